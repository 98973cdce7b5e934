"""A batch spanning several partitions fails mid-way on an infrastructure error: when it is nacked
every partition rewinds, so no record of any partition is skipped (FastStream >= 0.7.8; 0.7.0 to
0.7.7 rewound only the batch's first partition and the next commit passed over the others).

Through real Kafka: an in-process pledges service on the session's broker (tests/inprocess.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract.decisions import Verdict
from shared.runtime.consumer import Inbound
from tests import inprocess

pytestmark = pytest.mark.asyncio(loop_scope="session")

EVENTS = 60


class Outage:
    """The database goes away once, in the middle of the first batch that spans two partitions."""

    def __init__(self) -> None:
        self.fail_after: int | None = None
        self.calls = 0
        self.failed_batch: set[int] | None = None

    def batch(self, records: Sequence[ConsumerRecord]) -> None:
        partitions = {r.partition for r in records}
        self.calls = 0
        if self.failed_batch is None and len(partitions) > 1:
            self.failed_batch = partitions
            self.fail_after = len(records) // 2

    def wrap(self, handler: inprocess.Handler) -> inprocess.Handler:
        async def handle(session: AsyncSession, inbound: Inbound) -> Verdict:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                self.fail_after = None
                raise ConnectionError("database went away (injected)")
            return await handler(session, inbound)

        return handle


async def test_a_batch_failing_mid_way_skips_no_partition(kafka_bootstrap: str, tmp_path: Path) -> None:
    outage = Outage()
    service = inprocess.build(kafka_bootstrap, tmp_path, wrap=outage.wrap, batch_timeout_ms=500)
    real = service.processor.process

    async def process(records: Sequence[ConsumerRecord]) -> None:
        outage.batch(records)
        await real(records)

    service.processor.process = process  # type: ignore[method-assign]
    group = inprocess.group_of(service)
    # Published before the consumer starts, so its first poll holds records of every partition.
    await inprocess.start_group_at_end(kafka_bootstrap, group)
    await inprocess.publish_pledges(kafka_bootstrap, tmp_path / "keys", EVENTS)
    async with inprocess.consuming(service):
        await inprocess.wait_group_done(kafka_bootstrap, group, timeout=90)
        decided = await inprocess.processed(service)
    assert outage.failed_batch is not None, "no polled batch spanned two partitions: the test proved nothing"
    assert outage.fail_after is None, "the injected outage never happened"
    # Every offset is committed, so whatever was not decided by now was skipped for good.
    assert decided == EVENTS, f"{EVENTS - decided} of {EVENTS} records skipped after the batch failed"
