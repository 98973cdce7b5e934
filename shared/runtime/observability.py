"""Metrics (Prometheus) and structured logs shared by every service."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shared.contract import EVENTS

EVENTS_CONSUMED = Counter("gputrace_events_consumed_total", "Records consumed", ["service", "topic"])
DECISIONS = Counter("gputrace_decisions_total", "Decisions taken", ["service", "event_type", "status", "reason"])
DEAD_LETTERS = Counter("gputrace_dead_letters_total", "Records sent to the DLQ", ["service", "topic"])
DUPLICATES = Counter("gputrace_duplicates_total", "Redelivered events dropped", ["service"])
HANDLER_SECONDS = Histogram("gputrace_batch_seconds", "Time to handle one polled batch, commit included", ["service"])
OUTBOX_BACKLOG = Gauge("gputrace_outbox_backlog", "Outbox rows left after the last relay pass", ["service"])
OUTBOX_PUBLISHED = Counter("gputrace_outbox_published_total", "Outbox rows published", ["service"])
OUTBOX_PARKED = Counter(
    "gputrace_outbox_parked_total", "Outbox rows that can never be sent, parked for ops", ["service", "reason"]
)
# Records on a decisions topic not signed by the topic's owner; `reason` is one of FORGERY_REASONS.
FORGED_DECISIONS = Counter(
    "gputrace_forged_decisions_total",
    "Records on a decisions topic not signed by the service that owns it (dead-lettered)",
    ["service", "topic", "reason"],
)
LEDGER_SIZE = Gauge("gputrace_ledger_size", "Entries in the ledger's Merkle log")

OTHER = "other"


def event_type_label(event_type: str) -> str:
    """A partner chooses ce_type: only the contract's types become label values, anything else is
    `other`, so a sender cannot grow /metrics with one new series per random type (or write
    into it)."""
    return event_type if event_type in EVENTS else OTHER


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed with `extra=` (event_id, batch_id, party...) are kept."""

    _skip = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka is chatty at INFO about every rebalance step.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
