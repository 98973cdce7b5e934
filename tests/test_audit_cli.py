"""`gputrace audit` against the real ledger app over real HTTP, on real PostgreSQL.

The tamper tests change stored rows the way an insider with database access would (bypassing
the append-only triggers as the superuser) and check that the auditor exits with the documented
code and names what failed: the leaf, the node, the proof, or the checkpoint.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, HTTPException
from gputrace_verifier import merkle
from gputrace_verifier.audit import Exit
from gputrace_verifier.checkpoint import Checkpoint, make_vkey, sign_checkpoint
from gputrace_verifier.cli import main as audit_main
from typer.testing import CliRunner

from services.ledger.log_api import log_router
from services.ledger.main import create_app
from tests.test_log_api import (
    BATCHES,
    ORIGIN,
    Keys,
    Ledger,
    LedgerDB,
    ServerThread,
    fake_decision,
    ledger_settings,
    make_keys,
    serve_ledger,
)
from tools.cli import app as gputrace_app

ROOT = Path(__file__).resolve().parents[1]
CLEAN_ENV = {"GPUTRACE_URL": None, "GPUTRACE_TOKEN": None, "GPUTRACE_LEDGER_VKEY": None, "COLUMNS": "200"}


@dataclass
class Result:
    """What the auditor saw: the exit code and stdout then stderr."""

    exit_code: int
    output: str


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pg_admin(postgres_url: str) -> str:
    return postgres_url


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("audit_keys"))


MakeLedger = Callable[..., Ledger]


@pytest.fixture
def make_ledger(pg_admin: str, keys: Keys, tmp_path: Path) -> Iterator[MakeLedger]:
    """Fresh ledgers (own database, own server) for tests that grow or damage them."""
    made: list[Ledger] = []

    def make(batches: tuple[int, ...] | list[int] = BATCHES, tag: str = "") -> Ledger:
        db = LedgerDB(pg_admin, keys, tag)
        if batches:
            db.append(batches)
        ledger = Ledger(db, serve_ledger(db, tmp_path / db.name), keys)
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        ledger.server.stop()
        ledger.db.drop()


@pytest.fixture(scope="module")
def stable(pg_admin: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """One untouched 300-entry ledger for the tests that only read."""
    db = LedgerDB(pg_admin, keys)
    db.append(BATCHES)
    server = serve_ledger(db, tmp_path_factory.mktemp("stable"))
    yield Ledger(db, server, keys)
    server.stop()
    db.drop()


def audit(
    url: str, state: Path, *args: str, key: str | None = None, token: str | None = None, **env: str | None
) -> Result:
    argv = ["--url", url, "--state", str(state)]
    if token:
        argv += ["--token", token]
    if key:
        argv += ["--key", key]
    # In process (the ledger server is a thread here); the environment as the command would see it.
    variables = {**CLEAN_ENV, **env}
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, {k: v for k, v in variables.items() if v is not None}),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        for name in [k for k, v in variables.items() if v is None]:
            os.environ.pop(name, None)
        code = audit_main([*argv, *args])
    return Result(code, out.getvalue() + err.getvalue())


def verify(ledger: Ledger, state: Path, *args: str, key: str | None = "default") -> Result:
    return audit(
        ledger.server.url,
        state,
        "verify",
        *args,
        key=ledger.keys.vkey if key == "default" else key,
        token=ledger.keys.tokens["auditor"],
    )


def assert_exit(result: Result, code: Exit, *fragments: str) -> None:
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {int(code)}:\n{result.output}"
    for fragment in fragments:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"


def trusted_size(state: Path) -> int:
    return int(json.loads(state.read_text())["logs"][ORIGIN]["size"])


def flip_first_byte(level: int, idx: int) -> tuple[str, dict[str, Any]]:
    # `#` is XOR in PostgreSQL: one bit of one stored hash changes.
    return (
        "UPDATE log_nodes SET hash = set_byte(hash, 0, get_byte(hash, 0) # 1) WHERE level = %(l)s AND idx = %(i)s",
        {"l": level, "i": idx},
    )


# --------------------------------------------------------------------------- verifying a healthy log


def test_verify_trusts_the_first_checkpoint_then_checks_each_extension(make_ledger: MakeLedger, tmp_path: Path) -> None:
    ledger = make_ledger()
    state = tmp_path / "state" / "audit.json"

    first = verify(ledger, state, "--page-size", "64")  # pages that straddle the signed sizes
    assert_exit(first, Exit.OK, f"OK {ORIGIN}: size 300", "first run", "300 entries re-hashed")
    saved = json.loads(state.read_text())["logs"][ORIGIN]
    assert saved["size"] == 300 and "\u2014 " + ORIGIN in saved["note"]

    ledger.db.append([57, 3])
    second = verify(ledger, state)
    assert_exit(second, Exit.OK, "size 360", "consistent with trusted size 300", "360 entries re-hashed")

    # --incremental downloads only what is new, folding it onto the saved frontier; the key
    # may also be given as a file, as an operator would publish it.
    ledger.db.append([40])
    key_file = tmp_path / "ledger.vkey"
    key_file.write_text(ledger.keys.vkey + "\n")
    third = verify(ledger, state, "--incremental", key=str(key_file))
    assert_exit(third, Exit.OK, "size 400", "consistent with trusted size 360", "40 entries re-hashed")
    assert trusted_size(state) == 400


def test_verify_with_the_key_from_the_environment_in_a_real_process(stable: Ledger, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GPUTRACE_URL": stable.server.url,
        "GPUTRACE_TOKEN": stable.keys.tokens["ops"],
        "GPUTRACE_LEDGER_VKEY": stable.keys.vkey,
        "XDG_STATE_HOME": str(tmp_path / "xdg"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "gputrace_verifier", "verify", "--spot-checks", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 inclusion proofs checked" in done.stdout
    assert trusted_size(tmp_path / "xdg" / "gputrace" / "audit.json") == 300


# Building a venv and installing the verifier from PyPI takes a minute and needs the network, too
# slow for every run: opt in with a venv made by `python3 -m venv V && V/bin/pip install ./verifier`.
STANDALONE_VENV = os.environ.get("GPUTRACE_VERIFIER_VENV")


@pytest.mark.skipif(not STANDALONE_VENV, reason="set GPUTRACE_VERIFIER_VENV to a venv holding only ./verifier")
def test_the_standalone_verifier_checks_the_running_ledger(stable: Ledger, tmp_path: Path) -> None:
    venv = Path(str(STANDALONE_VENV))
    python = venv / "bin" / "python"
    # That venv really lacks the services' stack: the verifier runs without it.
    probe = (
        "import importlib.util as u; print([m for m in ('typer', 'rich', 'faststream', 'sqlmodel') if u.find_spec(m)])"
    )
    assert subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    auditor = stable.keys.tokens["auditor"]
    command = [str(venv / "bin" / "gputrace-audit"), "--url", stable.server.url, "--token", auditor,
               "--key", stable.keys.vkey, "--state", str(tmp_path / "audit.json"), "verify"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PATH": os.defpath})
    print(" ".join(command), done.stdout, done.stderr, sep="\n")  # the record, with pytest -s
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"OK {ORIGIN}: size 300" in done.stdout and "300 entries re-hashed" in done.stdout


def test_help_on_every_command() -> None:
    runner = CliRunner()
    for argv in (["audit", "--help"], ["audit", "verify", "--help"], ["audit", "batch", "--help"]):
        result = runner.invoke(gputrace_app, argv, env=CLEAN_ENV)
        assert result.exit_code == 0, result.output
        assert "Exit codes: 0 ok; 1 usage/config; 2 network/HTTP error; 3" in " ".join(result.output.split())
    top = runner.invoke(gputrace_app, ["audit", "--help"], env=CLEAN_ENV).output
    for option in ("--url", "--token", "--state", "--key", "--tofu", "GPUTRACE_LEDGER_VKEY"):
        assert option in top
    assert "--incremental" in runner.invoke(gputrace_app, ["audit", "verify", "--help"]).output


# --------------------------------------------------------------------------- keys and configuration


def test_a_key_is_required_and_must_be_the_ledgers(stable: Ledger, tmp_path: Path) -> None:
    state = tmp_path / "audit.json"
    assert_exit(verify(stable, state, key=None), Exit.USAGE, "no ledger key")
    assert_exit(verify(stable, state, key="not-a-key"), Exit.USAGE, "--key: bad verifier key")

    impostor = make_vkey(ORIGIN, Ed25519PrivateKey.generate().public_key())  # same name, other key
    assert_exit(verify(stable, state, key=impostor), Exit.SIGNATURE, "checkpoint signature invalid", "unknown key")
    other_origin = audit(stable.server.url, state, "--origin", "other.example/log", "verify",
                         key=stable.keys.vkey, token=stable.keys.tokens["auditor"])  # fmt: skip
    assert_exit(other_origin, Exit.SIGNATURE, "wrong origin")
    assert not state.exists(), "nothing may be trusted after a failure"


def test_trust_on_first_use_pins_the_servers_key_loudly(stable: Ledger, tmp_path: Path) -> None:
    state = tmp_path / "audit.json"
    first = audit(stable.server.url, state, "--tofu", "verify", token=stable.keys.tokens["auditor"])
    assert_exit(first, Exit.OK, "TRUST ON FIRST USE", stable.keys.vkey)
    assert json.loads(state.read_text())["pinned_vkey"] == stable.keys.vkey
    again = audit(stable.server.url, state, "verify", token=stable.keys.tokens["auditor"])
    assert_exit(again, Exit.OK, "pinned on first use")


def test_network_and_http_errors_exit_2(stable: Ledger, tmp_path: Path) -> None:
    state = tmp_path / "audit.json"
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert_exit(audit(url, state, "verify", key=stable.keys.vkey), Exit.NETWORK, f"GET {url}/v1/log/checkpoint")
    no_token = audit(stable.server.url, state, "verify", key=stable.keys.vkey)
    assert_exit(no_token, Exit.NETWORK, "HTTP 401")
    partner = audit(stable.server.url, state, "verify", key=stable.keys.vkey,
                    token=stable.keys.tokens["partner:partner-0"])  # fmt: skip
    assert_exit(partner, Exit.NETWORK, "HTTP 403", "role partner may not read this")


# --------------------------------------------------------------------------- tampering


def test_an_altered_entry_is_named_by_its_leaf_index(make_ledger: MakeLedger, tmp_path: Path) -> None:
    ledger = make_ledger()
    state = tmp_path / "audit.json"
    assert_exit(verify(ledger, state), Exit.OK)
    # One byte: 17 GPUs become 18.
    changed = ledger.db.tamper(
        "UPDATE log_entries SET entry = replace(entry, '\"gpus\":17,', '\"gpus\":18,') WHERE leaf_index = 17"
    )
    assert changed == 1
    result = verify(ledger, state)
    assert_exit(result, Exit.MISMATCH, "leaf 17: entry bytes hash to", "but server says")
    assert trusted_size(state) == 300


def test_an_altered_entry_with_a_recomputed_leaf_hash_is_still_located(make_ledger: MakeLedger, tmp_path: Path) -> None:
    ledger = make_ledger()
    # A careful insider also rewrites the stored leaf hash; the signed root still commits to the
    # original, and bisecting with the server's own proofs finds the leaf.
    new_entry = "replace(entry, '\"gpus\":201,', '\"gpus\":200,')"
    changed = ledger.db.tamper(
        f"UPDATE log_entries SET entry = {new_entry}, "
        f"leaf_hash = sha256('\\x00'::bytea || convert_to({new_entry}, 'UTF8')) WHERE leaf_index = 201"
    )
    assert changed == 1
    result = verify(ledger, tmp_path / "audit.json")
    assert_exit(
        result, Exit.MISMATCH, "root mismatch at size 300: recomputed", "disagrees with the served entry at leaf 201"
    )


def test_a_non_canonical_entry_is_named(make_ledger: MakeLedger, tmp_path: Path) -> None:
    ledger = make_ledger()
    # Same JSON value, different bytes (a space): hashes and root are consistent, canonical form is not.
    sql = "replace(entry, '\"gpus\":5,', '\"gpus\": 5,')"
    ledger.db.tamper(
        f"UPDATE log_entries SET entry = {sql}, leaf_hash = sha256('\\x00'::bytea || convert_to({sql}, 'UTF8')) "
        "WHERE leaf_index = 5"
    )
    result = verify(ledger, tmp_path / "audit.json")
    assert_exit(result, Exit.MISMATCH, "leaf 5: entry is not RFC 8785 canonical JSON")


def test_an_altered_node_fails_the_inclusion_proof_that_uses_it(make_ledger: MakeLedger, tmp_path: Path) -> None:
    ledger = make_ledger()
    state = tmp_path / "audit.json"
    assert_exit(verify(ledger, state), Exit.OK)
    # Node (8, 0) is the hash of leaves [0, 256): the proof of the last leaf climbs past it.
    assert ledger.db.tamper(*flip_first_byte(8, 0)) == 1
    result = verify(ledger, state, "--spot-checks", "2")
    assert_exit(
        result,
        Exit.PROOF,
        "inclusion proof for leaf 299 in the tree of size 300 does not verify",
        "leaves [0, 256) = stored node (level 8, index 0)",
    )


def test_an_altered_node_fails_the_consistency_proof_that_uses_it(make_ledger: MakeLedger, tmp_path: Path) -> None:
    ledger = make_ledger(BATCHES[:-1])
    state = tmp_path / "audit.json"
    assert_exit(verify(ledger, state), Exit.OK, "size 200")
    ledger.db.append([100])
    level, idx = merkle.consistency_proof_coords(200, 300)[0]
    assert ledger.db.tamper(*flip_first_byte(level, idx)) == 1

    # With all entries at hand the auditor can tell corrupt nodes (6) from a forked history (4).
    result = verify(ledger, state)
    assert_exit(result, Exit.PROOF, "the consistency proof 200->300 does not verify",
                "entries are consistent with both checkpoints", "element 0 is")  # fmt: skip
    # Incrementally it has only the new entries and must assume the worst.
    incremental = verify(ledger, state, "--incremental")
    assert_exit(incremental, Exit.INCONSISTENT, "not consistent with the trusted checkpoint at size 200")
    assert trusted_size(state) == 200


def test_a_forked_log_signed_with_the_same_key_is_caught(make_ledger: MakeLedger, tmp_path: Path) -> None:
    state = tmp_path / "audit.json"
    honest = make_ledger()
    assert_exit(verify(honest, state), Exit.OK, "size 300")

    # Another database, same key and origin: the first 100 entries agree, then history differs.
    fork = make_ledger([100])
    fork.db.tag = "fork-"
    fork.db.append([50])
    shrunk = verify(fork, state)
    assert_exit(
        shrunk, Exit.INCONSISTENT, "checkpoint at size 150 is not consistent with the trusted checkpoint at size 300"
    )
    assert "the log shrank" in shrunk.output

    fork.db.append([170])
    forked = verify(fork, state)
    assert_exit(forked, Exit.INCONSISTENT,
                "checkpoint at size 320 is not consistent with the trusted checkpoint at size 300",
                "first 300 entries now hash to")  # fmt: skip
    assert_exit(verify(fork, state, "--incremental"), Exit.INCONSISTENT, "consistency proof 300->320 does not verify")
    assert trusted_size(state) == 300


@pytest.fixture(scope="module")
def notes(pg_admin: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    db = LedgerDB(pg_admin, keys)
    db.append([10, 20])
    server = serve_ledger(db, tmp_path_factory.mktemp("notes"))
    yield Ledger(db, server, keys)
    server.stop()
    db.drop()


def _altered_notes(note: str, key: Ed25519PrivateKey) -> dict[str, tuple[str, str]]:
    text, _, signature = note.rpartition("\n\n")
    origin, size, root = text.split("\n")[:3]
    flipped = base64.b64encode(bytes([base64.b64decode(root)[0] ^ 1]) + base64.b64decode(root)[1:]).decode()
    cp = Checkpoint(origin="other.example/log", size=int(size), root_hash=base64.b64decode(root))
    stranger = Ed25519PrivateKey.generate()
    return {
        "size": (f"{origin}\n31\n{root}\n\n{signature}", "does not verify"),
        "root": (f"{origin}\n{size}\n{flipped}\n\n{signature}", "does not verify"),
        "origin": (f"evil.example/ledger\n{size}\n{root}\n\n{signature}", "does not verify"),
        "resigned-other-origin": (sign_checkpoint(cp, ORIGIN, key), "wrong origin"),
        "signed-by-another-key": (sign_checkpoint(Checkpoint(ORIGIN, 30, cp.root_hash), ORIGIN, stranger),
                                  "unknown key"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["size", "root", "origin", "resigned-other-origin", "signed-by-another-key"])
def test_an_altered_checkpoint_note_is_a_signature_failure(notes: Ledger, tmp_path: Path, case: str) -> None:
    with psycopg.connect(notes.db.libpq_url) as conn:
        row = conn.execute("SELECT note FROM log_checkpoints WHERE size = 30").fetchone()
    assert row is not None
    note, fragment = _altered_notes(row[0], notes.keys.private)[case]
    try:
        assert notes.db.tamper("UPDATE log_checkpoints SET note = %(n)s WHERE size = 30", {"n": note}) == 1
        result = verify(notes, tmp_path / "audit.json")
        assert_exit(result, Exit.SIGNATURE, "checkpoint signature invalid", fragment)
    finally:
        notes.db.tamper("UPDATE log_checkpoints SET note = %(n)s WHERE size = 30", {"n": row[0]})
    assert_exit(verify(notes, tmp_path / "again.json"), Exit.OK)


# --------------------------------------------------------------------------- batch


@pytest.fixture
def batch_server(pg_admin: str, keys: Keys, tmp_path: Path) -> Iterator[tuple[Ledger, dict[str, Any]]]:
    """The real log routes plus a stand-in for GET /v1/batches/{id} (built elsewhere), whose
    timeline the test controls, so that a lying batch view can be shown to be caught."""
    db = LedgerDB(pg_admin, keys)
    db.append(BATCHES)
    real = create_app(ledger_settings(db, tmp_path), consume=False)
    app = FastAPI()
    for name in ("settings", "sessions", "tokens"):
        setattr(app.state, name, getattr(real.state, name))
    app.include_router(log_router)
    batches: dict[str, Any] = {}

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str) -> Any:
        if batch_id not in batches:
            raise HTTPException(404, f"no batch {batch_id!r}")
        return batches[batch_id]

    server = ServerThread(app, real.state.service.engine).start()
    yield Ledger(db, server, keys), batches
    server.stop()
    db.drop()


def _step(i: int) -> dict[str, Any]:
    """A timeline step as GET /v1/batches/{id} gives it: fields copied from the ledger entry."""
    d = fake_decision(i)
    fields = ("service", "event_type", "status", "reason_code", "message", "decided_at", "party_id")
    return {"leaf_index": i, **{k: d[k] for k in fields}, "anomalies": []}


def test_batch_shows_the_timeline_and_proves_each_step(
    batch_server: tuple[Ledger, dict[str, Any]], tmp_path: Path
) -> None:
    ledger, batches = batch_server
    state = tmp_path / "audit.json"
    steps = [_step(i) for i in (3, 10, 17, 24)]
    steps[0]["decided_at"] = steps[0]["decided_at"].replace("Z", "+00:00")  # same instant, other spelling
    batches["batch-3"] = {"batch_id": "batch-3", "status": "accepted", "money": {"eur": 12.5}, "timeline": steps}
    token = ledger.keys.tokens["auditor"]

    shown = audit(ledger.server.url, state, "batch", "batch-3", token=token)
    assert_exit(shown, Exit.OK, "timeline", "gputrace.pledge.submitted.v1", "décision nº17")
    assert_exit(audit(ledger.server.url, state, "batch", "batch-3", "--verify", key=ledger.keys.vkey, token=token),
                Exit.USAGE, "run `gputrace audit verify` first")  # fmt: skip

    assert_exit(verify(ledger, state), Exit.OK)
    proven = audit(ledger.server.url, state, "batch", "batch-3", "--verify", key=ledger.keys.vkey, token=token)
    assert_exit(proven, Exit.OK, "4 step(s) proven", "✓ in 300")

    batches["batch-3"]["timeline"][1]["status"] = "accepted"  # leaf 10 was rejected
    lying = audit(ledger.server.url, state, "batch", "batch-3", "--verify", key=ledger.keys.vkey, token=token)
    assert_exit(lying, Exit.MISMATCH, "step 2 (leaf 10): the batch view says status 'accepted'")

    batches["batch-3"]["timeline"] = [_step(3), _step(4)]  # a true step, but of batch-4
    assert_exit(audit(ledger.server.url, state, "batch", "batch-3", "--verify", key=ledger.keys.vkey, token=token),
                Exit.MISMATCH, "step 2 (leaf 4): the ledger entry is about batch 'batch-4'")  # fmt: skip

    batches["batch-3"]["timeline"] = [{**_step(3), "leaf_index": 999}]
    assert_exit(audit(ledger.server.url, state, "batch", "batch-3", "--verify", key=ledger.keys.vkey, token=token),
                Exit.PROOF, "beyond the verified checkpoint (size 300)")  # fmt: skip
    assert_exit(audit(ledger.server.url, state, "batch", "nope", token=token), Exit.NETWORK, "HTTP 404")
