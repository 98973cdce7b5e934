"""Export-control domain: a table of cases across chips, destinations, dates and parties.

Every case names the rule it follows (rule-set version + clause) and its expected outcome and
ECCN. `test_every_rule_is_load_bearing` deletes each rule from the data in turn and checks
that some case or classification then fails, so a rule cannot silently drop out of the data.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import date

import pytest

from services.export_controls.domain import (
    Catalogue,
    ExportRequest,
    GpuSpec,
    NoRulesetInForceError,
    RuleSet,
    RulesetDataError,
    Screener,
    UnknownModelError,
    UnknownRulesetError,
    classify,
    default_catalogue,
    default_rulesets,
    default_screener,
    evaluate,
    get_ruleset,
    load_ruleset,
    select_ruleset,
)
from services.export_controls.domain._data import RULESETS_DIR

# One date inside each rule-set version.
D2023 = date(2024, 6, 1)  # acr-2023
DAID = date(2025, 3, 1)  # ai-diffusion-2025, before the H20 is-informed letter (2025-04-09)
DAID_LATE = date(2025, 4, 20)  # ai-diffusion-2025, after the H20 letter
DPOST = date(2025, 6, 1)  # post-rescission-2025-05
D2026 = date(2026, 3, 1)  # review-policy-2026-01

ACR, AID, POST, RP26 = "acr-2023", "ai-diffusion-2025", "post-rescission-2025-05", "review-policy-2026-01"

ALLOC_SG = "ai-diffusion-2025/tier2-allocation/2025-2027/SG"
LPP_MERLION = "ai-diffusion-2025/lpp/2025/SG/merlion-compute"


def _synthetic(model: str, tpp: float, die: float) -> GpuSpec:
    # Hypothetical chips that sit in exactly one 3A090 alternative each, so removing any
    # criterion from the data changes a classification (no real catalogue model is 3A090.b).
    return GpuSpec(
        model=model,
        vendor="TEST",
        architecture="test",
        die="test",
        dense_tops=tpp / 8,
        bit_length=8,
        die_area_mm2=die,
        dram_bandwidth_gbps=1000,
        designed_for_datacenter=True,
        tpp_reference=tpp,
        source="synthetic test chip",
    )


SYNTHETIC = {
    # model: (spec, expected ECCN, expected criterion clause)
    "TEST-A1": (_synthetic("TEST-A1", 5000, 1000), "3A090.a", "3A090.a (TPP ≥ 4800)"),  # PD 5.0
    "TEST-A2": (_synthetic("TEST-A2", 2000, 330), "3A090.a", "3A090.a (TPP ≥ 1600 and PD ≥ 5.92)"),  # PD 6.06
    "TEST-B1": (_synthetic("TEST-B1", 3000, 1500), "3A090.b", "3A090.b (2400 ≤ TPP < 4800 and 1.6 ≤ PD < 5.92)"),
    "TEST-B2": (_synthetic("TEST-B2", 2000, 500), "3A090.b", "3A090.b (TPP ≥ 1600 and 3.2 ≤ PD < 5.92)"),
    "TEST-NONE": (_synthetic("TEST-NONE", 1500, 150), None, None),  # PD 10 but TPP < 1600
}

BASE = default_catalogue()
CATALOGUE = Catalogue(
    catalogue_version=BASE.catalogue_version,
    models={**BASE.models, **{m: spec for m, (spec, _, _) in SYNTHETIC.items()}},
    sha256=BASE.sha256,
)


@dataclass(frozen=True)
class Case:
    id: str
    model: str
    destination: str
    on: date
    ruleset: str  # version the decision date must select
    rule: str  # the rule the case follows: version + clause + why
    outcome: str
    eccn: str | None
    exception: str | None = None
    review_policy: str | None = None
    causes: tuple[str, ...] = ()  # open requirement ids and screening entry ids
    hq: str | None = None
    end_user_country: str | None = None
    route: tuple[str, ...] = ()
    origin: str = "TW"
    consignee: str = "Naver Cloud Corp."
    end_user: str | None = None
    quantity: int = 100
    quota_used: tuple[tuple[str, int], ...] = ()


def request_for(c: Case, *, on: date | None = None) -> ExportRequest:
    return ExportRequest(
        batch_id=f"batch-{c.id}",
        model=c.model,
        quantity=c.quantity,
        origin_country=c.origin,
        route=list(c.route),
        destination_country=c.destination,
        consignee={"name": c.consignee, "country": c.destination},
        end_user={
            "name": c.end_user or c.consignee,
            "country": c.end_user_country or c.destination,
            "headquarters_country": c.hq or c.end_user_country or c.destination,
        },
        decision_date=on or c.on,
    )


LR, OK, DN = "license_required", "cleared", "denied"
DENIAL, CBC, APPROVAL = "presumption_of_denial", "case_by_case", "presumption_of_approval"

# Hand-wrapped table, one case per entry; keep ruff format off it.
# fmt: off
CASES: list[Case] = [
    # --- the national centre in Korea (A:5, Tier 1): cleared under every version -------------
    Case("kr-b200-2023", "B200", "KR", D2023, ACR, "acr-2023 · 15 CFR 742.6(a)(6)(iii): KR is A:5, not D:1/D:4/D:5",
         OK, "3A090.a"),
    Case("kr-h100-2023", "H100-SXM", "KR", D2023, ACR, "acr-2023 · 742.6(a)(6)(iii): KR is A:5", OK, "3A090.a"),
    Case("kr-l40s-2023", "L40S", "KR", D2023, ACR, "acr-2023 · 742.6(a)(6)(iii): KR is A:5", OK, "3A090.a"),
    Case("kr-b200-aid", "B200", "KR", DAID, AID, "ai-diffusion-2025 · 15 CFR 740.27 AIA: KR is Tier 1", OK,
         "3A090.a", "AIA"),
    Case("kr-h100-aid", "H100-SXM", "KR", DAID, AID, "ai-diffusion-2025 · 740.27 AIA: KR is Tier 1", OK, "3A090.a",
         "AIA"),
    Case("kr-h200-aid", "H200-SXM", "KR", DAID, AID, "ai-diffusion-2025 · 740.27 AIA: KR is Tier 1", OK, "3A090.a",
         "AIA"),
    Case("kr-gb200-aid", "GB200", "KR", DAID, AID, "ai-diffusion-2025 · 740.27 AIA: KR is Tier 1", OK, "3A090.a",
         "AIA"),
    Case("kr-a100-aid", "A100-SXM", "KR", DAID, AID, "ai-diffusion-2025 · 740.27 AIA: KR is Tier 1", OK, "3A090.a",
         "AIA"),
    Case("kr-b200-post", "B200", "KR", DPOST, POST, "post-rescission · 742.6(a)(6)(iii): KR is A:5", OK, "3A090.a"),
    Case("kr-h100-post", "H100-SXM", "KR", DPOST, POST, "post-rescission · 742.6(a)(6)(iii): KR is A:5", OK,
         "3A090.a"),
    Case("kr-b200-2026", "B200", "KR", D2026, RP26, "review-policy-2026-01 · 742.6(a)(6)(iii): KR is A:5", OK,
         "3A090.a"),
    Case("kr-h200-2026", "H200-SXM", "KR", D2026, RP26, "review-policy-2026-01 · 742.6(a)(6)(iii): KR is A:5", OK,
         "3A090.a"),
    Case("kr-h20-2023", "H20", "KR", D2023, ACR, "acr-2023 · 3A090: H20 below every threshold", OK, None),
    Case("kr-h20-aid", "H20", "KR", DAID_LATE, AID, "ai-diffusion-2025 · H20 not 3A090, KR not D:5", OK, None),
    Case("kr-h20-post", "H20", "KR", DPOST, POST, "post-rescission · H20 not 3A090, KR not D:5", OK, None),
    Case("kr-b200-route-sg-aid", "B200", "KR", DAID, AID,
         "ai-diffusion-2025 · AIA; transit via Tier 2 SG is not a Tier 3 route", OK, "3A090.a", "AIA", route=("SG",)),
    Case("us-b200-aid", "B200", "US", DAID, AID, "ai-diffusion-2025 · 740.27 AIA: US is in Tier 1", OK, "3A090.a",
         "AIA"),
    # --- Korea, but the end user is headquartered in China (D:5) ------------------------------
    Case("kr-b200-hq-cn-2023", "B200", "KR", D2023, ACR, "acr-2023 · 742.6(a)(6)(iii): entity headquartered in D:5",
         LR, "3A090.a", review_policy=DENIAL, causes=("acr-headquarters",), hq="CN",
         end_user="Hanbit AI Research Korea"),
    Case("kr-b200-hq-cn-aid", "B200", "KR", DAID, AID, "ai-diffusion-2025 · HQ in Tier 3: no AIA, licence worldwide",
         LR, "3A090.a", review_policy=DENIAL, causes=("aid-worldwide-3a090a", "aid-headquarters"), hq="CN",
         end_user="Hanbit AI Research Korea"),
    Case("kr-b200-hq-cn-post", "B200", "KR", DPOST, POST,
         "post-rescission · 742.6(a)(6)(iii): entity headquartered in D:5", LR, "3A090.a", review_policy=DENIAL,
         causes=("acr-headquarters",), hq="CN", end_user="Hanbit AI Research Korea"),
    Case("kr-h100-hq-cn-2026", "H100-SXM", "KR", D2026, RP26,
         "review-policy-2026-01 · HQ in D:5; the case-by-case policy covers only destinations CN/MO", LR, "3A090.a",
         review_policy=DENIAL, causes=("acr-headquarters",), hq="CN", origin="US",
         end_user="Hanbit AI Research Korea"),
    Case("kr-b200-hq-sg-aid-small", "B200", "KR", DAID, AID,
         "ai-diffusion-2025 · AIA needs a Tier 1 HQ; 740.29 LPP covers 3.6M TPP", OK, "3A090.a", "LPP", hq="SG"),
    Case("kr-b200-hq-sg-aid-large", "B200", "KR", DAID, AID,
         "ai-diffusion-2025 · AIA needs a Tier 1 HQ; 36M TPP exceeds LPP", LR, "3A090.a", review_policy=APPROVAL,
         causes=("aid-worldwide-3a090a",), hq="SG", quantity=1000),
    Case("kr-end-user-in-cn-post", "B200", "KR", DPOST, POST,
         "post-rescission · 742.6(a)(6)(iii): the ultimate destination (end user in CN) is D:5", LR, "3A090.a",
         review_policy=DENIAL, causes=("acr-destination", "acr-headquarters"), end_user_country="CN",
         end_user="Pearl River Compute Co., Ltd."),
    # --- routes through Tier 3 / D:5 ----------------------------------------------------------
    Case("kr-b200-route-hk-2023", "B200", "KR", D2023, ACR, "acr-2023 · programme policy: transit via HK (D:5)", LR,
         "3A090.a", review_policy=DENIAL, causes=("route-transit-d5",), route=("HK",)),
    Case("kr-b200-route-hk-aid", "B200", "KR", DAID, AID,
         "ai-diffusion-2025 · programme policy: transit via HK (Tier 3) although AIA covers KR", LR, "3A090.a",
         review_policy=DENIAL, causes=("route-transit-d5",), route=("HK",)),
    Case("kr-h100-route-mo-post", "H100-SXM", "KR", DPOST, POST,
         "post-rescission · programme policy: transit via Macau", LR, "3A090.a", review_policy=DENIAL,
         causes=("route-transit-d5",), route=("MO",)),
    Case("kr-b200-route-hk-2026", "B200", "KR", D2026, RP26,
         "review-policy-2026-01 · programme policy: transit via HK", LR, "3A090.a", review_policy=DENIAL,
         causes=("route-transit-d5",), route=("HK",)),
    Case("kr-h20-route-hk-post", "H20", "KR", DPOST, POST, "post-rescission · route policy covers 3A090 items only",
         OK, None, route=("HK",)),
    # --- China, Hong Kong, Macau --------------------------------------------------------------
    Case("cn-h100-2023", "H100-SXM", "CN", D2023, ACR, "acr-2023 · 742.6(a)(6)(iii): CN is D:5", LR, "3A090.a",
         review_policy=DENIAL, causes=("acr-destination", "acr-headquarters"),
         consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h100-aid", "H100-SXM", "CN", DAID, AID,
         "ai-diffusion-2025 · CN is Tier 3: no AIA/LPP, presumption of denial", LR, "3A090.a", review_policy=DENIAL,
         causes=("aid-worldwide-3a090a", "aid-headquarters"), consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h100-hq-us-2023", "H100-SXM", "CN", D2023, ACR,
         "acr-2023 · 742.6(a)(6)(iii) + review policy: destination in D:5", LR, "3A090.a", review_policy=DENIAL,
         causes=("acr-destination",), hq="US", consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h100-hq-us-aid", "H100-SXM", "CN", DAID, AID,
         "ai-diffusion-2025 · Tier 3 destination: presumption of denial", LR, "3A090.a", review_policy=DENIAL,
         causes=("aid-worldwide-3a090a",), hq="US", consignee="Pearl River Compute Co., Ltd."),
    Case("cn-3a090b-hq-us-aid", "TEST-B1", "CN", DAID, AID,
         "ai-diffusion-2025 · 3A090.b to D:5: presumption of denial", LR, "3A090.b", review_policy=DENIAL,
         causes=("aid-destination-3a090b",), hq="US", consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h100-hq-us-post", "H100-SXM", "CN", DPOST, POST,
         "post-rescission · destination in D:5: presumption of denial", LR, "3A090.a", review_policy=DENIAL,
         causes=("acr-destination",), hq="US", consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h100-hq-us-2026", "H100-SXM", "CN", D2026, RP26,
         "review-policy-2026-01 · reexport from TW to D:5: presumption of denial (91 FR 1684 covers US exports only)",
         LR, "3A090.a", review_policy=DENIAL, causes=("acr-destination",), hq="US",
         consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h20-2023", "H20", "CN", D2023, ACR, "acr-2023 · H20 is not 3A090 (TPP 2,368 < 2,400; PD 2.91 < 3.2)",
         OK, None, consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h20-aid-early", "H20", "CN", DAID, AID, "ai-diffusion-2025 · not 3A090; H20 letter not yet in force",
         OK, None, consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h20-aid-late", "H20", "CN", DAID_LATE, AID, "ai-diffusion-2025 · H20 is-informed letter of 2025-04-09",
         LR, None, review_policy=CBC, causes=("h20-is-informed-destination", "h20-is-informed-headquarters"),
         consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h20-hq-us-aid", "H20", "CN", DAID_LATE, AID, "ai-diffusion-2025 · H20 letter: destination China", LR,
         None, review_policy=CBC, causes=("h20-is-informed-destination",), hq="US",
         consignee="Pearl River Compute Co., Ltd."),
    Case("my-h20-hq-cn-aid", "H20", "MY", DAID_LATE, AID,
         "ai-diffusion-2025 · H20 letter: company headquartered in China", LR, None, review_policy=CBC,
         causes=("h20-is-informed-headquarters",), hq="CN", consignee="Johor AI Hosting Sdn. Bhd."),
    Case("cn-h20-hq-us-post", "H20", "CN", DPOST, POST, "post-rescission · H20 letter: destination China", LR, None,
         review_policy=CBC, causes=("h20-is-informed-destination",), hq="US",
         consignee="Pearl River Compute Co., Ltd."),
    Case("my-h20-hq-cn-post", "H20", "MY", DPOST, POST,
         "post-rescission · H20 letter: company headquartered in China", LR, None, review_policy=CBC,
         causes=("h20-is-informed-headquarters",), hq="CN", consignee="Johor AI Hosting Sdn. Bhd."),
    Case("cn-h20-hq-us-2026", "H20", "CN", D2026, RP26, "review-policy-2026-01 · H20 letter: destination China", LR,
         None, review_policy=CBC, causes=("h20-is-informed-destination",), hq="US",
         consignee="Pearl River Compute Co., Ltd."),
    Case("my-h20-hq-cn-2026", "H20", "MY", D2026, RP26,
         "review-policy-2026-01 · H20 letter: company headquartered in China", LR, None, review_policy=CBC,
         causes=("h20-is-informed-headquarters",), hq="CN", consignee="Johor AI Hosting Sdn. Bhd."),
    Case("cn-h200-us-2026", "H200-SXM", "CN", D2026, RP26,
         "review-policy-2026-01 · 91 FR 1684: export from US, TPP < 21,000, bandwidth < 6,500 GB/s → case-by-case",
         LR, "3A090.a", review_policy=CBC, causes=("acr-destination", "acr-headquarters"), origin="US",
         consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h200-tw-2026", "H200-SXM", "CN", D2026, RP26,
         "review-policy-2026-01 · reexport (origin TW) keeps presumption of denial", LR, "3A090.a",
         review_policy=DENIAL, causes=("acr-destination", "acr-headquarters"),
         consignee="Pearl River Compute Co., Ltd."),
    Case("cn-b200-us-2026", "B200", "CN", D2026, RP26,
         "review-policy-2026-01 · B200 TPP 36,000 ≥ 21,000: presumption of denial", LR, "3A090.a",
         review_policy=DENIAL, causes=("acr-destination", "acr-headquarters"), origin="US",
         consignee="Pearl River Compute Co., Ltd."),
    Case("cn-h100-us-2026-post", "H100-SXM", "CN", date(2026, 1, 14), POST,
         "post-rescission · the day before 91 FR 1684: presumption of denial", LR, "3A090.a", review_policy=DENIAL,
         causes=("acr-destination", "acr-headquarters"), origin="US", consignee="Pearl River Compute Co., Ltd."),
    Case("mo-h100-post", "H100-SXM", "MO", DPOST, POST, "post-rescission · 742.6(a)(6)(iii): Macau", LR, "3A090.a",
         review_policy=DENIAL, causes=("acr-destination", "acr-headquarters"), consignee="Cotai Data Ltd."),
    Case("hk-h100-post", "H100-SXM", "HK", DPOST, POST,
         "post-rescission · 742.6(a)(6)(iii): HK is treated as China (D:5)", LR, "3A090.a", review_policy=DENIAL,
         causes=("acr-destination", "acr-headquarters"), consignee="Kowloon GPU Cloud Ltd."),
    # --- Tier 2 and other destinations ----------------------------------------------------------
    Case("sg-b200-2023", "B200", "SG", D2023, ACR, "acr-2023 · SG is not in D:1/D:4/D:5", OK, "3A090.a",
         consignee="Merlion Compute Pte. Ltd.", quantity=1000),
    Case("sg-b200-aid-lpp", "B200", "SG", DAID, AID,
         "ai-diffusion-2025 · 740.29 LPP: 18M ≤ 26.9M TPP per consignee-year", OK, "3A090.a", "LPP",
         consignee="Merlion Compute Pte. Ltd.", quantity=500),
    Case("sg-b200-aid-licence", "B200", "SG", DAID, AID,
         "ai-diffusion-2025 · Tier 2, above LPP, within the 790M allocation → presumption of approval", LR,
         "3A090.a", review_policy=APPROVAL, causes=("aid-worldwide-3a090a",), consignee="Merlion Compute Pte. Ltd.",
         quantity=1000),
    Case("sg-b200-aid-cap", "B200", "SG", DAID, AID,
         "ai-diffusion-2025 · Tier 2 allocation 760M + 36M > 790M → presumption of denial", LR, "3A090.a",
         review_policy=DENIAL, causes=("aid-worldwide-3a090a",), consignee="Merlion Compute Pte. Ltd.", quantity=1000,
         quota_used=((ALLOC_SG, 760_000_000),)),
    Case("sg-b200-post", "B200", "SG", DPOST, POST, "post-rescission · SG is not in D:1/D:4/D:5; no tiers or caps",
         OK, "3A090.a", consignee="Merlion Compute Pte. Ltd.", quantity=1000),
    Case("pl-b200-aid", "B200", "PL", DAID, AID, "ai-diffusion-2025 · PL is Tier 2 (not every EU member is Tier 1)",
         LR, "3A090.a", review_policy=APPROVAL, causes=("aid-worldwide-3a090a",),
         consignee="Vistula Compute Sp. z o.o.", quantity=1000),
    Case("de-b200-aid", "B200", "DE", DAID, AID, "ai-diffusion-2025 · 740.27 AIA: DE is Tier 1", OK, "3A090.a",
         "AIA", consignee="Rhein Rechenzentrum GmbH"),
    Case("in-h100-aid-lpp", "H100-SXM", "IN", DAID, AID, "ai-diffusion-2025 · 740.29 LPP: IN is Tier 2, 1.58M TPP",
         OK, "3A090.a", "LPP", consignee="Deccan AI Cloud Pvt. Ltd."),
    Case("ae-h100-2023", "H100-SXM", "AE", D2023, ACR, "acr-2023 · 742.6(a)(6)(iii): AE is D:4 (not A:5/A:6)", LR,
         "3A090.a", review_policy=CBC, causes=("acr-destination",), consignee="Dune Compute FZ-LLC"),
    Case("ae-h100-aid-lpp", "H100-SXM", "AE", DAID, AID,
         "ai-diffusion-2025 · 740.29 LPP is open to D:4 (only D:5/Macau excluded)", OK, "3A090.a", "LPP",
         consignee="Dune Compute FZ-LLC"),
    Case("ae-h100-post", "H100-SXM", "AE", DPOST, POST, "post-rescission · 742.6(a)(6)(iii): AE is D:4", LR,
         "3A090.a", review_policy=CBC, causes=("acr-destination",), consignee="Dune Compute FZ-LLC"),
    Case("il-h100-2023", "H100-SXM", "IL", D2023, ACR,
         "acr-2023 · 742.6(a)(6)(iii): IL is D:4 but also A:6 (excluded)", OK, "3A090.a",
         consignee="Carmel Compute Ltd."),
    Case("vn-h100-post", "H100-SXM", "VN", DPOST, POST, "post-rescission · 742.6(a)(6)(iii): VN is D:1", LR,
         "3A090.a", review_policy=CBC, causes=("acr-destination",), consignee="Red River Data JSC"),
    Case("ru-h20-post", "H20", "RU", DPOST, POST,
         "post-rescission · 15 CFR 746.8 (any item) + H20 letter (RU is D:5)", LR, None, review_policy=DENIAL,
         causes=("embargo", "h20-is-informed-destination", "h20-is-informed-headquarters"),
         consignee="Neva Data OOO"),
    Case("ir-h20-2023", "H20", "IR", D2023, ACR, "acr-2023 · 15 CFR Part 746: Iran embargo", LR, None,
         review_policy=DENIAL, causes=("embargo",), consignee="Zagros Data Co."),
    Case("ir-h20-2026", "H20", "IR", D2026, RP26,
         "review-policy-2026-01 · 15 CFR Part 746 (any item) + H20 letter (IR is D:5)", LR, None,
         review_policy=DENIAL, causes=("embargo", "h20-is-informed-destination", "h20-is-informed-headquarters"),
         consignee="Zagros Data Co."),
    Case("ru-b200-aid", "B200", "RU", DAID, AID, "ai-diffusion-2025 · Tier 3 + HQ in D:5 + 746.8 sanctions", LR,
         "3A090.a", review_policy=DENIAL, causes=("aid-worldwide-3a090a", "aid-headquarters", "embargo"),
         consignee="Neva Data OOO"),
    # --- a hypothetical 3A090.b chip: AI Diffusion kept the 2023 destination rule for .b -------
    Case("ae-3a090b-2023", "TEST-B1", "AE", D2023, ACR, "acr-2023 · 742.6(a)(6)(iii) covers 3A090.b: AE is D:4", LR,
         "3A090.b", review_policy=CBC, causes=("acr-destination",), consignee="Dune Compute FZ-LLC"),
    Case("ae-3a090b-aid", "TEST-B1", "AE", DAID, AID,
         "ai-diffusion-2025 · 3A090.b keeps the D:1/D:4/D:5 requirement", LR, "3A090.b", review_policy=CBC,
         causes=("aid-destination-3a090b",), consignee="Dune Compute FZ-LLC"),
    Case("sg-3a090b-aid", "TEST-B1", "SG", DAID, AID,
         "ai-diffusion-2025 · the worldwide requirement covers 3A090.a only", OK, "3A090.b",
         consignee="Merlion Compute Pte. Ltd."),
    # --- screening ----------------------------------------------------------------------------
    Case("kr-consignee-huawei-aid", "B200", "KR", DAID, AID,
         "ai-diffusion-2025 · screening: Entity List hit → denied", DN, "3A090.a", review_policy=DENIAL,
         causes=("EL-HUAWEI",), consignee="HUAWEI TECHNOLOGIES LIMITED", end_user="Naver Cloud Corp."),
    Case("kr-end-user-nudt-2026", "H200-SXM", "KR", D2026, RP26,
         "review-policy-2026-01 · screening: Entity List hit → denied", DN, "3A090.a", review_policy=DENIAL,
         causes=("EL-NUDT",), end_user="National University of Defense Technology"),
    Case("kr-end-user-huawei-sub-post", "B200", "KR", DPOST, POST,
         "post-rescission · screening: name contains a listed name → denied; HQ CN also needs a licence", DN,
         "3A090.a", review_policy=DENIAL, causes=("EL-HUAWEI", "acr-headquarters"),
         end_user="Huawei Technologies Korea", hq="CN"),
    Case("kr-end-user-smic-typo-2023", "H100-SXM", "KR", D2023, ACR, "acr-2023 · screening: fuzzy hit on SMIC", DN,
         "3A090.a", review_policy=DENIAL, causes=("EL-SMIC",),
         end_user="Semiconductor Manufacturing Internatonal Corp."),
    *[Case(f"kr-end-user-meu-{rid}", "B200", "KR", on, rid, f"{rid} · screening: MEU List → licence (denial)",
           LR, "3A090.a", review_policy=DENIAL, causes=("MEU-SAMPLE-1",),
           end_user="Example Red Harbor Aviation Research Institute")
      for rid, on in ((ACR, D2023), (AID, DAID), (POST, DPOST), (RP26, D2026))],
    Case("kr-end-user-uvl-post", "H20", "KR", DPOST, POST,
         "post-rescission · screening: Unverified List → licence (any item)", LR, None, review_policy=CBC,
         causes=("UVL-SAMPLE-1",), end_user="Example Gulf DC Solutions"),
]
# fmt: on


def run(case: Case, ruleset: RuleSet | None = None):
    return evaluate(request_for(case), ruleset=ruleset, quota_used=dict(case.quota_used), catalogue=CATALOGUE)


def mismatches(case: Case, ruleset: RuleSet | None = None) -> list[str]:
    d = run(case, ruleset)
    causes = {f.requirement_id for f in d.requirements if f.outcome != "cleared"}
    causes |= {s.entry_id for s in d.screening_findings}
    got = {
        "outcome": d.outcome,
        "eccn": d.classification.eccn,
        "exception": d.licence_exception,
        "review_policy": d.review_policy,
        "causes": sorted(causes),
    }
    want = {
        "outcome": case.outcome,
        "eccn": case.eccn,
        "exception": case.exception,
        "review_policy": case.review_policy,
        "causes": sorted(case.causes),
    }
    if ruleset is None and d.ruleset.id != case.ruleset:
        return [f"ruleset {d.ruleset.id} != {case.ruleset}"]
    return [f"{k}: got {got[k]!r}, want {want[k]!r}" for k in want if got[k] != want[k]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_table(case: Case) -> None:
    assert mismatches(case) == [], case.rule


def test_table_covers_every_version_and_model() -> None:
    assert {c.ruleset for c in CASES} == {rs.id for rs in default_rulesets()}
    assert set(BASE.models) <= {c.model for c in CASES}
    assert {c.outcome for c in CASES} == {OK, LR, DN}


# --- rule removal ------------------------------------------------------------------------------


def _without_requirement(rs: RuleSet, req_id: str) -> RuleSet:
    return rs.model_copy(update={"requirements": [r for r in rs.requirements if r.id != req_id]})


def _replace_requirement(rs: RuleSet, new) -> RuleSet:
    return rs.model_copy(update={"requirements": [new if r.id == new.id else r for r in rs.requirements]})


def _mutations(rs: RuleSet):
    """Every single rule deleted from a rule set, one at a time."""
    for req in rs.requirements:
        yield f"requirement {req.id}", _without_requirement(rs, req.id)
        policy = req.review_policy
        for i in range(len(policy.by_group)):
            new_policy = policy.model_copy(update={"by_group": policy.by_group[:i] + policy.by_group[i + 1 :]})
            yield (
                f"{req.id} review policy by_group[{i}]",
                _replace_requirement(rs, req.model_copy(update={"review_policy": new_policy})),
            )
        for ov in policy.overrides:
            new_policy = policy.model_copy(update={"overrides": [o for o in policy.overrides if o is not ov]})
            yield (
                f"{req.id} override {ov.id}",
                _replace_requirement(rs, req.model_copy(update={"review_policy": new_policy})),
            )
    for name in rs.licence_exceptions:
        reqs = [r.model_copy(update={"exceptions": [e for e in r.exceptions if e != name]}) for r in rs.requirements]
        excs = {k: v for k, v in rs.licence_exceptions.items() if k != name}
        yield f"licence exception {name}", rs.model_copy(update={"requirements": reqs, "licence_exceptions": excs})
    for alloc in rs.country_allocations:
        reqs = [r.model_copy(update={"allocation": None}) if r.allocation == alloc.id else r for r in rs.requirements]
        allocs = [a for a in rs.country_allocations if a.id != alloc.id]
        yield f"allocation {alloc.id}", rs.model_copy(update={"requirements": reqs, "country_allocations": allocs})
    criteria = rs.classification.criteria
    for i, crit in enumerate(criteria):
        cls = rs.classification.model_copy(update={"criteria": criteria[:i] + criteria[i + 1 :]})
        yield f"criterion {crit.clause}", rs.model_copy(update={"classification": cls})
    for list_name in rs.screening.outcomes_by_list:
        if list_name == "Unverified List":
            continue  # its outcome equals the unknown-list fallback on purpose (escalate)
        lists = {k: v for k, v in rs.screening.outcomes_by_list.items() if k != list_name}
        yield (
            f"screening list {list_name}",
            rs.model_copy(update={"screening": rs.screening.model_copy(update={"outcomes_by_list": lists})}),
        )


def _classification_breaks(rs: RuleSet) -> bool:
    for spec, eccn, clause in SYNTHETIC.values():
        c = classify(spec, rs)
        if (c.eccn, c.clause) != (eccn, clause):
            return True
    return False


@pytest.mark.parametrize("ruleset_id", [ACR, AID, POST, RP26])
def test_every_rule_is_load_bearing(ruleset_id: str) -> None:
    """Deleting any rule from the data must make at least one expectation fail."""
    rs = get_ruleset(ruleset_id)
    cases = [c for c in CASES if c.ruleset == ruleset_id]
    assert all(mismatches(c, rs) == [] for c in cases)  # pinned explicitly, the unmodified data passes
    survivors = [
        label
        for label, mutated in _mutations(rs)
        if not _classification_breaks(mutated) and all(mismatches(c, mutated) == [] for c in cases)
    ]
    assert survivors == [], f"rules whose removal no test notices in {ruleset_id}: {survivors}"


# --- classification ----------------------------------------------------------------------------

# model: (TPP, PD, ECCN, criterion that matches first)
EXPECTED_CLASSIFICATION = {
    "A100-SXM": (4992, 6.04, "3A090.a", "3A090.a (TPP ≥ 4800)"),
    "H100-SXM": (15832, 19.45, "3A090.a", "3A090.a (TPP ≥ 4800)"),
    "H200-SXM": (15832, 19.45, "3A090.a", "3A090.a (TPP ≥ 4800)"),
    "H20": (2368, 2.91, None, None),
    "L40S": (5864, 9.63, "3A090.a", "3A090.a (TPP ≥ 4800)"),
    "B200": (36000, 22.5, "3A090.a", "3A090.a (TPP ≥ 4800)"),
    "GB200": (40000, 25.0, "3A090.a", "3A090.a (TPP ≥ 4800)"),
}
# Rough TPP figures from docs/design §5 (secondary sources).
DESIGN_TPP = {"A100-SXM": 4992, "H100-SXM": 15830, "H200-SXM": 15830, "H20": 2368, "L40S": 5800, "B200": 36000}


def test_catalogue_has_every_contract_model() -> None:
    assert set(BASE.models) == set(EXPECTED_CLASSIFICATION)
    for spec in BASE.models.values():
        assert spec.source.strip()
        assert spec.tpp == pytest.approx(spec.tpp_reference, rel=0.015)


@pytest.mark.parametrize("ruleset_id", [ACR, AID, POST, RP26])
@pytest.mark.parametrize("model", sorted(EXPECTED_CLASSIFICATION))
def test_classification(model: str, ruleset_id: str) -> None:
    tpp, pd, eccn, clause = EXPECTED_CLASSIFICATION[model]
    c = classify(BASE.get(model), get_ruleset(ruleset_id))
    assert c.tpp == pytest.approx(tpp, rel=1e-6)
    assert c.performance_density == pytest.approx(pd, abs=0.01)
    assert (c.eccn, c.clause) == (eccn, clause)
    assert c.citation == "88 FR 73458"
    if model in DESIGN_TPP:
        assert c.tpp == pytest.approx(DESIGN_TPP[model], rel=0.015)


@pytest.mark.parametrize("model", sorted(SYNTHETIC))
def test_classification_of_each_3a090_alternative(model: str) -> None:
    spec, eccn, clause = SYNTHETIC[model]
    for rs in default_rulesets():
        c = classify(spec, rs)
        assert (c.eccn, c.clause) == (eccn, clause), rs.id


def test_h20_is_not_3a090_and_says_why() -> None:
    c = classify(BASE.get("H20"), get_ruleset(POST))
    assert c.eccn is None and not c.controlled
    text = " ".join(c.sentences())
    assert "H20 is not 3A090" in text
    assert "TPP 2,368 < 4,800" in text and "TPP 2,368 < 2,400" in text
    assert "PD 2.91 < 5.92" in text and "PD 2.91 < 3.2" in text


def test_classification_sentence() -> None:
    c = classify(BASE.get("B200"), get_ruleset(AID))
    assert "B200 classified 3A090.a: TPP 36,000 ≥ 4,800 (88 FR 73458, ECCN 3A090.a)." in c.sentences()


# --- rule-version selection --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on", "expected"),
    [
        (date(2023, 11, 17), ACR),
        (date(2025, 1, 12), ACR),
        (date(2025, 1, 13), AID),
        (date(2025, 5, 12), AID),
        (date(2025, 5, 13), POST),
        (date(2025, 5, 15), POST),
        (date(2026, 1, 14), POST),
        (date(2026, 1, 15), RP26),
        (date(2027, 6, 30), RP26),
    ],
)
def test_version_selected_by_date(on: date, expected: str) -> None:
    assert select_ruleset(on).id == expected


def test_no_version_before_the_first() -> None:
    with pytest.raises(NoRulesetInForceError):
        select_ruleset(date(2023, 11, 16))
    case = CASES[0]
    with pytest.raises(NoRulesetInForceError):
        evaluate(request_for(case, on=date(2023, 11, 16)), quota_used={})


@pytest.mark.parametrize(
    ("on", "outcome", "ruleset"),
    [
        (date(2025, 1, 12), OK, ACR),  # SG is not in D:1/D:4/D:5
        (date(2025, 1, 13), LR, AID),  # Tier 2, above LPP
        (date(2025, 5, 12), LR, AID),
        (date(2025, 5, 13), OK, POST),  # rescission announced: back to the 2023 rules
        (date(2025, 5, 15), OK, POST),  # would have been the AI Diffusion compliance date
    ],
)
def test_boundary_dates_change_the_outcome(on: date, outcome: str, ruleset: str) -> None:
    case = next(c for c in CASES if c.id == "sg-b200-aid-licence")
    d = evaluate(request_for(case, on=on), quota_used={})
    assert (d.outcome, d.ruleset.id, d.ruleset.selected_by) == (outcome, ruleset, "decision_date")


def test_version_can_be_configured_explicitly() -> None:
    case = next(c for c in CASES if c.id == "sg-b200-post")
    d = evaluate(request_for(case), ruleset=AID, quota_used={})
    assert (d.ruleset.id, d.ruleset.selected_by, d.outcome) == (AID, "explicit", LR)
    assert any(s.startswith("Note: ai-diffusion-2025@1 is not the rule set in force") for s in d.reasoning)
    with pytest.raises(UnknownRulesetError):
        evaluate(request_for(case), ruleset="no-such-rules", quota_used={})


def test_ai_diffusion_records_its_compliance_date() -> None:
    d = run(next(c for c in CASES if c.id == "kr-b200-aid"))
    assert d.ruleset.compliance_from == date(2025, 5, 15)
    assert d.ruleset.citation.cite == "90 FR 4544"
    assert any("compliance is mandatory only from 2025-05-15" in s for s in d.reasoning)


# --- Tier 2 allocation and LPP -----------------------------------------------------------------


def _sg(quantity: int, quota_used: dict[str, int], consignee: str = "Merlion Compute Pte. Ltd.", hq: str = "SG"):
    case = Case("sg", "B200", "SG", DAID, AID, "", OK, "3A090.a", consignee=consignee, quantity=quantity, hq=hq)
    return evaluate(request_for(case), quota_used=quota_used)


@pytest.mark.parametrize(
    ("used", "policy"),
    [
        (0, APPROVAL),
        (754_000_000, APPROVAL),  # 754M + 36M = 790M exactly: still within
        (754_000_001, DENIAL),
        (789_999_999, DENIAL),
    ],
)
def test_tier2_country_allocation(used: int, policy: str) -> None:
    d = _sg(1000, {ALLOC_SG: used})
    assert d.outcome == LR and d.review_policy == policy
    alloc = next(q for q in d.quotas if q.kind == "country_allocation")
    assert (alloc.cap_tpp, alloc.used_before, alloc.batch_tpp) == (790_000_000, used, 36_000_000)
    assert alloc.used_after == used + 36_000_000
    # The allocation is consumed only when the licence is granted.
    assert (d.quota_key, d.quota_delta, d.quota_apply_on) == (ALLOC_SG, 36_000_000, "license_granted")


def test_allocation_is_per_destination_country() -> None:
    d = _sg(1000, {"ai-diffusion-2025/tier2-allocation/2025-2027/MY": 789_000_000})
    assert d.review_policy == APPROVAL


@pytest.mark.parametrize(
    ("used", "outcome", "exception"),
    [
        (0, OK, "LPP"),
        (8_900_000, OK, "LPP"),  # 8.9M + 18M = 26.9M exactly
        (8_900_001, LR, None),
    ],
)
def test_lpp_per_consignee_and_year(used: int, outcome: str, exception: str | None) -> None:
    d = _sg(500, {LPP_MERLION: used})
    assert (d.outcome, d.licence_exception) == (outcome, exception)
    lpp = next(q for q in d.quotas if q.kind == "lpp_consignee_year")
    assert (lpp.key, lpp.cap_tpp, lpp.used_before, lpp.used_after) == (LPP_MERLION, 26_900_000, used, used + 18_000_000)
    if outcome == OK:
        assert (d.quota_key, d.quota_delta, d.quota_apply_on) == (LPP_MERLION, 18_000_000, "decision")
        assert not any(q.kind == "country_allocation" for q in d.quotas)  # LPP does not count against it
    else:
        assert d.quota_key == ALLOC_SG


def test_lpp_key_identifies_the_consignee_not_its_spelling() -> None:
    assert _sg(500, {}).quota_key == _sg(500, {}, consignee="MERLION COMPUTE PTE LTD").quota_key == LPP_MERLION
    other = _sg(500, {LPP_MERLION: 26_900_000}, consignee="Raffles AI Pte. Ltd.")
    assert (other.outcome, other.licence_exception) == (OK, "LPP")
    assert other.quota_key == "ai-diffusion-2025/lpp/2025/SG/raffles-ai"


def test_lpp_not_for_entities_headquartered_in_d5() -> None:
    d = _sg(10, {}, hq="CN")
    assert d.outcome == LR and d.licence_exception is None
    assert not any(q.kind == "lpp_consignee_year" for q in d.quotas)
    assert any(s.startswith("Licence exception LPP") and "not available" in s for s in d.reasoning)


def test_no_quota_outside_ai_diffusion() -> None:
    d = evaluate(request_for(next(c for c in CASES if c.id == "sg-b200-post")), quota_used={ALLOC_SG: 10**12})
    assert d.outcome == OK and d.quotas == [] and d.quota_key is None and d.quota_delta == 0


# --- screening ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hit", "entry", "low", "high"),
    [
        ("Huawei Technologies Co., Ltd.", True, "EL-HUAWEI", 100, 100),
        ("HUAWEI TECHNOLOGIES LIMITED", True, "EL-HUAWEI", 100, 100),  # legal suffix and case folded
        ("Huawei Cloud Korea", True, "EL-HUAWEI", 100, 100),  # contains the listed alias "Huawei"
        ("Hauwei Technologies", True, "EL-HUAWEI", 94, 95),  # transposition
        ("Huwei Technologys", True, "EL-HUAWEI", 88, 89.5),  # just above the threshold
        ("Semiconductor Manufacturing Intl Corp", False, "EL-SMIC", 87, 88),  # near miss just below
        ("Gulf Datacenter Solutions", False, "UVL-SAMPLE-1", 85, 88),  # near miss
        ("Dawning Info Industry", False, "EL-SUGON", 85, 88),  # near miss
        ("Example Lotus Trading", False, "EL-SAMPLE-1", 83, 85),
        ("LG Electronics", False, None, 0, 70),  # shares only a generic word
        ("Naver Cloud Corp.", False, None, 0, 60),
        ("Samsung SDS Co., Ltd.", False, None, 0, 60),
    ],
)
def test_screening_scores_around_threshold(name: str, hit: bool, entry: str | None, low: float, high: float) -> None:
    p = default_screener().screen(name, "consignee")
    assert p.threshold == 88
    assert p.hit is hit
    assert low <= p.best_score <= high
    if entry is not None:
        assert p.matched_entry is not None and p.matched_entry.id == entry


def test_screening_threshold_is_configurable() -> None:
    strict = Screener(threshold=85)
    p = strict.screen("Semiconductor Manufacturing Intl Corp", "end_user")
    assert p.hit and p.matched_entry is not None and p.matched_entry.id == "EL-SMIC"
    case = next(c for c in CASES if c.id == "kr-b200-post")
    near = Case(**{**case.__dict__, "id": "near", "end_user": "Semiconductor Manufacturing Intl Corp"})
    assert evaluate(request_for(near), quota_used={}).outcome == OK
    assert evaluate(request_for(near), quota_used={}, screener=strict).outcome == DN


def test_screening_evidence_is_recorded() -> None:
    d = run(next(c for c in CASES if c.id == "kr-consignee-huawei-aid"))
    ev = d.screening
    assert ev.snapshot_date == date(2025, 6, 1) and ev.sha256
    consignee = next(p for p in ev.parties if p.role == "consignee")
    assert consignee.hit and consignee.best_score == 100 and consignee.matched_entry.list == "Entity List"
    end_user = next(p for p in ev.parties if p.role == "end_user")
    assert not end_user.hit and end_user.matched_entry is not None  # near-miss evidence kept
    hit = "Entity List entry 'Huawei Technologies Co., Ltd.'"
    assert any(hit in s and "snapshot 2025-06-01" in s for s in d.reasoning)


# --- errors, inputs and the decision record ----------------------------------------------------


@pytest.mark.parametrize("model", ["H100", "RTX 5090", "b200", ""])
def test_unknown_model(model: str) -> None:
    case = next(c for c in CASES if c.id == "kr-b200-aid")
    if not model:
        with pytest.raises(ValueError):
            request_for(Case(**{**case.__dict__, "model": model}))
        return
    with pytest.raises(UnknownModelError) as err:
        evaluate(request_for(Case(**{**case.__dict__, "model": model})), quota_used={})
    assert err.value.reason_code == "UNKNOWN_GPU_MODEL" and err.value.model == model
    assert "B200" in str(err.value)


def test_request_validation() -> None:
    case = next(c for c in CASES if c.id == "kr-b200-aid")
    data = request_for(case).model_dump()
    assert ExportRequest.model_validate({**data, "destination_country": "kr", "route": ["sg"]}).route == ["SG"]
    with pytest.raises(ValueError, match=r"differs from consignee\.country"):
        ExportRequest.model_validate({**data, "destination_country": "JP"})
    with pytest.raises(ValueError):
        ExportRequest.model_validate({**data, "quantity": 0})


def test_decision_record_for_the_korean_centre() -> None:
    d = run(next(c for c in CASES if c.id == "kr-b200-aid"))
    assert d.destination.tier == "TIER1" and "A:5" in d.destination.groups
    assert d.batch_tpp == 3_600_000 and d.quota_key is None
    assert "Destination KR is Tier 1 under the AI Diffusion rule (groups: A:5, TIER1)." in d.reasoning
    assert any(s.startswith("Licence exception AIA (Artificial Intelligence Authorization") for s in d.reasoning)
    assert d.reasoning[-1] == "Outcome: cleared — licence exception AIA under ai-diffusion-2025@1."
    assert set(d.data_digests) == {"ruleset", "country_groups", "catalogue", "screening_list"}
    record = json.loads(json.dumps(d.model_dump(mode="json")))  # what the service persists
    assert record["ruleset"]["version"] == "ai-diffusion-2025@1"
    assert record["inputs"]["consignee"]["name"] == "Naver Cloud Corp."


def test_route_evaluation_flags_transit_countries() -> None:
    d = run(next(c for c in CASES if c.id == "kr-b200-route-hk-aid"))
    assert d.route.flagged == ["HK"] and d.route.transit[0].tier == "TIER3"
    # Endpoints repeated in the route are not transit.
    case = next(c for c in CASES if c.id == "kr-b200-post")
    d = run(Case(**{**case.__dict__, "route": ("TW", "KR")}))
    assert d.route.transit == [] and d.outcome == OK


# --- the data itself ---------------------------------------------------------------------------


def test_versions_are_contiguous_and_cited() -> None:
    rulesets = default_rulesets()
    assert [r.id for r in rulesets] == [ACR, AID, POST, RP26]
    for earlier, later in itertools.pairwise(rulesets):
        assert (later.effective_from - earlier.effective_to).days == 1
    cites = {r.id: r.citations[r.primary_citation].cite for r in rulesets}
    assert cites[ACR] == "88 FR 73458" and cites[AID] == "90 FR 4544" and cites[RP26] == "91 FR 1684"
    assert get_ruleset(AID).effective_from == date(2025, 1, 13)
    assert get_ruleset(ACR).effective_from == date(2023, 11, 17)


def test_tiers_as_data() -> None:
    aid = get_ruleset(AID)
    tier1 = "AU BE CA DK FI FR DE IE IT JP NL NZ NO KR ES SE TW GB US".split()
    assert [c for c in tier1 if aid.tier_of(c) != "TIER1"] == []  # incl. Norway, not YAML's false
    for c in ["CN", "HK", "MO", "RU", "IR", "KP", "BY", "VE", "SY", "CU"]:
        assert aid.tier_of(c) == "TIER3", c
    for c in ["SG", "IN", "AE", "PL", "IL", "MY", "BR"]:
        assert aid.tier_of(c) == "TIER2", c
    assert get_ruleset(POST).tier_of("KR") is None
    lpp = aid.licence_exceptions["LPP"].quota
    assert lpp is not None and lpp.cap_tpp == 26_900_000
    assert aid.country_allocations[0].cap_tpp == 790_000_000


def test_bad_data_fails_at_load(tmp_path) -> None:
    text = (RULESETS_DIR / "acr-2023.yaml").read_text(encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("in_groups: [D:1, D:4, D:5, MACAU]", "in_groups: [D:1, D:44, D:5, MACAU]"))
    with pytest.raises(RulesetDataError, match="D:44"):
        load_ruleset(broken)
    broken.write_text(text.replace("summary:", "sumary:", 1))
    with pytest.raises(RulesetDataError):
        load_ruleset(broken)
