"""The layers of docs/architecture.md §8 hold: contract ← runtime ← services ← tools, services never
import each other, and the verifier stands alone. The contracts live in pyproject.toml
([tool.importlinter]); import-linter checks them over the real import graph.

The same check is run on copies of the tree with one forbidden import added, so this test is known
to fail when a layer is crossed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = {"shared": ROOT / "shared", "services": ROOT / "services", "tools": ROOT / "tools"}
VERIFIER = ROOT / "verifier" / "gputrace_verifier"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the copy's packages shadow the installed (editable) ones.
    env = {**os.environ, "PYTHONPATH": str(tree), "NO_COLOR": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the project's packages that a test may break."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, path in PACKAGES.items():
        shutil.copytree(path, tmp_path / name, ignore=ignore)
    shutil.copytree(VERIFIER, tmp_path / "gputrace_verifier", ignore=ignore)
    return tmp_path


def add_import(module: Path, statement: str) -> None:
    module.write_text(module.read_text() + f"\n{statement}  # added by tests/test_layers.py\n")


def test_the_layers_hold_on_the_tree_as_it_is(tree: Path) -> None:
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "statement", "broken"),
    [
        ("shared/runtime/db.py", "import services.quotes.main", "contract <- runtime <- services <- tools"),
        ("shared/contract/facts.py", "import shared.runtime.outbox", "contract <- runtime <- services <- tools"),
        ("services/pledges/domain.py", "import services.quotes.domain", "services never import each other"),
        ("services/ledger/api.py", "import tools.cli", "contract <- runtime <- services <- tools"),
        ("gputrace_verifier/merkle.py", "import shared.contract", "the verifier stands alone"),
    ],
    ids=[
        "runtime-imports-a-service",
        "contract-imports-runtime",
        "service-imports-service",
        "service-imports-tools",
        "verifier-imports-the-project",
    ],
)
def test_crossing_a_layer_fails(tree: Path, module: str, statement: str, broken: str) -> None:
    add_import(tree / module, statement)
    done = lint(tree)
    assert done.returncode != 0, done.stdout
    assert f"{broken} BROKEN" in done.stdout, done.stdout
