"""Tests for gputrace_verifier.checkpoint: C2SP tlog-checkpoint in C2SP signed-note format."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from gputrace_verifier.checkpoint import (
    Checkpoint,
    CheckpointError,
    key_id,
    make_vkey,
    open_note,
    parse_and_verify,
    parse_vkey,
    sign_checkpoint,
    sign_note,
)
from gputrace_verifier.merkle import EMPTY_ROOT, leaf_hash

EM = "\u2014"

# ---------------------------------------------------------------- published vectors
# vectors/go-signed-note.json: golang.org/x/mod/sumdb/note note_test.go (BSD-3-Clause, The Go
# Authors), and the Go checksum database's published key (cmd/go/internal/modfetch/key.go) — its
# base64 contains '+', which the vkey parser must not split on — with a checkpoint it signed.
_VECTORS = json.loads((Path(__file__).parent / "vectors" / "go-signed-note.json").read_text())
_GO, _SUMDB = _VECTORS["go_note"], _VECTORS["sumdb"]
PETER_SKEY_B64: str = _GO["peter_skey"]  # 0x01 || Ed25519 seed
PETER_VKEY: str = _GO["peter_vkey"]
ENOCH_VKEY: str = _GO["enoch_vkey"]
GO_TEXT: str = _GO["text"]
PETER_SIG: str = _GO["peter_signature_line"]
ENOCH_SIG: str = _GO["enoch_signature_line"]
SUMDB_VKEY: str = _SUMDB["vkey"]
SUMDB_NOTE: str = _SUMDB["note"]

LOG = "gputrace.example/ledger"
ROOT_B64 = base64.b64encode(EMPTY_ROOT).decode()
URLSAFE_B64 = base64.urlsafe_b64encode(b"\xfb" * 32).decode()  # '-' and '_': not standard base64


def peter_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(PETER_SKEY_B64)[1:])


@pytest.fixture(scope="module")
def log_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def cp() -> Checkpoint:
    return Checkpoint(origin=LOG, size=1234, root_hash=leaf_hash(b"some root"))


def sig_lines(note: str) -> list[str]:
    return note[note.rindex("\n\n") + 2 :].splitlines(keepends=True)


def raw(pub: object) -> bytes:
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- known answers


def test_go_vectors_key_id_vkey_and_deterministic_signature() -> None:
    key = peter_key()
    assert key_id("PeterNeumann", key.public_key()).hex() == _GO["peter_key_id"] == "c74f20a3"
    assert make_vkey("PeterNeumann", key.public_key()) == PETER_VKEY
    # Ed25519 is deterministic, so our signer must reproduce Go's note byte for byte.
    assert sign_note(GO_TEXT, "PeterNeumann", key) == GO_TEXT + "\n" + PETER_SIG


def test_go_note_with_two_signatures_verifies_with_either_key() -> None:
    note = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(note, PETER_VKEY) == GO_TEXT  # Enoch's signature is unknown: ignored
    assert open_note(note, ENOCH_VKEY) == GO_TEXT
    assert open_note(note.encode("utf-8"), PETER_VKEY) == GO_TEXT


def test_real_sum_golang_org_checkpoint() -> None:
    cp = parse_and_verify(SUMDB_NOTE, SUMDB_VKEY, expected_origin=_SUMDB["origin"])
    assert cp.origin == "go.sum database tree" == _SUMDB["origin"]
    assert cp.size == 65664258 == _SUMDB["size"]
    assert cp.root_hash == base64.b64decode(_SUMDB["root_hash"])
    assert cp.extensions == ()
    with pytest.raises(CheckpointError, match="bad signature"):
        parse_and_verify(SUMDB_NOTE.replace("65664258", "65664259"), SUMDB_VKEY)


def test_key_id_is_computed_as_the_spec_says(log_key: Ed25519PrivateKey) -> None:
    pub = log_key.public_key()
    expected = hashlib.sha256(LOG.encode() + b"\x0a" + b"\x01" + raw(pub)).digest()[:4]
    assert key_id(LOG, pub) == expected
    line = sig_lines(sign_checkpoint(Checkpoint(LOG, 0, EMPTY_ROOT), LOG, log_key))[0]
    assert base64.b64decode(line.split(" ")[2])[:4] == expected


# ---------------------------------------------------------------- round trip


def test_round_trip(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    note = sign_checkpoint(cp, LOG, log_key)
    root_b64 = base64.b64encode(cp.root_hash).decode()
    assert note.startswith(f"{LOG}\n1234\n{root_b64}\n\n{EM} {LOG} ")
    assert note.endswith("\n") and note.count("\n\n") == 1
    assert parse_and_verify(note, make_vkey(LOG, log_key.public_key())) == cp
    assert parse_and_verify(note, (LOG, log_key.public_key()), expected_origin=LOG) == cp


def test_round_trip_empty_tree_and_extensions(log_key: Ed25519PrivateKey) -> None:
    vkey = make_vkey(LOG, log_key.public_key())
    empty = Checkpoint(LOG, 0, EMPTY_ROOT)
    assert parse_and_verify(sign_checkpoint(empty, LOG, log_key), vkey) == empty
    extended = Checkpoint(LOG, 2**64 - 1, EMPTY_ROOT, ("ext one", "ext two"))
    note = sign_checkpoint(extended, LOG, log_key)
    assert "\next one\next two\n\n" in note
    assert parse_and_verify(note, vkey) == extended


def test_root_hash_from_a_database_memoryview() -> None:
    assert Checkpoint(LOG, 1, memoryview(EMPTY_ROOT)).root_hash == EMPTY_ROOT  # type: ignore[arg-type]


def test_vkey_round_trip(log_key: Ed25519PrivateKey) -> None:
    vkey = make_vkey(LOG, log_key.public_key())
    name, pub = parse_vkey(vkey)
    assert name == LOG and raw(pub) == raw(log_key.public_key())
    assert make_vkey(name, pub) == vkey
    for published in (PETER_VKEY, ENOCH_VKEY, SUMDB_VKEY):
        assert make_vkey(*parse_vkey(published)) == published


# ---------------------------------------------------------------- tampering


def _replace_line(note: str, index: int, value: str) -> str:
    lines = note.split("\n")
    lines[index] = value
    return "\n".join(lines)


def test_changed_size_root_or_origin_fails(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    vkey = make_vkey(LOG, log_key.public_key())
    note = sign_checkpoint(cp, LOG, log_key)
    other_root = base64.b64encode(leaf_hash(b"another root")).decode()
    tampered = {
        "size": _replace_line(note, 1, "1235"),
        "size zero": _replace_line(note, 1, "0"),
        "root": _replace_line(note, 2, other_root),
        "origin": _replace_line(note, 0, "gputrace.example/other"),
        "extension added": note.replace("\n\n", "\nextra\n\n", 1),
    }
    for what, bad in tampered.items():
        with pytest.raises(CheckpointError, match="bad signature"):
            parse_and_verify(bad, vkey)
        assert bad != note, what


def test_every_byte_of_the_signature_matters(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    vkey = make_vkey(LOG, log_key.public_key())
    note = sign_checkpoint(cp, LOG, log_key)
    head, line = note[: note.rindex("\n\n") + 2], sig_lines(note)[0]
    prefix, encoded = line.rstrip("\n").rsplit(" ", 1)
    sig = base64.b64decode(encoded)
    assert len(sig) == 4 + 64
    for i in range(len(sig)):
        for mask in (0x01, 0x80):
            bad = bytearray(sig)
            bad[i] ^= mask
            forged = f"{head}{prefix} {base64.b64encode(bytes(bad)).decode()}\n"
            # Bytes 0-3 are the key id: the line then belongs to an unknown key and is ignored.
            expected = "unknown key" if i < 4 else "bad signature"
            with pytest.raises(CheckpointError, match=expected):
                parse_and_verify(forged, vkey)


def test_wrong_key_fails(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    note = sign_checkpoint(cp, LOG, log_key)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(CheckpointError, match="unknown key"):
        parse_and_verify(note, make_vkey(LOG, other))  # same name, other key: other key id
    with pytest.raises(CheckpointError, match="unknown key"):
        parse_and_verify(note, make_vkey("gputrace.example/other", log_key.public_key()))
    with pytest.raises(CheckpointError, match="unknown key"):
        parse_and_verify(note, PETER_VKEY)


def test_known_name_and_id_with_a_bad_signature_rejects_the_note(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    # An attacker can grind a key whose id collides with ours; the spec says a signature
    # that matches a known (name, id) must verify, else the note is rejected.
    attacker = Ed25519PrivateKey.generate()
    forged = sign_checkpoint(cp, LOG, attacker)
    ours = key_id(LOG, log_key.public_key())
    head, line = forged[: forged.rindex("\n\n") + 2], sig_lines(forged)[0]
    prefix, encoded = line.rstrip("\n").rsplit(" ", 1)
    sig = ours + base64.b64decode(encoded)[4:]
    forged = f"{head}{prefix} {base64.b64encode(sig).decode()}\n"
    with pytest.raises(CheckpointError, match="bad signature"):
        parse_and_verify(forged, (LOG, log_key.public_key()))
    # ... even when a good signature by our key is also present.
    good = sign_checkpoint(cp, LOG, log_key)
    both = good + forged[forged.rindex("\n\n") + 2 :]
    with pytest.raises(CheckpointError, match="bad signature"):
        parse_and_verify(both, (LOG, log_key.public_key()))


def test_two_signatures_one_by_an_unknown_key(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    witness = Ed25519PrivateKey.generate()
    ours = sign_checkpoint(cp, LOG, log_key)
    theirs = sign_checkpoint(cp, "witness.example/w1", witness)
    body = ours[: ours.rindex("\n\n") + 2]
    for lines in (sig_lines(ours) + sig_lines(theirs), sig_lines(theirs) + sig_lines(ours)):
        note = body + "".join(lines)
        assert parse_and_verify(note, make_vkey(LOG, log_key.public_key())) == cp
        assert parse_and_verify(note, ("witness.example/w1", witness.public_key())) == cp
    with pytest.raises(CheckpointError, match="unknown key"):
        parse_and_verify(theirs, make_vkey(LOG, log_key.public_key()))


def test_wrong_origin(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    note = sign_checkpoint(cp, LOG, log_key)
    with pytest.raises(CheckpointError, match="wrong origin"):
        parse_and_verify(note, (LOG, log_key.public_key()), expected_origin="gputrace.example/staging")


# ---------------------------------------------------------------- malformed notes


def _signed(text: str, key: Ed25519PrivateKey) -> str:
    return sign_note(text, LOG, key)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (f"{LOG}\n12\n", "fewer than three lines"),
        (f"{LOG}\n012\n{ROOT_B64}\n", "canonical decimal"),
        (f"{LOG}\n-1\n{ROOT_B64}\n", "canonical decimal"),
        (f"{LOG}\n+1\n{ROOT_B64}\n", "canonical decimal"),
        (f"{LOG}\n 1\n{ROOT_B64}\n", "canonical decimal"),
        (f"{LOG}\n\u0663\n{ROOT_B64}\n", "canonical decimal"),
        (f"{LOG}\n{2**64}\n{ROOT_B64}\n", "tree size"),
        (f"{LOG}\n1\nAAAA\n", "32 canonically"),
        (f"{LOG}\n1\n{URLSAFE_B64}\n", "base64"),
        (f"{LOG}\n1\n{ROOT_B64.rstrip('=')}\n", "base64"),
        (f"{LOG}\n1\n{ROOT_B64[:-2]}V=\n", "canonically"),
        (f"{LOG}\n1\n{ROOT_B64}\n\nlate extension\n", "empty line"),
        (f"\n1\n{ROOT_B64}\n", "empty line"),
    ],
)
def test_bad_checkpoint_bodies_are_rejected_after_a_valid_signature(
    body: str, error: str, log_key: Ed25519PrivateKey
) -> None:
    with pytest.raises(CheckpointError, match=error):
        parse_and_verify(_signed(body, log_key), (LOG, log_key.public_key()))


def test_malformed_notes(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    verifier = (LOG, log_key.public_key())
    note = sign_checkpoint(cp, LOG, log_key)
    text, line = note[: note.rindex("\n\n") + 1], sig_lines(note)[0]
    cases = {
        "no blank line": (text, "no blank line"),
        "no signatures": (text + "\n", "signature lines"),
        "unterminated": (note[:-1], "unterminated"),
        "hyphen instead of em dash": (text + "\n" + "-" + line[1:], "em dash"),
        "two spaces": (text + "\n" + line.replace(" ", "  ", 1), "signature line"),
        "name with +": (text + "\n" + line.replace(LOG, LOG + "+x", 1), "malformed signature line"),
        "bad base64": (text + "\n" + line[:-3] + "!=\n", "malformed signature line"),
        "short signature": (text + "\n" + f"{EM} {LOG} AAAA\n", "too short"),
        "control character": (note.replace(LOG, LOG + "\t", 1), "control characters"),
        "trailing junk": (note + "junk\n", "em dash"),
        "too many signatures": (text + "\n" + line * 101, "more than 100"),
    }
    for what, (bad, error) in cases.items():
        with pytest.raises(CheckpointError, match=error):
            parse_and_verify(bad, verifier)
        assert what
    with pytest.raises(CheckpointError, match="UTF-8"):
        parse_and_verify(b"\xff" + note.encode(), verifier)
    # 16 signatures must be accepted (spec minimum); duplicates of a good one are fine.
    assert parse_and_verify(text + "\n" + line * 16, verifier) == cp


def test_unsignable_checkpoints_cannot_be_built() -> None:
    bad = [
        dict(origin="", size=1, root_hash=EMPTY_ROOT),
        dict(origin="a\nb", size=1, root_hash=EMPTY_ROOT),
        dict(origin=LOG, size=-1, root_hash=EMPTY_ROOT),
        dict(origin=LOG, size=True, root_hash=EMPTY_ROOT),
        dict(origin=LOG, size=2**64, root_hash=EMPTY_ROOT),
        dict(origin=LOG, size=1, root_hash=EMPTY_ROOT[:31]),
        dict(origin=LOG, size=1, root_hash=EMPTY_ROOT.hex()),
        dict(origin=LOG, size=1, root_hash=EMPTY_ROOT, extensions=("",)),
        dict(origin=LOG, size=1, root_hash=EMPTY_ROOT, extensions=("a\nb",)),
    ]
    for kwargs in bad:
        with pytest.raises(CheckpointError):
            Checkpoint(**kwargs)  # type: ignore[arg-type]


def test_sign_rejects_bad_names_and_text(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    for name in ("", "has space", "has+plus", "tab\tname"):
        with pytest.raises(CheckpointError, match="key name"):
            sign_checkpoint(cp, name, log_key)
    with pytest.raises(CheckpointError, match="newline"):
        sign_note("no newline", LOG, log_key)


@pytest.mark.parametrize(
    ("vkey", "error"),
    [
        ("PeterNeumann", "expected"),
        ("PeterNeumann+c74f20a3", "expected"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key name"),
        ("PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "8 hex"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("PeterNeuman+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T", "base64"),
        ("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==", "33 bytes"),
        ("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "unsupported signature type"),
    ],
)
def test_bad_vkeys(vkey: str, error: str) -> None:
    with pytest.raises(CheckpointError, match=error):
        parse_vkey(vkey)


def test_every_single_character_change_of_a_vkey_is_refused() -> None:
    # As Go's TestNewVerifier: bump each character by one code point.
    for i in range(len(PETER_VKEY)):
        mangled = PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1 :]
        with pytest.raises(CheckpointError):
            parse_vkey(mangled)


def test_bad_verifier_argument(cp: Checkpoint, log_key: Ed25519PrivateKey) -> None:
    note = sign_checkpoint(cp, LOG, log_key)
    with pytest.raises(CheckpointError, match="verifier must be"):
        parse_and_verify(note, (LOG, raw(log_key.public_key())))  # type: ignore[arg-type]
