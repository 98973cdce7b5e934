"""The ledger asks its witnesses to cosign each new checkpoint (C2SP tlog-witness), off the append path.

A background task wakes when a batch that signed a checkpoint commits (and every
WITNESS_POLL_SECONDS anyway), and submits the latest checkpoint to each witness that has not
cosigned it yet, with the consistency proof from the size the witness last cosigned; a 409 tells
us the witness's real size (after a restart, or another ledger replica's submission), and we
retry from there. Cosignatures are checked against the witness's configured key before they are
stored (`log_cosignatures`), and the checkpoint routes serve the note with them appended.

Appends never wait for a witness: a witness that is down or refuses only shows in the log, in
`gputrace_witness_failures_total` and in checkpoints that stay uncosigned, which an auditor
requiring a quorum (`gputrace audit verify --witness`) then refuses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import CheckpointError
from gputrace_verifier.cosignature import (
    cosigner_key_id,
    format_add_checkpoint,
    parse_witness_vkey,
    verify_cosignatures,
)
from prometheus_client import Counter, Gauge
from sqlalchemy import func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.log import LogCosignature, SignedCheckpoint, fetch_nodes
from shared.runtime.settings import WitnessEndpoint

log = logging.getLogger(__name__)

WITNESS_FAILURES = Counter(
    "gputrace_witness_failures_total", "Checkpoint submissions to a witness that failed or were refused", ["witness"]
)
WITNESSED_SIZE = Gauge("gputrace_witnessed_size", "Largest checkpoint size a witness cosigned", ["witness"])
MAX_CONFLICTS = 3  # 409 answers followed in one submission before giving up until the next round


class WitnessConfigError(RuntimeError):
    """A configured witness key is unusable."""


class WitnessError(Exception):
    """One submission to one witness failed; the next round tries again."""


@dataclass
class Target:
    url: str
    name: str
    key: Ed25519PublicKey
    key_id: str
    size: int | None = None  # the witness's size as last learnt; None: ask our own records


def _read_vkey(value: str) -> str:
    path = Path(value).expanduser()
    return path.read_text().strip() if "+" not in value and path.is_file() else value.strip()


def targets(endpoints: Sequence[WitnessEndpoint]) -> list[Target]:
    out = []
    for endpoint in endpoints:
        name, key = parse_witness_vkey(_read_vkey(endpoint.vkey))
        out.append(Target(endpoint.url.rstrip("/"), name, key, cosigner_key_id(name, key).hex()))
    return out


# --------------------------------------------------------------------------- serving


async def cosigned_note(session: AsyncSession, cp: SignedCheckpoint) -> str:
    """The checkpoint's signed note with every stored cosignature line appended (signed-note allows
    any number of signature lines; verifiers ignore the keys they do not know)."""
    lines = (
        await session.exec(
            select(LogCosignature.line).where(LogCosignature.size == cp.size).order_by(col(LogCosignature.key_id))
        )
    ).all()
    return cp.note + "".join(lines)


async def latest_witnessed(session: AsyncSession, key_ids: Sequence[str]) -> SignedCheckpoint | None:
    """The latest checkpoint cosigned by every one of these witnesses, if any."""
    if not key_ids:
        return None
    size = (
        await session.exec(
            select(func.max(LogCosignature.size)).where(
                col(LogCosignature.size).in_(
                    select(LogCosignature.size)
                    .where(col(LogCosignature.key_id).in_(list(key_ids)))
                    .group_by(col(LogCosignature.size))
                    .having(func.count(func.distinct(LogCosignature.key_id)) == len(set(key_ids)))
                )
            )
        )
    ).first()
    return None if size is None else await session.get(SignedCheckpoint, size)


# --------------------------------------------------------------------------- submitting


class Witnesser:
    def __init__(self, endpoints: Sequence[WitnessEndpoint], poll_seconds: float = 1.0, timeout: float = 10.0) -> None:
        try:
            self.targets = targets(endpoints)
        except CheckpointError as e:
            raise WitnessConfigError(f"WITNESSES: {e}") from None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._poll = poll_seconds
        self._timeout = timeout
        self._wake = asyncio.Event()

    @property
    def key_ids(self) -> list[str]:
        return [t.key_id for t in self.targets]

    def wake(self) -> None:
        """Called when a batch that signed a checkpoint has committed."""
        self._wake.set()

    def bind(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    def attach(self, app: FastAPI, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Run alongside the app (inside its lifespan) when witnesses are configured; tell the
        checkpoint route which witnesses `?witnessed=true` means."""
        self.bind(sessions)
        app.state.witness_key_ids = self.key_ids
        if not self.targets:
            return
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
            async with inner(a) as state, self.running():
                yield state

        app.router.lifespan_context = lifespan

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        task = asyncio.create_task(self.run(), name="gputrace-witnessing")
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout) as http:
            while True:
                try:
                    await self.round(http)
                except Exception:  # the database may be away for a while; try again next round
                    log.exception("witnessing round failed")
                try:
                    await asyncio.wait_for(self._wake.wait(), self._poll)
                except TimeoutError:
                    pass
                self._wake.clear()

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        assert self._sessions is not None, "Witnesser.bind() first"
        return self._sessions

    async def round(self, http: httpx.AsyncClient) -> None:
        """Submit the latest checkpoint to each witness that has not cosigned it yet."""
        async with self.sessions() as session:
            latest = (
                await session.exec(select(SignedCheckpoint).order_by(col(SignedCheckpoint.size).desc()).limit(1))
            ).first()
        if latest is None:
            return
        for target in self.targets:
            try:
                await self._submit(http, target, latest)
            except (WitnessError, httpx.HTTPError) as e:
                WITNESS_FAILURES.labels(target.name).inc()
                log.warning(
                    "witness %s did not cosign size %d: %s", target.name, latest.size, e, extra={"url": target.url}
                )

    async def _submit(self, http: httpx.AsyncClient, target: Target, cp: SignedCheckpoint) -> None:
        async with self.sessions() as session:
            if await session.get(LogCosignature, (cp.size, target.key_id)) is not None:
                return
            if target.size is None:
                mine = select(func.max(LogCosignature.size)).where(LogCosignature.key_id == target.key_id)
                target.size = (await session.exec(mine)).first() or 0
        old = target.size
        for _ in range(MAX_CONFLICTS + 1):
            if old > cp.size:
                raise WitnessError(f"the witness is at size {old}, beyond this log's {cp.size}: a fork or a reset")
            response = await http.post(f"{target.url}/add-checkpoint", content=await self._body(old, cp))
            if response.status_code == 409:
                old = _conflict_size(response)
                target.size = old
                continue
            if response.status_code != 200:
                raise WitnessError(f"HTTP {response.status_code}: {response.text.strip()[:300]}")
            await self._store(target, cp, response.text)
            target.size = cp.size
            return
        raise WitnessError(f"still conflicting after {MAX_CONFLICTS} answers of 409")

    async def _body(self, old: int, cp: SignedCheckpoint) -> str:
        proof: list[bytes] = []
        if 0 < old < cp.size:
            async with self.sessions() as session:
                nodes = await fetch_nodes(session, merkle.consistency_proof_coords(old, cp.size))
            proof = merkle.consistency_proof(old, cp.size, nodes)
        return format_add_checkpoint(old, proof, cp.note)

    async def _store(self, target: Target, cp: SignedCheckpoint, body: str) -> None:
        """Keep the returned line that is a valid cosignature by this witness's key."""
        for line in body.splitlines():
            try:
                cosigned = verify_cosignatures(cp.note + line + "\n", [(target.name, target.key)])
            except CheckpointError as e:
                raise WitnessError(f"returned an invalid cosignature: {e}") from None
            if cosigned:
                async with self.sessions() as session, session.begin():
                    if await session.get(LogCosignature, (cp.size, target.key_id)) is None:
                        session.add(
                            LogCosignature(
                                size=cp.size,
                                key_id=target.key_id,
                                witness=target.name,
                                line=line + "\n",
                                timestamp=cosigned[0].timestamp,
                            )
                        )
                WITNESSED_SIZE.labels(target.name).set(cp.size)
                log.info("witness %s cosigned size %d", target.name, cp.size)
                return
        raise WitnessError("the response holds no cosignature by the configured key")


def _conflict_size(response: httpx.Response) -> int:
    text = response.text.strip()
    if not response.headers.get("content-type", "").startswith("text/x.tlog.size") or not text.isdigit():
        raise WitnessError(f"409 without a text/x.tlog.size body: {text[:100]!r}")
    return int(text)
