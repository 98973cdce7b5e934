"""The request the service hands in and the decision record it gets back."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .classification import Classification
from .rulesets import Citation, Outcome, ReviewPolicy
from .screening import PartyScreening


def _upper(value: object) -> object:
    return value.strip().upper() if isinstance(value, str) else value


# ISO 3166-1 alpha-2, as in the partner contract; accepted in any case, stored upper-case.
Country = Annotated[str, BeforeValidator(_upper), Field(pattern=r"^[A-Z]{2}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Party(_Frozen):
    name: Annotated[str, Field(min_length=1)]
    country: Country
    # The street address the partner gave (optional): screened against listed addresses.
    address: Annotated[str, Field(min_length=1)] | None = None

    def screening_address(self) -> str | None:
        """The address as the list writes it, ending in the country code ("…, Kowloon, HK"), so a
        partner who leaves the country out of the line still compares like for like."""
        if self.address is None:
            return None
        line = self.address.strip()
        return line if line.upper().endswith(self.country) else f"{line}, {self.country}"


class EndUser(Party):
    headquarters_country: Country


class ExportRequest(_Frozen):
    batch_id: Annotated[str, Field(min_length=1)]
    model: Annotated[str, Field(min_length=1)]
    quantity: Annotated[int, Field(gt=0)]
    origin_country: Country
    route: list[Country] = []  # transit countries between origin and destination, in order
    destination_country: Country  # the consignee's country
    consignee: Party
    end_user: EndUser
    decision_date: date

    @model_validator(mode="after")
    def _destination_is_consignee_country(self) -> ExportRequest:
        # The contract defines the destination as the consignee's country; a mismatch means the
        # caller built the request wrongly, and guessing which one is right would hide that.
        if self.destination_country != self.consignee.country:
            raise ValueError(
                f"destination_country {self.destination_country} differs from consignee.country "
                f"{self.consignee.country}"
            )
        return self


class RulesetRef(_Frozen):
    id: str
    revision: int
    version: str
    title: str
    effective_from: date
    effective_to: date | None
    compliance_from: date | None
    citation: Citation  # the rule set's primary citation
    sha256: str  # of the rule-set file as loaded
    selected_by: Literal["decision_date", "explicit"]


class CountryStatus(_Frozen):
    country: str
    groups: list[str]  # every EAR / rule-set group containing it
    tier: str | None  # e.g. "TIER1"; None when the rule set has no tiers


class RouteEvaluation(_Frozen):
    origin: CountryStatus
    transit: list[CountryStatus]
    flagged: list[str]  # transit countries that triggered a route requirement


class ScreeningEvidence(_Frozen):
    snapshot_date: date
    source: str
    sha256: str
    parties: list[PartyScreening]


class RequirementFinding(_Frozen):
    """One licence requirement of the rule set that covers this item, triggered or not."""

    requirement_id: str
    clause: str
    citations: list[str]  # human cites, e.g. "88 FR 73458"
    basis: str
    triggered: bool
    triggered_by: list[str]  # countries that triggered it
    licence_exception: str | None  # the exception that lifted it, if any
    outcome: Outcome  # after any exception
    review_policy: ReviewPolicy | None
    review_policy_basis: str | None


class ScreeningFinding(_Frozen):
    role: str
    list: str
    entry_id: str
    outcome: Outcome
    review_policy: ReviewPolicy
    citations: list[str]
    basis: str


class QuotaEvaluation(_Frozen):
    kind: Literal["lpp_consignee_year", "country_allocation"]
    source: str  # the exception or allocation id
    key: str
    cap_tpp: int
    used_before: int
    batch_tpp: int
    used_after: int
    within_cap: bool


class ScreeningHit(_Frozen):
    """A screening match as a licensing officer cites it: list, entry, listing date, notice."""

    role: str
    entry_id: str
    entry_name: str
    list: str
    score: float
    start_date: date | None
    federal_register_notice: str | None


class Explanation(_Frozen):
    """What the decision relied on, in one place (also in the ledger entry and the batch view):
    enough to re-derive it from the recorded rule version and screening snapshot."""

    rule_version: str
    ruleset_sha256: str
    decision_date: date
    # Country → the groups it belonged to on the decision date (destination, end user, route).
    group_memberships: dict[str, list[str]]
    licence_exceptions: list[str]  # the exceptions that lifted a requirement
    screening_snapshot: str  # sha256 of the list snapshot
    screening_source_date: date
    screening_hits: list[ScreeningHit]
    screening_reviews: list[ScreeningHit]  # near misses sent to a human (SCREENING_REVIEW)


class ExportDecision(_Frozen):
    batch_id: str
    outcome: Outcome
    review_policy: ReviewPolicy | None  # how a licence application would be reviewed
    licence_exception: str | None  # e.g. "AIA", "LPP" when cleared under an exception
    ruleset: RulesetRef
    inputs: ExportRequest
    classification: Classification
    batch_tpp: int  # tpp x quantity
    destination: CountryStatus
    end_user_location: CountryStatus
    end_user_headquarters: CountryStatus
    route: RouteEvaluation
    screening: ScreeningEvidence
    screening_findings: list[ScreeningFinding]
    requirements: list[RequirementFinding]
    quotas: list[QuotaEvaluation]  # every quota examined, used or not
    # What the service should add to its running totals. Apply when the export is authorised:
    # at decision time if cleared ("decision"), on license.granted if a licence is required.
    quota_key: str | None
    quota_delta: int
    quota_apply_on: Literal["decision", "license_granted"] | None
    reasoning: list[str]
    data_digests: dict[str, str]  # sha256 of each data file used
    explanation: Explanation
