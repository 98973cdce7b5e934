"""Who may do what on the broker: Kafka principals, their SCRAM passwords and their ACLs.

One principal per service (its name), per partner party of the registry (its party id) and the ops
`admin` (a super user, like the broker's own `broker`). The broker denies whatever no ACL allows
(`allow.everyone.if.no.acl.found=false`); the ACLs declared here are the whole policy:

- a partner party writes the partner topics its roles send on (from the contract's event table),
  reads the outcomes, with consumer groups named `<party-id>.<anything>`;
- a service reads its input topics with its consumer group `<prefix>-<service>`, writes its own
  decisions topic, the outcomes and the DLQ (the ledger: the DLQ only), with the transactional id
  and progress group `<prefix>-<service>-outbox` of its outbox relay (shared.runtime.outbox).

aiokafka has no ACL or SCRAM admin calls, so CreateAcls (v1) and AlterUserScramCredentials (v0)
are sent with aiokafka's own protocol classes, from a client authenticated as the admin.
`gputrace kafka acls` and `gputrace kafka users` are the command line; docs/ops.md the how-to.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import CreateAclsRequest_v1, CreateAclsResponse_v1
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import CompactArray, CompactBytes, CompactString, Int8, Int16, Int32, Schema, TaggedFields

from shared.contract import DECIDING_SERVICES, DLQ_TOPIC, EVENTS, OUTCOMES_TOPIC, SERVICES, decisions_topic
from shared.contract.parties import PartyRegistry, RegisteredParty
from shared.runtime.kafka_auth import KAFKA_ADMIN, password_file
from shared.runtime.settings import Settings
from shared.runtime.topics import RELAY_PROGRESS_TOPIC

# Kafka's wire codes (org.apache.kafka.common.resource / acl).
TOPIC, GROUP, TRANSACTIONAL_ID = 2, 3, 5
LITERAL, PREFIXED = 3, 4
READ, WRITE = 3, 4  # each implies DESCRIBE on its resource
ALLOW = 3
SCRAM_SHA_512 = 2
SCRAM_ITERATIONS = 8192

# The topics each service's main subscribes to (services/<name>/main.py): what its principal reads.
SERVICE_INPUTS: dict[str, tuple[str, ...]] = {
    "pledges": ("partner.pledges.v1",),
    "quotes": ("partner.procurement.v1", decisions_topic("pledges")),
    "export_controls": ("partner.licensing.v1", decisions_topic("quotes")),
    "deliveries": ("partner.logistics.v1", decisions_topic("quotes"), decisions_topic("export_controls")),
    "ledger": tuple(decisions_topic(s) for s in DECIDING_SERVICES),
}


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW rule: `principal` may `operation` on the resource, from any host."""

    principal: str
    resource_type: int
    name: str
    operation: int
    pattern: int = LITERAL


def _user(name: str) -> str:
    return f"User:{name}"


def service_acls(service: str, group_prefix: str) -> list[Acl]:
    user = _user(service)
    outbox = f"{group_prefix}-{service}-outbox"
    writes = [DLQ_TOPIC] if service not in DECIDING_SERVICES else [decisions_topic(service), OUTCOMES_TOPIC, DLQ_TOPIC]
    return [
        *(Acl(user, TOPIC, t, READ) for t in SERVICE_INPUTS[service]),
        Acl(user, GROUP, f"{group_prefix}-{service}", READ),
        *(Acl(user, TOPIC, t, WRITE) for t in writes),
        # The outbox relay: its transactional id, and its progress committed as offsets of the
        # relay-progress topic in the group of the same name.
        Acl(user, TRANSACTIONAL_ID, outbox, WRITE),
        Acl(user, GROUP, outbox, READ),
        Acl(user, TOPIC, RELAY_PROGRESS_TOPIC, READ),
    ]


def partner_topics(party: RegisteredParty) -> list[str]:
    """The partner topics on which the contract lets this party's roles send something."""
    return sorted({spec.topic for spec in EVENTS.values() if spec.roles & party.roles})


def partner_acls(party: RegisteredParty) -> list[Acl]:
    user = _user(party.id)
    return [
        *(Acl(user, TOPIC, t, WRITE) for t in partner_topics(party)),
        Acl(user, TOPIC, OUTCOMES_TOPIC, READ),
        Acl(user, GROUP, f"{party.id}.", READ, PREFIXED),
    ]


def partners(registry: PartyRegistry) -> list[RegisteredParty]:
    """The parties that send partner events (a service's own registry entry is not one)."""
    return [p for p in registry if p.id not in SERVICES and partner_topics(p)]


def declared_acls(registry: PartyRegistry, group_prefix: str = "gputrace") -> list[Acl]:
    acls = [a for s in SERVICES for a in service_acls(s, group_prefix)]
    acls += [a for p in partners(registry) for a in partner_acls(p)]
    return sorted(set(acls))


def principals(registry: PartyRegistry) -> list[str]:
    return [KAFKA_ADMIN, *SERVICES, *(p.id for p in partners(registry))]


def new_password() -> str:
    # url-safe base64: safe inside kafka-storage's --add-scram argument and a JAAS string.
    return secrets.token_urlsafe(32)


def write_password(path: Path, password: str) -> None:
    """0600 from the start (never readable by others, even for a moment), replaced atomically."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    tmp.replace(path)


def write_credentials(directory: Path, names: Iterable[str]) -> list[str]:
    """A <principal>.password file (directory 0700) for each name that has none; existing ones are
    kept, so running it again is safe. Returns the names written."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    written = []
    for name in names:
        path = password_file(directory, name)
        if not path.exists():
            write_password(path, new_password())
            written.append(name)
    return written


# --- the two admin requests aiokafka lacks -----------------------------------------------------


class _CreateAcls(Request[CreateAclsRequest_v1]):
    API_KEY = 30

    def __init__(self, acls: list[Acl]) -> None:
        self._acls = acls

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> CreateAclsRequest_v1:
        return request_struct_class(
            [(a.resource_type, a.name, a.pattern, a.principal, "*", a.operation, ALLOW) for a in self._acls]
        )


class _AlterScramResponse(Response):
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScramStruct(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponse
    SCHEMA = Schema(
        ("deletions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields))),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScram(Request[_AlterScramStruct]):
    API_KEY = 51

    def __init__(self, passwords: dict[str, str]) -> None:
        self._passwords = passwords

    def build(self, request_struct_class: type[_AlterScramStruct]) -> _AlterScramStruct:
        upserts = []
        for name, password in self._passwords.items():
            # RFC 5802 Hi(): the broker stores keys derived from this, never the password.
            salt = secrets.token_bytes(32)
            salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
            upserts.append((name, SCRAM_SHA_512, SCRAM_ITERATIONS, salt, salted, {}))
        return request_struct_class([], upserts, {})


class KafkaAdminError(RuntimeError):
    pass


async def _admin(bootstrap: str, options: dict[str, Any]) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="gputrace-access", **options)
    await admin.start()
    return admin


async def apply_acls(bootstrap: str, options: dict[str, Any], acls: list[Acl]) -> int:
    """Create the ACLs (creating one that exists is a no-op). Raises on any refusal."""
    admin = await _admin(bootstrap, options)
    try:
        response: CreateAclsResponse_v1 = await admin._send_request(_CreateAcls(acls))
    finally:
        await admin.close()
    errors = [(acl, code, msg) for acl, (code, msg) in zip(acls, response.creation_responses, strict=True) if code]
    if errors:
        raise KafkaAdminError(f"{len(errors)} ACL(s) refused, first: {errors[0]}")
    return len(acls)


async def upsert_scram_users(bootstrap: str, options: dict[str, Any], passwords: dict[str, str]) -> None:
    """Create or change SCRAM-SHA-512 users (a new partner, a rotated password). Controllers apply it."""
    admin = await _admin(bootstrap, options)
    try:
        response = await admin._send_request(_AlterScram(passwords))
    finally:
        await admin.close()
    errors = [(user, code, msg) for user, code, msg, _ in response.results if code]
    if errors:
        raise KafkaAdminError(f"SCRAM users refused: {errors}")


# --- command line: gputrace kafka ... ---------------------------------------------------------

kafka_app = typer.Typer(help="Kafka principals, passwords and ACLs (run as the admin principal).", no_args_is_help=True)


def _connection(bootstrap: str | None) -> tuple[str, dict[str, Any]]:
    settings = Settings()
    return bootstrap or settings.kafka_bootstrap_servers, settings.kafka_client_options(KAFKA_ADMIN)


@kafka_app.command("acls")
def acls_command(
    registry: Annotated[Path, typer.Option(help="The party registry")] = Path("var/keys/registry.json"),
    group_prefix: Annotated[str, typer.Option(help="CONSUMER_GROUP_PREFIX of the services")] = "gputrace",
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
    show: Annotated[bool, typer.Option(help="Only print the ACLs, change nothing")] = False,
) -> None:
    """Create the ACLs of every service and partner principal (idempotent)."""
    wanted = declared_acls(PartyRegistry.load(registry), group_prefix)
    if show:
        for a in wanted:
            kind = {TOPIC: "topic", GROUP: "group", TRANSACTIONAL_ID: "transactional-id"}[a.resource_type]
            op = {READ: "READ", WRITE: "WRITE"}[a.operation]
            star = "*" if a.pattern == PREFIXED else ""
            typer.echo(f"{a.principal:28} {op:5} {kind} {a.name}{star}")
        return
    servers, options = _connection(bootstrap)
    count = asyncio.run(apply_acls(servers, options, wanted))
    typer.echo(f"{count} ACL(s) in place on {servers}")


@kafka_app.command("users")
def users_command(
    credentials: Annotated[Path, typer.Option(help="KAFKA_CREDENTIALS_DIR")] = Path("var/keys/kafka"),
    rotate: Annotated[list[str] | None, typer.Option(help="Give this principal a new password first")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Create or update a SCRAM user for each <principal>.password file (e.g. a partner added after
    the broker was formatted), after writing new passwords for the --rotate principals."""
    names = [p.stem for p in sorted(credentials.glob("*.password"))]
    for name in rotate or []:
        if name not in names:
            raise typer.BadParameter(f"no {password_file(credentials, name)}")
    servers, options = _connection(bootstrap)
    if rotate:
        # The broker first, then the files: the admin's old password still authenticates this call.
        fresh = {n: new_password() for n in rotate}
        asyncio.run(upsert_scram_users(servers, options, fresh))
        for name, password in fresh.items():
            write_password(password_file(credentials, name), password)
        typer.echo(f"new password(s) for {', '.join(fresh)}: restart (or reconfigure) those clients")
        return
    passwords = {n: password_file(credentials, n).read_text().strip() for n in names}
    asyncio.run(upsert_scram_users(servers, options, passwords))
    typer.echo(f"{len(passwords)} SCRAM user(s) in place on {servers}")


def tool_options(principal: str, keys_dir: Path | None = None) -> dict[str, Any]:
    """A command-line tool's Kafka options, acting as `principal` (a partner party, or the admin),
    its password read from `<keys_dir>/kafka` unless KAFKA_CREDENTIALS_DIR says elsewhere; the
    environment's KAFKA_SASL_USERNAME, when set, wins (shared.runtime.kafka_auth.client_options)."""
    settings = Settings()
    if keys_dir is not None and not os.environ.get("KAFKA_CREDENTIALS_DIR"):
        settings.kafka_credentials_dir = keys_dir / "kafka"
    return settings.kafka_client_options(principal)
