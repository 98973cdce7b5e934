"""A partner system as an integrator would write one: plain aiokafka, signing done here from the
contract's words (docs/partner-contract.md), not with the project's own publisher. If the project's
verification drifts from the contract, these tests notice."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import rfc8785
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

TOPIC_OF = {
    "pledge": "partner.pledges.v1",
    "batch.requested": "partner.procurement.v1",
    "quote": "partner.procurement.v1",
    "license": "partner.licensing.v1",
    "shipment": "partner.logistics.v1",
    "batch.installed": "partner.logistics.v1",
    "batch.accepted": "partner.logistics.v1",
}


def topic_for(short_type: str) -> str:
    for prefix, topic in TOPIC_OF.items():
        if short_type.startswith(prefix):
            return topic
    raise KeyError(short_type)


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class PartnerClient:
    """Publishes signed CloudEvents (binary mode) as any registered party."""

    def __init__(self, bootstrap: str, keys_dir: Path, *, client_options: dict[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.keys_dir = keys_dir
        # Kafka identity: a partner principal's, or (none given) the test harness's (tests.infra).
        self.client_options = client_options or {}
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> PartnerClient:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True, **self.client_options
        )
        await self._producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._producer
        await self._producer.stop()

    def key(self, party: str) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key((self.keys_dir / f"{party}.key").read_bytes(), None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def record(
        self,
        party: str,
        short_type: str,
        data: dict[str, Any],
        *,
        subject: str | None = None,
        event_id: str | None = None,
        sign_as: str | None = None,
        signature: str | None = None,
        drop: tuple[str, ...] = (),
    ) -> tuple[bytes, bytes, list[tuple[str, bytes]], str]:
        event_id = event_id or str(uuid.uuid4())
        attrs = {
            "specversion": "1.0",
            "id": event_id,
            "source": f"urn:gputrace:party:{party}",
            "type": f"gputrace.{short_type}",
            "time": now(),
            "subject": subject or _aggregate(data),
            "datacontenttype": "application/json",
        }
        if signature is None:
            signing_input = rfc8785.dumps({**attrs, "data": data})
            signature = base64.b64encode(self.key(sign_as or party).sign(signing_input)).decode()
        headers = [(f"ce_{k}", v.encode()) for k, v in attrs.items() if k != "datacontenttype"]
        headers += [("content-type", b"application/json"), ("ce_signature", signature.encode())]
        headers = [(k, v) for k, v in headers if k not in drop]
        return attrs["subject"].encode(), json.dumps(data).encode(), headers, event_id

    async def publish(self, party: str, short_type: str, data: dict[str, Any], **kw: Any) -> str:
        key, value, headers, event_id = self.record(party, short_type, data, **kw)
        await self.send_raw(topic_for(short_type), key, value, headers)
        return event_id

    async def send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        assert self._producer
        await self._producer.send_and_wait(topic, value, key=key, headers=headers)


def _aggregate(data: dict[str, Any]) -> str:
    for field in ("pledge_id", "batch_id"):
        if field in data:
            return str(data[field])
    raise KeyError("no aggregate id in data")


class TopicWatcher:
    """Reads a topic from the beginning in the background; tests wait for what they expect.

    Reads as the contract tells partners to: isolation.level=read_committed, so `records` holds
    every raw record a partner sees (copies included: tests count them, not distinct ids)."""

    def __init__(
        self,
        bootstrap: str,
        *topics: str,
        isolation_level: str = "read_committed",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self._consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            **(client_options or {}),
            auto_offset_reset="earliest",
            group_id=None,
            enable_auto_commit=False,
            isolation_level=isolation_level,
        )
        self.records: list[Any] = []
        self.by_event: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> TopicWatcher:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        # Cleanup after the assertions: a fetch that timed out on a loaded broker surfaces here
        # (seen at session teardown) and must not turn a passed run into an error.
        with contextlib.suppress(KafkaError):
            await self._consumer.stop()

    async def _run(self) -> None:
        async for rec in self._consumer:
            self.records.append(rec)
            try:
                doc = json.loads(rec.value)
            except ValueError:
                continue
            if isinstance(doc, dict) and "event_id" in doc:
                self.by_event[doc["event_id"]].append(doc)
            self._changed.set()

    async def wait(self, predicate: Any, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError("condition not met in time")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))
            except TimeoutError:
                pass

    async def outcomes(self, *event_ids: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """The first outcome of each event, in the order asked."""
        await self.wait(lambda: all(self.by_event.get(e) for e in event_ids), timeout)
        return [self.by_event[e][0] for e in event_ids]

    async def outcome(self, event_id: str, timeout: float = 60.0) -> dict[str, Any]:
        return (await self.outcomes(event_id, timeout=timeout))[0]
