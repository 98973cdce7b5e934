"""Events are signed and verified through libsodium (shared.contract.ed25519), keys stay
`cryptography` objects: the signatures must be RFC 8032's, the same bytes `cryptography` makes,
and whatever libsodium accepts `cryptography` (the auditor's verifier) must accept too."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.contract import ed25519

# RFC 8032 §7.1, TEST 1-3: (secret key, public key, message, signature), hex.
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


def _openssl_accepts(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors(secret: str, public: str, message: str, signature: str) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex() == public
    assert ed25519.sign(key, bytes.fromhex(message)).hex() == signature
    assert ed25519.verify(key.public_key(), bytes.fromhex(signature), bytes.fromhex(message))
    assert not ed25519.verify(key.public_key(), bytes.fromhex(signature), bytes.fromhex(message) + b"\0")


KEYS = [Ed25519PrivateKey.generate() for _ in range(3)]


@settings(max_examples=200, deadline=None)
@given(message=st.binary(max_size=2048), which=st.integers(0, 2), flip=st.integers(0, 64 * 8 - 1))
def test_the_same_signatures_as_cryptography_and_the_same_answers(message: bytes, which: int, flip: int) -> None:
    key = KEYS[which]
    signature = ed25519.sign(key, message)
    assert signature == key.sign(message)
    assert ed25519.verify(key.public_key(), signature, message)
    # Any one bit flipped: both refuse.
    bad = bytearray(signature)
    bad[flip // 8] ^= 1 << (flip % 8)
    assert not ed25519.verify(key.public_key(), bytes(bad), message)
    assert not _openssl_accepts(key.public_key(), bytes(bad), message)
    # Another key's signature: refused.
    other = KEYS[(which + 1) % 3].public_key()
    assert not ed25519.verify(other, signature, message)


@pytest.mark.parametrize("signature", [b"", b"\0" * 63, b"\0" * 65, b"\xff" * 64])
def test_malformed_signatures_are_refused_without_raising(signature: bytes) -> None:
    assert not ed25519.verify(KEYS[0].public_key(), signature, b"m")


def test_a_small_order_key_that_openssl_lets_sign_everything_verifies_nothing() -> None:
    """The identity point as a public key, R = identity and S = 0: OpenSSL's check accepts this
    "signature" of every message; libsodium refuses small-order keys, so such a key (registered
    by mistake or malice) can never make an event count."""
    identity = bytes([1]) + bytes(31)
    key = Ed25519PublicKey.from_public_bytes(identity)
    universal = identity + bytes(32)
    assert _openssl_accepts(key, universal, b"any message")
    assert not ed25519.verify(key, universal, b"any message")
