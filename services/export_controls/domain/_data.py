"""Locating and reading the YAML data files shipped next to this package."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from .errors import RulesetDataError

# services/export_controls/data — package-relative so it works from a checkout and a wheel.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
RULESETS_DIR = DATA_DIR / "rulesets"


def read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    """Parse a YAML file and return it with the SHA-256 of its exact bytes.

    The digest goes into every decision so an auditor can tell which data version was used.
    A file that cannot be read or parsed raises RulesetDataError naming it.
    """
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise RulesetDataError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise RulesetDataError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data, hashlib.sha256(raw).hexdigest()
