"""Witnessed checkpoints (C2SP tlog-witness / tlog-cosignature), over real HTTP on real PostgreSQL.

A witness service (its own key, its own database) and ledgers that ask it to cosign: a log that
grows normally is cosigned and `gputrace audit verify --witness` passes; a FORK (a second log under
the same key and origin, with other entries: two different checkpoints of one size, then one that
does not extend the first) is refused by the witness and recorded, and the auditor shown it exits
with the no-quorum code; a stale or replayed submission gets 409 with the witness's size; a
checkpoint signed by the wrong key gets 403.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from gputrace_verifier import merkle
from gputrace_verifier.audit import Exit
from gputrace_verifier.checkpoint import Checkpoint, sign_checkpoint
from gputrace_verifier.cosignature import (
    cosign,
    cosigner_key_id,
    format_add_checkpoint,
    make_witness_vkey,
    parse_witness_vkey,
    verify_cosignatures,
)
from prometheus_client import REGISTRY
from sqlmodel import select
from typer.testing import CliRunner

from services.ledger.appender import _WRITER as APPENDER_WRITER
from services.ledger.appender import Appender
from services.ledger.log import LogCosignature, LogWriter
from services.ledger.main import create_app as create_ledger
from services.ledger.witnessing import Witnesser
from services.witness.main import WitnessedLog, WitnessRefusal
from services.witness.main import create_app as create_witness
from shared.contract.parties import load_private_key, write_private_key
from shared.runtime.db import make_engine, session_factory
from shared.runtime.settings import Settings, WitnessEndpoint
from tests.test_audit_cli import assert_exit, audit
from tests.test_log_api import (
    ORIGIN,
    Keys,
    LedgerDB,
    ServerThread,
    fake_decision,
    ledger_settings,
    libpq,
    make_keys,
    run_async,
)
from tools.cli import app as gputrace_app
from tools.devstack import free_port
from tools.witness_keys import witness_env

WITNESS_NAME = "witness.test.gputrace.example/w1"


@dataclass
class WitnessServer:
    server: ServerThread
    vkey: str
    db_url: str

    @property
    def url(self) -> str:
        return self.server.url

    def rows(self, model: type) -> list:  # type: ignore[type-arg]
        async def read() -> list:  # type: ignore[type-arg]
            engine = make_engine(self.db_url)
            try:
                async with session_factory(engine)() as session:
                    return list((await session.exec(select(model))).all())
            finally:
                await engine.dispose()

        return run_async(read())


@dataclass
class WitnessedLedger:
    db: LedgerDB
    server: ServerThread
    keys: Keys
    endpoints: list[WitnessEndpoint]

    def witness_round(self) -> None:
        """One round of the ledger's background witnessing task (the same code, on its own loop)."""

        async def go() -> None:
            engine = make_engine(self.db.url)
            witnesser = Witnesser(self.endpoints)
            witnesser.bind(session_factory(engine))
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    await witnesser.round(http)
            finally:
                await engine.dispose()

        run_async(go())

    def note(self, size: int | None = None) -> str:
        path = "/v1/log/checkpoint" if size is None else f"/v1/log/checkpoints/{size}"
        response = httpx.get(self.server.url + path, headers=self.keys.headers(), timeout=10)
        assert response.status_code == 200, response.text
        return response.text


def _database(admin: str, prefix: str) -> str:
    name = f"{prefix}_{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:10]}"
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return libpq(admin).rpartition("/")[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("witness_keys"))


@pytest.fixture
def witness(postgres_url: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WitnessServer]:
    """A fresh witness per test (its own database): every ledger here shares one origin and key."""
    workdir = tmp_path_factory.mktemp("witness")
    key = Ed25519PrivateKey.generate()
    write_private_key(workdir / "witness.key", key)
    # The log's key as an operator would hand it over: a file holding the vkey.
    (workdir / "ledger.vkey").write_text(keys.vkey + "\n")
    settings = Settings(
        database_url=_database(postgres_url, "gt_witness"),
        witness_name=WITNESS_NAME,
        witness_signing_key=workdir / "witness.key",
        witness_logs=[str(workdir / "ledger.vkey")],
        var_dir=workdir / "var",
    )
    app = create_witness(settings)

    async def init() -> None:  # the lifespan's work, done here: the test server runs without one
        await app.state.witness.init_db()
        await app.state.witness.engine.dispose()

    run_async(init())
    server = ServerThread(app, app.state.witness.engine).start()
    yield WitnessServer(server, make_witness_vkey(WITNESS_NAME, key.public_key()), settings.database_url or "")
    server.stop()


MakeLedger = Callable[[str], "WitnessedLedger"]


@pytest.fixture
def make_ledger(
    postgres_url: str, keys: Keys, witness: WitnessServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MakeLedger]:
    made: list[WitnessedLedger] = []

    def make(tag: str) -> WitnessedLedger:
        db = LedgerDB(postgres_url, keys, tag)
        endpoints = [WitnessEndpoint(url=witness.url, vkey=witness.vkey)]
        settings = ledger_settings(db, tmp_path_factory.mktemp(f"ledger{tag}")).model_copy(
            update={"witnesses": endpoints}
        )
        app = create_ledger(settings, consume=False)
        ledger = WitnessedLedger(db, ServerThread(app, app.state.service.engine).start(), keys, endpoints)
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        ledger.server.stop()
        ledger.db.drop()


def verify(ledger: WitnessedLedger, state: Path, *args: str):  # type: ignore[no-untyped-def]
    return audit(ledger.server.url, state, "verify", *args, key=ledger.keys.vkey, token=ledger.keys.tokens["auditor"])


def failures_count() -> float:
    return REGISTRY.get_sample_value("gputrace_witness_failures_total", {"witness": WITNESS_NAME}) or 0.0


def post(witness: WitnessServer, old: int, proof: list[bytes], note: str) -> httpx.Response:
    return httpx.post(f"{witness.url}/add-checkpoint", content=format_add_checkpoint(old, proof, note), timeout=10)


# ------------------------------------------------------------------------------------------------


def test_a_growing_log_is_cosigned_and_the_auditor_requires_the_quorum(
    make_ledger: MakeLedger,
    witness: WitnessServer,
    tmp_path: Path,
) -> None:
    ledger = make_ledger("a")
    ledger.db.append([3, 5])
    ledger.witness_round()
    note = ledger.note()
    assert [c.name for c in verify_cosignatures(note, [witness.vkey])] == [WITNESS_NAME]
    assert note.startswith(f"{ORIGIN}\n8\n")
    state = tmp_path / "audit.json"
    assert_exit(verify(ledger, state, "--witness", witness.vkey), Exit.OK, "size 8", "witnessed: 1 cosignature(s)")

    # It grows: the ledger sends the consistency proof 8 -> 12 and gets the new size cosigned.
    ledger.db.append([4])
    ledger.witness_round()
    assert_exit(verify(ledger, state, "--witness", witness.vkey, "--witness-quorum", "1"), Exit.OK, "size 12")
    assert [(r.size, r.origin) for r in witness.rows(WitnessedLog)] == [(12, ORIGIN)]
    # The witness serves what it cosigned to monitors, by the hash of the origin (tlog-witness).
    served = httpx.get(f"{witness.url}/{hashlib.sha256(ORIGIN.encode()).hexdigest()}/checkpoint", timeout=10)
    assert served.status_code == 200 and verify_cosignatures(served.text, [witness.vkey])

    # A witness the checkpoint lacks: no quorum, its own exit code, whatever else verifies.
    other = make_witness_vkey("witness.test.gputrace.example/w2", Ed25519PrivateKey.generate().public_key())
    missing = verify(ledger, tmp_path / "fresh.json", "--witness", witness.vkey, "--witness", other)
    assert_exit(missing, Exit.WITNESS, "no witness quorum: 1 of the required 2", "w2")
    assert_exit(
        verify(ledger, tmp_path / "fresh.json", "--witness", witness.vkey, "--witness", other, "--witness-quorum", "1"),
        Exit.OK,
    )


def test_a_fork_is_refused_by_the_witness_and_fails_the_audit(
    make_ledger: MakeLedger,
    witness: WitnessServer,
    tmp_path: Path,
) -> None:
    honest = make_ledger("h")
    honest.db.append([6, 4])
    honest.witness_round()
    assert verify_cosignatures(honest.note(), [witness.vkey])

    # The same key and origin, other entries: a second checkpoint of size 10, signed by the log.
    fork = make_ledger("f")
    fork.db.append([10])
    refusals_before = len(witness.rows(WitnessRefusal))
    failures = failures_count()
    fork.witness_round()  # old 0 -> 409 "10" -> old 10, same size, other root -> 422
    assert failures_count() == failures + 1
    assert verify_cosignatures(fork.note(), [witness.vkey]) == []
    refused = witness.rows(WitnessRefusal)[refusals_before:]
    assert [(r.status, r.size) for r in refused] == [(409, 10), (422, 10)]
    assert "fork" in refused[-1].reason and refused[-1].note == fork.note()  # kept as evidence

    fresh = tmp_path / "fresh.json"  # an auditor who never saw the honest log
    assert_exit(verify(fork, fresh, "--witness", witness.vkey), Exit.WITNESS, "no witness quorum")
    assert_exit(verify(fork, tmp_path / "no-witness.json"), Exit.OK)  # without witnesses it would pass

    # The fork grows past the witnessed size: its proof 10 -> 13 does not lead from what the
    # witness saw, so it is refused too (this is the consistency check at work).
    fork.db.append([3])
    fork.witness_round()
    assert verify_cosignatures(fork.note(), [witness.vkey]) == []
    assert witness.rows(WitnessRefusal)[-1].status == 422
    assert "consistency proof 10->13 does not verify" in witness.rows(WitnessRefusal)[-1].reason
    assert_exit(verify(fork, fresh, "--witness", witness.vkey), Exit.WITNESS, "no witness quorum")

    # The honest log still extends what the witness saw, and is still cosigned.
    honest.db.append([5])
    honest.witness_round()
    assert_exit(verify(honest, tmp_path / "honest.json", "--witness", witness.vkey), Exit.OK, "size 15")


def test_stale_replayed_and_wrongly_signed_submissions_are_refused(
    make_ledger: MakeLedger,
    witness: WitnessServer,
) -> None:
    # A log of its own origin would be unknown to the witness; this one shares the witnessed origin.
    ledger = make_ledger("s")
    ledger.db.append([2, 2])
    ledger.witness_round()
    witnessed = max(r.size for r in witness.rows(WitnessedLog))
    first_note = ledger.note(2)  # as served: the witness ignores signatures by keys it does not know

    # Replayed / stale: the old size is not the witness's current size.
    stale = post(witness, 0, [], first_note)
    assert stale.status_code == 409
    assert stale.headers["content-type"].startswith("text/x.tlog.size")
    assert stale.text == f"{witnessed}\n"

    # Signed by another key under the log's name: 403. An unknown origin: 404. Garbage: 400.
    cp = Checkpoint(origin=ORIGIN, size=witnessed, root_hash=merkle.EMPTY_ROOT)
    assert post(witness, witnessed, [], sign_checkpoint(cp, ORIGIN, Ed25519PrivateKey.generate())).status_code == 403
    stranger = Checkpoint(origin="elsewhere.example/log", size=1, root_hash=merkle.leaf_hash(b"x"))
    other_key = Ed25519PrivateKey.generate()
    assert post(witness, 0, [], sign_checkpoint(stranger, "elsewhere.example/log", other_key)).status_code == 404
    assert httpx.post(f"{witness.url}/add-checkpoint", content=b"old 01\n\n", timeout=10).status_code == 400
    # The old size beyond the checkpoint's: 400; a proof with old size 0: 422 (tlog-witness).
    assert post(witness, 5, [], first_note).status_code == 400
    not_empty = Checkpoint(origin=ORIGIN, size=0, root_hash=merkle.leaf_hash(b"not empty"))
    assert post(witness, 0, [], sign_checkpoint(not_empty, ORIGIN, ledger.keys.private)).status_code == 422
    # None of these moved the witness.
    assert [r.size for r in witness.rows(WitnessedLog)] == [witnessed]


def test_the_ledger_keeps_only_cosignatures_that_verify_with_the_witness_s_key(
    make_ledger: MakeLedger,
    witness: WitnessServer,
) -> None:
    """Something at the witness's URL answers with a line that claims the witness's key id but is
    signed by another key: the ledger stores nothing and counts a failure."""
    impostor = Ed25519PrivateKey.generate()
    real_key_id = cosigner_key_id(*parse_witness_vkey(witness.vkey))
    fake = FastAPI()

    @fake.post("/add-checkpoint")
    async def add_checkpoint(request: Request) -> PlainTextResponse:
        note = (await request.body()).decode().split("\n\n", 1)[1]
        line = cosign(note.split("\n\n")[0] + "\n", WITNESS_NAME, impostor, int(time.time()))
        blob = base64.b64decode(line.rstrip("\n").rsplit(" ", 1)[1])
        return PlainTextResponse(f"\u2014 {WITNESS_NAME} {base64.b64encode(real_key_id + blob[4:]).decode()}\n")

    server = ServerThread(fake).start()
    try:
        ledger = make_ledger("i")
        ledger.db.append([2])
        ledger.endpoints = [WitnessEndpoint(url=server.url, vkey=witness.vkey)]
        before = failures_count()
        ledger.witness_round()
        assert failures_count() == before + 1
        assert verify_cosignatures(ledger.note(), [witness.vkey]) == []
    finally:
        server.stop()


def test_the_background_task_cosigns_each_checkpoint_when_its_batch_commits(
    make_ledger: MakeLedger,
    witness: WitnessServer,
) -> None:
    """The ledger's wiring: the task runs in the app's lifespan (Witnesser.attach) and the
    appender wakes it when a batch that signed a checkpoint commits. It polls only every minute
    here, so a cosignature within seconds means the wake-up worked."""
    ledger = make_ledger("b")

    async def go() -> list[int]:
        engine = make_engine(ledger.db.url)
        sessions = session_factory(engine)
        witnesser = Witnesser(ledger.endpoints, poll_seconds=60)
        app = FastAPI()
        witnesser.attach(app, sessions)
        appender = Appender(ORIGIN, ledger.keys.private)
        appender.on_checkpoint = witnesser.wake
        try:
            async with app.router.lifespan_context(app):
                await asyncio.sleep(0.5)  # the task's first round: nothing to witness yet
                async with sessions() as session, session.begin():
                    writer = session.info[APPENDER_WRITER] = await LogWriter.open(session)
                    for i in range(3):
                        d = fake_decision(i, "b")
                        writer.append(d, service=d["service"], event_type=d["event_type"], status=d["status"])
                    await appender.after_batch(session)  # signs the checkpoint; wakes after commit
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    async with sessions() as session:
                        sizes = list((await session.exec(select(LogCosignature.size))).all())
                    if sizes:
                        return sizes
                    await asyncio.sleep(0.1)
                return []
        finally:
            await engine.dispose()

    assert run_async(go()) == [3]
    assert verify_cosignatures(ledger.note(), [witness.vkey])


def test_keys_init_and_the_witness_process(tmp_path: Path) -> None:
    """`gputrace keys init` writes the witness's key and the published vkeys; `python -m
    services.witness` (embedded SQLite) starts from them and cosigns a checkpoint of that ledger."""
    keys_dir = tmp_path / "keys"
    done = CliRunner().invoke(gputrace_app, ["keys", "init", "--directory", str(keys_dir)])
    assert done.exit_code == 0, done.output
    witness_vkey = (keys_dir / "witness.vkey").read_text().strip()
    port = free_port()
    env = {
        **os.environ,
        "VAR_DIR": str(tmp_path / "var"),
        "HTTP_PORT": str(port),
        "LOG_JSON": "false",
        **witness_env(keys_dir, port),
    }
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.witness"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/public-key", timeout=5).json()["vkey"] == witness_vkey
        origin = Settings().ledger_origin
        cp = Checkpoint(origin=origin, size=1, root_hash=merkle.leaf_hash(b"entry"))
        note = sign_checkpoint(cp, origin, load_private_key(keys_dir / "ledger.key"))
        answer = httpx.post(f"http://127.0.0.1:{port}/add-checkpoint", content=format_add_checkpoint(0, [], note))
        assert answer.status_code == 200, answer.text
        assert verify_cosignatures(note + answer.text, [witness_vkey])
    finally:
        proc.terminate()
        proc.wait(15)
