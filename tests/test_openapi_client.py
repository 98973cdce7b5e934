"""docs/openapi.json as a partner uses it: a client generated from it by `openapi-python-client`
(the generator, run as its users run it, into a temporary directory) reads every endpoint of the
running ledger (real Kafka and PostgreSQL behind it) holding one batch's life.

Every body must parse into the generated typed models, and no object may carry a key the schema
does not declare: the generated models keep such keys in `additional_properties` where the schema
leaves objects open, and drop them where it says `additionalProperties: false` (so the body is
compared with the parsed models' to_dict()). A route answering more, or other, than its documented
model fails here, and an untyped route's body would be all `additional_properties`. Exempt are the
schema's free-form maps (`dict[str, ...]` fields) and the objects the schema itself leaves open:
the standards' extension points and an anomaly's code-specific fields.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import httpx
import pytest

from tests.partner import PartnerClient, TopicWatcher
from tests.test_batch_lifecycle_e2e import Programme, batch_view, uid
from tools.devstack import Stack

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
PACKAGE = "gputrace_ledger_client"  # from the document's title
# The schemas that allow extra keys on purpose (services/ledger/responses.py says why).
OPEN_MODELS = {"OcdsRelease", "EpcisEvent", "AnomalyNote"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    out = tmp_path_factory.mktemp("openapi-client")
    bin_dir = str(Path(sys.executable).parent)  # the generator formats its output with ruff, from PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [Path(bin_dir) / "openapi-python-client", "generate", "--path", OPENAPI, "--output-path", out / "client"],
        cwd=out,
        env=env,
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(out / "client"))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out / "client"))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def endpoints(package: ModuleType) -> dict[str, ModuleType]:
    """Every generated endpoint module, by name (one per operation of the document)."""
    api = importlib.import_module(f"{package.__name__}.api")
    found = {}
    for tag in pkgutil.iter_modules(api.__path__):
        group = importlib.import_module(f"{api.__name__}.{tag.name}")
        for op in pkgutil.iter_modules(group.__path__):
            found[op.name] = importlib.import_module(f"{group.__name__}.{op.name}")
    return found


def undeclared(value: Any, where: str = "body") -> list[str]:
    """Paths of the keys no schema declared, anywhere in a parsed body."""
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in undeclared(v, f"{where}[{i}]")]
    if not attrs.has(type(value)):
        return []
    fields = [f.name for f in attrs.fields(type(value)) if f.name != "additional_properties"]
    extra: dict[str, Any] = getattr(value, "additional_properties", {})
    # Only a model with declared fields may be wrong to carry others; a map is all extra keys.
    strict = bool(fields) and type(value).__name__ not in OPEN_MODELS
    found = [f"{where}.{k} ({type(value).__name__})" for k in extra if strict]
    for name in fields:
        found += undeclared(getattr(value, name), f"{where}.{name}")
    for key, item in extra.items():  # a map's values may be models themselves (by_partner)
        found += undeclared(item, f"{where}[{key!r}]")
    return found


def dropped(sent: Any, kept: Any, where: str = "body") -> list[str]:
    """Paths of the keys the server sent that the parsed body no longer has: a model whose schema
    says `additionalProperties: false` is generated without a place for other keys, and its
    from_dict ignores them."""
    if isinstance(sent, list) and isinstance(kept, list):
        return [p for i, (s, k) in enumerate(zip(sent, kept, strict=False)) for p in dropped(s, k, f"{where}[{i}]")]
    if not (isinstance(sent, dict) and isinstance(kept, dict)):
        return []
    return [f"{where}.{k}" for k in sent if k not in kept] + [
        p for k in sent if k in kept for p in dropped(sent[k], kept[k], f"{where}.{k}")
    ]


@pytest.fixture(scope="module")
async def batch(
    partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient, database_urls: dict[str, str]
) -> Programme:
    """One batch funded, quoted twice, awarded, cleared, shipped and received with a damaged unit
    (an anomaly), so every view, export and proof has something in it."""
    g = Programme(partner, outcomes, quantity=2, db=database_urls)
    await g.fund()
    await g.request()
    winner = await g.submit("nvidia-partner-kr", "50000000")
    await g.submit("supermicro-apac", "52000000")
    await g.award(winner)
    await batch_view(api, g.batch, lambda d: d["status"] == "cleared")
    await g.deliveries_see("cleared")
    shipment, serials = uid("S"), g.serials(0, 2)
    await g.dispatch(shipment, serials)
    await g.receive(shipment, serials, damaged=serials[:1])
    await batch_view(api, g.batch, lambda d: d["status"] == "received")
    return g


async def test_a_generated_client_reads_every_endpoint(
    generated: ModuleType, batch: Programme, stack: Stack, tokens: dict[str, str], api: httpx.AsyncClient
) -> None:
    ops = endpoints(generated)
    models = importlib.import_module(f"{PACKAGE}.models")
    size = (await api.get("/v1/log/checkpoint", params={"format": "json"})).json()["size"]
    pledge = (await api.get(f"/v1/batches/{batch.batch}")).json()["money"]["pledges"][0]
    json_format = models.GetCheckpointV1LogCheckpointGetFormat.JSON
    calls: dict[str, tuple[dict[str, Any], str]] = {  # operation -> (arguments, the model it must parse into)
        "get_program_v1_program_get": ({"program_id": batch.program}, "ProgramTotals"),
        "get_pledge_v1_pledges_pledge_id_get": ({"pledge_id": pledge}, "Pledge"),
        "get_batches_v1_batches_get": ({"program_id": batch.program}, "BatchesPage"),
        "get_batch_v1_batches_batch_id_get": ({"batch_id": batch.batch}, "BatchDetail"),
        "get_batch_ocds_v1_batches_batch_id_ocds_get": ({"batch_id": batch.batch}, "OcdsReleasePackage"),
        "get_batch_epcis_v1_batches_batch_id_epcis_get": ({"batch_id": batch.batch}, "EpcisDocument"),
        "get_anomalies_v1_anomalies_get": ({"batch_id": batch.batch}, "AnomalyList"),
        "get_checkpoint_v1_log_checkpoint_get": ({"format_": json_format}, "CheckpointJSON"),
        "get_past_checkpoint_v1_log_checkpoints_size_get": (
            {"size": size, "format_": models.GetPastCheckpointV1LogCheckpointsSizeGetFormat.JSON},
            "CheckpointJSON",
        ),
        "get_public_key_v1_log_public_key_get": ({}, "PublicKey"),
        "get_entries_v1_log_entries_get": ({"start": max(size - 5, 0)}, "Entry"),
        "get_inclusion_proof_v1_log_proof_inclusion_get": ({"leaf_index": 0, "tree_size": size}, "InclusionProof"),
        "get_consistency_proof_v1_log_proof_consistency_get": ({"first": 1, "second": size}, "ConsistencyProof"),
    }
    assert set(calls) == set(ops), "an endpoint this test does not read (or reads no more): update `calls`"
    client = generated.AuthenticatedClient(base_url=stack.api_url, token=tokens["auditor"], timeout=httpx.Timeout(30))
    problems: list[str] = []  # every endpoint is read, then all that is wrong is reported at once
    async with client as c:
        for name, (kwargs, model) in calls.items():
            response = await ops[name].asyncio_detailed(client=c, **kwargs)
            if response.status_code != 200:
                problems.append(f"{name}: {response.status_code} {response.content[:300]!r}")
                continue
            parsed = response.parsed
            items = parsed if isinstance(parsed, list) else [parsed]
            if not items or any(type(i).__name__ != model for i in items):
                problems.append(f"{name}: parsed as {type(items[0]).__name__ if items else None}, not {model}")
            if undeclared(parsed):
                problems.append(f"{name}: keys the schema does not declare: {undeclared(parsed)}")
            sent = json.loads(response.content)
            kept = [i.to_dict() for i in items] if isinstance(parsed, list) else parsed.to_dict()
            if dropped(sent, kept):
                problems.append(f"{name}: keys the client's models drop (undeclared): {dropped(sent, kept)}")
            if model == "BatchDetail":  # typed all the way down, not dicts
                assert parsed.award.funding.currency == "KRW"
                assert [a.code for t in parsed.timeline for a in t.anomalies] == ["DAMAGED_IN_TRANSIT"]
            if model == "EpcisDocument":
                assert [e.biz_step for e in parsed.epcis_body.event_list] == ["shipping", "receiving", "receiving"]
    assert not problems, "\n".join(problems)
