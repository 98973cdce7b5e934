"""The broker's doors, tried as an attacker with a Kafka client would (real Kafka, SASL/SCRAM + ACLs).

A partner principal may write only its partner topics and read only the outcomes; a service
principal writes only its own outputs; a client without (valid) credentials gets no connection at
all. The services running under these ACLs are the rest of the suite (pledges, outbox, crash ...).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from shared.contract import OUTCOMES_TOPIC, PLEDGES_TOPIC, PROCUREMENT_TOPIC, decisions_topic
from shared.runtime.kafka_auth import read_password
from tests.infra import LocalKafka
from tests.inprocess import capital
from tests.partner import PartnerClient, TopicWatcher
from tools.devstack import Stack


@pytest.fixture(scope="module")
def credentials(local_kafka: LocalKafka | None, stack: Stack) -> Path:
    if local_kafka is None or not stack.kafka_principals:
        pytest.skip("needs the secured broker these tests start (not an outside KAFKA_BOOTSTRAP_SERVERS)")
    return Path(os.environ["KAFKA_CREDENTIALS_DIR"])


def as_principal(credentials: Path, principal: str, password: str | None = None) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": principal,
        "sasl_plain_password": password or read_password(credentials, principal),
    }


async def produce(bootstrap: str, options: dict[str, Any], topic: str, **producer: Any) -> None:
    client = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10_000, **options, **producer)
    try:
        await client.start()
        await asyncio.wait_for(client.send_and_wait(topic, b'{"forged": true}', key=b"B-1"), 20)
    finally:
        await client.stop()


async def readable(bootstrap: str, options: dict[str, Any], topic: str, group: str | None = None) -> bool:
    """Whether the principal may read `topic` (with `group`, when given). The broker hides a topic
    it may not describe from its metadata, and refuses a fetch or a group it may not read."""
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest", request_timeout_ms=10_000, **options
    )
    try:
        await client.start()
        if topic not in await client.topics():
            return False
        if group is None:
            client.assign([TopicPartition(topic, 0)])
        else:
            client.subscribe([topic])
        await asyncio.wait_for(client.getmany(timeout_ms=3000), 20)
        return True
    except (TopicAuthorizationFailedError, GroupAuthorizationFailedError):
        return False
    finally:
        await client.stop()


@pytest.mark.parametrize(
    ("principal", "topic"),
    [
        ("kakao", decisions_topic("pledges")),  # a partner forging a decision the ledger would append
        ("kakao", OUTCOMES_TOPIC),  # ... or an outcome another partner trusts
        ("kakao", PROCUREMENT_TOPIC),  # a partner on a topic its roles send nothing on
        ("quotes", decisions_topic("pledges")),  # a service writing another service's decisions
        ("ledger", decisions_topic("quotes")),  # the ledger only reads decisions
    ],
)
async def test_a_principal_cannot_write_what_is_not_its_own(
    kafka_bootstrap: str, credentials: Path, principal: str, topic: str
) -> None:
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(kafka_bootstrap, as_principal(credentials, principal), topic)


async def test_a_service_cannot_take_another_services_outbox_identity(
    kafka_bootstrap: str, credentials: Path, stack: Stack
) -> None:
    # With pledges' transactional id, quotes could fence the pledges relay and publish as it.
    prefix = stack.base_env["CONSUMER_GROUP_PREFIX"]
    with pytest.raises(TransactionalIdAuthorizationFailed):
        await produce(
            kafka_bootstrap,
            as_principal(credentials, "quotes"),
            decisions_topic("quotes"),
            transactional_id=f"{prefix}-pledges-outbox",
        )


@pytest.mark.parametrize("topic", [PLEDGES_TOPIC, decisions_topic("quotes")])
async def test_a_partner_reads_no_topic_but_the_outcomes(kafka_bootstrap: str, credentials: Path, topic: str) -> None:
    # Other partners' events, and the decisions (award prices of batches not its own).
    kakao = as_principal(credentials, "kakao")
    assert not await readable(kafka_bootstrap, kakao, topic)
    assert await readable(kafka_bootstrap, kakao, OUTCOMES_TOPIC)


async def test_a_partners_consumer_groups_carry_its_own_name(kafka_bootstrap: str, credentials: Path) -> None:
    # A group named for another party (or a service's group, to disturb its offsets) is refused.
    kakao = as_principal(credentials, "kakao")
    assert not await readable(kafka_bootstrap, kakao, OUTCOMES_TOPIC, group="nhn-cloud.reader")
    assert await readable(kafka_bootstrap, kakao, OUTCOMES_TOPIC, group="kakao.reader")


@pytest.mark.parametrize("how", ["no credentials", "wrong password", "unknown principal"])
async def test_no_connection_without_valid_credentials(kafka_bootstrap: str, credentials: Path, how: str) -> None:
    options = {
        "no credentials": {"security_protocol": "PLAINTEXT"},
        "wrong password": as_principal(credentials, "nhn-cloud", password="not-" + uuid.uuid4().hex),
        "unknown principal": as_principal(credentials, "mallory", password=uuid.uuid4().hex),
    }[how]
    with pytest.raises(KafkaConnectionError):
        await produce(kafka_bootstrap, options, PLEDGES_TOPIC)


async def test_a_partner_sends_on_its_topic_and_reads_its_outcome(
    kafka_bootstrap: str, credentials: Path, keys_dir: Path
) -> None:
    """The door that must stay open: kdb, as itself, pledges and reads the pipeline's answer."""
    kdb = as_principal(credentials, "kdb")
    watcher = await TopicWatcher(kafka_bootstrap, OUTCOMES_TOPIC, client_options=kdb).start()
    try:
        async with PartnerClient(kafka_bootstrap, keys_dir, client_options=kdb) as partner:
            pledge = f"acl-{uuid.uuid4().hex[:8]}"
            event_id = await partner.publish("kdb", "pledge.committed.v1", capital(pledge, "acl"))
        outcome = await watcher.outcome(event_id, timeout=90)
    finally:
        await watcher.stop()
    assert outcome["event_id"] == event_id
