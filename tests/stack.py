"""Brings up the services as real processes against the session's Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import uuid
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.ledger.auth import write_dev_tokens
from shared.contract import SERVICES
from shared.contract.parties import PartyRegistry, write_private_key
from shared.runtime.kafka_auth import KAFKA_ADMIN
from shared.runtime.settings import Settings
from shared.runtime.topics import ensure_topics
from tools.devkeys import DEV_PARTIES, generate_dev_registry
from tools.devstack import Stack, free_port
from tools.kafka_access import apply_acls, declared_acls


def make_keys(directory: Path) -> dict[str, str]:
    generate_dev_registry(directory)
    write_private_key(directory / "ledger.key", Ed25519PrivateKey.generate())
    return write_dev_tokens(directory / "tokens.json", [p for p, _, _ in DEV_PARTIES])


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def create_databases(admin_url: str, run_id: str, names: tuple[str, ...]) -> dict[str, str]:
    """One database per service, as in production: services share nothing but Kafka."""
    urls = {}
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        for name in names:
            db = f"gt_{run_id}_{name}"
            conn.execute(f'CREATE DATABASE "{db}"')
            base, _, _ = _libpq(admin_url).rpartition("/")
            urls[name] = f"{base}/{db}"
    return urls


def secure_kafka_access(kafka: str, registry: Path, group_prefix: str) -> bool:
    """On a broker this process administers (KAFKA_CREDENTIALS_DIR holds the admin's password, see
    tests.infra.speak_as_admin), the ACLs of every service and partner, for this stack's consumer
    groups; the services then run as their own principals. False: the environment's broker and identity."""
    credentials = os.environ.get("KAFKA_CREDENTIALS_DIR")
    if not credentials or not (Path(credentials) / f"{KAFKA_ADMIN}.password").exists():
        return False
    options = Settings().kafka_client_options(KAFKA_ADMIN)
    asyncio.run(apply_acls(kafka, options, declared_acls(PartyRegistry.load(registry), group_prefix)))
    return True


def available_services() -> tuple[str, ...]:
    return tuple(s for s in SERVICES if importlib.util.find_spec(f"services.{s}.main") is not None)


def start_stack(kafka: str, admin_url: str | None, workdir: Path) -> tuple[Stack, dict[str, str]]:
    """`admin_url` None: each service in its own SQLite file (the embedded default, `make run`)."""
    run_id = uuid.uuid4().hex[:8]
    keys = workdir / "keys"
    tokens = make_keys(keys)
    asyncio.run(ensure_topics(kafka))
    names = available_services()
    secured = secure_kafka_access(kafka, keys / "registry.json", f"test-{run_id}")
    stack = Stack(
        base_env={
            "KAFKA_BOOTSTRAP_SERVERS": kafka,
            "PARTY_REGISTRY": str(keys / "registry.json"),
            "VAR_DIR": str(workdir / "var"),
            "CONSUMER_GROUP_PREFIX": f"test-{run_id}",
            "LEDGER_SIGNING_KEY": str(keys / "ledger.key"),
            "API_TOKENS": str(keys / "tokens.json"),
            "LOG_JSON": "true",
        },
        log_dir=workdir / "logs",
        database_urls=create_databases(admin_url, run_id, names)
        if admin_url
        else {n: f"sqlite+aiosqlite:///{workdir / 'var' / 'data' / n}.db" for n in names},
        api_port=free_port(),
        kafka_principals=secured,
    )
    (workdir / "var" / "data").mkdir(parents=True, exist_ok=True)
    stack.start(names)
    stack.wait_ready()
    return stack, tokens


def dump_logs(stack: Stack, lines: int = 40) -> str:
    out = []
    for name, proc in stack.processes.items():
        text = proc.log_path.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {name} ---\n" + "\n".join(text))
    return "\n".join(out)


def auditor_headers(tokens: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['auditor']}"}
