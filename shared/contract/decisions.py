"""What a service says about an event: the decision record (canonical topic, the ledger's entry)
and the partner-facing outcome (`gputrace.outcomes.v1`).

A decision id is derived from what was decided (service + event source + event id), so a
redelivered event, or a relay that publishes twice after a crash, yields the same id and every
downstream consumer drops the copy.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.contract import ReasonCode

_NAMESPACE = uuid.UUID("8d0c4f0e-5a43-4a0c-9a53-6f1c2e0b9d11")

DECISION_TYPE = "gputrace.decision.v1"
OUTCOME_TYPE = "gputrace.outcome.v1"
DLQ_TYPE = "gputrace.deadletter.v1"


def decision_id(service: str, source: str, event_id: str, salt: str = "") -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{service}\n{source}\n{event_id}\n{salt}"))


class Accepted(BaseModel):
    """A handler's verdict: the event is applied. `facts` are what the service derived."""

    status: Literal["accepted"] = "accepted"
    message: str = "accepted"
    facts: dict[str, Any] = Field(default_factory=dict)
    anomalies: list[dict[str, Any]] = Field(default_factory=list)


class Rejected(BaseModel):
    """A handler's verdict: the event breaks a rule and changes nothing but the record of it."""

    status: Literal["rejected"] = "rejected"
    reason_code: ReasonCode
    message: str
    facts: dict[str, Any] = Field(default_factory=dict)
    anomalies: list[dict[str, Any]] = Field(default_factory=list)


Verdict = Accepted | Rejected


class RuleBroken(Exception):
    """Raised by a service's pure domain rules when an event breaks one; the handler answers with
    `rejected()`. Facts and anomalies let a rejection carry what auditors must see."""

    def __init__(
        self,
        code: ReasonCode,
        message: str,
        *,
        facts: dict[str, Any] | None = None,
        anomalies: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.facts = facts or {}
        self.anomalies = anomalies or []

    def rejected(self) -> Rejected:
        return Rejected(reason_code=self.code, message=self.message, facts=self.facts, anomalies=self.anomalies)


class Decision(BaseModel):
    """One decision of one service; the unit the ledger appends."""

    decision_id: str
    service: str
    decided_at: datetime
    status: Literal["accepted", "rejected"]
    reason_code: str | None = None
    message: str
    event_type: str
    aggregate_id: str | None = None
    batch_id: str | None = None
    party_id: str | None = None
    # The inbound event as received, in CloudEvents structured form with its signature, so an
    # auditor can check the partner's signature on the ledger entry without trusting us.
    event: dict[str, Any] | None = None
    # For decisions a service takes on its own (e.g. an export check on an award): what triggered it.
    trigger: dict[str, Any] | None = None
    facts: dict[str, Any] = Field(default_factory=dict)
    anomalies: list[dict[str, Any]] = Field(default_factory=list)


class Outcome(BaseModel):
    """The receipt a partner reads for each event it sent."""

    event_id: str
    event_source: str
    event_type: str
    status: Literal["accepted", "rejected"]
    reason_code: str | None = None
    message: str
    decision_id: str
    service: str
    decided_at: datetime


class DeadLetter(BaseModel):
    """A record that is not a decidable event, with its bytes; always under 1 MiB (the heads of
    long bytes are kept, with the value's SHA-256 and length)."""

    reason: str
    topic: str
    partition: int
    offset: int
    key_b64: str | None = Field(None, description="the key's bytes (its first 1 KiB when longer)")
    value_b64: str | None = Field(None, description="the value's bytes (its first 128 KiB when longer)")
    value_length: int | None = Field(None, description="the value's length in bytes")
    value_sha256: str | None = Field(None, description="SHA-256 of the whole value, hex")
    headers: list[tuple[str, str]] = Field(
        default_factory=list,
        description="name, base64 value (the first 32 headers, values' first 1 KiB; a name that is "
        "not UTF-8 shows its bytes as \\xNN)",
    )
    header_count: int = Field(0, description="how many headers the record had")
    truncated: bool = Field(False, description="true when any bytes were left out")
    service: str
    failed_at: datetime
