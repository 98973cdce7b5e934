"""The witness: cosigns a log's checkpoints only while they extend everything it saw of that log.

C2SP tlog-witness (`POST /add-checkpoint`) with tlog-cosignature `cosignature/v1` (Ed25519). It
knows the logs it witnesses (WITNESS_LOGS: their checkpoint keys; a log's origin is its key's
name), keeps per log the last checkpoint it cosigned (size, root) in its own database, and for
each submission: checks the log's signature, checks the consistency proof from its recorded
size to the new one (RFC 9162, the verifier's merkle module), records the new size and root by
compare-and-swap on the old size, and only then returns a timestamped cosignature line.

A log that shows one history to the witness and another to someone else (a fork: two different
checkpoints of one size, or a checkpoint that does not extend the last one) gets 422, and the
refusal is kept in `witness_refusals` with the offending note, as evidence. The witness is not a
Kafka service: it talks HTTP only and needs nothing of the pipeline.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import Checkpoint, CheckpointError, _split_note, open_note, parse_vkey
from gputrace_verifier.cosignature import cosign, make_witness_vkey, parse_add_checkpoint
from prometheus_client import Counter, make_asgi_app
from sqlalchemy import BigInteger, Column, LargeBinary, Text, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel

from shared.contract.parties import load_private_key
from shared.runtime.db import make_engine, session_factory, utcnow
from shared.runtime.migrations import prepare_schema, refuse_older_schema
from shared.runtime.observability import configure_logging
from shared.runtime.settings import Settings

SERVICE = "witness"
MAX_BODY = 64 * 1024  # a checkpoint, 63 hashes and some signatures fit many times over
SIZE_MEDIA_TYPE = "text/x.tlog.size"
log = logging.getLogger(__name__)

REQUESTS = Counter("gputrace_witness_requests_total", "add-checkpoint requests by outcome (HTTP status)", ["status"])


class WitnessedLog(SQLModel, table=True):
    """Per log: the last checkpoint this witness cosigned. Only moves forward, by compare-and-swap."""

    __tablename__ = "witnessed_logs"

    origin: str = Field(primary_key=True, max_length=300)
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    root_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # The cosigned checkpoint with the log's signature and ours (served to monitors).
    note: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(default_factory=utcnow)


class WitnessRefusal(SQLModel, table=True):
    """A validly signed checkpoint the witness refused: possible evidence of a misbehaving log."""

    __tablename__ = "witness_refusals"

    id: int | None = Field(default=None, primary_key=True)
    origin: str = Field(max_length=300, index=True)
    old_size: int = Field(sa_column=Column(BigInteger, nullable=False))
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    status: int
    reason: str = Field(sa_column=Column(Text, nullable=False))
    note: str = Field(sa_column=Column(Text, nullable=False))
    refused_at: datetime = Field(default_factory=utcnow)


WITNESS_TABLES = [WitnessedLog.__table__, WitnessRefusal.__table__]


class WitnessConfigError(RuntimeError):
    """The witness cannot start as configured; the message says what to do."""


@dataclass(frozen=True)
class KnownLog:
    origin: str
    key_name: str
    key: Ed25519PublicKey


def _read_vkey(value: str) -> str:
    path = Path(value).expanduser()
    return path.read_text().strip() if "+" not in value and path.is_file() else value.strip()


def known_logs(settings: Settings) -> dict[str, KnownLog]:
    logs: dict[str, KnownLog] = {}
    for value in settings.witness_logs:
        try:
            name, key = parse_vkey(_read_vkey(value))
        except CheckpointError as e:
            raise WitnessConfigError(f"WITNESS_LOGS: {e}") from None
        logs[name] = KnownLog(name, name, key)  # C2SP: a log's key is named after its origin
    return logs


def witness_key(settings: Settings) -> Ed25519PrivateKey:
    path = settings.witness_signing_key
    if not path.exists():
        raise WitnessConfigError(f"no witness key at {path}: create it once with `gputrace keys init`")
    return load_private_key(path)


class Refused(Exception):
    def __init__(self, status: int, reason: str, *, record: bool = True, body: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.record, self.body = status, reason, record, body


class Witness:
    def __init__(self, name: str, key: Ed25519PrivateKey, logs: dict[str, KnownLog], engine: AsyncEngine) -> None:
        self.name, self._key, self.logs, self.engine = name, key, logs, engine
        self._sessions = session_factory(engine)
        self.vkey = make_witness_vkey(name, key.public_key())

    async def init_db(self) -> None:
        # Its schema from its migrations, like every service: an empty database is created at
        # head, an older one refused (gputrace migrate --service witness).
        await prepare_schema(self.engine, SERVICE)

    async def add_checkpoint(self, body: bytes) -> str:
        """The cosignature line for a submission, or Refused with the status tlog-witness prescribes."""
        try:
            request = parse_add_checkpoint(body)
            text, _ = _split_note(request.note)
            claimed = Checkpoint.from_text(text)  # only to find the log; trusted after the signature
        except CheckpointError as e:
            raise Refused(400, str(e), record=False) from None
        known = self.logs.get(claimed.origin)
        if known is None:
            raise Refused(404, f"unknown log origin {claimed.origin!r}", record=False)
        try:
            cp = Checkpoint.from_text(open_note(request.note, (known.key_name, known.key)))
        except CheckpointError as e:
            raise Refused(403, f"not signed by the log's key: {e}", record=False) from None
        try:
            return await self._witness(cp, text, request.old_size, request.proof, request.note)
        except Refused as refusal:
            if refusal.record:
                await self._record(cp, request.old_size, refusal, request.note)
            raise

    async def _witness(self, cp: Checkpoint, text: str, old: int, proof: list[bytes], note: str) -> str:
        if old > cp.size:
            raise Refused(400, f"old size {old} is larger than the checkpoint's size {cp.size}")
        if cp.size == 0 and cp.root_hash != merkle.EMPTY_ROOT:
            raise Refused(422, "a checkpoint of size 0 must have the empty tree's root")
        async with self._sessions() as session:
            seen = await session.get(WitnessedLog, cp.origin)
        seen_size = seen.size if seen is not None else 0
        if old != seen_size:
            raise Refused(409, f"old size {old} is not {seen_size}", body=f"{seen_size}\n")
        if old == 0:
            if proof:
                raise Refused(422, "old size 0 takes no consistency proof")
        elif old == cp.size:
            assert seen is not None
            if cp.root_hash != seen.root_hash:
                raise Refused(422, f"fork: a different root at size {old} than the one cosigned")
        else:
            assert seen is not None
            if not merkle.verify_consistency(old, cp.size, seen.root_hash, cp.root_hash, proof):
                raise Refused(422, f"fork: the consistency proof {old}->{cp.size} does not verify")
        line = cosign(text, self.name, self._key, int(time.time()))
        await self._advance(cp, seen, note + line)
        return line

    async def _advance(self, cp: Checkpoint, seen: WitnessedLog | None, note: str) -> None:
        """Record the new head only if nobody moved it since it was read (tlog-witness: checking
        the old size and persisting must be atomic, or a slower request could roll it back)."""
        values = {"size": cp.size, "root_hash": cp.root_hash, "note": note, "updated_at": utcnow()}
        async with self._sessions() as session, session.begin():
            if seen is None:
                dialect = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
                stmt = dialect(WitnessedLog).values(origin=cp.origin, **values).on_conflict_do_nothing()
            else:
                stmt = (
                    update(WitnessedLog)
                    .where(
                        WitnessedLog.origin == cp.origin,  # type: ignore[arg-type]
                        WitnessedLog.size == seen.size,  # type: ignore[arg-type]
                        WitnessedLog.root_hash == seen.root_hash,  # type: ignore[arg-type]
                    )
                    .values(**values)
                )
            moved = (await session.execute(stmt)).rowcount == 0  # type: ignore[attr-defined]
        if moved:
            async with self._sessions() as session:
                now = await session.get(WitnessedLog, cp.origin)
            size = now.size if now is not None else 0
            raise Refused(409, f"another submission moved the witness to size {size}", body=f"{size}\n")

    async def _record(self, cp: Checkpoint, old: int, refusal: Refused, note: str) -> None:
        log.warning(
            "refused a checkpoint of %s: %s", cp.origin, refusal.reason, extra={"size": cp.size, "old_size": old}
        )
        async with self._sessions() as session, session.begin():
            await session.execute(
                insert(WitnessRefusal).values(
                    origin=cp.origin,
                    old_size=old,
                    size=cp.size,
                    status=refusal.status,
                    reason=refusal.reason,
                    note=note,
                    refused_at=utcnow(),
                )
            )

    async def latest(self, origin_hash: str) -> str | None:
        for origin in self.logs:
            if hashlib.sha256(origin.encode()).hexdigest() == origin_hash:
                async with self._sessions() as session:
                    row = (await session.execute(select(WitnessedLog).where(WitnessedLog.origin == origin))).scalar()  # type: ignore[arg-type]
                return row.note if row is not None else None
        return None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = make_engine(settings.sqlalchemy_url(SERVICE))
    witness = Witness(settings.witness_name, witness_key(settings), known_logs(settings), engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await witness.init_db()
        log.info("witness %s for %s", witness.vkey, ", ".join(witness.logs) or "no logs (set WITNESS_LOGS)")
        try:
            yield
        finally:
            await witness.engine.dispose()

    app = FastAPI(
        title="gputrace witness",
        description="Cosigns a log's checkpoints only while they extend what it saw (C2SP tlog-witness).",
        lifespan=lifespan,
    )
    app.state.witness = witness

    @app.post("/add-checkpoint", summary="Submit a checkpoint with a consistency proof; get a cosignature")
    async def add_checkpoint(request: Request) -> PlainTextResponse:
        body = await request.body()
        if len(body) > MAX_BODY:
            REQUESTS.labels("413").inc()
            return PlainTextResponse("request body too large\n", status_code=413)
        try:
            line = await witness.add_checkpoint(body)
        except Refused as refusal:
            REQUESTS.labels(str(refusal.status)).inc()
            if refusal.body is not None:
                return PlainTextResponse(refusal.body, status_code=refusal.status, media_type=SIZE_MEDIA_TYPE)
            return PlainTextResponse(refusal.reason + "\n", status_code=refusal.status)
        REQUESTS.labels("200").inc()
        return PlainTextResponse(line)

    @app.get("/{origin_hash}/checkpoint", summary="The last checkpoint cosigned for a log (by SHA-256 of its origin)")
    async def checkpoint(origin_hash: str) -> PlainTextResponse:
        note = await witness.latest(origin_hash)
        if note is None:
            return PlainTextResponse("no checkpoint cosigned for that log\n", status_code=404)
        return PlainTextResponse(note)

    @app.get("/public-key", summary="The witness's name and cosignature vkey")
    async def public_key() -> dict[str, str]:
        return {"name": witness.name, "vkey": witness.vkey}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": SERVICE}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> PlainTextResponse:
        # Ready when it can record what it cosigns: without its database it must not cosign.
        try:
            async with witness.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error: not ready, say why
            return PlainTextResponse(f"database unreachable: {type(exc).__name__}\n", status_code=503)
        return PlainTextResponse("ready\n")

    app.mount("/metrics", make_asgi_app())
    return app


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    try:
        app = create_app(settings)
    except WitnessConfigError as exc:
        raise SystemExit(f"witness: {exc}") from None
    refuse_older_schema(settings.sqlalchemy_url(SERVICE), SERVICE)
    uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_config=None)


if __name__ == "__main__":
    main()
