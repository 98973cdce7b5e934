"""The auditor API against its own OpenAPI document, fuzzed over real HTTP with schemathesis.

Every operation of docs/openapi.json is called on the running ledger (real Kafka and PostgreSQL
behind it) with schema-valid and schema-invalid parameters, and every schemathesis check is on:
no 5xx, statuses, content types, headers and bodies as documented, invalid input refused (4xx),
valid input accepted, auth not ignored, 405s with an Allow header. Bounded and derandomised, so
it takes seconds and fails the same way twice. Then the faults it first found, pinned one by one.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from tests.partner import PartnerClient, TopicWatcher
from tools.devstack import Stack

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
BIG = 2**64  # past PostgreSQL's BIGINT, and past what psycopg binds as an integer

CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {"enabled": True},
        # The log routes refuse, with 400 or 416, what a schema cannot state: leaf_index beyond
        # tree_size, end <= start, first > second, a size the log has not reached yet. Schema-valid
        # requests may get those there (and only there); everything else stands as shipped.
        "operations": [
            {
                "include-path-regex": "^/v1/log/(entries|proof/|checkpoints/)",
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "416"]}
                },
            }
        ],
    }
)
schema = schemathesis.openapi.from_path(OPENAPI, config=CONFIG)


@pytest.fixture(scope="session")
async def log_with_entries(partner: PartnerClient, outcomes: TopicWatcher, api: httpx.AsyncClient) -> dict[str, Any]:
    """A pledge and a batch through Kafka, so the log, its proofs and the views have something."""
    program, batch, pledge = (f"{p}-{uuid.uuid4().hex[:8]}" for p in ("fuzz", "B-fuzz", "P-fuzz"))
    ids = [
        await partner.publish("kakao", "pledge.committed.v1", {
            "pledge_id": pledge, "partner_id": "kakao", "program_id": program, "kind": "capital",
            "capital": {"amount": "1000", "currency": "KRW"}, "earmark_batch_id": batch,
            "committed_at": "2025-03-01T00:00:00Z", "due_by": "2025-12-31",
        }),
        await partner.publish("nipa", "batch.requested.v1", {
            "batch_id": batch, "program_id": program, "model": "B200", "quantity": 2, "site_id": "haenam-1",
            "needed_by": "2025-12-31",
        }),
    ]  # fmt: skip
    assert [o["status"] for o in await outcomes.outcomes(*ids)] == ["accepted", "accepted"]
    deadline = asyncio.get_running_loop().time() + 60
    while (await api.get(f"/v1/batches/{batch}")).status_code != 200 or (
        await api.get("/v1/log/checkpoint")
    ).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, "the ledger never showed the seeded batch"
        await asyncio.sleep(0.3)
    return {"batch": batch, "pledge": pledge, "program": program}


@pytest.fixture(scope="session")
def http_session() -> Iterator[requests.Session]:
    """One keep-alive connection pool for every fuzzed call (schemathesis sends with requests)."""
    with requests.Session() as session:
        yield session


@schema.parametrize()
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi_document(
    case: schemathesis.Case,
    stack: Stack,
    tokens: dict[str, str],
    log_with_entries: dict[str, Any],
    http_session: requests.Session,
) -> None:
    case.call_and_validate(
        base_url=stack.api_url,
        session=http_session,
        headers={"Authorization": f"Bearer {tokens['auditor']}"},
        timeout=30,
    )


# --------------------------------------------------------------------------- the faults it found

NON_ASCII_HASH = "é" * 44  # base64.b64decode raised ValueError (not binascii.Error) on this: a 500
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/log/proof/inclusion", {"leaf_hash": NON_ASCII_HASH}, "leaf_hash"),
    ("/v1/log/proof/inclusion", {"leaf_hash": "é"}, "leaf_hash"),
    ("/v1/log/proof/inclusion", {"leaf_hash": base64.b64encode(b"\xff" * 31).decode()}, "leaf_hash"),
    ("/v1/log/proof/inclusion", {"leaf_index": BIG, "tree_size": 1}, "leaf_index"),
    ("/v1/log/proof/inclusion", {"leaf_index": 0, "tree_size": BIG}, "tree_size"),
    ("/v1/log/proof/inclusion", {"leaf_index": -1, "tree_size": 1}, "leaf_index"),
    (f"/v1/log/checkpoints/{BIG}", {}, "size"),
    ("/v1/log/checkpoints/-1", {}, "size"),
    ("/v1/log/entries", {"start": BIG}, "start"),
    ("/v1/log/entries", {"start": 0, "end": BIG}, "end"),
    ("/v1/log/entries", {"start": -1}, "start"),
    ("/v1/log/proof/consistency", {"first": BIG}, "first"),
    ("/v1/log/proof/consistency", {"first": 0, "second": BIG}, "second"),
    ("/v1/log/proof/consistency", {"first": -1}, "first"),
    ("/v1/batches", {"offset": BIG}, "offset"),
    ("/v1/batches", {"offset": -1}, "offset"),
    ("/v1/batches", {"limit": 0}, "limit"),
    ("/v1/batches", {"status": "lost"}, "status"),
    ("/v1/batches", {"program_id": "a\x00b"}, "program_id"),
    ("/v1/anomalies", {"offset": BIG}, "offset"),
    ("/v1/anomalies", {"offset": -1}, "offset"),
    ("/v1/anomalies", {"code": "x" * 61}, "code"),
    ("/v1/batches/%00", {}, "batch_id"),
    ("/v1/pledges/" + "p" * 201, {}, "pledge_id"),
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(("path", "params", "named"), MALFORMED)
async def test_malformed_parameters_are_refused_with_400_naming_them(
    api: httpx.AsyncClient, log_with_entries: dict[str, Any], path: str, params: dict[str, Any], named: str
) -> None:
    # A log with entries, so a leaf_hash gets past the size checks to its decoding, as it did.
    response = await api.get(path, params=params)
    assert response.status_code == 400, (path, params, response.status_code, response.text)
    assert named in response.json()["detail"], response.text


BIGINT_MAX = 2**63 - 1
AT_THE_BOUNDS: list[tuple[str, dict[str, Any], int]] = [
    ("/v1/batches", {"offset": BIGINT_MAX}, 200),
    ("/v1/anomalies", {"offset": BIGINT_MAX}, 200),
    (f"/v1/log/checkpoints/{BIGINT_MAX}", {}, 416),
    ("/v1/log/entries", {"start": BIGINT_MAX}, 416),
    ("/v1/log/proof/inclusion", {"leaf_index": 0, "tree_size": BIGINT_MAX}, 416),
    ("/v1/log/proof/consistency", {"first": 0, "second": BIGINT_MAX}, 416),
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(("path", "params", "status"), AT_THE_BOUNDS)
async def test_the_largest_accepted_numbers_are_answered_not_crashed_on(
    api: httpx.AsyncClient, log_with_entries: dict[str, Any], path: str, params: dict[str, Any], status: int
) -> None:
    response = await api.get(path, params=params)
    assert response.status_code == status, (path, params, response.status_code, response.text)


@pytest.mark.asyncio(loop_scope="session")
async def test_unknown_or_repeated_query_parameters_are_refused(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/batches", params={"ofset": 100})
    assert response.status_code == 400
    assert "'ofset'" in response.json()["detail"] and "offset" in response.json()["detail"]
    # Several values of a one-value parameter: FastAPI alone would keep the last, silently.
    response = await api.get("/v1/anomalies", params=[("code", "A"), ("code", "B")])
    assert response.status_code == 400 and "code" in response.json()["detail"], response.text


@pytest.mark.asyncio(loop_scope="session")
async def test_dashboard_assets_outside_the_schema_refuse_odd_names(stack: Stack) -> None:
    # The dashboard's routes are not in the OpenAPI document, so schemathesis never calls them.
    async with httpx.AsyncClient(base_url=stack.api_url) as anonymous:
        for name in ("%00", "..%2Fapi.py", "dashboard.js%00.png", "é" * 300):
            response = await anonymous.get(f"/dashboard/static/{name}")
            assert response.status_code == 404, (name, response.status_code)
