"""The auditor's checks without a server process: an in-memory ledger behind httpx.MockTransport,
built with the verifier's own Merkle and checkpoint code, and the command line's argument handling.

The same checks against the real ledger (PostgreSQL, HTTP, tampered rows) are in the main
project's tests/test_audit_cli.py; these run where only the verifier and pytest are installed.
"""

from __future__ import annotations

import base64
import json
import random
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier import merkle
from gputrace_verifier.audit import (
    AuditFailure,
    Exit,
    Leaves,
    Options,
    State,
    Trusted,
    check_entry,
    describe_range,
    inclusion_path_ranges,
    spot_check_indices,
    verify,
)
from gputrace_verifier.checkpoint import Checkpoint, make_vkey, sign_checkpoint
from gputrace_verifier.cli import main

ORIGIN = "gputrace.test/ledger"
URL = "http://ledger.test"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class MemoryLedger:
    """The log routes the auditor reads, served from memory; the entries can be tampered with."""

    def __init__(self, key: Ed25519PrivateKey, entries: list[bytes]) -> None:
        self.key = key
        self.entries = list(entries)
        self.served = list(entries)  # what /entries returns: change it to lie about an entry
        self.store: dict[merkle.Coord, bytes] = {}
        self.frontier = merkle.Frontier()
        for entry in entries:
            self.store.update({(lv, ix): h for lv, ix, h in self.frontier.append(merkle.leaf_hash(entry))})

    def append(self, entries: list[bytes]) -> None:
        for entry in entries:
            self.store.update({(lv, ix): h for lv, ix, h in self.frontier.append(merkle.leaf_hash(entry))})
        self.entries += entries
        self.served += entries

    def handle(self, request: httpx.Request) -> httpx.Response:
        q = {k: int(v) for k, v in request.url.params.items()}
        size = self.frontier.size
        match request.url.path:
            case "/v1/log/checkpoint":
                return httpx.Response(
                    200, text=sign_checkpoint(Checkpoint(ORIGIN, size, self.frontier.root()), ORIGIN, self.key)
                )
            case "/v1/log/public-key":
                return httpx.Response(200, json={"vkey": make_vkey(ORIGIN, self.key.public_key())})
            case "/v1/log/entries":
                # The leaf hash is the logged one: a lying entry must be caught by re-hashing it.
                rows = range(q["start"], min(q["end"], size))
                return httpx.Response(200, json=[self._row(i) for i in rows])
            case "/v1/log/proof/inclusion":
                proof = merkle.inclusion_proof(q["leaf_index"], q["tree_size"], self.store)
                return httpx.Response(200, json={**q, "proof": [b64(h) for h in proof]})
            case "/v1/log/proof/consistency":
                proof = merkle.consistency_proof(q["first"], q["second"], self.store)
                return httpx.Response(200, json={**q, "proof": [b64(h) for h in proof]})
        return httpx.Response(404, json={"detail": "no such route"})

    def _row(self, i: int) -> dict[str, Any]:
        return {"leaf_index": i, "entry": self.served[i].decode(), "leaf_hash": b64(merkle.leaf_hash(self.entries[i]))}


def entries(n: int, start: int = 0, tag: str = "") -> list[bytes]:
    return [
        rfc8785.dumps({"batch_id": f"batch-{i}", "gpus": i, "note": f"{tag}décision nº{i}"}) for i in range(start, n)
    ]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def run_verify(ledger: MemoryLedger, state: Path, **kwargs: Any) -> Any:
    opts = Options(URL, None, state, make_vkey(ORIGIN, ledger.key.public_key()), None, False)
    return verify(opts, transport=httpx.MockTransport(ledger.handle), seed=1, **kwargs)


def failure(ledger: MemoryLedger, state: Path, **kwargs: Any) -> AuditFailure:
    with pytest.raises(AuditFailure) as caught:
        run_verify(ledger, state, **kwargs)
    return caught.value


# --------------------------------------------------------------------------- verify, end to end in memory


def test_verify_trusts_a_log_then_checks_that_it_only_grows(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    state = tmp_path / "audit.json"
    ledger = MemoryLedger(key, entries(37))
    first = run_verify(ledger, state, page_size=10)
    assert (first.size, first.previous_size, first.downloaded) == (37, None, 37)
    assert first.root_hash == ledger.frontier.root()
    assert first.spot_checked == 16
    assert json.loads(state.read_text())["logs"][ORIGIN]["size"] == 37

    ledger.append(entries(60, 37))
    second = run_verify(ledger, state, incremental=True)
    assert (second.size, second.previous_size, second.downloaded) == (60, 37, 23)


def test_an_entry_that_does_not_hash_to_its_leaf_is_named(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    ledger = MemoryLedger(key, entries(20))
    ledger.served[7] = ledger.served[7].replace(b'"gpus":7', b'"gpus":8')
    error = failure(ledger, tmp_path / "audit.json")
    assert error.code == Exit.MISMATCH
    assert "leaf 7: entry bytes hash to" in error.message
    assert not (tmp_path / "audit.json").exists(), "nothing may be trusted after a failure"


def test_a_rewritten_history_is_caught(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    state = tmp_path / "audit.json"
    run_verify(MemoryLedger(key, entries(20)), state)
    fork = MemoryLedger(key, entries(10) + entries(25, 10, tag="rewritten "))  # same key, other history
    error = failure(fork, state)
    assert error.code == Exit.INCONSISTENT
    assert "first 20 entries now hash to" in error.message
    assert failure(MemoryLedger(key, entries(15)), state).code == Exit.INCONSISTENT  # shrank


def test_a_checkpoint_by_another_key_is_refused(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    ledger = MemoryLedger(key, entries(5))
    ledger.key = Ed25519PrivateKey.generate()  # the server now signs with a key the auditor never trusted
    opts = Options(URL, None, tmp_path / "a.json", make_vkey(ORIGIN, key.public_key()), None, False)
    with pytest.raises(AuditFailure) as caught:
        verify(opts, transport=httpx.MockTransport(ledger.handle))
    assert caught.value.code == Exit.SIGNATURE and "unknown key" in caught.value.message


# --------------------------------------------------------------------------- the pure checks


def test_check_entry_demands_canonical_json_and_the_right_index() -> None:
    good = rfc8785.dumps({"a": 1, "b": "x"})
    leaf, problems = check_entry(3, {"leaf_index": 3, "entry": good.decode(), "leaf_hash": b64(merkle.leaf_hash(good))})
    assert leaf == merkle.leaf_hash(good) and problems == []
    spaced = '{"a": 1,"b":"x"}'
    _, problems = check_entry(
        3, {"leaf_index": 3, "entry": spaced, "leaf_hash": b64(merkle.leaf_hash(spaced.encode()))}
    )
    assert problems == ["leaf 3: entry is not RFC 8785 canonical JSON (re-canonicalised bytes differ at byte 5)"]
    with pytest.raises(AuditFailure, match="returned leaf_index 4 in its place"):
        check_entry(3, {"leaf_index": 4, "entry": good.decode(), "leaf_hash": b64(merkle.leaf_hash(good))})


def test_diagnosis_ranges_are_the_rfc_path_and_name_stored_nodes() -> None:
    for size in range(1, 70):
        for index in range(size):
            ranges = inclusion_path_ranges(index, size)
            assert ranges == merkle._inclusion_ranges(index, size)
    assert describe_range(0, 256) == "leaves [0, 256) = stored node (level 8, index 0)"
    assert describe_range(256, 300) == "leaves [256, 300) (built from several stored nodes)"


def test_leaves_recompute_the_same_subtree_hashes_as_the_log() -> None:
    hashes = [merkle.leaf_hash(e) for e in entries(45)]
    leaves, frontier = Leaves(0), merkle.Frontier()
    for h in hashes:
        leaves.append(h)
        frontier.append(h)
    assert leaves.mth(0, 45) == frontier.root()
    assert leaves.get(44) == hashes[44] and leaves.get(45) is None
    assert leaves.covers(3, 45) and not leaves.covers(3, 46)


def test_spot_checks_always_include_both_ends() -> None:
    rng = random.Random(7)
    assert spot_check_indices(0, 16, rng) == []
    assert spot_check_indices(1, 16, rng) == [0]
    assert spot_check_indices(100, 1, rng) == [99]
    chosen = spot_check_indices(100, 16, rng)
    assert len(chosen) == 16 and chosen[0] == 0 and chosen[-1] == 99
    assert spot_check_indices(5, 16, rng) == [0, 1, 2, 3, 4]


def test_state_file_round_trip_and_unreadable_state(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "audit.json"
    state = State(path, "vkey")
    state.logs[ORIGIN] = Trusted("note", 3, b"\x01" * 32, [b"\x02" * 32, b"\x03" * 32], URL, "now")
    state.save()
    again = State.load(path)
    assert again.pinned_vkey == "vkey" and again.logs == state.logs
    path.write_text("{not json")
    with pytest.raises(AuditFailure, match="unreadable") as caught:
        State.load(path)
    assert caught.value.code == Exit.USAGE


# --------------------------------------------------------------------------- command line


def test_cli_help_names_every_option_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    top = " ".join(capsys.readouterr().out.split())
    for option in (
        "--url",
        "--token",
        "--state",
        "--key",
        "--origin",
        "--tofu",
        "GPUTRACE_LEDGER_VKEY",
        "verify",
        "batch",
    ):
        assert option in top
    assert "Exit codes: 0 ok; 1 usage/config; 2 network/HTTP error; 3 checkpoint signature invalid" in top
    assert main(["verify", "--help"]) == 0
    assert "--incremental" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "usage: gputrace-audit"),
        (["verify", "--page-size", "0"], "0 is not in the range 1<=x<=1000"),
        (["verify", "--spot-checks", "-1"], "-1 is not in the range x>=0"),
        (["frobnicate"], "invalid choice"),
        (["verify"], "no ledger key"),
        (["--key", "not-a-key", "verify"], "--key: bad verifier key"),
    ],
)
def test_cli_usage_errors_exit_1(
    argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUTRACE_LEDGER_VKEY", raising=False)
    assert main(["--state", str(tmp_path / "a.json"), *argv] if argv else []) == Exit.USAGE
    seen = capsys.readouterr()
    assert fragment in seen.out + seen.err


def test_cli_network_error_exits_2(key: Ed25519PrivateKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    vkey = make_vkey(ORIGIN, key.public_key())
    assert main(["--url", url, "--key", vkey, "--state", str(tmp_path / "a.json"), "verify"]) == Exit.NETWORK
    assert f"FAILED (exit 2): GET {url}/v1/log/checkpoint" in capsys.readouterr().err
