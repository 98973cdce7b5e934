"""Everything an export decision reads, loaded and checked once, when the service starts.

A rule-set file that does not parse, a dangling reference, a quota key that cannot be filled
in, a contract GPU model the catalogue lacks: each is a fault of the service's configuration,
so it stops the start-up with a message naming the file, instead of surfacing later as a
decision about some partner's batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TypeVar

from shared.contract import GPU_MODELS

from ._data import DATA_DIR
from .catalogue import Catalogue, load_catalogue
from .errors import RulesetDataError
from .rulesets import RuleSet, get_ruleset, load_country_groups, load_rulesets, select_ruleset
from .screening import Screener, load_screening_list
from .snapshots import load_active

T = TypeVar("T")


@dataclass(frozen=True)
class RuleBook:
    rulesets: tuple[RuleSet, ...]
    catalogue: Catalogue
    screener: Screener
    # EXPORT_RULESET: one version for every decision (a re-run), instead of the one in force.
    pinned: RuleSet | None = None
    # The list shipped with the service: what screens when no snapshot is active.
    shipped_screener: Screener | None = None

    def ruleset_on(self, on: date) -> RuleSet:
        """The version that decides a shipment planned for `on`; NoRulesetInForceError if none."""
        return self.pinned or select_ruleset(on, self.rulesets)


def _load(path: Path, loader: Callable[[Path], T]) -> T:
    try:
        return loader(path)
    except RulesetDataError:
        raise
    except Exception as exc:  # YAML syntax, a missing file, a wrong shape: all name the file
        raise RulesetDataError(f"{path}: {type(exc).__name__}: {exc}") from exc


def _check_ruleset(rs: RuleSet) -> None:
    """What the load-time validators cannot see: group definitions that loop, quota keys whose
    placeholders the evaluation cannot fill."""
    for name in [*rs.country_groups.groups, *rs.groups]:
        rs.in_group("KR", name)  # raises RulesetDataError on a group defined in terms of itself
    try:
        for exc in rs.licence_exceptions.values():
            if exc.quota is not None:
                exc.quota.key.format(year=2025, consignee_country="KR", consignee="c")
        for alloc in rs.country_allocations:
            alloc.key.format(period=alloc.period_label, country="KR")
    except (KeyError, IndexError, ValueError) as err:
        raise RulesetDataError(f"rule set {rs.id}: a quota key has an unknown placeholder: {err}") from err


def load_rulebook(data_dir: Path | None = None, pinned: str | None = None, var_dir: Path | None = None) -> RuleBook:
    """Load and check every data file under `data_dir` (default: the data shipped with the
    service), and the active screening snapshot under `var_dir` if one was imported (it then
    replaces the shipped sample list). Raises ExportControlError (RulesetDataError,
    UnknownRulesetError) on any fault."""
    directory = data_dir or DATA_DIR
    groups = _load(directory / "country_groups.yaml", load_country_groups)
    rulesets = _load(directory / "rulesets", lambda d: load_rulesets(d, groups))
    if not rulesets:
        raise RulesetDataError(f"{directory / 'rulesets'}: no rule-set files (*.yaml)")
    for rs in rulesets:
        _check_ruleset(rs)
    catalogue = _load(directory / "gpu_catalogue.yaml", load_catalogue)
    missing = [m for m in GPU_MODELS if m not in catalogue]
    if missing:
        raise RulesetDataError(
            f"{directory / 'gpu_catalogue.yaml'}: no entry for the contract's GPU models {', '.join(missing)}"
        )
    shipped = screener = _load(directory / "screening_list.yaml", lambda p: Screener(load_screening_list(p)))
    if var_dir is not None:
        active = load_active(var_dir)  # a missing, altered or invalid snapshot stops the start-up
        if active is not None:
            screener = Screener(active)
    return RuleBook(
        rulesets=rulesets,
        catalogue=catalogue,
        screener=screener,
        pinned=get_ruleset(pinned, rulesets) if pinned else None,
        shipped_screener=shipped,
    )
