"""Who a process is to Kafka, and the client keyword arguments that say so.

The broker authenticates every client with SASL/SCRAM-SHA-512 and authorizes it by ACL (see
docs/ops.md): each service, each partner party and the ops admin is its own principal. A process
finds its identity in the environment (KAFKA_SASL_USERNAME / KAFKA_SASL_PASSWORD, or a password
file under KAFKA_CREDENTIALS_DIR written by `gputrace keys init`); `client_options` turns it into
aiokafka's keyword arguments, the one place every client (FastStream broker, outbox producer,
admin clients, tools) takes them from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

if TYPE_CHECKING:
    from shared.runtime.settings import Settings

# The ops principal: creates topics and ACLs, a super user of the broker. Never a service's identity.
KAFKA_ADMIN = "admin"
SCRAM_MECHANISM = "SCRAM-SHA-512"


class KafkaCredentialsMissing(RuntimeError):
    """A secured connection was asked for but no password is known; the message says where to put one."""


def password_file(directory: Path, principal: str) -> Path:
    return directory / f"{principal}.password"


def read_password(directory: Path, principal: str) -> str:
    path = password_file(directory, principal)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise KafkaCredentialsMissing(
            f"no Kafka password for principal {principal!r} at {path}: create it with `gputrace keys init` "
            "(or set KAFKA_SASL_PASSWORD)"
        ) from None


def client_options(settings: Settings, principal: str | None = None) -> dict[str, Any]:
    """aiokafka keyword arguments (security_protocol, sasl_*, ssl_context) for this process.

    The environment's KAFKA_SASL_USERNAME wins: an operator who names an identity gets it. Else
    `principal` (a tool acting for a partner, or the admin) is used when its password file exists
    under KAFKA_CREDENTIALS_DIR; without either, the connection is PLAINTEXT (an unsecured broker).
    """
    explicit = settings.kafka_security_protocol
    user = settings.kafka_sasl_username
    if user is None and principal is not None:
        if explicit or password_file(settings.kafka_credentials_dir, principal).exists():
            user = principal
    protocol = (explicit or ("SASL_PLAINTEXT" if user else "PLAINTEXT")).upper()
    if not protocol.startswith("SASL_"):
        return {"security_protocol": protocol, **_tls(protocol)}
    if user is None:
        raise KafkaCredentialsMissing(f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_USERNAME")
    if settings.kafka_sasl_password is not None and user == settings.kafka_sasl_username:
        password = settings.kafka_sasl_password.get_secret_value()
    else:
        password = read_password(settings.kafka_credentials_dir, user)
    return {
        "security_protocol": protocol,
        "sasl_mechanism": settings.kafka_sasl_mechanism,
        "sasl_plain_username": user,
        "sasl_plain_password": password,
        **_tls(protocol),
    }


def _tls(protocol: str) -> dict[str, Any]:
    # SASL_SSL / SSL: the system's trust store verifies the broker (production; see docs/ops.md).
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        return {"ssl_context": create_ssl_context()}
    return {}


def faststream_security(options: dict[str, Any]) -> BaseSecurity | None:
    """The same options in the form FastStream's KafkaBroker takes them."""
    protocol = options.get("security_protocol", "PLAINTEXT")
    tls = protocol in ("SSL", "SASL_SSL")
    if not protocol.startswith("SASL_"):
        return BaseSecurity(ssl_context=options.get("ssl_context"), use_ssl=True) if tls else None
    kinds: dict[str, type[SASLPlaintext | SASLScram256 | SASLScram512]] = {
        "PLAIN": SASLPlaintext,
        "SCRAM-SHA-256": SASLScram256,
        "SCRAM-SHA-512": SASLScram512,
    }
    kind = kinds.get(options["sasl_mechanism"])
    if kind is None:
        raise ValueError(f"unsupported KAFKA_SASL_MECHANISM {options['sasl_mechanism']!r}")
    return kind(
        options["sasl_plain_username"],
        options["sasl_plain_password"],
        ssl_context=options.get("ssl_context"),
        use_ssl=tls,
    )
