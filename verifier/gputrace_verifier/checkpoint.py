"""C2SP tlog-checkpoint in the C2SP signed-note format, with Ed25519 signatures.

    <origin>\\n<tree size>\\n<base64 root hash>\\n[<extension line>\\n ...]
    \\n
    — <key name> <base64(4-byte key id || 64-byte Ed25519 signature)>\\n   (one or more)

Specs: https://c2sp.org/tlog-checkpoint and https://c2sp.org/signed-note (which is also
what Go's golang.org/x/mod/sumdb/note implements; the tests check against its vectors and
against a real sum.golang.org checkpoint).

Verification follows the signed-note rules: signatures by keys we were not given are
ignored (witness cosignatures, rotated keys), a signature by our key that does not verify
rejects the whole note, and at least one signature by our key must verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "SIG_TYPE_ED25519",
    "Checkpoint",
    "CheckpointError",
    "Verifier",
    "key_id",
    "make_vkey",
    "open_note",
    "parse_and_verify",
    "parse_vkey",
    "sign_checkpoint",
    "sign_note",
]

SIG_TYPE_ED25519 = 0x01  # signed-note signature type byte for Ed25519
EM_DASH = "\u2014"
SIG_PREFIX = EM_DASH + " "
HASH_SIZE = 32
ED25519_SIG_SIZE = 64
# The spec requires accepting at least 16 signatures and recommends a cap; Go uses 100.
MAX_SIGNATURES = 100
MAX_TREE_SIZE = 2**64 - 1  # tree sizes are uint64 everywhere else (RFC 9162, Go)

_DECIMAL = re.compile(r"0|[1-9][0-9]*")  # ASCII only: str.isdigit() would accept "٣"
_HEX_KEY_ID = re.compile(r"[0-9a-fA-F]{8}")

Verifier = str | tuple[str, Ed25519PublicKey]  # a vkey string, or (key name, public key)


class CheckpointError(ValueError):
    """A checkpoint or note is malformed, or is not signed by the expected key."""


# --------------------------------------------------------------------------- checkpoint body


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Validate on construction so an unsignable checkpoint can never be built.
        object.__setattr__(self, "extensions", tuple(self.extensions))
        if not isinstance(self.origin, str) or not self.origin:
            raise CheckpointError("checkpoint origin must be a non-empty string")
        _check_line("origin", self.origin)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError(f"checkpoint tree size must be an int in [0, 2^64), got {self.size!r}")
        if isinstance(self.root_hash, bytearray | memoryview):  # as database drivers may return
            object.__setattr__(self, "root_hash", bytes(self.root_hash))
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise CheckpointError(f"checkpoint root hash must be {HASH_SIZE} bytes")
        for ext in self.extensions:
            if not isinstance(ext, str) or not ext:
                raise CheckpointError("checkpoint extension lines must be non-empty strings")
            _check_line("extension line", ext)

    def to_text(self) -> str:
        """The note text that gets signed (ends with a newline)."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        return "".join(f"{line}\n" for line in (self.origin, str(self.size), root, *self.extensions))

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse note text (no signatures). Strict, so that one checkpoint has one text."""
        if not text.endswith("\n"):
            raise CheckpointError("bad checkpoint body: it must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError("bad checkpoint body: fewer than three lines (origin, size, root)")
        if any(not line for line in lines):
            raise CheckpointError("bad checkpoint body: empty line")
        origin, size_line, root_line, *extensions = lines
        if not _DECIMAL.fullmatch(size_line):
            raise CheckpointError(f"bad checkpoint body: tree size {size_line!r} is not a canonical decimal")
        try:
            root = base64.b64decode(root_line, validate=True)
        except binascii.Error:
            raise CheckpointError("bad checkpoint body: root hash is not standard base64") from None
        if len(root) != HASH_SIZE or base64.b64encode(root).decode("ascii") != root_line:
            raise CheckpointError(f"bad checkpoint body: root hash is not {HASH_SIZE} canonically encoded bytes")
        try:
            return cls(origin=origin, size=int(size_line), root_hash=root, extensions=tuple(extensions))
        except CheckpointError as e:
            raise CheckpointError(f"bad checkpoint body: {e}") from None


def _check_line(what: str, value: str) -> None:
    if any(ord(c) < 0x20 for c in value):
        raise CheckpointError(f"checkpoint {what} must be one line without control characters")


# --------------------------------------------------------------------------- keys


def _check_key_name(name: object) -> str:
    # signed-note: non-empty, no Unicode spaces, no "+" (the vkey field separator).
    if not isinstance(name, str) or not name or "+" in name or any(c.isspace() for c in name):
        raise CheckpointError(f"bad key name {name!r}: must be non-empty, without spaces or '+'")
    if any(ord(c) < 0x20 for c in name):
        raise CheckpointError(f"bad key name {name!r}: control characters")
    return name


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, public_key: Ed25519PublicKey, sig_type: int = SIG_TYPE_ED25519) -> bytes:
    """signed-note key ID: SHA-256(key name || 0x0A || type byte || 32-byte public key)[:4]
    (type 0x01 a log's Ed25519 key, 0x04 a witness's cosignature/v1 key)."""
    _check_key_name(name)
    material = name.encode("utf-8") + b"\n" + bytes([sig_type]) + _raw_public(public_key)
    return hashlib.sha256(material).digest()[:4]


def make_vkey(name: str, public_key: Ed25519PublicKey, sig_type: int = SIG_TYPE_ED25519) -> str:
    """Verifier key string `<name>+<hex key id>+<base64(type byte || public key)>` (Go note format)."""
    encoded = base64.b64encode(bytes([sig_type]) + _raw_public(public_key)).decode("ascii")
    return f"{name}+{key_id(name, public_key, sig_type).hex()}+{encoded}"


def parse_vkey(vkey: str, sig_type: int = SIG_TYPE_ED25519, what: str = "verifier key") -> tuple[str, Ed25519PublicKey]:
    """Inverse of make_vkey; checks the key id against the key, as Go's NewVerifier does. Only
    `sig_type` is accepted: a log key (0x01) is never a witness key (0x04), nor the reverse."""
    if not isinstance(vkey, str):
        raise CheckpointError(f"bad {what}: not a string")
    # Split twice only: the base64 key itself may contain '+'.
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3:
        raise CheckpointError(f"bad {what}: expected <name>+<hex key id>+<base64 key>")
    name, hex_id, encoded = parts
    try:
        _check_key_name(name)
    except CheckpointError as e:
        raise CheckpointError(f"bad {what}: {e}") from None
    if not _HEX_KEY_ID.fullmatch(hex_id):
        raise CheckpointError(f"bad {what}: key id is not 8 hex digits")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise CheckpointError(f"bad {what}: key is not standard base64") from None
    if len(raw) != 1 + 32:
        raise CheckpointError(f"bad {what}: key must be 33 bytes (type byte + Ed25519 key)")
    if raw[0] != sig_type:
        raise CheckpointError(f"bad {what}: unsupported signature type 0x{raw[0]:02x} (expected 0x{sig_type:02x})")
    public_key = Ed25519PublicKey.from_public_bytes(raw[1:])
    if key_id(name, public_key, sig_type) != bytes.fromhex(hex_id):
        raise CheckpointError(f"bad {what}: key id does not match the name and key")
    return name, public_key


def _resolve_verifier(verifier: Verifier) -> tuple[str, bytes, Ed25519PublicKey]:
    if isinstance(verifier, str):
        name, public_key = parse_vkey(verifier)
    elif isinstance(verifier, tuple) and len(verifier) == 2 and isinstance(verifier[1], Ed25519PublicKey):
        name, public_key = _check_key_name(verifier[0]), verifier[1]
    else:
        raise CheckpointError("verifier must be a vkey string or a (key name, Ed25519PublicKey) pair")
    return name, key_id(name, public_key), public_key


# --------------------------------------------------------------------------- signed notes


def _check_note_chars(text: str) -> None:
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise CheckpointError("bad note: contains ASCII control characters other than newline")


def sign_note(text: str, name: str, private_key: Ed25519PrivateKey) -> str:
    """Sign note text (which must end with a newline) and return the full signed note."""
    if not isinstance(text, str) or not text.endswith("\n"):
        raise CheckpointError("bad note: text must be a string ending with a newline")
    _check_note_chars(text)
    kid = key_id(name, private_key.public_key())
    signature = private_key.sign(text.encode("utf-8"))
    return f"{text}\n{SIG_PREFIX}{name} {base64.b64encode(kid + signature).decode('ascii')}\n"


def _split_note(note: str | bytes) -> tuple[str, list[tuple[str, bytes]]]:
    """Split a signed note into its text and (key name, decoded signature) pairs."""
    if isinstance(note, bytes | bytearray):
        try:
            note = bytes(note).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError("bad note: not valid UTF-8") from None
    if not isinstance(note, str):
        raise CheckpointError("bad note: not text")
    _check_note_chars(note)
    # The text ends at the LAST blank line: the text itself may contain blank lines.
    split = note.rfind("\n\n")
    if split < 0:
        raise CheckpointError("bad note: no blank line between the text and the signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block.endswith("\n"):
        raise CheckpointError("bad note: missing or unterminated signature lines")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(f"bad note: more than {MAX_SIGNATURES} signatures")
    return text, [_parse_signature_line(line) for line in lines]


def _parse_signature_line(line: str) -> tuple[str, bytes]:
    if not line.startswith(SIG_PREFIX):
        raise CheckpointError(f"bad note: signature line does not start with an em dash: {line[:40]!r}")
    fields = line[len(SIG_PREFIX) :].split(" ")
    if len(fields) != 2:
        raise CheckpointError(f"bad note: signature line is not '— <name> <base64>': {line[:40]!r}")
    name, encoded = fields
    try:
        _check_key_name(name)
        signature = base64.b64decode(encoded, validate=True)
    except (CheckpointError, binascii.Error):
        raise CheckpointError(f"bad note: malformed signature line {line[:40]!r}") from None
    if len(signature) < 5:  # 4-byte key id plus at least one byte of signature
        raise CheckpointError(f"bad note: signature too short in {line[:40]!r}")
    return name, signature


def open_note(note: str | bytes, verifier: Verifier) -> str:
    """Verify a signed note against one trusted key and return its text.

    Signatures by other keys are ignored; a signature claiming to be by the trusted key
    (same name and key id) that fails to verify rejects the note."""
    name, kid, public_key = _resolve_verifier(verifier)
    text, signatures = _split_note(note)
    message = text.encode("utf-8")
    verified = False
    for sig_name, signature in signatures:
        if sig_name != name or signature[:4] != kid:
            continue  # unknown key: the spec says ignore, even if the name or id matches
        try:
            if len(signature) != 4 + ED25519_SIG_SIZE:
                raise InvalidSignature
            public_key.verify(signature[4:], message)
        except InvalidSignature:
            raise CheckpointError(f"bad signature: signature by key {name}+{kid.hex()} does not verify") from None
        verified = True
    if not verified:
        seen = ", ".join(f"{n}+{s[:4].hex()}" for n, s in signatures)
        raise CheckpointError(f"unknown key: no signature by {name}+{kid.hex()} (note is signed by {seen})")
    return text


# --------------------------------------------------------------------------- checkpoints


def sign_checkpoint(cp: Checkpoint, name: str, private_key: Ed25519PrivateKey) -> str:
    """The signed note for a checkpoint. The key name SHOULD equal cp.origin (C2SP)."""
    return sign_note(cp.to_text(), name, private_key)


def parse_and_verify(note_text: str | bytes, verifier: Verifier, *, expected_origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint against a trusted key and parse it.

    Raises CheckpointError naming what failed: a bad note or body format, no signature by
    the trusted key, a bad signature, or (if expected_origin is given) another log's origin.
    The body is only parsed after the signature verified: unverified text is not trusted."""
    text = open_note(note_text, verifier)
    cp = Checkpoint.from_text(text)
    if expected_origin is not None and cp.origin != expected_origin:
        raise CheckpointError(f"wrong origin: checkpoint is for {cp.origin!r}, expected {expected_origin!r}")
    return cp
