"""Tests for gputrace_verifier.cosignature: C2SP tlog-cosignature (cosignature/v1, Ed25519) and
the tlog-witness add-checkpoint body."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier.checkpoint import Checkpoint, CheckpointError, make_vkey, parse_and_verify, sign_checkpoint
from gputrace_verifier.cosignature import (
    cosign,
    cosignature_message,
    cosigner_key_id,
    format_add_checkpoint,
    make_witness_vkey,
    parse_add_checkpoint,
    parse_witness_vkey,
    verify_cosignatures,
)
from gputrace_verifier.merkle import leaf_hash

# ---------------------------------------------------------------- published vectors
# transparency-dev/formats note/note_cosigv1_test.go (Apache-2.0): a deployed witness's native
# cosignature/v1 vkey (type 0x04), whose key id must be SHA-256(name || 0x0A || 0x04 || key)[:4],
# and a cosignature/v1 signature whose timestamp (bytes 4..12, big-endian) is 1727964367.
REMORA_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
TIMESTAMPED_SIG = (
    "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEBYJXORmnFBOBA=="
)
# The example message of c2sp.org/tlog-cosignature ("Ed25519 signed message").
SPEC_BODY = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
SPEC_MESSAGE = "cosignature/v1\ntime 1679315147\n" + SPEC_BODY

LOG = "gputrace.example/ledger"
WITNESS = "witness.example/w1"
T = 1_767_225_600


def test_key_id_and_vkey_match_a_deployed_witness() -> None:
    name, key = parse_witness_vkey(REMORA_VKEY)
    raw = base64.b64decode(REMORA_VKEY.split("+")[2])
    assert raw[0] == 0x04 and cosigner_key_id(name, key).hex() == "da77ade7"
    assert cosigner_key_id(name, key) == hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    assert make_witness_vkey(name, key) == REMORA_VKEY


def test_the_timestamp_is_big_endian_after_the_key_id() -> None:
    blob = base64.b64decode(TIMESTAMPED_SIG)
    assert len(blob) == 4 + 8 + 64
    assert struct.unpack(">Q", blob[4:12]) == (1727964367,)


def test_the_signed_message_is_the_spec_s() -> None:
    assert cosignature_message(SPEC_BODY, 1679315147) == SPEC_MESSAGE.encode()


def test_a_log_key_is_not_a_witness_key() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(CheckpointError, match="0x04"):
        parse_witness_vkey(make_vkey(WITNESS, key.public_key()))
    # Same name and key, other type byte: other key ids, so one can never pass for the other.
    assert cosigner_key_id(WITNESS, key.public_key()).hex() not in make_vkey(WITNESS, key.public_key())


@pytest.fixture
def note() -> tuple[str, Ed25519PrivateKey]:
    log_key = Ed25519PrivateKey.generate()
    cp = Checkpoint(origin=LOG, size=42, root_hash=leaf_hash(b"root"))
    return sign_checkpoint(cp, LOG, log_key), log_key


def test_cosign_then_verify_and_the_log_signature_still_verifies(note: tuple[str, Ed25519PrivateKey]) -> None:
    signed, log_key = note
    witness = Ed25519PrivateKey.generate()
    text = signed.split("\n\n")[0] + "\n"
    cosigned = signed + cosign(text, WITNESS, witness, T)
    [cs] = verify_cosignatures(cosigned, [make_witness_vkey(WITNESS, witness.public_key())])
    assert (cs.name, cs.timestamp) == (WITNESS, T)
    # The raw Ed25519 signature is over the cosignature/v1 message, as the spec defines it.
    blob = base64.b64decode(cosigned.rstrip("\n").rsplit(" ", 1)[1])
    witness.public_key().verify(blob[12:], cosignature_message(text, T))
    # The log's verifier ignores the witness's line (an unknown key to it).
    assert parse_and_verify(cosigned, make_vkey(LOG, log_key.public_key())).size == 42


def test_unknown_witnesses_are_ignored_and_a_bad_cosignature_is_an_error(note: tuple[str, Ed25519PrivateKey]) -> None:
    signed, _ = note
    text = signed.split("\n\n")[0] + "\n"
    witness, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    vkey = make_witness_vkey(WITNESS, witness.public_key())
    assert verify_cosignatures(signed + cosign(text, "stranger.example", stranger, T), [vkey]) == []
    # A cosignature over another checkpoint (a forked one) does not verify on this one.
    other = Checkpoint(origin=LOG, size=42, root_hash=leaf_hash(b"other root")).to_text()
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_cosignatures(signed + cosign(other, WITNESS, witness, T), [vkey])
    # Nor does one whose timestamp was changed after signing.
    line = cosign(text, WITNESS, witness, T)
    blob = bytearray(base64.b64decode(line.rstrip("\n").rsplit(" ", 1)[1]))
    blob[11] ^= 1
    forged = f"\u2014 {WITNESS} {base64.b64encode(bytes(blob)).decode()}\n"
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_cosignatures(signed + forged, [vkey])


def test_add_checkpoint_body_round_trip_and_limits() -> None:
    proof = [leaf_hash(bytes([i])) for i in range(3)]
    body = format_add_checkpoint(20852014, proof, "origin\n1\nroot\n\n\u2014 sig\n")
    assert body.startswith("old 20852014\n") and "\n\norigin\n" in body
    parsed = parse_add_checkpoint(body.encode())
    assert (parsed.old_size, parsed.proof, parsed.note) == (20852014, proof, "origin\n1\nroot\n\n\u2014 sig\n")
    for bad in (b"old 01\n\nx", b"old -1\n\nx", b"new 1\n\nx", b"old 1\nnot base64!\n\nx", b"old 1\n"):
        with pytest.raises(CheckpointError):
            parse_add_checkpoint(bad)
    with pytest.raises(CheckpointError, match="63"):
        parse_add_checkpoint(format_add_checkpoint(1, proof * 22, "n\n").encode())
