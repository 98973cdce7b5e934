"""Ed25519 signing and verification of events through libsodium (PyNaCl, also PyCA's).

Every event is verified up to three times on its way (pledges, quotes, the ledger) and every
decision signed once: on this machine libsodium does both about twice as fast as OpenSSL, which
`cryptography` uses. Keys stay `cryptography` objects everywhere else (loading, the registry, the
standalone verifier); Ed25519 is deterministic, so both libraries give the same signature bytes.
libsodium's verification is the stricter of the two (it also refuses small-order keys and R
points), so a signature it accepts is one `cryptography` accepts too: the auditor's verifier,
which uses `cryptography`, never disagrees with what the services admitted.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from nacl.bindings import crypto_sign, crypto_sign_open, crypto_sign_seed_keypair
from nacl.exceptions import BadSignatureError, CryptoError

SIGNATURE_BYTES = 64

# cryptography's key objects are not hashable: the raw bytes are kept by id(), with the object
# itself, which keeps it alive, so its id cannot go to another key while cached. Services hold a
# few keys; the bound only matters to test runs that make thousands.
_CACHE_LIMIT = 4096
_public: dict[int, tuple[Ed25519PublicKey, bytes]] = {}
_secret: dict[int, tuple[Ed25519PrivateKey, bytes]] = {}


def _public_raw(key: Ed25519PublicKey) -> bytes:
    cached = _public.get(id(key))
    if cached is not None:
        return cached[1]
    if len(_public) >= _CACHE_LIMIT:
        _public.clear()
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    _public[id(key)] = (key, raw)
    return raw


def _secret_raw(key: Ed25519PrivateKey) -> bytes:
    cached = _secret.get(id(key))
    if cached is not None:
        return cached[1]
    if len(_secret) >= _CACHE_LIMIT:
        _secret.clear()
    seed = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    _, secret = crypto_sign_seed_keypair(seed)
    _secret[id(key)] = (key, secret)
    return secret


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `message`, as `key.sign(message)` gives it."""
    return crypto_sign(message, _secret_raw(key))[:SIGNATURE_BYTES]


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is `key`'s signature of `message`. Never raises for bad input."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        crypto_sign_open(signature + message, _public_raw(key))
    except (BadSignatureError, CryptoError, ValueError):
        return False
    return True
