"""The party registry: who may publish, in which roles, with which Ed25519 key.

The registry is a JSON file (`PARTY_REGISTRY`), public keys only: the partners', and one entry per
deciding service (role `service`, id = the service's name) whose key signs its decisions.
`gputrace keys init` writes a development registry and one private key per party and service
beside it, so the demo and the tests can sign as any party; production registries come from the
programme office.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.contract import PARTY_SOURCE_PREFIX, Role


@dataclass(frozen=True)
class RegisteredParty:
    id: str
    name: str
    roles: frozenset[Role]
    public_key: Ed25519PublicKey


class PartyRegistry:
    def __init__(self, parties: list[RegisteredParty]) -> None:
        self._by_id = {p.id: p for p in parties}

    @classmethod
    def load(cls, path: Path | str) -> PartyRegistry:
        doc = json.loads(Path(path).read_text())
        return cls(
            [
                RegisteredParty(
                    id=p["id"],
                    name=p.get("name", p["id"]),
                    roles=frozenset(Role(r) for r in p["roles"]),
                    public_key=Ed25519PublicKey.from_public_bytes(base64.b64decode(p["public_key"])),
                )
                for p in doc["parties"]
            ]
        )

    def by_source(self, source: str) -> RegisteredParty | None:
        """The partner (never a service) that a partner event's ce_source names."""
        if not source.startswith(PARTY_SOURCE_PREFIX):
            return None
        party = self._by_id.get(source[len(PARTY_SOURCE_PREFIX) :])
        return None if party is None or Role.SERVICE in party.roles else party

    def service(self, name: str) -> RegisteredParty | None:
        """The registered key of a gputrace service (role `service`), which signs its decisions."""
        party = self._by_id.get(name)
        return party if party is not None and Role.SERVICE in party.roles else None

    def get(self, party_id: str) -> RegisteredParty | None:
        return self._by_id.get(party_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_id.values())


def public_key_b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key
