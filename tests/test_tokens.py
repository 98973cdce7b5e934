"""The ledger's own doors: hashed and validated API tokens, no silently regenerated signing key,
a log head that only grows, and append-only triggers the run-time role cannot remove."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlmodel import SQLModel

from services.ledger.auth import TokenFileError, dev_tokens_path, load_tokens, token_digest, write_dev_tokens
from services.ledger.log import LOG_TABLES, install_append_only_guards, runtime_grants
from services.ledger.main import LedgerConfigError, create_app
from shared.runtime.settings import Settings
from tools.devkeys import generate_dev_registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate_dev_registry(directory)
    return directory


def settings(keys: Path, tmp_path: Path, **changes: Any) -> Settings:
    from shared.contract.parties import write_private_key

    key = keys / "ledger.key"
    if not key.exists():
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        write_private_key(key, Ed25519PrivateKey.generate())
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
        "party_registry": keys / "registry.json",
        "ledger_signing_key": key,
        "api_tokens": keys / "tokens.json",
        "var_dir": tmp_path / "var",
        "kafka_bootstrap_servers": "127.0.0.1:9",  # never contacted: consume=False
        **changes,
    }
    return Settings(**values)


def test_tokens_file_holds_only_digests(keys: Path) -> None:
    issued = write_dev_tokens(keys / "tokens.json", ["kakao"])
    stored = (keys / "tokens.json").read_text()
    for token in issued.values():
        assert token not in stored
    entries = json.loads(stored)["tokens"]
    assert all("token" not in t and len(bytes.fromhex(t["token_sha256"])) == 32 for t in entries)
    # Re-running keeps the issued tokens (from the development file beside it).
    assert write_dev_tokens(keys / "tokens.json", ["kakao"]) == issued
    assert json.loads(dev_tokens_path(keys / "tokens.json").read_text()) == issued
    loaded = load_tokens(keys / "tokens.json")
    principal = loaded.find(issued["partner:kakao"])
    assert principal is not None and principal.role == "partner" and principal.party_id == "kakao"


def _write(keys: Path, *entries: dict[str, Any]) -> Path:
    path = keys / "tokens.json"
    path.write_text(json.dumps({"tokens": list(entries)}))
    return path


DIGEST = token_digest("gt_x").hex()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"name": "p", "role": "partner", "token_sha256": DIGEST}, "needs a party_id"),
        ({"name": "p", "role": "partner", "party_id": "nobody", "token_sha256": DIGEST}, "not in the party registry"),
        ({"name": "r", "role": "root", "token_sha256": DIGEST}, "unknown role"),
        ({"name": "a", "role": "auditor", "token": "gt_plain"}, "plain token"),
        ({"name": "a", "role": "auditor", "token_sha256": "abcd"}, "not a SHA-256"),
    ],
)
def test_a_bad_tokens_file_stops_the_ledger(keys: Path, tmp_path: Path, entry: dict[str, Any], why: str) -> None:
    _write(keys, entry)
    with pytest.raises(LedgerConfigError, match=why):
        create_app(settings(keys, tmp_path), consume=False)


def test_partner_token_without_registry_still_needs_a_party(keys: Path) -> None:
    path = _write(keys, {"name": "p", "role": "partner", "token_sha256": DIGEST})
    with pytest.raises(TokenFileError, match="needs a party_id"):
        load_tokens(path, None)


async def test_wrong_token_of_the_same_length_is_401(keys: Path, tmp_path: Path) -> None:
    issued = write_dev_tokens(keys / "tokens.json", ["kakao"])
    app = create_app(settings(keys, tmp_path), consume=False)
    right = issued["auditor"]
    wrong = right[:-1] + ("A" if right[-1] != "A" else "B")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ledger") as client:
        for token in (wrong, token_digest(right).hex(), issued["auditor"].upper()):
            r = await client.get("/v1/batches", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, token
    await app.state.service.engine.dispose()


def test_missing_signing_key_refuses_to_start(keys: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ledger.key"
    with pytest.raises(LedgerConfigError, match="gputrace keys init"):
        create_app(settings(keys, tmp_path, ledger_signing_key=missing), consume=False)
    assert not missing.exists()
    # And the real entry point says so and exits non-zero, before touching Kafka.
    env = {**os.environ, "LEDGER_SIGNING_KEY": str(missing), "API_TOKENS": str(keys / "tokens.json")}
    env["DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    env["PARTY_REGISTRY"] = str(keys / "registry.json")
    done = subprocess.run(
        [sys.executable, "-m", "services.ledger"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "gputrace keys init" in done.stderr
    assert not missing.exists()


# --- the log head only grows; the run-time role cannot remove the guards ---------------------------


async def _schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: SQLModel.metadata.create_all(sync, tables=LOG_TABLES))
        await install_append_only_guards(conn)
        await conn.execute(text("INSERT INTO log_head (id, size) VALUES (1, 5)"))


async def _refused(engine: AsyncEngine, sql: str, match: str) -> None:
    with pytest.raises(Exception, match=match):
        async with engine.begin() as conn:
            await conn.execute(text(sql))


async def _head_only_grows(engine: AsyncEngine) -> None:
    await _refused(engine, "UPDATE log_head SET size = 3 WHERE id = 1", "can only grow")
    await _refused(engine, "UPDATE log_head SET size = 0", "can only grow")
    await _refused(engine, "DELETE FROM log_head", "can only grow")
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE log_head SET size = 6 WHERE id = 1"))
        assert await conn.scalar(text("SELECT size FROM log_head")) == 6


async def test_head_only_grows_sqlite(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'head.db'}")
    await _schema(engine)
    await _head_only_grows(engine)
    await engine.dispose()


@pytest.fixture
async def ledger_db(postgres_url: str) -> AsyncIterator[Callable[[str], str]]:
    """A fresh database owned by a fresh owner role; yields url_as(role)."""
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    tag = uuid.uuid4().hex[:8]
    name, owner, runtime = f"gt_roles_{tag}", f"gt_owner_{tag}", f"gt_app_{tag}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{owner}" LOGIN')
        conn.execute(f'CREATE ROLE "{runtime}" LOGIN')
        conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
    base = postgres_url.rsplit("/", 1)[0].split("://", 1)[1].split("@", 1)[1]

    def url_as(role: str) -> str:
        return f"postgresql+psycopg://{owner if role == 'owner' else runtime}@{base}/{name}"

    yield url_as
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'DROP ROLE IF EXISTS "{runtime}"')
        conn.execute(f'DROP ROLE IF EXISTS "{owner}"')


async def test_runtime_role_cannot_remove_the_guards(ledger_db: Callable[[str], str]) -> None:
    owner = create_async_engine(ledger_db("owner"))
    await _schema(owner)
    runtime_name = ledger_db("runtime").split("://", 1)[1].split("@", 1)[0]
    async with owner.begin() as conn:
        for sql in runtime_grants(runtime_name):
            await conn.execute(text(sql))
    await owner.dispose()
    app = create_async_engine(ledger_db("runtime"))
    for sql in (
        "ALTER TABLE log_entries DISABLE TRIGGER log_entries_append_only",
        "ALTER TABLE log_entries DISABLE TRIGGER ALL",
        "DROP TRIGGER log_entries_append_only ON log_entries",
        "DROP TRIGGER log_head_grows ON log_head",
        "DROP TABLE log_entries",
        "TRUNCATE log_entries",
        "SET session_replication_role = replica",
    ):
        await _refused(app, sql, "permission denied|must be owner")
    # The service's start-up check passes (the owner installed the guards) and changes nothing.
    async with app.begin() as conn:
        await install_append_only_guards(conn)
    # Appends still work; rewriting does not.
    async with app.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO log_entries (leaf_index, decision_id, entry, leaf_hash, service, event_type, status, "
                "appended_at) VALUES (0, 'd0', '{}', '\\x00', 'quotes', 't', 'accepted', now())"
            )
        )
    await _refused(app, "UPDATE log_entries SET status = 'rejected'", "append-only")
    await _refused(app, "DELETE FROM log_entries", "append-only")
    await _head_only_grows(app)
    await app.dispose()


async def test_head_only_grows_postgres(ledger_db: Callable[[str], str]) -> None:
    engine = create_async_engine(ledger_db("owner"))
    await _schema(engine)
    await _head_only_grows(engine)
    await engine.dispose()
