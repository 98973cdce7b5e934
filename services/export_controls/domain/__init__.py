"""Pure export-control domain of the export_controls service.

Classifies a GPU under ECCN 3A090 and evaluates a shipment against the versioned rule set in
force (data/rulesets/*.yaml), screening the parties against a dated list snapshot, and carries
the export case of a batch from award to licence (lifecycle.py). No Kafka, no database: the
service loads the rule book at start-up (rulebook.py), calls the lifecycle functions and
persists the case and quotas.
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
from .evaluate import evaluate, quota_keys
from .lifecycle import Case, Opened, deny_licence, export_request, grant_licence, open_case, quotas_read, shipment_date
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
from .rulebook import RuleBook, load_rulebook
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
    "Case",
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
    "Opened",
    "Party",
    "PartyScreening",
    "QuotaEvaluation",
    "RequirementFinding",
    "RouteEvaluation",
    "RuleBook",
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
    "deny_licence",
    "evaluate",
    "export_request",
    "get_ruleset",
    "grant_licence",
    "load_catalogue",
    "load_rulebook",
    "load_ruleset",
    "load_rulesets",
    "load_screening_list",
    "open_case",
    "quota_keys",
    "quotas_read",
    "select_ruleset",
    "shipment_date",
]
