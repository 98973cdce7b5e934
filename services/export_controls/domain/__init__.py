"""Pure export-control domain of the export_controls service.

Classifies a GPU under ECCN 3A090 and evaluates a shipment against the versioned rule set in
force (data/rulesets/*.yaml), screening the parties against a dated list snapshot. No Kafka,
no database: the service wrapper calls `evaluate` and persists the decision and quotas.
"""

from .catalogue import Catalogue, GpuSpec, default_catalogue, load_catalogue
from .classification import Classification, CriterionCheck, classify
from .errors import (
    ExportControlError,
    NoRulesetInForceError,
    RulesetDataError,
    UnknownModelError,
    UnknownRulesetError,
)
from .evaluate import evaluate
from .models import (
    CountryStatus,
    EndUser,
    ExportDecision,
    ExportRequest,
    Party,
    QuotaEvaluation,
    RequirementFinding,
    RouteEvaluation,
    RulesetRef,
    ScreeningEvidence,
    ScreeningFinding,
)
from .rulesets import (
    RuleSet,
    default_rulesets,
    get_ruleset,
    load_ruleset,
    load_rulesets,
    select_ruleset,
)
from .screening import (
    PartyScreening,
    Screener,
    ScreeningList,
    default_screener,
    load_screening_list,
)

__all__ = [
    "Catalogue",
    "Classification",
    "CountryStatus",
    "CriterionCheck",
    "EndUser",
    "ExportControlError",
    "ExportDecision",
    "ExportRequest",
    "GpuSpec",
    "NoRulesetInForceError",
    "Party",
    "PartyScreening",
    "QuotaEvaluation",
    "RequirementFinding",
    "RouteEvaluation",
    "RuleSet",
    "RulesetDataError",
    "RulesetRef",
    "Screener",
    "ScreeningEvidence",
    "ScreeningFinding",
    "ScreeningList",
    "UnknownModelError",
    "UnknownRulesetError",
    "classify",
    "default_catalogue",
    "default_rulesets",
    "default_screener",
    "evaluate",
    "get_ruleset",
    "load_catalogue",
    "load_ruleset",
    "load_rulesets",
    "load_screening_list",
    "select_ruleset",
]
