"""The verifier stands alone: it imports the standard library, its three declared dependencies and
itself, nothing else (no other gputrace layer, no typer/rich/pydantic), so an auditor can install
it without anything the operator runs."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gputrace_verifier"
PYPROJECT = PACKAGE.parent / "pyproject.toml"
# Import names of the declared distributions (cryptography, rfc8785, httpx).
ALLOWED_THIRD_PARTY = {"cryptography", "rfc8785", "httpx"}


def top_level_imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (also inside functions), by top-level name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the package
                names.add("gputrace_verifier")
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


def test_the_declared_dependencies_are_exactly_three() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert declared == ALLOWED_THIRD_PARTY
    assert project["scripts"] == {"gputrace-audit": "gputrace_verifier.cli:run"}


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_imports_only_the_stdlib_and_its_dependencies(path: Path) -> None:
    foreign = {
        name
        for name in top_level_imports(path)
        if name not in sys.stdlib_module_names and name not in ALLOWED_THIRD_PARTY and name != "gputrace_verifier"
    }
    assert not foreign, (
        f"{path.name} imports {sorted(foreign)}: the verifier may use only {sorted(ALLOWED_THIRD_PARTY)}"
    )


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    # The check itself must not be blind: late, dotted and from-imports all count.
    sample = tmp_path / "sample.py"
    sample.write_text("import os.path\nfrom shared import merkle\ndef f():\n    import typer\nfrom . import cli\n")
    assert top_level_imports(sample) == {"os", "shared", "typer", "gputrace_verifier"}
