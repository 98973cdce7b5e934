"""GPU catalogue: the technical parameters that export classification needs, held as data."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ._data import DATA_DIR, read_yaml
from .errors import UnknownModelError

CATALOGUE_PATH = DATA_DIR / "gpu_catalogue.yaml"


class GpuSpec(BaseModel):
    """One catalogue entry (one GPU as counted in batch quantities)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    vendor: str
    architecture: str
    die: str
    dense_tops: Annotated[float, Field(gt=0)]
    bit_length: Annotated[int, Field(gt=0)]
    die_area_mm2: Annotated[float, Field(gt=0)]
    dram_bandwidth_gbps: Annotated[float, Field(gt=0)]
    designed_for_datacenter: bool
    tpp_reference: Annotated[float, Field(gt=0)]
    source: str

    @property
    def tpp(self) -> float:
        # 3A090 technical note: TPP = 2 x MacTOPS x bit length; 2 x MacTOPS is the dense TOPS.
        return self.dense_tops * self.bit_length

    @property
    def performance_density(self) -> float:
        return self.tpp / self.die_area_mm2


class Catalogue(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    catalogue_version: str
    models: dict[str, GpuSpec]
    sha256: str = ""

    def get(self, model: str) -> GpuSpec:
        """Exact lookup: model ids are part of the partner contract, so no fuzzy guessing here."""
        try:
            return self.models[model]
        except KeyError:
            raise UnknownModelError(model, sorted(self.models)) from None

    def __contains__(self, model: object) -> bool:
        return model in self.models


def load_catalogue(path: Path = CATALOGUE_PATH) -> Catalogue:
    data, digest = read_yaml(path)
    models = {name: {"model": name, **spec} for name, spec in data["models"].items()}
    return Catalogue.model_validate({**data, "models": models, "sha256": digest})


@cache
def default_catalogue() -> Catalogue:
    return load_catalogue()
