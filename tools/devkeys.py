"""Development keys: the programme's parties with a fresh Ed25519 key each, and their registry.

Production registries are written by whoever admits a party; this is for `make run`, the demo
and the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.contract import DECIDING_SERVICES, Role
from shared.contract.parties import load_private_key, public_key_b64, write_private_key

# The parties of the 2025 programme, for development and the demo.
DEV_PARTIES: list[tuple[str, str, list[Role]]] = [
    ("nhn-cloud", "NHN Cloud", [Role.PARTNER]),
    ("kakao", "Kakao", [Role.PARTNER]),
    ("naver-cloud", "Naver Cloud", [Role.PARTNER]),
    ("kt-cloud", "KT Cloud", [Role.PARTNER]),
    ("kdb", "Korea Development Bank", [Role.PARTNER]),
    ("ibk", "Industrial Bank of Korea", [Role.PARTNER]),
    # The 2025-10-31 programme's partners (about 260,000 Blackwell GPUs; tools/demo/programme.py).
    ("msit", "Ministry of Science and ICT", [Role.PARTNER]),
    ("samsung-electronics", "Samsung Electronics", [Role.PARTNER]),
    ("sk-group", "SK Group", [Role.PARTNER]),
    ("hyundai-motor-group", "Hyundai Motor Group", [Role.PARTNER]),
    ("nipa", "National AI Computing Center programme office", [Role.PROGRAM_OFFICE]),
    ("nvidia-partner-kr", "NVIDIA Partner Network Korea", [Role.VENDOR]),
    ("supermicro-apac", "Supermicro APAC", [Role.VENDOR]),
    ("dell-korea", "Dell Technologies Korea", [Role.VENDOR]),
    ("bis-liaison", "Licensing authority liaison", [Role.LICENSING_AUTHORITY]),
    ("korea-logistics", "Korea Logistics Co.", [Role.LOGISTICS]),
    ("haenam-site", "National AI Computing Center, Haenam", [Role.SITE]),
]


# Each deciding service signs its decisions with a key of its own (<service>.key, role `service`).
DEV_SERVICES: list[tuple[str, str, list[Role]]] = [
    (service, f"gputrace {service} service", [Role.SERVICE]) for service in DECIDING_SERVICES
]


def generate_dev_registry(directory: Path) -> Path:
    """Write registry.json and <party>.key / <service>.key files; existing keys are kept, so
    re-running is safe."""
    directory.mkdir(parents=True, exist_ok=True)
    parties = []
    for party_id, name, roles in [*DEV_PARTIES, *DEV_SERVICES]:
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
