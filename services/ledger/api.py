"""The auditors' HTTP API (FastAPI). Every route reads; nothing here writes to the log."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.auth import CurrentPrincipal, Principal, require
from services.ledger.batches import STAGES, AnomalyView, BatchView, batch_parties, list_batches, summarize
from services.ledger.exports import epcis_document, ocds_package
from services.ledger.log import LogEntry
from services.ledger.projections import PledgeView, batch_money, program_summary

router = APIRouter(prefix="/v1")


async def get_session(request: Request):  # type: ignore[no-untyped-def]
    async with request.app.state.sessions() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]
# Bids carry competitors' prices: the full procurement record is for auditors and ops.
AuditorOrOps = Annotated[Principal, require("auditor", "ops")]


@router.get("/program", summary="Programme totals: pledged capital, in-kind GPUs, capacity, disbursed; by partner")
async def get_program(
    request: Request, session: Session, principal: CurrentPrincipal, program_id: str | None = None
) -> dict[str, Any]:
    summary = await program_summary(session, request.app.state.settings.program_target_gpus, program_id)
    if principal.role == "partner":
        summary["by_partner"] = {k: v for k, v in summary["by_partner"].items() if k == principal.party_id}
    return summary


@router.get("/pledges/{pledge_id}", summary="One pledge as the ledger knows it")
async def get_pledge(pledge_id: str, session: Session, principal: CurrentPrincipal) -> dict[str, Any]:
    view = await session.get(PledgeView, pledge_id)
    if view is None:
        raise HTTPException(404, f"no pledge {pledge_id!r}")
    if not principal.can_read_party(view.partner_id):
        raise HTTPException(403, "this pledge belongs to another partner")
    return {**json.loads(view.state), "leaf_index": view.leaf_index}


async def _readable_batch(session: AsyncSession, batch_id: str, principal: Principal) -> BatchView:
    view = await session.get(BatchView, batch_id)
    if view is None:
        raise HTTPException(404, f"no batch {batch_id!r}")
    if principal.role == "partner" and principal.party_id not in await batch_parties(session, batch_id):
        raise HTTPException(403, "this batch does not concern your party")
    return view


@router.get("/batches", summary="Batches with filters and paging")
async def get_batches(
    session: Session,
    principal: CurrentPrincipal,
    status: Annotated[str | None, Query(description=f"One of: {', '.join(STAGES)}")] = None,
    partner: Annotated[str | None, Query(description="Batches that concern this party")] = None,
    vendor: str | None = None,
    model: str | None = None,
    program_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    if status is not None and status not in STAGES:
        raise HTTPException(400, f"unknown status {status!r}; one of {', '.join(STAGES)}")
    if principal.role == "partner":
        if partner not in (None, principal.party_id):
            raise HTTPException(403, "a partner reads only its own batches")
        partner = principal.party_id
    total, rows = await list_batches(
        session,
        status=status,
        partner=partner,
        vendor=vendor,
        model=model,
        program_id=program_id,
        limit=limit,
        offset=offset,
    )
    return {"total": total, "limit": limit, "offset": offset, "items": [summarize(r) for r in rows]}


def _step(entry: LogEntry) -> dict[str, Any]:
    doc = json.loads(entry.entry)
    return {
        "leaf_index": entry.leaf_index,
        "decided_at": doc["decided_at"],
        "service": doc["service"],
        "event_type": doc["event_type"],
        "status": doc["status"],
        "reason_code": doc.get("reason_code"),
        "message": doc["message"],
        "party_id": doc.get("party_id"),
        "event_id": (doc.get("event") or {}).get("id"),
        "anomalies": doc.get("anomalies", []),
    }


@router.get("/batches/{batch_id}", summary="One batch: status, quantities, money, export decision, timeline")
async def get_batch(batch_id: str, session: Session, principal: CurrentPrincipal) -> dict[str, Any]:
    view = await _readable_batch(session, batch_id, principal)
    state = json.loads(view.state)
    entries = (
        await session.execute(select(LogEntry).where(LogEntry.batch_id == batch_id).order_by(LogEntry.leaf_index))
    ).scalars()
    timeline = [_step(e) for e in entries]
    if principal.role == "partner":
        # A partner sees the services' own decisions and its own events, not a competitor's.
        timeline = [s for s in timeline if s["party_id"] in (None, principal.party_id)]
    return {
        **summarize(view),
        "money": await batch_money(session, batch_id, state),
        "export_decision": (state.get("export") or {}).get("decision"),
        "award": state.get("award"),
        "timeline": timeline,
    }


async def _batch_entries(session: AsyncSession, batch_id: str) -> list[dict[str, Any]]:
    rows = (
        await session.execute(select(LogEntry).where(LogEntry.batch_id == batch_id).order_by(LogEntry.leaf_index))
    ).scalars()
    return [{**json.loads(r.entry), "leaf_index": r.leaf_index} for r in rows]


@router.get("/batches/{batch_id}/ocds", summary="The batch's procurement as an OCDS 1.1 release package")
async def get_batch_ocds(batch_id: str, session: Session, principal: AuditorOrOps) -> dict[str, Any]:
    await _readable_batch(session, batch_id, principal)
    return ocds_package(batch_id, await _batch_entries(session, batch_id), publisher="gputrace ledger")


@router.get("/batches/{batch_id}/epcis", summary="The batch's delivery events as an EPCIS 2.0 document")
async def get_batch_epcis(batch_id: str, session: Session, principal: CurrentPrincipal) -> dict[str, Any]:
    await _readable_batch(session, batch_id, principal)
    return epcis_document(batch_id, await _batch_entries(session, batch_id))


@router.get("/anomalies", summary="Anomalies auditors must see (funding shortfalls, export violations, ...)")
async def get_anomalies(
    session: Session,
    principal: CurrentPrincipal,
    batch_id: str | None = None,
    code: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    query = select(AnomalyView).order_by(col(AnomalyView.leaf_index))
    if batch_id:
        query = query.where(AnomalyView.batch_id == batch_id)
    if code:
        query = query.where(AnomalyView.code == code)
    if principal.role == "partner":
        query = query.where(AnomalyView.party_id == principal.party_id)
    rows = (await session.execute(query.limit(limit).offset(offset))).scalars().all()
    return {
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
