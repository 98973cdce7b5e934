"""A broken or missing export-control data file is a configuration fault: the export service
refuses to start, with a message naming the file, and so can never record it in the ledger as
a partner's rejection (the old behaviour: `UNKNOWN_MODEL` on the first award).

Each case copies the shipped data directory, breaks one thing, and points the service at the
copy with EXPORT_DATA_DIR.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from services.export_controls.domain import ExportControlError, RulesetDataError, load_rulebook
from services.export_controls.domain._data import DATA_DIR
from services.export_controls.main import build
from shared.runtime.settings import Settings
from tools.devkeys import generate_dev_registry
from tools.devstack import free_port

AID = "rulesets/ai-diffusion-2025.yaml"


def data_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "export-data"
    shutil.copytree(DATA_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return copy


def edit_yaml(path: Path, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def break_syntax(d: Path) -> None:
    with (d / AID).open("a") as f:
        f.write("requirements: [unclosed\n")


def group_loop(d: Path) -> None:
    edit_yaml(d / AID, lambda data: data["groups"]["TIER3"]["include"].append("TIER3"))


def bad_quota_key(d: Path) -> None:
    def change(data: dict) -> None:
        data["country_allocations"][0]["key"] = "tier2/{period}/{destination}"

    edit_yaml(d / AID, change)


def catalogue_without_h20(d: Path) -> None:
    edit_yaml(d / "gpu_catalogue.yaml", lambda data: data["models"].pop("H20"))


# breakage, the words the message must contain
BREAKAGES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "yaml-syntax": (break_syntax, ["ai-diffusion-2025.yaml"]),
    "not-a-mapping": (lambda d: (d / AID).write_text("- just\n- a list\n"), ["ai-diffusion-2025.yaml", "mapping"]),
    "unknown-citation": (
        lambda d: edit_yaml(d / AID, lambda data: data.update(primary_citation="NOPE")),
        ["ai-diffusion-2025.yaml", "unknown citation 'NOPE'"],
    ),
    "misspelt-key": (
        lambda d: edit_yaml(d / AID, lambda data: data.update(efective_to="2025-05-12")),
        ["ai-diffusion-2025.yaml", "efective_to"],
    ),
    "group-loop": (group_loop, ["ai-diffusion-2025", "TIER3", "itself"]),
    "quota-key": (bad_quota_key, ["ai-diffusion-2025", "quota key", "destination"]),
    "no-rulesets": (lambda d: shutil.rmtree(d / "rulesets"), ["no rule-set files"]),
    "no-catalogue": (lambda d: (d / "gpu_catalogue.yaml").unlink(), ["gpu_catalogue.yaml"]),
    "catalogue-gap": (catalogue_without_h20, ["gpu_catalogue.yaml", "H20"]),
    "no-screening-list": (lambda d: (d / "screening_list.yaml").unlink(), ["screening_list.yaml"]),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_the_rule_book_refuses_broken_data_naming_the_fault(name: str, tmp_path: Path) -> None:
    breakage, words = BREAKAGES[name]
    data = data_copy(tmp_path)
    load_rulebook(data)  # the unbroken copy loads
    breakage(data)
    with pytest.raises(RulesetDataError) as caught:
        load_rulebook(data)
    for word in words:
        assert word in str(caught.value)


def test_a_pinned_rule_set_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ExportControlError, match="no-such-rules"):
        load_rulebook(pinned="no-such-rules")


def test_the_service_is_built_on_the_configured_data(tmp_path: Path) -> None:
    data = data_copy(tmp_path)
    registry = generate_dev_registry(tmp_path / "keys")
    settings = Settings(export_data_dir=data, party_registry=registry, var_dir=tmp_path / "var")
    assert build(settings).name == "export_controls"
    break_syntax(data)  # the service reads the copy, not the shipped data
    with pytest.raises(RulesetDataError, match=r"ai-diffusion-2025\.yaml"):
        build(settings)


def test_a_malformed_rule_set_stops_the_export_service_process(tmp_path: Path) -> None:
    data = data_copy(tmp_path)
    break_syntax(data)
    var = tmp_path / "var"
    env = {
        **os.environ,
        "EXPORT_DATA_DIR": str(data),
        # Nothing listens there: the refusal comes before any connection is tried.
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "VAR_DIR": str(var),
        "PARTY_REGISTRY": str(generate_dev_registry(tmp_path / "keys")),
    }
    env.pop("DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "services.export_controls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode != 0
    # A clear message, not a traceback: what is wrong, in which file, at which line.
    assert proc.stderr.startswith(
        f"export_controls refuses to start: the export-control data is invalid: {data / AID}:"
    ), proc.stderr
    broken_line = len((data / AID).read_text().splitlines())
    assert f"line {broken_line}, column" in proc.stderr and "Traceback" not in proc.stderr
    assert "UNKNOWN_MODEL" not in proc.stdout + proc.stderr
    # No database, hence no outbox: the service could not have recorded any decision.
    assert not (var / "data").exists()
