"""The auditor API's hot queries read indexes, not tables, at 10^5 rows on PostgreSQL: before the
planner has statistics (right after a bulk load) and after ANALYZE (issue 11, item 2).

The queries are the ones the routes run (their builders are imported, not copied); the rows are
bulk-inserted with SQL (generate_series), so the test takes seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from services.ledger.api import anomalies_query
from services.ledger.batches import batches_query, parties_query, steps_query
from services.ledger.log import LOG_TABLES, PG_ENTRIES, PG_LEAF, PG_NODES, entries_query, leaf_lookup_query
from services.ledger.projections import PROJECTION_TABLES, earmarked_query, totals_query
from shared.runtime.db import create_tables, make_engine

ROWS = 100_000
# Tables that grow with the programme: none of them may be read whole by a request.
BIG = {
    "log_entries",
    "log_nodes",
    "view_batches",
    "view_batch_parties",
    "view_batch_steps",
    "view_pledges",
    "view_anomalies",
    "view_totals",
}

LOAD = [
    # One row per leaf; a tenth of them about batches, the rest pledges.
    f"""INSERT INTO log_entries (leaf_index, decision_id, entry, leaf_hash, service, event_type, status,
        batch_id, aggregate_id, party_id, appended_at)
    SELECT i, 'd' || i, '{{"i":' || i || '}}', sha256(int8send(i)), 'deliveries', 'gputrace.x.v1', 'accepted',
        'B-' || (i % 10000), 'A-' || i, 'p-' || (i % 50), now()
    FROM generate_series(0, {ROWS - 1}) AS i""",
    # The complete subtrees: every leaf (level 0) and every pair of leaves (level 1).
    f"""INSERT INTO log_nodes (level, idx, hash)
    SELECT l, i, sha256(int8send(i)) FROM generate_series(0, 1) AS l, generate_series(0, {ROWS - 1}) AS i
    WHERE i < {ROWS} >> l""",
    f"""INSERT INTO view_batches (batch_id, program_id, model, vendor_id, status, anomalies, last_leaf_index, state)
    SELECT 'B-' || i, 'PROG-' || (i % 20), 'B200', 'v-' || (i % 3),
        (ARRAY['requested','quoted','awarded','cleared','in_transit','received','installed','accepted'])[1 + i % 8],
        0, i, '{{}}'
    FROM generate_series(0, {ROWS - 1}) AS i""",
    f"""INSERT INTO view_batch_parties (batch_id, party_id)
    SELECT 'B-' || i, 'p-' || (i % 50) FROM generate_series(0, {ROWS - 1}) AS i""",
    f"""INSERT INTO view_batch_steps (leaf_index, batch_id, step)
    SELECT i, 'B-' || (i % 10000), '{{}}' FROM generate_series(0, {ROWS - 1}) AS i""",
    f"""INSERT INTO view_pledges (pledge_id, partner_id, program_id, earmark_batch_id, version, state, leaf_index)
    SELECT 'PL-' || i, 'p-' || (i % 50), 'PROG-' || (i % 20), 'B-' || i, 1, '{{}}', i
    FROM generate_series(0, {ROWS - 1}) AS i""",
    f"""INSERT INTO view_anomalies (leaf_index, batch_id, code, severity, message, service, party_id, decision_id,
        decided_at, details)
    SELECT i, 'B-' || (i % 10000), (ARRAY['DAMAGED_IN_TRANSIT','ACCEPTANCE_FAILED'])[1 + i % 2], 'high', 'm',
        'deliveries', 'p-' || (i % 50), 'd' || i, now(), '{{}}'
    FROM generate_series(0, {ROWS - 1}) AS i""",
    # Running totals stay small by construction; a ledger of 10^4 programmes still reads one's by index.
    f"""INSERT INTO view_totals (scope, program_id, party_id, metric, unit, value)
    SELECT 'pledges', 'PROG-' || (i / 10), 'p-' || (i % 10), 'capital', 'KRW', '1'
    FROM generate_series(0, {ROWS - 1}) AS i""",
]


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="module")
def big_ledger(postgres_url: str) -> Iterator[str]:
    admin = _libpq(postgres_url)
    name = f"gt_plans_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin.rpartition('/')[0]}/{name}"

    async def create() -> None:
        engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            await create_tables(engine, [*LOG_TABLES, *PROJECTION_TABLES])  # type: ignore[list-item]
        finally:
            await engine.dispose()

    asyncio.run(create())
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in LOAD:
            conn.execute(sql)  # type: ignore[arg-type]
    try:
        yield url.replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def hot_queries() -> dict[str, tuple[Any, str | None]]:
    """name -> (the route's query, the index that must answer it, or None for any index)."""
    leaf = hashlib.sha256((12_345).to_bytes(8, "big", signed=True)).digest()
    return {
        "leaf-hash lookup": (leaf_lookup_query(leaf, ROWS), "ix_log_entries_leaf_hash_index"),
        "entries page": (entries_query(50_000, 51_000), "log_entries_pkey"),
        "batch page by status": (batches_query(status="accepted").limit(50).offset(0), None),
        "batch page by programme": (batches_query(program_id="PROG-3").limit(50).offset(100), None),
        "batch page of a partner": (batches_query(partner="p-7").limit(50), None),
        "batch page after a key": (batches_query(status="accepted", after="B-50000").limit(50), None),
        "program summary": (totals_query(("pledges", "batches", "gpus", "anomalies"), "PROG-77"), None),
        "batch view: timeline": (steps_query("B-4242"), "ix_view_batch_steps_batch"),
        "batch view: parties": (parties_query("B-4242"), None),
        "batch view: money": (earmarked_query("B-4242"), None),
        "anomalies page": (anomalies_query(code="ACCEPTANCE_FAILED").limit(200).offset(0), None),
        "anomalies of a batch": (anomalies_query(batch_id="B-4242").limit(200), None),
    }


def raw_queries() -> dict[str, tuple[str, tuple[Any, ...], str]]:
    """The statements the log routes send PostgreSQL as they are (services.ledger.log.PG_*)."""
    leaf = hashlib.sha256((12_345).to_bytes(8, "big", signed=True)).digest()
    return {
        "proof nodes (unnest join)": (PG_NODES, ("{0,1,0}", "{12345,777,99999}"), "log_nodes_pkey"),
        "entries page with the size": (PG_ENTRIES, (50_000, 51_000), "log_entries_pkey"),
        "size and leaf-hash lookup": (PG_LEAF, (leaf, ROWS), "ix_log_entries_leaf_hash_index"),
    }


def plan_of(conn: Connection, query: Any) -> dict[str, Any]:
    compiled = query.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    row = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar_one()
    return row[0]["Plan"]


def plan_of_sql(conn: Connection, sql: str, params: tuple[Any, ...]) -> dict[str, Any]:
    return conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).scalar_one()[0]["Plan"]


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def check(plan: dict[str, Any], index: str | None) -> list[str]:
    problems = []
    scans = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes(plan)]
    for kind, relation, _ in scans:
        if kind == "Seq Scan" and relation in BIG:
            problems.append(f"sequential scan of {relation}")
    used = {name for _, _, name in scans if name}
    if not used:
        problems.append("no index used")
    if index is not None and index not in used:
        problems.append(f"{index} not used (used: {sorted(used)})")
    return problems


@pytest.mark.parametrize("analysed", [False, True], ids=["fresh bulk load", "after ANALYZE"])
def test_hot_queries_use_indexes_at_1e5_rows(big_ledger: str, analysed: bool) -> None:
    engine = create_engine(big_ledger)
    try:
        with engine.connect() as conn:
            if analysed:
                conn.exec_driver_sql("ANALYZE")
            failures = {}
            for name, (query, index) in hot_queries().items():
                problems = check(plan_of(conn, query), index)
                if problems:
                    failures[name] = problems
            for name, (sql, params, index) in raw_queries().items():
                problems = check(plan_of_sql(conn, sql, params), index)
                if problems:
                    failures[name] = problems
            assert not failures, failures
    finally:
        engine.dispose()
