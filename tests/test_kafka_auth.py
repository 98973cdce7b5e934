"""Which Kafka identity a process takes (shared.runtime.kafka_auth), and the declared ACLs (no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.contract import DECISION_TOPICS, OUTCOMES_TOPIC, PLEDGES_TOPIC, PROCUREMENT_TOPIC, decisions_topic
from shared.contract.parties import PartyRegistry
from shared.runtime.kafka_auth import KafkaCredentialsMissing, faststream_security
from shared.runtime.settings import Settings
from tools.devkeys import generate_dev_registry
from tools.kafka_access import READ, TOPIC, WRITE, declared_acls, principals, write_credentials

_ENV = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_CREDENTIALS_DIR")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:  # the test process may itself be the admin (tests.infra.speak_as_admin)
        monkeypatch.delenv(name, raising=False)


def test_identity_from_password_file_environment_or_none(clean_env: None, tmp_path: Path) -> None:
    write_credentials(tmp_path, ["pledges", "kakao"])
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "kakao.password").stat().st_mode & 0o777) == "0o600"
    kakao = (tmp_path / "kakao.password").read_text().strip()

    # A tool acting for a party: its password file.
    opts = Settings(kafka_credentials_dir=tmp_path).kafka_client_options("kakao")
    assert opts["security_protocol"] == "SASL_PLAINTEXT" and opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("kakao", kakao)
    # The environment's user wins (password from its file when none is given).
    service = Settings(kafka_credentials_dir=tmp_path, kafka_sasl_username="pledges")
    assert service.kafka_client_options("kakao")["sasl_plain_username"] == "pledges"
    explicit = Settings(kafka_sasl_username="pledges", kafka_sasl_password="s3cret", kafka_security_protocol="SASL_SSL")
    assert explicit.kafka_client_options()["sasl_plain_password"] == "s3cret"
    assert explicit.kafka_client_options()["ssl_context"] is not None
    # No identity and no password file: an unsecured broker.
    assert Settings(kafka_credentials_dir=tmp_path).kafka_client_options("nobody") == {"security_protocol": "PLAINTEXT"}
    # A user without a password is an error naming the fix, never a silent PLAINTEXT.
    with pytest.raises(KafkaCredentialsMissing, match="gputrace keys init"):
        Settings(kafka_credentials_dir=tmp_path, kafka_sasl_username="quotes").kafka_client_options()
    assert type(faststream_security(opts)).__name__ == "SASLScram512"


def test_declared_acls_keep_each_principal_to_its_own(tmp_path: Path) -> None:
    registry = PartyRegistry.load(generate_dev_registry(tmp_path))
    acls = declared_acls(registry, "gputrace")
    writes = {(a.principal, a.name) for a in acls if a.resource_type == TOPIC and a.operation == WRITE}
    reads = {(a.principal, a.name) for a in acls if a.resource_type == TOPIC and a.operation == READ}
    # Each decisions topic is written by its own service only.
    for topic in DECISION_TOPICS:
        assert {p for p, t in writes if t == topic} == {f"User:{topic.split('.')[1].replace('-', '_')}"}
    # A partner writes its role's topic, reads only the outcomes; a vendor writes procurement.
    assert {t for p, t in writes if p == "User:kakao"} == {PLEDGES_TOPIC}
    assert {t for p, t in reads if p == "User:kakao"} == {OUTCOMES_TOPIC}
    assert {t for p, t in writes if p == "User:dell-korea"} == {PROCUREMENT_TOPIC}
    # The ledger reads decisions only and writes no decision.
    assert {t for p, t in reads if p == "User:ledger"} - {"gputrace.relay-progress.v1"} == set(DECISION_TOPICS)
    assert decisions_topic("quotes") not in {t for p, t in writes if p == "User:ledger"}
    assert principals(registry)[0] == "admin" and "kakao" in principals(registry)
