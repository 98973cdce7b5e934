"""Evaluate one GPU shipment against the rule-set version in force.

Pure: no I/O beyond the (cached) data files, no clock — the decision date comes in the
request, and running quota totals come in as `quota_used` and go out as `quota_key` /
`quota_delta` for the service to persist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Literal

from .catalogue import Catalogue, GpuSpec, default_catalogue
from .classification import Classification, classify, fmt_tpp
from .models import (
    CountryStatus,
    Explanation,
    ExportDecision,
    ExportRequest,
    QuotaEvaluation,
    RequirementFinding,
    RouteEvaluation,
    RulesetRef,
    ScreeningEvidence,
    ScreeningFinding,
    ScreeningHit,
)
from .rulesets import (
    OUTCOME_SEVERITY,
    POLICY_SEVERITY,
    CountryAllocation,
    LicenceException,
    Outcome,
    Requirement,
    ReviewPolicy,
    RuleSet,
    get_ruleset,
    select_ruleset,
)
from .screening import MatchedEntry, PartyScreening, Screener, default_screener


@dataclass(frozen=True)
class _Ctx:
    rs: RuleSet
    req: ExportRequest
    spec: GpuSpec
    cls: Classification
    batch_tpp: int
    quota_used: Mapping[str, int]
    screener: Screener

    @property
    def on(self) -> date:
        return self.req.decision_date

    @property
    def destinations(self) -> list[str]:
        # The ultimate destination is where the end user is as well as where the consignee is;
        # both must pass a destination test (they normally coincide).
        return list(dict.fromkeys([self.req.destination_country, self.req.end_user.country]))

    @property
    def transit(self) -> list[str]:
        # Route entries equal to the endpoints are not transit (partners sometimes include them).
        ends = {self.req.origin_country, self.req.destination_country}
        return [c for c in self.req.route if c not in ends]

    def labels(self, refs: list[str]) -> str:
        return ", ".join(self.rs.group_label(r) for r in refs)


def _policy_text(policy: ReviewPolicy | None) -> str:
    return (policy or "none").replace("_", " ")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _status(rs: RuleSet, country: str) -> CountryStatus:
    return CountryStatus(country=country, groups=rs.groups_of(country), tier=rs.tier_of(country))


# --- requirements ---------------------------------------------------------------------------


def _candidates(req: Requirement, ctx: _Ctx) -> tuple[str, list[str]]:
    kind = req.trigger.kind
    if kind == "destination":
        return "destination", ctx.destinations
    if kind == "end_user_headquarters":
        return "end user headquarters", [ctx.req.end_user.headquarters_country]
    return "route transit", ctx.transit


def _trigger(req: Requirement, ctx: _Ctx) -> tuple[list[str], list[str]]:
    """Countries that trigger the requirement, and sentences explaining the others."""
    what, candidates = _candidates(req, ctx)
    trig = req.trigger
    hits: list[str] = []
    misses: list[str] = []
    if not candidates:
        misses.append(f"no {what} countries")
    for c in candidates:
        if trig.in_groups is not None and not ctx.rs.in_any(c, trig.in_groups):
            misses.append(f"{what} {c} is not in {ctx.labels(trig.in_groups)}")
            continue
        excluded = ctx.rs.matching_groups(c, trig.except_groups)
        if excluded:
            misses.append(f"{what} {c} is in {ctx.labels(excluded)}, which is excluded")
            continue
        hits.append(c)
    return hits, misses


def _hit_text(req: Requirement, ctx: _Ctx, hits: list[str]) -> str:
    what, _ = _candidates(req, ctx)
    if req.trigger.in_groups is None:
        return f"{what} {', '.join(hits)} (applies to every destination)"
    parts = [f"{c} is in {ctx.labels(ctx.rs.matching_groups(c, req.trigger.in_groups))}" for c in hits]
    return f"{what} " + "; ".join(parts)


def _lead(req: Requirement) -> str:
    """The requirement's summary as the start of a sentence, labelled if it is not regulation text."""
    prefix = {"programme_policy": "Programme policy: ", "is_informed": "Is-informed requirement: "}.get(req.basis)
    return f"{prefix}{req.summary}" if prefix else _cap(req.summary)


def _quota_eval(
    kind: Literal["lpp_consignee_year", "country_allocation"], source: str, key: str, cap: int, ctx: _Ctx
) -> QuotaEvaluation:
    before = int(ctx.quota_used.get(key, 0))
    after = before + ctx.batch_tpp
    return QuotaEvaluation(
        kind=kind,
        source=source,
        key=key,
        cap_tpp=cap,
        used_before=before,
        batch_tpp=ctx.batch_tpp,
        used_after=after,
        within_cap=after <= cap,
    )


def _consignee_key(template: str, req: ExportRequest, screener: Screener) -> str:
    # The consignee is identified by its screening-normalised name, so "Merlion Compute Pte.
    # Ltd." and "MERLION COMPUTE PTE LTD" accumulate into one annual total.
    return template.format(
        year=req.decision_date.year,
        consignee_country=req.consignee.country,
        consignee=screener.normalise(req.consignee.name).replace(" ", "-"),
    )


def _allocation_key(alloc: CountryAllocation, country: str) -> str:
    return alloc.key.format(period=alloc.period_label, country=country)


def quota_keys(request: ExportRequest, rs: RuleSet, screener: Screener | None = None) -> list[str]:
    """Every running total evaluating `request` under `rs` may read, so the service loads those
    rows only: the consignee's yearly totals and the destination's country allocations."""
    screener = screener or default_screener()
    keys = [_consignee_key(e.quota.key, request, screener) for e in rs.licence_exceptions.values() if e.quota]
    keys += [_allocation_key(a, request.destination_country) for a in rs.country_allocations]
    return list(dict.fromkeys(keys))


def _check_exception(name: str, exc: LicenceException, ctx: _Ctx) -> tuple[bool, list[str], QuotaEvaluation | None]:
    """Is the exception available? Returns (ok, reasons, quota examined)."""
    rs, eu = ctx.rs, ctx.req.end_user
    good: list[str] = []
    bad: list[str] = []
    for c in ctx.destinations:
        if exc.destination_in is not None:
            inside = rs.in_any(c, exc.destination_in)
            (good if inside else bad).append(
                f"destination {c} is {'' if inside else 'not '}in {ctx.labels(exc.destination_in)}"
            )
        blocked = rs.matching_groups(c, exc.destination_not_in)
        if blocked:
            bad.append(f"destination {c} is in {ctx.labels(blocked)}")
    hq = eu.headquarters_country
    if exc.end_user_headquarters_in is not None:
        inside = rs.in_any(hq, exc.end_user_headquarters_in)
        (good if inside else bad).append(
            f"end user headquarters {hq} is {'' if inside else 'not '}in {ctx.labels(exc.end_user_headquarters_in)}"
        )
    blocked = rs.matching_groups(hq, exc.end_user_headquarters_not_in)
    if blocked:
        bad.append(f"end user is headquartered in {hq} ({ctx.labels(blocked)})")
    quota = None
    if exc.quota is not None and not bad:
        # Only meaningful once the party/destination conditions hold; otherwise it would record
        # a quota that could never be used.
        key = _consignee_key(exc.quota.key, ctx.req, ctx.screener)
        quota = _quota_eval("lpp_consignee_year", name, key, exc.quota.cap_tpp, ctx)
        text = (
            f"consignee's {ctx.on.year} total {quota.used_before:,} + {quota.batch_tpp:,} = {quota.used_after:,} TPP "
            f"{'≤' if quota.within_cap else '>'} {quota.cap_tpp:,}"
        )
        (good if quota.within_cap else bad).append(text)
    head = f"Licence exception {name} ({exc.name}, {exc.clause}; {rs.cites(exc.citations)})"
    if bad:
        return False, [f"{head} not available: {'; '.join(bad)}."], quota
    return True, [f"{head} applies: {'; '.join(good) or 'no conditions'}."], quota


def _review_policy(req: Requirement, hits: list[str], ctx: _Ctx) -> tuple[ReviewPolicy, str, QuotaEvaluation | None]:
    rs, spec = ctx.rs, ctx.spec
    for ov in req.review_policy.overrides:
        conditions = [
            ov.origin_in is None or rs.in_any(ctx.req.origin_country, ov.origin_in),
            ov.destination_in is None or all(rs.in_any(c, ov.destination_in) for c in ctx.destinations),
            ov.tpp_below is None or ctx.cls.tpp < ov.tpp_below,
            ov.dram_bandwidth_below_gbps is None or spec.dram_bandwidth_gbps < ov.dram_bandwidth_below_gbps,
        ]
        if all(conditions):
            basis = f"{ov.clause} ({rs.cites(ov.citations)})"
            if ov.tpp_below is not None:
                basis += f": TPP {fmt_tpp(ctx.cls.tpp)} < {ov.tpp_below:,.0f}"
            if ov.dram_bandwidth_below_gbps is not None:
                basis += f", DRAM bandwidth {spec.dram_bandwidth_gbps:,.0f} < {ov.dram_bandwidth_below_gbps:,.0f} GB/s"
            if ov.note:
                basis += f" — {ov.note}"
            return ov.policy, basis, None
    if req.allocation is not None:
        alloc = next(a for a in rs.country_allocations if a.id == req.allocation)
        dest = ctx.req.destination_country
        if rs.in_any(dest, alloc.destination_in) and alloc.period_from <= ctx.on <= alloc.period_to:
            key = _allocation_key(alloc, dest)
            quota = _quota_eval("country_allocation", alloc.id, key, alloc.cap_tpp, ctx)
            policy = alloc.within_cap_policy if quota.within_cap else alloc.beyond_cap_policy
            basis = (
                f"{alloc.clause} ({rs.cites(alloc.citations)}): {dest} cumulative {quota.used_before:,} + "
                f"{quota.batch_tpp:,} = {quota.used_after:,} TPP {'≤' if quota.within_cap else '>'} "
                f"{alloc.cap_tpp:,} for {alloc.period_label}"
            )
            return policy, basis, quota
    for gp in req.review_policy.by_group:
        for c in hits:
            matched = rs.matching_groups(c, gp.groups)
            if matched:
                return gp.policy, f"{c} is in {ctx.labels(matched)}", None
    return req.review_policy.default, "default review policy of the requirement", None


def _evaluate_requirement(
    req: Requirement, ctx: _Ctx, reasoning: list[str], quotas: list[QuotaEvaluation]
) -> RequirementFinding:
    rs = ctx.rs
    cites = [rs.citations[k].cite for k in req.citations]
    where = "; ".join(dict.fromkeys([req.clause, *cites]))
    hits, misses = _trigger(req, ctx)
    if not hits:
        reasoning.append(f"{_lead(req)}: not triggered — {'; '.join(misses)} ({where}).")
        return RequirementFinding(
            requirement_id=req.id,
            clause=req.clause,
            citations=cites,
            basis=req.basis,
            triggered=False,
            triggered_by=[],
            licence_exception=None,
            outcome="cleared",
            review_policy=None,
            review_policy_basis=None,
        )
    reasoning.append(f"{_lead(req)}: triggered — {_hit_text(req, ctx, hits)} ({where}).")
    for name in req.exceptions:
        ok, sentences, quota = _check_exception(name, rs.licence_exceptions[name], ctx)
        reasoning.extend(sentences)
        if quota is not None:
            quotas.append(quota)
        if ok:
            return RequirementFinding(
                requirement_id=req.id,
                clause=req.clause,
                citations=cites,
                basis=req.basis,
                triggered=True,
                triggered_by=hits,
                licence_exception=name,
                outcome="cleared",
                review_policy=None,
                review_policy_basis=None,
            )
    policy, basis, quota = _review_policy(req, hits, ctx)
    if quota is not None:
        quotas.append(quota)
    reasoning.append(f"Licence required under {req.clause}; review policy: {_policy_text(policy)} ({basis}).")
    return RequirementFinding(
        requirement_id=req.id,
        clause=req.clause,
        citations=cites,
        basis=req.basis,
        triggered=True,
        triggered_by=hits,
        licence_exception=None,
        outcome=req.outcome,
        review_policy=policy,
        review_policy_basis=basis,
    )


# --- screening ------------------------------------------------------------------------------


def _listing(entry: MatchedEntry) -> str:
    # The citation a licensing officer checks: when listed, and the notice that listed it.
    listed = entry.start_date.isoformat() if entry.start_date else "listing date unknown"
    return f"; listed {listed}" + (f", {entry.federal_register_notice}" if entry.federal_register_notice else "")


def _screen(ctx: _Ctx, reasoning: list[str]) -> tuple[list[PartyScreening], list[ScreeningFinding]]:
    rs, sl = ctx.rs, ctx.screener.list
    # Name and, when the partner gave one, address: an address-only match is a review, not a hit.
    consignee, end_user = ctx.req.consignee, ctx.req.end_user
    parties = [
        ctx.screener.screen(consignee.name, "consignee", on=ctx.on, address=consignee.screening_address()),
        ctx.screener.screen(end_user.name, "end_user", on=ctx.on, address=end_user.screening_address()),
    ]
    findings: list[ScreeningFinding] = []
    for p in parties:
        role = p.role.replace("_", " ")
        entry = p.matched_entry
        if p.hit and entry is not None:
            rule = rs.screening.outcomes_by_list.get(entry.list, rs.screening.unknown_list)
            findings.append(
                ScreeningFinding(
                    role=p.role,
                    list=entry.list,
                    entry_id=entry.id,
                    outcome=rule.outcome,
                    review_policy=rule.review_policy,
                    citations=[rs.citations[k].cite for k in rule.citations],
                    basis=rule.basis,
                )
            )
            reasoning.append(
                f"Screening: {role} '{p.name}' matches {entry.list} entry '{entry.name}' ({entry.id}, via "
                f"'{entry.matched_name}'{', contains the listed name' if p.method == 'contains_listed_name' else ''}"
                f"{_listing(entry)}) with score {p.best_score:.1f} ≥ {p.threshold:g} "
                f"(snapshot {sl.snapshot_date.isoformat()}) → {rule.outcome}: {rule.basis.strip()}"
            )
        elif entry is not None and p.review and p.method == "address":
            reasoning.append(
                f"Screening: {role} '{p.name}' — address for review: it matches the listed address "
                f"'{entry.matched_name}' of {entry.list} entry '{entry.name}' ({entry.id}{_listing(entry)}) with "
                f"score {p.best_score:.1f} ≥ {p.threshold:g}; the name does not match, so a human decides "
                f"(snapshot {sl.snapshot_date.isoformat()})."
            )
        elif entry is not None and p.review:
            reasoning.append(
                f"Screening: {role} '{p.name}' — near miss for review: best score {p.best_score:.1f} in "
                f"[{p.review_threshold:g}, {p.threshold:g}) against {entry.list} entry '{entry.name}' ({entry.id}, "
                f"via '{entry.matched_name}'{_listing(entry)}; snapshot {sl.snapshot_date.isoformat()})."
            )
        elif entry is not None:
            reasoning.append(
                f"Screening: {role} '{p.name}' — no match (best score {p.best_score:.1f} < {p.threshold:g}, "
                f"against '{entry.matched_name}' on the {entry.list}; snapshot {sl.snapshot_date.isoformat()})."
            )
        else:
            reasoning.append(f"Screening: {role} '{p.name}' — list snapshot {sl.snapshot_date.isoformat()} is empty.")
    return parties, findings


# --- entry point ----------------------------------------------------------------------------


def evaluate(
    request: ExportRequest,
    *,
    ruleset: RuleSet | str | None = None,
    rulesets: tuple[RuleSet, ...] | None = None,
    quota_used: Mapping[str, int],
    catalogue: Catalogue | None = None,
    screener: Screener | None = None,
) -> ExportDecision:
    """Decide `cleared` / `license_required` / `denied` for one shipment.

    ruleset: None selects the version in force on ``request.decision_date``; a RuleSet or a
        rule-set id pins a version explicitly (recorded as such in the decision).
    rulesets: the versions to choose from (None: the data shipped with the service).
    quota_used: running totals the service has persisted, by quota key (missing key = 0).
    Raises UnknownModelError for a model not in the catalogue and NoRulesetInForceError for a
    date no version covers — the service turns both into rejections.
    """
    catalogue = catalogue or default_catalogue()
    screener = screener or default_screener()
    spec = catalogue.get(request.model)
    on = request.decision_date
    selected_by: Literal["decision_date", "explicit"]
    if ruleset is None:
        rs, selected_by = select_ruleset(on, rulesets), "decision_date"
    else:
        rs, selected_by = (get_ruleset(ruleset, rulesets) if isinstance(ruleset, str) else ruleset), "explicit"
    # Country groups as they stood on the decision date (dated memberships in country_groups.yaml).
    rs = rs.model_copy(update={"membership_date": on})
    cls = classify(spec, rs, catalogue_version=catalogue.catalogue_version)
    batch_tpp = round(cls.tpp * request.quantity)
    ctx = _Ctx(rs, request, spec, cls, batch_tpp, quota_used, screener)
    primary = rs.citations[rs.primary_citation]
    reasoning: list[str] = []

    until = rs.effective_to.isoformat() if rs.effective_to else "until superseded"
    how = (
        f"selected by decision date {on.isoformat()}"
        if selected_by == "decision_date"
        else (f"configured explicitly (decision date {on.isoformat()})")
    )
    reasoning.append(
        f"Rule set {rs.version} ({rs.short_title}, {primary.cite}) applies: in force "
        f"{rs.effective_from.isoformat()} to {until}; {how}."
    )
    if selected_by == "explicit" and not rs.in_force(on):
        reasoning.append(f"Note: {rs.version} is not the rule set in force on {on.isoformat()}.")
    if rs.compliance_from is not None and on < rs.compliance_from:
        reasoning.append(
            f"{_cap(rs.short_title)} is effective but compliance is mandatory only from "
            f"{rs.compliance_from.isoformat()}; it is applied from its effective date (conservative)."
        )
    reasoning.append(
        f"Items are treated as subject to the EAR whatever their origin (origin {request.origin_country}): "
        f"US-origin or foreign-produced direct products of US technology; the shipment is evaluated as an "
        f"export or reexport to {request.destination_country}."
    )
    reasoning.extend(cls.sentences())
    reasoning.append(f"Batch TPP = {fmt_tpp(cls.tpp)} × {request.quantity:,} = {batch_tpp:,}.")

    dest = _status(rs, request.destination_country)
    eu_loc = _status(rs, request.end_user.country)
    eu_hq = _status(rs, request.end_user.headquarters_country)
    statuses = [("Destination", dest)]
    if eu_loc.country != dest.country:
        statuses.append(("End user location", eu_loc))
    statuses.append(("End user headquarters", eu_hq))
    for label, st in statuses:
        groups = ", ".join(st.groups) or "none"
        if st.tier:
            reasoning.append(
                f"{label} {st.country} is {rs.group_label(st.tier)} under {rs.short_title} (groups: {groups})."
            )
        else:
            reasoning.append(f"{label} {st.country}: country groups {groups}.")
    route = RouteEvaluation(
        origin=_status(rs, request.origin_country),
        transit=[_status(rs, c) for c in ctx.transit],
        flagged=[],
    )
    path = " → ".join([request.origin_country, *ctx.transit, request.destination_country])
    reasoning.append(f"Route: {path}.")

    parties, screening_findings = _screen(ctx, reasoning)

    findings: list[RequirementFinding] = []
    quotas: list[QuotaEvaluation] = []
    for req in rs.requirements:
        if not req.items.covers(spec.model, cls.eccn):
            continue
        if not req.in_force(on):
            start = req.effective_from.isoformat() if req.effective_from else "?"
            reasoning.append(f"{_lead(req)}: not in force on {on.isoformat()} (from {start}).")
            continue
        findings.append(_evaluate_requirement(req, ctx, reasoning, quotas))
    if not findings:
        reasoning.append(f"No licence requirement of {rs.version} covers {spec.model} ({cls.eccn or 'not 3A090'}).")

    route_ids = {r.id for r in rs.requirements if r.trigger.kind == "route"}
    flagged = sorted({c for f in findings if f.requirement_id in route_ids for c in f.triggered_by})
    route = route.model_copy(update={"flagged": flagged})

    # Combine: the most severe outcome wins; its review policy is the most restrictive one.
    open_items: list[tuple[Outcome, ReviewPolicy | None]] = [
        (f.outcome, f.review_policy) for f in findings if f.outcome != "cleared"
    ] + [(s.outcome, s.review_policy) for s in screening_findings]
    outcome: Outcome = max((o for o, _ in open_items), key=OUTCOME_SEVERITY.__getitem__, default="cleared")
    policies = [p for _, p in open_items if p is not None]
    review_policy = max(policies, key=POLICY_SEVERITY.__getitem__) if policies else None
    used = [f.licence_exception for f in findings if f.licence_exception]
    licence_exception = used[0] if outcome == "cleared" and used else None

    quota_key: str | None = None
    quota_delta = 0
    apply_on: Literal["decision", "license_granted"] | None = None
    if outcome == "cleared" and licence_exception is not None:
        q = next((q for q in quotas if q.source == licence_exception and q.within_cap), None)
        if q is not None:
            quota_key, quota_delta, apply_on = q.key, q.batch_tpp, "decision"
    elif outcome == "license_required":
        q = next((q for q in quotas if q.kind == "country_allocation"), None)
        if q is not None:
            quota_key, quota_delta, apply_on = q.key, q.batch_tpp, "license_granted"

    if outcome == "cleared":
        how_cleared = f"licence exception {licence_exception}" if licence_exception else "no licence required"
        reasoning.append(f"Outcome: cleared — {how_cleared} under {rs.version}.")
    else:
        causes = [f.requirement_id for f in findings if f.outcome != "cleared"]
        causes += [f"screening:{s.role}:{s.entry_id}" for s in screening_findings]
        if outcome == "license_required":
            reasoning.append(
                f"Outcome: license_required — review policy {_policy_text(review_policy)}; the licensing "
                f"authority's license.granted / license.denied decides. Caused by: {', '.join(causes)}."
            )
        else:
            reasoning.append(f"Outcome: denied. Caused by: {', '.join(causes)}.")
    if quota_key is not None:
        when = "now" if apply_on == "decision" else "when the licence is granted"
        reasoning.append(f"Quota to record {when}: {quota_key} += {quota_delta:,} TPP.")

    def _hit(p: PartyScreening) -> ScreeningHit:
        assert p.matched_entry is not None
        e = p.matched_entry
        return ScreeningHit(
            role=p.role,
            entry_id=e.id,
            entry_name=e.name,
            list=e.list,
            score=p.best_score,
            start_date=e.start_date,
            federal_register_notice=e.federal_register_notice,
        )

    statuses = [dest, eu_loc, eu_hq, route.origin, *route.transit]
    explanation = Explanation(
        rule_version=rs.version,
        ruleset_sha256=rs.sha256,
        decision_date=on,
        group_memberships={s.country: s.groups for s in statuses},
        licence_exceptions=sorted({f.licence_exception for f in findings if f.licence_exception}),
        screening_snapshot=screener.list.sha256,
        screening_source_date=screener.list.snapshot_date,
        screening_hits=[_hit(p) for p in parties if p.hit],
        screening_reviews=[_hit(p) for p in parties if p.review and p.matched_entry is not None],
    )
    return ExportDecision(
        explanation=explanation,
        batch_id=request.batch_id,
        outcome=outcome,
        review_policy=review_policy,
        licence_exception=licence_exception,
        ruleset=RulesetRef(
            id=rs.id,
            revision=rs.revision,
            version=rs.version,
            title=rs.title,
            effective_from=rs.effective_from,
            effective_to=rs.effective_to,
            compliance_from=rs.compliance_from,
            citation=primary,
            sha256=rs.sha256,
            selected_by=selected_by,
        ),
        inputs=request,
        classification=cls,
        batch_tpp=batch_tpp,
        destination=dest,
        end_user_location=eu_loc,
        end_user_headquarters=eu_hq,
        route=route,
        screening=ScreeningEvidence(
            snapshot_date=screener.list.snapshot_date,
            source=screener.list.source,
            sha256=screener.list.sha256,
            parties=parties,
        ),
        screening_findings=screening_findings,
        requirements=findings,
        quotas=quotas,
        quota_key=quota_key,
        quota_delta=quota_delta,
        quota_apply_on=apply_on,
        reasoning=reasoning,
        data_digests={
            "ruleset": rs.sha256,
            "country_groups": rs.country_groups.sha256,
            "catalogue": catalogue.sha256,
            "screening_list": screener.list.sha256,
        },
    )
