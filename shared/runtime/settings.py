"""Settings from the environment (pydantic-settings); one class for every service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_VAR_DIR = Path("var")


class WitnessEndpoint(BaseModel):
    """One witness the ledger submits checkpoints to."""

    url: str
    vkey: str


class Settings(BaseSettings):
    """Every setting a gputrace process reads. Names are the environment variables."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    # Kafka identity (shared.runtime.kafka_auth): one SCRAM principal per service, partner and admin.
    kafka_security_protocol: str | None = Field(
        None,
        description="PLAINTEXT, SASL_PLAINTEXT or SASL_SSL (production: SASL_SSL). Unset: SASL_PLAINTEXT when "
        "a SASL user is known, else PLAINTEXT.",
    )
    kafka_sasl_mechanism: str = Field("SCRAM-SHA-512", description="SASL mechanism of the broker's client listener.")
    kafka_sasl_username: str | None = Field(
        None, description="This process's Kafka principal (a service's name, a party id, or admin)."
    )
    kafka_sasl_password: SecretStr | None = Field(
        None, description="Its password. Unset: read from KAFKA_CREDENTIALS_DIR/<principal>.password."
    )
    kafka_credentials_dir: Path = Field(
        DEFAULT_VAR_DIR / "keys" / "kafka",
        description="Kafka passwords, one <principal>.password file each (0600), written by `gputrace keys init`.",
    )
    kafka_replication_factor: int | None = Field(
        None,
        description="Copies of each topic `gputrace topics` creates. Unset: 3 on a cluster of three brokers or "
        "more (with min.insync.replicas=2), else one per broker.",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of this service's own database (postgresql://...). "
        "Unset: a SQLite file under VAR_DIR (the embedded default).",
    )
    var_dir: Path = Field(DEFAULT_VAR_DIR, description="Where embedded databases, keys and state live.")
    party_registry: Path = Field(
        DEFAULT_VAR_DIR / "keys" / "registry.json", description="JSON registry of parties and public keys."
    )
    service_signing_key: Path | None = Field(
        None,
        description="Ed25519 PEM key a deciding service signs its decisions with; it must match the service's "
        "entry (role service) in PARTY_REGISTRY. Unset: <service>.key beside PARTY_REGISTRY.",
    )
    consumer_group_prefix: str = Field("gputrace", description="Consumer groups are <prefix>-<service>.")
    batch_max_records: int = Field(500, description="Most records handled in one database transaction.")
    batch_timeout_ms: int = Field(100, description="How long a poll waits to fill a batch.")
    outbox_poll_seconds: float = Field(0.5, description="Outbox relay poll interval (it is also woken on commit).")
    readiness_stall_seconds: float = Field(
        60.0,
        description="/readyz fails when records wait (lag, or a failed or hanging batch) and no batch "
        "completed for this long.",
    )
    readiness_relay_seconds: float = Field(
        60.0, description="/readyz fails when the outbox relay completed no round (failed or hung) for this long."
    )
    readiness_probe_seconds: float = Field(
        2.0, description="How long /readyz waits for the Kafka broker to answer before calling it unreachable."
    )
    log_level: str = Field("INFO", description="Python log level.")
    log_json: bool = Field(True, description="Structured JSON logs (false: plain text).")
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector (OTLP/HTTP, e.g. http://collector:4318): spans of every record "
        "handled go to its /v1/traces (shared.runtime.tracing). Unset: no spans, partners' traceparent passed on.",
    )

    # Ledger.
    ledger_origin: str = Field("gputrace.example/ledger", description="Checkpoint origin line of the log.")
    ledger_signing_key: Path = Field(
        DEFAULT_VAR_DIR / "keys" / "ledger.key", description="Ed25519 PEM key the ledger signs checkpoints with."
    )
    http_host: str = Field("127.0.0.1", description="Bind address of the service's HTTP endpoint.")
    http_port: int = Field(8000, description="Port of /healthz, /readyz and /metrics (and the ledger's API).")
    api_tokens: Path = Field(
        DEFAULT_VAR_DIR / "keys" / "tokens.json", description="Bearer tokens of the ledger API and their roles."
    )
    program_target_gpus: int = Field(
        260_000, description="The programme's GPU target (2025-10-31: about 260,000 Blackwell GPUs)."
    )
    api_db_pool_size: int = Field(
        20,
        description="Ledger: connections of the API's own read pool (apart from the consumer's), so API load "
        "neither starves nor is starved by ingestion; as many again may open under bursts.",
    )

    witnesses: list[WitnessEndpoint] = Field(
        [],
        description="Ledger: witnesses asked to cosign each new checkpoint (C2SP tlog-witness), a JSON list of "
        '{"url": submission prefix, "vkey": cosignature key or a file holding it}. Empty: no witnessing.',
    )
    witness_poll_seconds: float = Field(1.0, description="Ledger: how often it looks for checkpoints to witness.")

    # Witness.
    witness_name: str = Field("gputrace.example/witness", description="Witness: its key name (cosignature lines).")
    witness_signing_key: Path = Field(
        DEFAULT_VAR_DIR / "keys" / "witness.key", description="Witness: its Ed25519 PEM cosigning key."
    )
    witness_logs: list[str] = Field(
        [],
        description="Witness: the logs it witnesses, a JSON list of their checkpoint vkeys (or files holding one); "
        "a log's origin is its key's name.",
    )

    # Export controls.
    export_ruleset: str | None = Field(
        None, description="Pin one export rule-set version (e.g. for a re-run); unset: chosen by the shipment date."
    )
    export_data_dir: Path | None = Field(
        None,
        description="Export-control data (rulesets/, country_groups.yaml, gpu_catalogue.yaml, screening_list.yaml), "
        "loaded and checked at start-up; unset: the data shipped with the service.",
    )

    def signing_key_path(self, service: str) -> Path:
        return self.service_signing_key or self.party_registry.parent / f"{service}.key"

    def kafka_client_options(self, principal: str | None = None) -> dict[str, Any]:
        """aiokafka's security keyword arguments for this process (or for `principal`, a tool acting
        for a partner or the admin, when the environment names no user): see shared.runtime.kafka_auth."""
        from shared.runtime.kafka_auth import client_options

        return client_options(self, principal)

    def sqlalchemy_url(self, service: str) -> str:
        if not self.database_url:
            path = self.var_dir / "data" / f"{service}.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite+aiosqlite:///{path}"
        url = self.database_url
        # Accept the plain libpq form ops usually have; we speak psycopg 3.
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain) :]
        return url
