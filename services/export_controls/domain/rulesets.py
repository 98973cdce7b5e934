"""Versioned export-control rule sets, held as YAML data and typed here.

Each file in data/rulesets/ is one version of the rules (one legal regime) with its own
effective dates and citations. Code never hard-codes a threshold, a country list or a clause:
it interprets these files, so a new rule is a new file, and removing a rule from a file
changes decisions (the tests check that).

Group references used throughout a rule set are resolved against data/country_groups.yaml
(EAR Country Groups) plus the rule set's own `groups` (e.g. the AI Diffusion tiers); a bare
two-letter code stands for that single country.
"""

from __future__ import annotations

import itertools
import re
from datetime import date
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._data import DATA_DIR, RULESETS_DIR, read_yaml
from .errors import NoRulesetInForceError, RulesetDataError, UnknownRulesetError

COUNTRY_GROUPS_PATH = DATA_DIR / "country_groups.yaml"

Outcome = Literal["cleared", "license_required", "denied"]
ReviewPolicy = Literal["presumption_of_approval", "case_by_case", "presumption_of_denial"]
CountryCode = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]

OUTCOME_SEVERITY: dict[str, int] = {"cleared": 0, "license_required": 1, "denied": 2}
POLICY_SEVERITY: dict[str, int] = {"presumption_of_approval": 0, "case_by_case": 1, "presumption_of_denial": 2}

_COUNTRY_RE = re.compile(r"^[A-Z]{2}$")


class _Data(BaseModel):
    # Frozen + extra="forbid": a misspelt key in a data file is an error, not a silently ignored rule.
    model_config = ConfigDict(frozen=True, extra="forbid")


class Citation(_Data):
    cite: str
    title: str
    published: date | None = None
    effective: date | None = None
    compliance: date | None = None
    url: str | None = None


class DatedMember(_Data):
    """A membership with dates (Supp. No. 1 to part 740 changes over time): a member from `from`
    (inclusive) until `to` (exclusive: the day it left); either open-ended when absent."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    country: CountryCode
    from_: date | None = Field(None, alias="from")
    to: date | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> DatedMember:
        if self.from_ is not None and self.to is not None and self.to <= self.from_:
            raise ValueError(f"{self.country}: 'to' {self.to} is not after 'from' {self.from_}")
        return self

    def member_on(self, on: date | None) -> bool:
        # No date (start-up checks only): every member counts.
        return on is None or ((self.from_ is None or self.from_ <= on) and (self.to is None or on < self.to))


class GroupDef(_Data):
    """A country group: explicit members, other groups included, or the complement of groups."""

    label: str | None = None
    name: str | None = None
    countries: list[CountryCode | DatedMember] = []
    include: list[str] = []
    complement_of: list[str] = []
    note: str | None = None

    def members(self, on: date | None) -> set[str]:
        return {m if isinstance(m, str) else m.country for m in self.countries if isinstance(m, str) or m.member_on(on)}


class CountryGroups(_Data):
    as_of: str
    groups: dict[str, GroupDef]
    sha256: str = ""


class Criterion(_Data):
    """One alternative of an ECCN definition; every bound given must hold."""

    eccn: Literal["3A090.a", "3A090.b"]
    clause: str
    tpp_min: float | None = None
    tpp_below: float | None = None
    pd_min: float | None = None
    pd_below: float | None = None


class ClassificationRules(_Data):
    citation: str
    criteria: Annotated[list[Criterion], Field(min_length=1)]


class ItemScope(_Data):
    """Which items a requirement covers: by ECCN, by catalogue model, or any item."""

    eccns: list[str] = []
    models: list[str] = []
    any: bool = False

    def covers(self, model: str, eccn: str | None) -> bool:
        return self.any or model in self.models or (eccn is not None and eccn in self.eccns)


class Trigger(_Data):
    """Where a requirement looks: the ultimate destination(s), the end user's HQ, or the route.

    `in_groups` omitted means everywhere (the AI Diffusion worldwide requirement).
    """

    kind: Literal["destination", "end_user_headquarters", "route"]
    in_groups: list[str] | None = None
    except_groups: list[str] = []


class GroupPolicy(_Data):
    groups: list[str]
    policy: ReviewPolicy


class PolicyOverride(_Data):
    """A later rule that changes only the review policy when all its conditions hold."""

    id: str
    clause: str
    citations: list[str]
    origin_in: list[str] | None = None
    destination_in: list[str] | None = None
    tpp_below: float | None = None
    dram_bandwidth_below_gbps: float | None = None
    policy: ReviewPolicy
    note: str | None = None


class ReviewPolicySpec(_Data):
    default: ReviewPolicy
    by_group: list[GroupPolicy] = []
    overrides: list[PolicyOverride] = []


class Requirement(_Data):
    id: str
    clause: str
    citations: Annotated[list[str], Field(min_length=1)]
    summary: str
    items: ItemScope
    trigger: Trigger
    outcome: Literal["license_required", "denied"]
    review_policy: ReviewPolicySpec
    exceptions: list[str] = []
    allocation: str | None = None
    # regulation: Federal Register text; is_informed: a letter to the exporter (not published);
    # programme_policy: the programme's own conservative rule where the EAR gives no clear answer.
    basis: Literal["regulation", "is_informed", "programme_policy"] = "regulation"
    effective_from: date | None = None
    effective_to: date | None = None

    def in_force(self, on: date) -> bool:
        return (self.effective_from is None or self.effective_from <= on) and (
            self.effective_to is None or on <= self.effective_to
        )


class QuotaSpec(_Data):
    scope: Literal["consignee_calendar_year"]
    cap_tpp: Annotated[int, Field(gt=0)]
    key: str


class LicenceException(_Data):
    name: str
    clause: str
    citations: Annotated[list[str], Field(min_length=1)]
    summary: str
    destination_in: list[str] | None = None
    destination_not_in: list[str] = []
    end_user_headquarters_in: list[str] | None = None
    end_user_headquarters_not_in: list[str] = []
    quota: QuotaSpec | None = None


class CountryAllocation(_Data):
    id: str
    clause: str
    citations: Annotated[list[str], Field(min_length=1)]
    summary: str
    destination_in: list[str]
    cap_tpp: Annotated[int, Field(gt=0)]
    period_from: date
    period_to: date
    period_label: str
    key: str
    within_cap_policy: ReviewPolicy
    beyond_cap_policy: ReviewPolicy


class ListOutcome(_Data):
    outcome: Literal["license_required", "denied"]
    review_policy: ReviewPolicy
    citations: list[str] = []
    basis: str


class ScreeningPolicy(_Data):
    outcomes_by_list: dict[str, ListOutcome]
    unknown_list: ListOutcome


class RuleSet(_Data):
    """One version of the rules, validated and with all group references resolved."""

    id: str
    revision: Annotated[int, Field(ge=1)]
    title: str
    short_title: str  # for sentences: "Destination KR is Tier 1 under the AI Diffusion rule"
    effective_from: date
    effective_to: date | None = None
    compliance_from: date | None = None
    citations: dict[str, Citation]
    primary_citation: str
    tiers: list[str] = []
    groups: dict[str, GroupDef] = {}
    classification: ClassificationRules
    requirements: list[Requirement]
    licence_exceptions: dict[str, LicenceException] = {}
    country_allocations: list[CountryAllocation] = []
    screening: ScreeningPolicy
    notes: list[str] = []
    not_modelled: list[str] = []
    # Filled in by the loader, not written in the YAML:
    sha256: str = ""
    country_groups: CountryGroups
    # Set by the evaluation to its decision date: dated group memberships are read as of it.
    membership_date: date | None = None

    @property
    def version(self) -> str:
        return f"{self.id}@{self.revision}"

    def in_force(self, on: date) -> bool:
        return self.effective_from <= on and (self.effective_to is None or on <= self.effective_to)

    # --- group resolution -------------------------------------------------------------------

    def _group_def(self, name: str) -> GroupDef | None:
        # Rule-set groups shadow the shared EAR groups (a version may redefine a group).
        return self.groups.get(name) or self.country_groups.groups.get(name)

    def _all_group_names(self) -> list[str]:
        names = list(self.country_groups.groups)
        names += [n for n in self.groups if n not in names]
        return names

    def in_group(self, country: str, ref: str, _seen: frozenset[str] = frozenset()) -> bool:
        """Is `country` in the group (or single country) `ref`?"""
        if ref in _seen:
            raise RulesetDataError(f"{self.id}: group {ref!r} is defined in terms of itself")
        gdef = self._group_def(ref)
        if gdef is None:
            if _COUNTRY_RE.match(ref):
                return country == ref
            raise RulesetDataError(f"{self.id}: unknown country group {ref!r}")
        seen = _seen | {ref}
        if gdef.complement_of:
            return not any(self.in_group(country, g, seen) for g in gdef.complement_of)
        return country in gdef.members(self.membership_date) or any(
            self.in_group(country, g, seen) for g in gdef.include
        )

    def in_any(self, country: str, refs: list[str]) -> bool:
        return any(self.in_group(country, r) for r in refs)

    def matching_groups(self, country: str, refs: list[str]) -> list[str]:
        return [r for r in refs if self.in_group(country, r)]

    def groups_of(self, country: str) -> list[str]:
        """All named groups containing the country (shared EAR groups first), for the record."""
        return [g for g in self._all_group_names() if self.in_group(country, g)]

    def tier_of(self, country: str) -> str | None:
        for tier in self.tiers:
            if self.in_group(country, tier):
                return tier
        return None

    def group_label(self, ref: str) -> str:
        gdef = self._group_def(ref)
        return gdef.label if gdef is not None and gdef.label else ref

    def cites(self, keys: list[str]) -> str:
        return "; ".join(self.citations[k].cite for k in keys)

    # --- load-time consistency --------------------------------------------------------------

    @model_validator(mode="after")
    def _check_references(self) -> RuleSet:
        problems: list[str] = []

        def need_citation(keys: list[str], where: str) -> None:
            problems.extend(f"{where}: unknown citation {k!r}" for k in keys if k not in self.citations)

        def need_groups(refs: list[str] | None, where: str) -> None:
            for ref in refs or []:
                if self._group_def(ref) is None and not _COUNTRY_RE.match(ref):
                    problems.append(f"{where}: unknown group {ref!r}")

        need_citation([self.primary_citation], "primary_citation")
        need_citation([self.classification.citation], "classification")
        need_groups(self.tiers, "tiers")
        for name, gdef in self.groups.items():
            need_groups(gdef.include + gdef.complement_of, f"group {name}")
        ids = [r.id for r in self.requirements]
        problems.extend(f"duplicate requirement id {i!r}" for i in set(ids) if ids.count(i) > 1)
        allocations = {a.id for a in self.country_allocations}
        for req in self.requirements:
            where = f"requirement {req.id}"
            need_citation(req.citations, where)
            need_groups(req.trigger.in_groups, where)
            need_groups(req.trigger.except_groups, where)
            for gp in req.review_policy.by_group:
                need_groups(gp.groups, where)
            for ov in req.review_policy.overrides:
                need_citation(ov.citations, f"{where} override {ov.id}")
                need_groups(ov.origin_in, where)
                need_groups(ov.destination_in, where)
            problems.extend(
                f"{where}: unknown licence exception {e!r}" for e in req.exceptions if e not in self.licence_exceptions
            )
            if req.allocation is not None and req.allocation not in allocations:
                problems.append(f"{where}: unknown allocation {req.allocation!r}")
        for name, exc in self.licence_exceptions.items():
            where = f"licence exception {name}"
            need_citation(exc.citations, where)
            for refs in (
                exc.destination_in,
                exc.destination_not_in,
                exc.end_user_headquarters_in,
                exc.end_user_headquarters_not_in,
            ):
                need_groups(refs, where)
        for alloc in self.country_allocations:
            need_citation(alloc.citations, f"allocation {alloc.id}")
            need_groups(alloc.destination_in, f"allocation {alloc.id}")
        for list_name, lo in self.screening.outcomes_by_list.items():
            need_citation(lo.citations, f"screening list {list_name}")
        if self.effective_to is not None and self.effective_to < self.effective_from:
            problems.append("effective_to is before effective_from")
        if problems:
            raise RulesetDataError(f"rule set {self.id}: " + "; ".join(problems))
        return self


def load_country_groups(path: Path = COUNTRY_GROUPS_PATH) -> CountryGroups:
    data, digest = read_yaml(path)
    try:
        return CountryGroups.model_validate({**data, "sha256": digest})
    except ValidationError as exc:
        raise RulesetDataError(f"{path.name}: {exc}") from exc


def load_ruleset(path: Path, country_groups: CountryGroups | None = None) -> RuleSet:
    data, digest = read_yaml(path)
    groups = country_groups or load_country_groups()
    try:
        return RuleSet.model_validate({**data, "sha256": digest, "country_groups": groups})
    except ValidationError as exc:
        # One error type for bad data, whichever check caught it.
        raise RulesetDataError(f"{path.name}: {exc}") from exc


def load_rulesets(directory: Path = RULESETS_DIR, country_groups: CountryGroups | None = None) -> tuple[RuleSet, ...]:
    """Load every version, sorted by effective date, and refuse overlapping validity periods.

    Gaps are allowed (a date in a gap raises NoRulesetInForceError); overlaps are not, because
    then the decision date would not determine the rules.
    """
    groups = country_groups or load_country_groups()
    rulesets = sorted(
        (load_ruleset(p, groups) for p in sorted(directory.glob("*.yaml"))), key=lambda r: r.effective_from
    )
    ids = [r.id for r in rulesets]
    if len(set(ids)) != len(ids):
        raise RulesetDataError(f"duplicate rule-set ids: {ids}")
    for earlier, later in itertools.pairwise(rulesets):
        if earlier.effective_to is None or earlier.effective_to >= later.effective_from:
            raise RulesetDataError(
                f"rule sets {earlier.id} and {later.id} overlap: {earlier.id} must end before "
                f"{later.effective_from.isoformat()}"
            )
    return tuple(rulesets)


@cache
def default_rulesets() -> tuple[RuleSet, ...]:
    return load_rulesets()


def select_ruleset(on: date, rulesets: tuple[RuleSet, ...] | None = None) -> RuleSet:
    """The version in force on `on` (the shipment / decision date)."""
    for rs in rulesets if rulesets is not None else default_rulesets():
        if rs.in_force(on):
            return rs
    raise NoRulesetInForceError(on)


def get_ruleset(ruleset_id: str, rulesets: tuple[RuleSet, ...] | None = None) -> RuleSet:
    """An explicitly configured version, by id (e.g. ``"ai-diffusion-2025"``)."""
    available = rulesets if rulesets is not None else default_rulesets()
    for rs in available:
        if rs.id == ruleset_id:
            return rs
    raise UnknownRulesetError(ruleset_id, [r.id for r in available])
