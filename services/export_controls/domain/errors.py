"""Errors the export-control domain raises.

Each carries a stable `reason_code` (for the evidence, not the partner contract). The case
lifecycle (lifecycle.py) turns the two a partner's award can cause, UnknownModelError and
NoRulesetInForceError, into RuleBroken with a contract reason code; RulesetDataError and
UnknownRulesetError are configuration faults that stop the service at start-up (rulebook.py).
"""

from __future__ import annotations

from datetime import date


class ExportControlError(ValueError):
    """Base class: the request cannot be evaluated at all (as opposed to an outcome)."""

    reason_code = "EXPORT_CHECK_FAILED"


class UnknownModelError(ExportControlError):
    """The GPU model is not in the catalogue, so it cannot be classified."""

    reason_code = "UNKNOWN_GPU_MODEL"

    def __init__(self, model: str, known: list[str]) -> None:
        self.model = model
        self.known = known
        super().__init__(f"GPU model {model!r} is not in the catalogue (known: {', '.join(known)})")


class NoRulesetInForceError(ExportControlError):
    """No rule-set version covers the decision date (e.g. before the first one)."""

    reason_code = "NO_RULESET_IN_FORCE"

    def __init__(self, on: date) -> None:
        self.on = on
        super().__init__(f"no export-control rule set is in force on {on.isoformat()}")


class UnknownRulesetError(ExportControlError):
    """A rule-set id was configured explicitly but no such version exists."""

    reason_code = "UNKNOWN_RULESET"

    def __init__(self, ruleset_id: str, known: list[str]) -> None:
        self.ruleset_id = ruleset_id
        super().__init__(f"unknown rule set {ruleset_id!r} (known: {', '.join(known)})")


class RulesetDataError(ExportControlError):
    """A data file is inconsistent (dangling reference, overlapping versions, ...).

    Raised at load time so bad data fails fast instead of silently changing decisions.
    """

    reason_code = "RULESET_DATA_INVALID"
