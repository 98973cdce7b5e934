"""The auditors' HTTP API (FastAPI). Every route reads; nothing here writes to the log.

Every parameter is typed and bounded in the signature, so the OpenAPI document states what is
accepted and anything else is refused before a query is built: integers fit PostgreSQL's BIGINT,
ids are 1-200 characters without control characters (NUL cannot even be sent to PostgreSQL).
A malformed parameter is 400 with one readable line, the shape of every other refusal here.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic_core import to_json
from sqlalchemy import bindparam
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.concurrency import run_in_threadpool

from services.ledger.auth import CurrentPrincipal, Principal, require
from services.ledger.batches import (
    STAGES,
    AnomalyView,
    Stage,
    batch_parties,
    batch_steps,
    get_batch_row,
    list_batches,
    summarize,
)
from services.ledger.exports import epcis_document, ocds_package
from services.ledger.log import LogEntry
from services.ledger.projections import PLEDGE_BY_ID, batch_count, batch_money, program_summary
from services.ledger.responses import (
    AnomalyList,
    BatchDetail,
    BatchesPage,
    EpcisDocument,
    OcdsReleasePackage,
    Pledge,
    Problem,
    ProgramTotals,
)
from shared.runtime.db import distrust_pooled_connections

# --------------------------------------------------------------------------- parameters and refusals

BIGINT_MAX = 2**63 - 1  # PostgreSQL BIGINT: a larger number cannot even be bound to a query
MAX_ID = 200  # the views' id columns are VARCHAR(200)
# Ids are free text in the contract; refuse only what no id can hold.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"


def id_param(where: Callable[..., Any], description: str, max_length: int = MAX_ID) -> Any:
    """Path(...) or Query(...) for an id or a free-text filter."""
    return where(min_length=1, max_length=max_length, pattern=TEXT_PATTERN, description=description)


def refusals(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the refusals a route can answer, each with the Problem shape."""
    described: dict[int | str, dict[str, Any]] = {
        code: {"model": Problem, "description": text} for code, text in codes.items()
    }
    # "4XX" also keeps FastAPI from documenting a 422 that RefuseMalformed never answers.
    described["4XX"] = {"model": Problem, "description": "Any other refusal (e.g. 405), in the same shape"}
    described[503] = {"model": Problem, "description": UNAVAILABLE, "headers": _RETRY_AFTER}
    return described


UNAVAILABLE = "The ledger's database is unavailable (down, or every read connection busy): retry later"
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}


MALFORMED = "A malformed parameter (type, bound, pattern or combination); `detail` names it"
NO_TOKEN = "No bearer token, or an unknown one"
FORBIDDEN = "The token's role or party may not read this"


def explain(errors: Sequence[Any]) -> str:
    """One line from pydantic's errors, naming each parameter; the input is not echoed back."""
    parts = []
    for error in errors:
        loc = [str(x) for x in error.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


# Connection failures: psycopg's own (the log's fixed statements run on the driver connection)
# and SQLAlchemy's wrapping of them (a dead pooled connection, or none to be had).
DATABASE_UNREACHABLE: tuple[type[Exception], ...] = (psycopg.OperationalError, sa_exc.OperationalError)
RETRY_AFTER_SECONDS = 1


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


class RefuseMalformed(APIRoute):
    """Answers 400 (Problem) to a parameter that fails validation, instead of FastAPI's 422 list,
    and to an unknown query parameter: `ofset=100` silently ignored would hand an auditor the
    wrong page without a word."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        known = _query_names(self.dependant)

        async def route(request: Request) -> Response:
            unknown = sorted(set(request.query_params) - known)
            if unknown:
                takes = ", ".join(sorted(known)) or "none"
                detail = f"unknown query parameter(s): {', '.join(map(repr, unknown))[:200]}; this route takes: {takes}"
                return JSONResponse({"detail": detail}, status_code=400)
            # Every parameter here is one value; FastAPI would silently keep the last of several.
            given = Counter(name for name, _ in request.query_params.multi_items())
            repeated = sorted(name for name, count in given.items() if count > 1)
            if repeated:
                detail = f"query parameter(s) given more than once: {', '.join(repeated)}"
                return JSONResponse({"detail": detail}, status_code=400)
            try:
                try:
                    return await handler(request)
                except DATABASE_UNREACHABLE:
                    # A connection the database dropped (a restart kills them all): every route here
                    # only reads, so it is answered once more, on connections pinged first.
                    distrust_pooled_connections(request.app.state.sessions.kw["bind"])
                    return await handler(request)
            except RequestValidationError as e:
                return JSONResponse({"detail": explain(e.errors())}, status_code=400)
            except (*DATABASE_UNREACHABLE, PoolTimeout):
                # Down, or every read connection busy for the pool's timeout: a retryable 503, not a 500.
                return JSONResponse(
                    {"detail": "the ledger's database is unavailable; retry shortly"},
                    status_code=503,
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )

        return route


router = APIRouter(
    prefix="/v1",
    route_class=RefuseMalformed,
    responses=refusals({400: MALFORMED, 401: NO_TOKEN, 403: FORBIDDEN}),
)


async def get_session(request: Request):  # type: ignore[no-untyped-def]
    async with request.app.state.sessions() as session:
        yield session


async def get_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    # The read routes run Core statements on a bare connection of the API's read engine (the one
    # its session factory is bound to): no ORM session, identity map or unit of work per request.
    async with request.app.state.sessions.kw["bind"].connect() as conn:
        yield conn


Session = Annotated[AsyncSession, Depends(get_session)]
Conn = Annotated[AsyncConnection, Depends(get_connection)]
# Bids carry competitors' prices: the full procurement record is for auditors and ops.
AuditorOrOps = Annotated[Principal, require("auditor", "ops")]
BatchId = Annotated[str, id_param(Path, "The batch id")]
ProgramFilter = Annotated[str | None, id_param(Query, "Only this programme")]
Offset = Annotated[int, Query(ge=0, le=BIGINT_MAX)]
NOT_FOUND = {404: {"model": Problem, "description": "No such object"}}


def listing(page: dict[str, Any]) -> Response:
    """A page of up to 1,000 items, encoded by pydantic-core as built: validating each item into
    its model costs ~7x the encoding (tests/benchmarks/bench_response_models.py), so list routes
    name their model in `response_model` for the schema only; tests/test_openapi_client.py and
    the schemathesis run hold their JSON to it."""
    return Response(to_json(page), media_type="application/json")


# --------------------------------------------------------------------------- routes


# Routes that build one object as a dict name its model in `response_model`: FastAPI validates the
# dict into it once and serialises it (what it did with dict[str, Any], with the types checked now).
@router.get(
    "/program",
    summary="Programme totals: pledged capital, in-kind GPUs, capacity, disbursed; by partner",
    response_model=ProgramTotals,
)
async def get_program(
    request: Request, conn: Conn, principal: CurrentPrincipal, program_id: ProgramFilter = None
) -> dict[str, Any]:
    summary = await program_summary(conn, request.app.state.settings.program_target_gpus, program_id)
    if principal.role == "partner":
        summary["by_partner"] = {k: v for k, v in summary["by_partner"].items() if k == principal.party_id}
    return summary


@router.get(
    "/pledges/{pledge_id}", summary="One pledge as the ledger knows it", responses=NOT_FOUND, response_model=Pledge
)
async def get_pledge(
    pledge_id: Annotated[str, id_param(Path, "The pledge id")], conn: Conn, principal: CurrentPrincipal
) -> dict[str, Any]:
    view = (await conn.execute(PLEDGE_BY_ID, {"pledge_id": pledge_id})).first()
    if view is None:
        raise HTTPException(404, f"no pledge {pledge_id!r}")
    if not principal.can_read_party(view.partner_id):
        raise HTTPException(403, "this pledge belongs to another partner")
    return {**json.loads(view.state), "leaf_index": view.leaf_index}


async def _readable_batch(session: AsyncConnection | AsyncSession, batch_id: str, principal: Principal) -> Any:
    view = await get_batch_row(session, batch_id)
    if view is None:
        raise HTTPException(404, f"no batch {batch_id!r}")
    if principal.role == "partner" and principal.party_id not in await batch_parties(session, batch_id):
        # 404, not 403: a partner learns nothing, not even that a competitor's batch exists.
        raise HTTPException(404, f"no batch {batch_id!r}")
    return view


@router.get("/batches", summary="Batches with filters and paging", response_model=BatchesPage)
async def get_batches(
    conn: Conn,
    principal: CurrentPrincipal,
    status: Annotated[Stage | None, Query(description=f"One of: {', '.join(STAGES)}")] = None,
    partner: Annotated[str | None, id_param(Query, "Batches that concern this party")] = None,
    vendor: Annotated[str | None, id_param(Query, "Batches awarded to this vendor")] = None,
    model: Annotated[str | None, id_param(Query, "Batches of this GPU model")] = None,
    program_id: ProgramFilter = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
    after: Annotated[
        str | None, id_param(Query, "Only batches whose id sorts after this one: keyset paging, as fast on any page")
    ] = None,
) -> Response:
    if principal.role == "partner":
        if partner not in (None, principal.party_id):
            raise HTTPException(403, "a partner reads only its own batches")
        partner = principal.party_id
    total, rows = await list_batches(
        conn,
        status=status,
        partner=partner,
        vendor=vendor,
        model=model,
        program_id=program_id,
        limit=limit,
        offset=offset,
        after=after,
        count=lambda program, stage: batch_count(conn, program, stage),
    )
    return listing({"total": total, "limit": limit, "offset": offset, "items": [summarize(r) for r in rows]})


@router.get(
    "/batches/{batch_id}",
    summary="One batch: status, quantities, money, export decision, timeline",
    responses=NOT_FOUND,
    response_model=BatchDetail,
)
async def get_batch(batch_id: BatchId, conn: Conn, principal: CurrentPrincipal) -> dict[str, Any]:
    view = await _readable_batch(conn, batch_id, principal)
    state = json.loads(view.state)
    # From the timeline's own small rows: the entries of a batch hold every serial it shipped.
    timeline = await batch_steps(conn, batch_id)
    if principal.role == "partner":
        # A partner sees the services' own decisions and its own events, not a competitor's.
        timeline = [s for s in timeline if s["party_id"] in (None, principal.party_id)]
    return {
        **summarize(view),
        "money": await batch_money(conn, batch_id, state),
        "export_decision": (state.get("export") or {}).get("decision"),
        "award": state.get("award"),
        "timeline": timeline,
    }


async def _export(session: AsyncSession, batch_id: str, build: Callable[[list[dict[str, Any]]], Any]) -> Response:
    """An export of a batch's entries (megabytes for a batch of thousands of serials): parsed,
    built and encoded in a worker thread, so the event loop keeps answering other requests."""
    rows = (
        await session.execute(
            select(LogEntry.leaf_index, LogEntry.entry)
            .where(LogEntry.batch_id == batch_id)
            .order_by(col(LogEntry.leaf_index))
        )
    ).all()

    def encode() -> bytes:
        entries = [{**json.loads(entry), "leaf_index": index} for index, entry in rows]
        return json.dumps(build(entries), ensure_ascii=False, separators=(",", ":")).encode()

    return Response(await run_in_threadpool(encode), media_type="application/json")


# The exports are built and encoded in a worker thread and returned as a Response, which FastAPI
# sends as it is: `response_model` documents their shape without a second pass over megabytes.
@router.get(
    "/batches/{batch_id}/ocds",
    summary="The batch's procurement as an OCDS 1.1 release package",
    responses=NOT_FOUND,
    response_model=OcdsReleasePackage,
)
async def get_batch_ocds(batch_id: BatchId, session: Session, principal: AuditorOrOps) -> Response:
    await _readable_batch(session, batch_id, principal)
    return await _export(session, batch_id, lambda e: ocds_package(batch_id, e, publisher="gputrace ledger"))


@router.get(
    "/batches/{batch_id}/epcis",
    summary="The batch's delivery events as an EPCIS 2.0 document",
    responses=NOT_FOUND,
    response_model=EpcisDocument,
)
async def get_batch_epcis(batch_id: BatchId, session: Session, principal: CurrentPrincipal) -> Response:
    await _readable_batch(session, batch_id, principal)
    return await _export(session, batch_id, lambda e: epcis_document(batch_id, e))


_ANOMALIES = AnomalyView.__table__.c  # type: ignore[attr-defined]


@functools.cache
def _anomalies_statement(given: frozenset[str], paged: bool = False) -> Any:
    query = select(AnomalyView.__table__).order_by(_ANOMALIES.leaf_index)  # type: ignore[call-overload]
    for name in ("batch_id", "code", "party_id"):
        if name in given:
            query = query.where(_ANOMALIES[name] == bindparam(name))
    return query.limit(bindparam("limit")).offset(bindparam("offset")) if paged else query


def anomalies_query(batch_id: str | None = None, code: str | None = None, party_id: str | None = None) -> Any:
    """The anomalies page's statement with its values (for the plan test); built once per shape."""
    values = {k: v for k, v in {"batch_id": batch_id, "code": code, "party_id": party_id}.items() if v}
    return _anomalies_statement(frozenset(values)).params(**values)


@router.get(
    "/anomalies",
    summary="Anomalies auditors must see (funding shortfalls, export violations, ...)",
    response_model=AnomalyList,
)
async def get_anomalies(
    conn: Conn,
    principal: CurrentPrincipal,
    batch_id: Annotated[str | None, id_param(Query, "Anomalies of this batch")] = None,
    code: Annotated[str | None, id_param(Query, "Anomalies with this code", max_length=60)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Offset = 0,
) -> Response:
    party = principal.party_id if principal.role == "partner" else None
    values: dict[str, Any] = {k: v for k, v in {"batch_id": batch_id, "code": code, "party_id": party}.items() if v}
    statement = _anomalies_statement(frozenset(values), paged=True)
    rows = (await conn.execute(statement, {**values, "limit": limit, "offset": offset})).all()
    page = {
        "items": [
            {
                "leaf_index": a.leaf_index,
                "batch_id": a.batch_id,
                "code": a.code,
                "severity": a.severity,
                "message": a.message,
                "service": a.service,
                "party_id": a.party_id,
                "decided_at": a.decided_at,
                "details": json.loads(a.details),
            }
            for a in rows
        ]
    }
    return listing(page)
