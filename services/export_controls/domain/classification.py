"""ECCN 3A090 classification of a catalogue GPU under a given rule-set version."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .catalogue import GpuSpec
from .rulesets import Criterion, RuleSet


def fmt_tpp(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def fmt_pd(value: float) -> str:
    return f"{value:.2f}"


def fmt_bound(value: float) -> str:
    # Thresholds print as written in the rule ("4,800", "5.92", "1.6").
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"


class CriterionCheck(BaseModel):
    """The result of testing one ECCN alternative, kept as evidence."""

    model_config = ConfigDict(frozen=True)

    eccn: str
    clause: str
    met: bool
    holds: list[str]  # e.g. "TPP 36,000 ≥ 4,800"
    fails: list[str]  # e.g. "TPP 2,368 < 2,400"


class Classification(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    dense_tops: float
    bit_length: int
    die_area_mm2: float
    tpp: float
    performance_density: float
    eccn: str | None  # None: below every 3A090 alternative ("not 3A090")
    clause: str | None
    citation: str  # e.g. "88 FR 73458"
    checks: list[CriterionCheck]
    catalogue_source: str
    catalogue_version: str

    @property
    def controlled(self) -> bool:
        return self.eccn is not None

    def sentences(self) -> list[str]:
        out = [
            f"{self.model}: TPP = {self.dense_tops:,g} dense TOPS × {self.bit_length}-bit = {fmt_tpp(self.tpp)}; "
            f"PD = {fmt_tpp(self.tpp)} / {self.die_area_mm2:,g} mm² = {fmt_pd(self.performance_density)} "
            f"(catalogue {self.catalogue_version})."
        ]
        if self.eccn is not None:
            met = next(c for c in self.checks if c.met)
            out.append(
                f"{self.model} classified {self.eccn}: {' and '.join(met.holds)} ({self.citation}, ECCN {met.eccn})."
            )
        else:
            why = "; ".join(f"{', '.join(c.fails)} ({c.clause})" for c in self.checks)
            out.append(f"{self.model} is not 3A090: {why} ({self.citation}). No 3A090 licence requirement applies.")
        return out


def _check(criterion: Criterion, tpp: float, pd: float) -> CriterionCheck:
    holds: list[str] = []
    fails: list[str] = []
    for label, value, fmt, low, high in (
        ("TPP", tpp, fmt_tpp, criterion.tpp_min, criterion.tpp_below),
        ("PD", pd, fmt_pd, criterion.pd_min, criterion.pd_below),
    ):
        if low is not None:
            (holds if value >= low else fails).append(
                f"{label} {fmt(value)} {'≥' if value >= low else '<'} {fmt_bound(low)}"
            )
        if high is not None:
            (holds if value < high else fails).append(
                f"{label} {fmt(value)} {'<' if value < high else '≥'} {fmt_bound(high)}"
            )
    return CriterionCheck(eccn=criterion.eccn, clause=criterion.clause, met=not fails, holds=holds, fails=fails)


def classify(spec: GpuSpec, ruleset: RuleSet, *, catalogue_version: str = "") -> Classification:
    """Classify under the rule set's 3A090 criteria; the first alternative met wins (a before b)."""
    tpp, pd = spec.tpp, spec.performance_density
    checks = [_check(c, tpp, pd) for c in ruleset.classification.criteria]
    first = next((c for c in checks if c.met), None)
    return Classification(
        model=spec.model,
        dense_tops=spec.dense_tops,
        bit_length=spec.bit_length,
        die_area_mm2=spec.die_area_mm2,
        tpp=tpp,
        performance_density=pd,
        eccn=first.eccn if first else None,
        clause=first.clause if first else None,
        citation=ruleset.citations[ruleset.classification.citation].cite,
        checks=checks,
        catalogue_source=spec.source,
        catalogue_version=catalogue_version,
    )
