"""The party registry: who may publish, in which roles, with which Ed25519 key.

The registry is a JSON file (`PARTY_REGISTRY`), public keys only. `gputrace keys init` writes a
development registry and one private key per party beside it, so the demo and the tests can
sign as any party; production registries come from the programme office.
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
        if not source.startswith(PARTY_SOURCE_PREFIX):
            return None
        return self._by_id.get(source[len(PARTY_SOURCE_PREFIX) :])

    def get(self, party_id: str) -> RegisteredParty | None:
        return self._by_id.get(party_id)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_id.values())


# The parties of the 2025 programme, for development and the demo.
DEV_PARTIES: list[tuple[str, str, list[Role]]] = [
    ("nhn-cloud", "NHN Cloud", [Role.PARTNER]),
    ("kakao", "Kakao", [Role.PARTNER]),
    ("naver-cloud", "Naver Cloud", [Role.PARTNER]),
    ("kt-cloud", "KT Cloud", [Role.PARTNER]),
    ("kdb", "Korea Development Bank", [Role.PARTNER]),
    ("ibk", "Industrial Bank of Korea", [Role.PARTNER]),
    ("nipa", "National AI Computing Center programme office", [Role.PROGRAM_OFFICE]),
    ("nvidia-partner-kr", "NVIDIA Partner Network Korea", [Role.VENDOR]),
    ("supermicro-apac", "Supermicro APAC", [Role.VENDOR]),
    ("dell-korea", "Dell Technologies Korea", [Role.VENDOR]),
    ("bis-liaison", "Licensing authority liaison", [Role.LICENSING_AUTHORITY]),
    ("korea-logistics", "Korea Logistics Co.", [Role.LOGISTICS]),
    ("haenam-site", "National AI Computing Center, Haenam", [Role.SITE]),
]


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


def generate_dev_registry(directory: Path) -> Path:
    """Write registry.json and <party>.key files; existing keys are kept, so re-running is safe."""
    directory.mkdir(parents=True, exist_ok=True)
    parties = []
    for party_id, name, roles in DEV_PARTIES:
        key_path = directory / f"{party_id}.key"
        if key_path.exists():
            key = load_private_key(key_path)
        else:
            key = Ed25519PrivateKey.generate()
            write_private_key(key_path, key)
        parties.append(
            {
                "id": party_id,
                "name": name,
                "roles": [r.value for r in roles],
                "public_key": public_key_b64(key.public_key()),
            }
        )
    registry = directory / "registry.json"
    registry.write_text(json.dumps({"parties": parties}, indent=2) + "\n")
    return registry
