"""The auditors' HTTP API (FastAPI). Every route reads; nothing here writes to the log."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.auth import CurrentPrincipal, require
from services.ledger.projections import PledgeView, program_summary

router = APIRouter(prefix="/v1")


async def get_session(request: Request):  # type: ignore[no-untyped-def]
    async with request.app.state.sessions() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


@router.get("/program", summary="Programme totals: pledged capital, in-kind GPUs, capacity, disbursed; by partner")
async def get_program(request: Request, session: Session, principal: CurrentPrincipal) -> dict[str, Any]:
    summary = await program_summary(session, request.app.state.settings.program_target_gpus)
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


health = APIRouter()


@health.get("/healthz", summary="Liveness", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


__all__ = ["health", "require", "router"]
