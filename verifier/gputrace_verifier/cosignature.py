"""C2SP tlog-cosignature (Ed25519 `cosignature/v1`) and the tlog-witness add-checkpoint body.

A witness that verified a checkpoint is consistent with everything it saw of that log before
adds a note signature line to it:

    — <witness name> base64(key id (4) || timestamp (u64, big-endian) || Ed25519 signature (64))

signed over "cosignature/v1\\ntime <timestamp>\\n" followed by the checkpoint's note text. The key
id is SHA-256(<name> || "\\n" || 0x04 || public key)[:4] (type 0x04: a cosignature key, never a
log key), and a witness key is published as a vkey `<name>+<hex key id>+base64(0x04 || key)`.

Specs: https://c2sp.org/tlog-cosignature and https://c2sp.org/tlog-witness. The tests check the
key ids and the timestamp encoding against transparency-dev/formats (note/note_cosigv1_test.go).
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gputrace_verifier.checkpoint import (
    ED25519_SIG_SIZE,
    SIG_PREFIX,
    CheckpointError,
    _split_note,
    key_id,
    make_vkey,
    parse_vkey,
)

__all__ = [
    "SIG_TYPE_COSIGNATURE_V1",
    "AddCheckpoint",
    "Cosignature",
    "cosign",
    "cosignature_message",
    "cosigner_key_id",
    "format_add_checkpoint",
    "make_witness_vkey",
    "parse_add_checkpoint",
    "parse_witness_vkey",
    "verify_cosignatures",
]

SIG_TYPE_COSIGNATURE_V1 = 0x04
MAX_TIMESTAMP = 2**63 - 1  # tlog-cosignature: the timestamp MUST NOT exceed 2^63 - 1
MAX_PROOF_LINES = 63  # tlog-witness: a client MUST NOT send more
_DECIMAL = re.compile(r"0|[1-9][0-9]*")

Witness = tuple[str, Ed25519PublicKey]


def cosigner_key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """SHA-256(name || 0x0A || 0x04 || 32-byte public key)[:4]."""
    return key_id(name, public_key, SIG_TYPE_COSIGNATURE_V1)


def make_witness_vkey(name: str, public_key: Ed25519PublicKey) -> str:
    return make_vkey(name, public_key, SIG_TYPE_COSIGNATURE_V1)


def parse_witness_vkey(vkey: str) -> Witness:
    """Inverse of make_witness_vkey. Only type 0x04: a log key (0x01) is not a witness key, and
    accepting one would let a log's own signature pass for a witness's."""
    return parse_vkey(vkey, SIG_TYPE_COSIGNATURE_V1, "witness key")


def cosignature_message(text: str, timestamp: int) -> bytes:
    """What a cosignature/v1 signs: two header lines, then the checkpoint's note text."""
    if not text.endswith("\n"):
        raise CheckpointError("bad note: text must end with a newline")
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


def cosign(text: str, name: str, private_key: Ed25519PrivateKey, timestamp: int) -> str:
    """One cosignature line (with its newline) over a checkpoint's note text."""
    if not 0 < timestamp <= MAX_TIMESTAMP:
        raise CheckpointError(f"cosignature timestamp must be in (0, 2^63), got {timestamp}")
    kid = cosigner_key_id(name, private_key.public_key())
    signature = private_key.sign(cosignature_message(text, timestamp))
    blob = kid + struct.pack(">Q", timestamp) + signature
    return f"{SIG_PREFIX}{name} {base64.b64encode(blob).decode('ascii')}\n"


@dataclass(frozen=True)
class Cosignature:
    name: str
    key_id: bytes
    timestamp: int


def verify_cosignatures(note: str | bytes, witnesses: Sequence[str | Witness]) -> list[Cosignature]:
    """The witnesses (vkeys or (name, key) pairs) whose cosignature on this note verifies, one
    entry per witness. Lines by other keys are ignored (signed-note); a line that claims a
    trusted witness's name and key id but does not verify makes the note invalid (raises)."""
    resolved = [parse_witness_vkey(w) if isinstance(w, str) else w for w in witnesses]
    text, signatures = _split_note(note)
    found: dict[bytes, Cosignature] = {}
    for name, public_key in resolved:
        kid = cosigner_key_id(name, public_key)
        for sig_name, blob in signatures:
            if sig_name != name or blob[:4] != kid:
                continue
            if len(blob) != 4 + 8 + ED25519_SIG_SIZE:
                raise CheckpointError(f"bad cosignature by {name}+{kid.hex()}: wrong length")
            (timestamp,) = struct.unpack(">Q", blob[4:12])
            try:
                if timestamp > MAX_TIMESTAMP:
                    raise InvalidSignature
                public_key.verify(blob[12:], cosignature_message(text, timestamp))
            except InvalidSignature:
                raise CheckpointError(f"bad cosignature: cosignature by {name}+{kid.hex()} does not verify") from None
            # One witness counts once, however many lines it has on the note.
            if kid not in found or timestamp > found[kid].timestamp:
                found[kid] = Cosignature(name, kid, timestamp)
    return list(found.values())


# --------------------------------------------------------------------------- tlog-witness body


@dataclass(frozen=True)
class AddCheckpoint:
    old_size: int
    proof: list[bytes]
    note: str


def format_add_checkpoint(old_size: int, proof: Sequence[bytes], note: str) -> str:
    """`old <size>`, one base64 proof hash per line, an empty line, then the signed note."""
    lines = [f"old {old_size}", *(base64.b64encode(h).decode("ascii") for h in proof)]
    return "".join(f"{line}\n" for line in lines) + "\n" + note


def parse_add_checkpoint(body: bytes) -> AddCheckpoint:
    """Parse an add-checkpoint request body; CheckpointError (a 400) if it is malformed."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("request body is not UTF-8") from None
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise CheckpointError("request body has no empty line before the checkpoint")
    first, *proof_lines = head.split("\n")
    if not first.startswith("old ") or not _DECIMAL.fullmatch(first[4:]):
        raise CheckpointError("the first line must be 'old <size>' (decimal, no leading zeros)")
    if len(proof_lines) > MAX_PROOF_LINES:
        raise CheckpointError(f"more than {MAX_PROOF_LINES} consistency proof lines")
    proof: list[bytes] = []
    for line in proof_lines:
        try:
            digest = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise CheckpointError("a consistency proof line is not standard base64") from None
        if len(digest) != 32:
            raise CheckpointError("a consistency proof line is not a 32-byte hash")
        proof.append(digest)
    return AddCheckpoint(int(first[4:]), proof, note)
