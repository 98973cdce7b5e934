"""Locating and reading the YAML data files shipped next to this package."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

# services/export_controls/data — package-relative so it works from a checkout and a wheel.
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
RULESETS_DIR = DATA_DIR / "rulesets"


def read_yaml(path: Path) -> tuple[Any, str]:
    """Parse a YAML file and return it with the SHA-256 of its exact bytes.

    The digest goes into every decision so an auditor can tell which data version was used.
    """
    raw = path.read_bytes()
    return yaml.safe_load(raw), hashlib.sha256(raw).hexdigest()
