"""The ledger's log API (/v1/log) against real PostgreSQL and real HTTP (uvicorn on a local port).

Every proof and checkpoint the server hands out is checked with the pure verifiers in
gputrace_verifier.merkle / .checkpoint, for many tree sizes, never by comparing with the server's
own computations. The helpers here (a throwaway ledger database, a server thread) are also
used by tests/test_audit_cli.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import make_vkey, parse_and_verify
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.ledger.auth import write_dev_tokens
from services.ledger.log import APPEND_ONLY, LOG_TABLES, LogWriter, install_append_only_guards
from services.ledger.log_api import MAX_ENTRIES
from services.ledger.main import create_app
from services.ledger.projections import PROJECTION_TABLES
from shared.contract.cloudevents import canonical_json
from shared.contract.parties import public_key_b64, write_private_key
from shared.runtime.db import create_tables, make_engine, session_factory
from shared.runtime.settings import Settings
from tools.devkeys import generate_dev_registry

ORIGIN = "test.gputrace.example/ledger"
BATCHES = (1, 2, 5, 13, 29, 50, 100, 100)  # 300 entries; a checkpoint signed after each batch

# --------------------------------------------------------------------------- helpers (shared)


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on a private loop, leaving the thread's event loop (pytest-asyncio's) alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def libpq(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def fake_decision(i: int, tag: str = "") -> dict[str, Any]:
    """A decision-shaped entry; floats and non-ASCII text exercise RFC 8785 and UTF-8 end to end."""
    rejected = i % 5 == 0
    return {
        "decision_id": f"{tag}d-{i:06d}",
        "service": "pledges",
        "event_type": "gputrace.pledge.submitted.v1",
        "status": "rejected" if rejected else "accepted",
        "reason_code": "LIMIT_EXCEEDED" if rejected else None,
        "message": f"{tag}décision nº{i} ✓",
        "batch_id": f"batch-{i % 7}",
        "party_id": f"partner-{i % 3}",
        "decided_at": f"2026-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z",
        "facts": {"gpus": i, "price_eur": i * 1.25, "ratio": 1 / (i + 3)},
    }


@dataclass
class Keys:
    directory: Path
    private: Ed25519PrivateKey
    key_path: Path
    tokens_path: Path
    tokens: dict[str, str]

    @property
    def vkey(self) -> str:
        return make_vkey(ORIGIN, self.private.public_key())

    def headers(self, who: str = "auditor") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path = directory / "ledger.key"
    write_private_key(key_path, private)
    tokens_path = directory / "tokens.json"
    # The ledger reads the services' keys (and checks partner tokens) in the party registry.
    registry = generate_dev_registry(directory)
    doc = json.loads(registry.read_text())
    partner = {"id": "partner-0", "roles": ["partner"], "public_key": public_key_b64(private.public_key())}
    registry.write_text(json.dumps({"parties": [*doc["parties"], partner]}))
    tokens = write_dev_tokens(tokens_path, ["partner-0"])
    return Keys(directory, private, key_path, tokens_path, tokens)


class LedgerDB:
    """A fresh ledger database (log and projection tables), its log filled through the real LogWriter."""

    def __init__(self, admin_url: str, keys: Keys, tag: str = "") -> None:
        self.admin = libpq(admin_url)
        self.name = f"gt_log_{uuid.uuid4().hex[:10]}"
        self.keys = keys
        self.tag = tag
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base, _, _ = self.admin.rpartition("/")
        self.libpq_url = f"{base}/{self.name}"
        self.url = self.libpq_url.replace("postgresql://", "postgresql+psycopg://", 1)
        self.size = 0
        self.signed_sizes: list[int] = []
        run_async(self._create())

    async def _create(self) -> None:
        engine = make_engine(self.url)
        try:
            await create_tables(engine, [*LOG_TABLES, *PROJECTION_TABLES])  # type: ignore[list-item]
            async with engine.begin() as conn:
                await install_append_only_guards(conn)
        finally:
            await engine.dispose()

    def append(self, batches: tuple[int, ...] | list[int]) -> int:
        """Append `fake_decision`s in transactions of the given sizes, each signing a checkpoint."""
        run_async(self._append(list(batches)))
        return self.size

    async def _append(self, batches: list[int]) -> None:
        engine = make_engine(self.url)
        try:
            sessions = session_factory(engine)
            for count in batches:
                async with sessions() as session, session.begin():
                    writer = await LogWriter.open(session)
                    for i in range(writer.size, writer.size + count):
                        d = fake_decision(i, self.tag)
                        writer.append(
                            d, service=d["service"], event_type=d["event_type"], status=d["status"],
                            batch_id=d["batch_id"], party_id=d["party_id"],
                        )  # fmt: skip
                    await writer.finish(ORIGIN, ORIGIN, self.keys.private)
                    self.size = writer.size
                self.signed_sizes.append(self.size)
        finally:
            await engine.dispose()

    def tamper(self, sql: str, params: dict[str, Any] | None = None) -> int:
        """Rewrite stored rows as an attacker with the table owner's rights would: switch the
        append-only triggers off, rewrite, switch them back on (the guards stop bugs, not owners;
        the Merkle log is what catches an owner)."""
        with psycopg.connect(self.libpq_url) as conn:
            for table in APPEND_ONLY:
                conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
            changed = conn.execute(sql, params or {}).rowcount
            for table in APPEND_ONLY:
                for trigger in (f"{table}_append_only", f"{table}_no_truncate"):
                    conn.execute(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}")
            return changed

    def drop(self) -> None:
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class _Server(uvicorn.Server):
    """uvicorn without the app's lifespan (which needs Kafka); disposes the app's engine on exit
    from the server's own loop, where its connections live."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine | None) -> None:
        super().__init__(config)
        self._engine = engine

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self._engine is not None:
            await self._engine.dispose()


class ServerThread:
    """Serves an ASGI app over real HTTP on 127.0.0.1 from a background thread."""

    def __init__(self, app: FastAPI, engine: AsyncEngine | None = None) -> None:
        # Bind first and hand uvicorn the socket: no window for another process to take the port.
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets of that
        # proto, and without it every response waits ~40 ms for a delayed ACK (Nagle).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
        self._server = _Server(config, engine)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(15)
        self._sock.close()


def ledger_settings(db: LedgerDB, workdir: Path) -> Settings:
    return Settings(
        database_url=db.url,
        ledger_signing_key=db.keys.key_path,
        api_tokens=db.keys.tokens_path,
        party_registry=db.keys.directory / "registry.json",
        ledger_origin=ORIGIN,
        var_dir=workdir / "var",
        kafka_bootstrap_servers="127.0.0.1:9",  # never contacted: no lifespan, no consumer
    )


def serve_ledger(db: LedgerDB, workdir: Path) -> ServerThread:
    """The real ledger app (create_app, consume=False) over HTTP, on the given database."""
    app = create_app(ledger_settings(db, workdir), consume=False)
    return ServerThread(app, app.state.service.engine).start()


def b64d(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_admin(postgres_url: str) -> str:
    """Admin URL of the session's PostgreSQL (tests/conftest.py); each ledger gets its own database."""
    return postgres_url


@dataclass
class Ledger:
    db: LedgerDB
    server: ServerThread
    keys: Keys

    def client(self, who: str | None = "auditor") -> httpx.Client:
        headers = self.keys.headers(who) if who else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def ledger(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    workdir = tmp_path_factory.mktemp("log_api")
    keys = make_keys(workdir / "keys")
    db = LedgerDB(pg_admin, keys)
    db.append(BATCHES)
    server = serve_ledger(db, workdir)
    try:
        yield Ledger(db, server, keys)
    finally:
        server.stop()
        db.drop()


@pytest.fixture(scope="module")
def api(ledger: Ledger) -> Iterator[httpx.Client]:
    with ledger.client("auditor") as client:
        yield client


@pytest.fixture(scope="module")
def leaves(api: httpx.Client, ledger: Ledger) -> list[bytes]:
    """Leaf hashes recomputed by us from the served entry bytes."""
    out: list[bytes] = []
    for start in range(0, ledger.db.size, 128):
        page = api.get("/v1/log/entries", params={"start": start, "end": min(start + 128, ledger.db.size)})
        assert page.status_code == 200, page.text
        out.extend(merkle.leaf_hash(item["entry"].encode("utf-8")) for item in page.json())
    return out


def root_of(leaves: list[bytes], size: int) -> bytes:
    frontier = merkle.Frontier()
    frontier.extend(leaves[:size])
    return frontier.root()


# --------------------------------------------------------------------------- checkpoints and key


def test_latest_checkpoint_is_a_signed_note_for_the_whole_log(api: httpx.Client, ledger: Ledger) -> None:
    response = api.get("/v1/log/checkpoint")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    cp = parse_and_verify(response.text, ledger.keys.vkey, expected_origin=ORIGIN)
    assert cp.size == 300

    doc = api.get("/v1/log/checkpoint", params={"format": "json"}).json()
    assert doc["size"] == 300
    assert b64d(doc["root_hash"]) == cp.root_hash
    assert doc["note"] == response.text


def test_every_signed_checkpoint_is_served_and_matches_the_entries(
    api: httpx.Client, ledger: Ledger, leaves: list[bytes]
) -> None:
    assert ledger.db.signed_sizes == [1, 3, 8, 21, 50, 100, 200, 300]
    for size in ledger.db.signed_sizes:
        response = api.get(f"/v1/log/checkpoints/{size}")
        assert response.status_code == 200, size
        cp = parse_and_verify(response.text, ledger.keys.vkey, expected_origin=ORIGIN)
        assert cp.size == size
        assert cp.root_hash == root_of(leaves, size), f"root at size {size}"
        assert api.get(f"/v1/log/checkpoints/{size}", params={"format": "json"}).json()["size"] == size
    missing = api.get("/v1/log/checkpoints/7")
    assert missing.status_code == 404
    assert "size 7" in missing.json()["detail"]


def test_public_key_is_public_and_matches_the_signing_key(ledger: Ledger) -> None:
    with ledger.client(None) as anonymous:
        doc = anonymous.get("/v1/log/public-key").json()
    assert doc["origin"] == ORIGIN
    assert doc["key_name"] == ORIGIN
    assert doc["vkey"] == ledger.keys.vkey
    assert b64d(doc["public_key"]) == ledger.keys.private.public_key().public_bytes_raw()


# --------------------------------------------------------------------------- entries


def test_entries_are_the_canonical_bytes_that_were_hashed(api: httpx.Client, leaves: list[bytes]) -> None:
    page = api.get("/v1/log/entries", params={"start": 10, "end": 20}).json()
    assert [item["leaf_index"] for item in page] == list(range(10, 20))
    for item in page:
        data = item["entry"].encode("utf-8")
        assert data == canonical_json(fake_decision(item["leaf_index"]))
        assert b64d(item["leaf_hash"]) == merkle.leaf_hash(data) == leaves[item["leaf_index"]]
    assert len(leaves) == 300


def test_entries_default_end_and_limits(api: httpx.Client) -> None:
    page = api.get("/v1/log/entries", params={"start": 250}).json()
    assert [item["leaf_index"] for item in page] == list(range(250, 300))
    cases = {
        (("start", -1), ("end", 5)): 400,
        (("start", 5), ("end", 5)): 400,
        (("start", 9), ("end", 3)): 400,
        (("start", 0), ("end", MAX_ENTRIES + 1)): 400,
        (("start", 0), ("end", 301)): 416,
        (("start", 300),): 416,
    }
    for params, status in cases.items():
        response = api.get("/v1/log/entries", params=dict(params))
        assert response.status_code == status, (params, response.text)
        assert response.json()["detail"]
    assert "beyond the current log size 300" in api.get("/v1/log/entries", params={"start": 0, "end": 301}).text


# --------------------------------------------------------------------------- proofs

SIZES = (1, 2, 3, 7, 8, 21, 64, 100, 129, 200, 255, 256, 257, 299, 300)


def test_inclusion_proofs_verify_for_many_sizes(api: httpx.Client, leaves: list[bytes]) -> None:
    for size in SIZES:
        root = root_of(leaves, size)
        for index in sorted({0, size // 2, size - 1, (size * 7) // 11}):
            doc = api.get("/v1/log/proof/inclusion", params={"leaf_index": index, "tree_size": size}).json()
            assert (doc["leaf_index"], doc["tree_size"]) == (index, size)
            proof = [b64d(p) for p in doc["proof"]]
            assert merkle.verify_inclusion(leaves[index], index, size, proof, root), (index, size)


def test_inclusion_proof_by_leaf_hash_and_default_size(api: httpx.Client, leaves: list[bytes]) -> None:
    doc = api.get("/v1/log/proof/inclusion", params={"leaf_hash": base64.b64encode(leaves[123]).decode()}).json()
    assert (doc["leaf_index"], doc["tree_size"]) == (123, 300)
    assert merkle.verify_inclusion(leaves[123], 123, 300, [b64d(p) for p in doc["proof"]], root_of(leaves, 300))
    # A leaf that exists, but not yet in the smaller tree asked for.
    late = api.get("/v1/log/proof/inclusion", params={"leaf_hash": base64.b64encode(leaves[250]).decode(),
                                                      "tree_size": 200})  # fmt: skip
    assert late.status_code == 404


def test_inclusion_proof_rejects_bad_requests(api: httpx.Client) -> None:
    cases = [
        ({"leaf_index": 0, "tree_size": 301}, 416),
        ({"leaf_index": 5, "tree_size": 5}, 400),
        ({"leaf_index": -1, "tree_size": 5}, 400),
        ({"leaf_index": 0, "tree_size": 0}, 400),
        ({"tree_size": 5}, 400),
        ({"leaf_index": 1, "leaf_hash": base64.b64encode(b"x" * 32).decode()}, 400),
        ({"leaf_hash": "not base64!"}, 400),
        ({"leaf_hash": base64.b64encode(b"short").decode()}, 400),
        ({"leaf_hash": base64.b64encode(b"\x00" * 32).decode()}, 404),
    ]
    for params, status in cases:
        response = api.get("/v1/log/proof/inclusion", params=params)
        assert response.status_code == status, (params, response.text)


def test_consistency_proofs_verify_for_many_size_pairs(api: httpx.Client, leaves: list[bytes]) -> None:
    pairs = [(a, b) for a in SIZES for b in SIZES if a <= b] + [(0, 300)]
    for first, second in pairs:
        doc = api.get("/v1/log/proof/consistency", params={"first": first, "second": second}).json()
        assert (doc["first"], doc["second"]) == (first, second)
        proof = [b64d(p) for p in doc["proof"]]
        first_root = root_of(leaves, first)
        assert merkle.verify_consistency(first, second, first_root, root_of(leaves, second), proof), (first, second)
    default = api.get("/v1/log/proof/consistency", params={"first": 100}).json()
    assert default["second"] == 300


def test_consistency_proof_rejects_bad_requests(api: httpx.Client) -> None:
    for params, status in [
        ({"first": 10, "second": 5}, 400),
        ({"first": -1, "second": 5}, 400),
        ({"first": 10, "second": 301}, 416),
    ]:
        response = api.get("/v1/log/proof/consistency", params=params)
        assert response.status_code == status, (params, response.text)


# --------------------------------------------------------------------------- auth

PROTECTED = [
    ("/v1/log/checkpoint", {}),
    ("/v1/log/checkpoints/300", {}),
    ("/v1/log/entries", {"start": 0, "end": 2}),
    ("/v1/log/proof/inclusion", {"leaf_index": 0, "tree_size": 2}),
    ("/v1/log/proof/consistency", {"first": 1, "second": 2}),
]


def test_log_is_for_auditors_and_ops_only(ledger: Ledger) -> None:
    with (
        ledger.client(None) as anonymous,
        ledger.client("partner:partner-0") as partner,
        ledger.client("ops") as ops,
        ledger.client("auditor") as auditor,
        httpx.Client(base_url=ledger.server.url, headers={"Authorization": "Bearer nope"}) as forged,
    ):
        for path, params in PROTECTED:
            assert anonymous.get(path, params=params).status_code == 401, path
            assert forged.get(path, params=params).status_code == 401, path
            assert partner.get(path, params=params).status_code == 403, path
            assert ops.get(path, params=params).status_code == 200, path
            assert auditor.get(path, params=params).status_code == 200, path


# --------------------------------------------------------------------------- the database refuses rewrites


def test_the_database_refuses_update_delete_and_truncate_of_the_log(ledger: Ledger) -> None:
    statements = {
        "log_entries": ["UPDATE log_entries SET entry = '{}' WHERE leaf_index = 3",
                        "DELETE FROM log_entries WHERE leaf_index = 3"],
        "log_nodes": ["UPDATE log_nodes SET hash = '\\x00'::bytea WHERE level = 0 AND idx = 3",
                      "DELETE FROM log_nodes WHERE level = 0 AND idx = 3"],
        "log_checkpoints": ["UPDATE log_checkpoints SET note = 'x' WHERE size = 300",
                            "DELETE FROM log_checkpoints WHERE size = 300"],
    }  # fmt: skip

    async def attempt(sql: str) -> str:
        engine = make_engine(ledger.db.url)
        try:
            async with engine.connect() as conn:  # an ordinary connection: no replica role, triggers fire
                try:
                    await conn.execute(text(sql))
                    await conn.commit()
                except Exception as e:  # the trigger's exception, wrapped by SQLAlchemy
                    await conn.rollback()
                    return str(e)
                return "accepted"
        finally:
            await engine.dispose()

    for table, sqls in statements.items():
        for sql in [*sqls, f"TRUNCATE {table}"]:
            outcome = run_async(attempt(sql))
            assert f"ledger table {table} is append-only" in outcome, (sql, outcome)
    with psycopg.connect(ledger.db.libpq_url) as conn:
        assert conn.execute("SELECT count(*) FROM log_entries").fetchone() == (300,)
    # Replica mode, which silences ordinary triggers, does not silence these.
    with psycopg.connect(ledger.db.libpq_url, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM log_entries WHERE leaf_index = 3")


def test_an_empty_log_has_no_checkpoint(pg_admin: str, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    db = LedgerDB(pg_admin, keys)
    server = serve_ledger(db, tmp_path)
    try:
        with httpx.Client(base_url=server.url, headers=keys.headers()) as client:
            response = client.get("/v1/log/checkpoint")
            assert response.status_code == 404
            assert "not signed a checkpoint yet" in response.json()["detail"]
            assert client.get("/v1/log/entries", params={"start": 0}).status_code == 416
            assert client.get("/v1/log/proof/consistency", params={"first": 0}).json()["proof"] == []
    finally:
        server.stop()
        db.drop()
