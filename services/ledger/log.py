"""The ledger's RFC 9162 Merkle log in SQL: entries, complete-subtree nodes, signed checkpoints.

One writer at a time (a PostgreSQL advisory lock, or SQLite's single writer) appends with
contiguous leaf indices from the log head row, never from a sequence. The tables refuse UPDATE
and DELETE by trigger, so even the service's own code cannot rewrite history.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import Checkpoint, sign_checkpoint
from sqlalchemy import Column, LargeBinary, Text, insert, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import Field, SQLModel, col
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract.cloudevents import canonical_json
from shared.runtime.db import utcnow

WRITER_LOCK = 0x6770_7574_7261_6365  # "gputrace"


class LogHead(SQLModel, table=True):
    """One row: the size of the log. Locked by the writer; the only mutable ledger row."""

    __tablename__ = "log_head"

    id: int = Field(default=1, primary_key=True)
    size: int = 0


class LogEntry(SQLModel, table=True):
    __tablename__ = "log_entries"

    leaf_index: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    decision_id: str = Field(unique=True, max_length=64)
    # The canonical JSON (RFC 8785) that the leaf hash covers, stored byte for byte.
    entry: str = Field(sa_column=Column(Text, nullable=False))
    leaf_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False, index=True))
    # Index columns derived from the entry, for queries; not part of the hash.
    service: str = Field(max_length=40)
    event_type: str = Field(max_length=100)
    status: str = Field(max_length=20)
    batch_id: str | None = Field(default=None, index=True, max_length=200)
    aggregate_id: str | None = Field(default=None, index=True, max_length=200)
    party_id: str | None = Field(default=None, index=True, max_length=200)
    appended_at: datetime = Field(default_factory=utcnow)


class LogNode(SQLModel, table=True):
    """Hash of the complete subtree covering leaves [index·2^level, (index+1)·2^level)."""

    __tablename__ = "log_nodes"

    level: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    idx: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class SignedCheckpoint(SQLModel, table=True):
    __tablename__ = "log_checkpoints"

    size: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    root_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    note: str = Field(sa_column=Column(Text, nullable=False))
    signed_at: datetime = Field(default_factory=utcnow)


LOG_TABLES = [LogHead.__table__, LogEntry.__table__, LogNode.__table__, SignedCheckpoint.__table__]
APPEND_ONLY = ("log_entries", "log_nodes", "log_checkpoints")


async def install_append_only_guards(conn: AsyncConnection) -> None:
    """UPDATE, DELETE (and TRUNCATE) on the log tables are refused by the database itself."""
    if conn.dialect.name == "postgresql":
        await conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION gputrace_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN RAISE EXCEPTION 'ledger table % is append-only (% refused)', TG_TABLE_NAME, TG_OP; END $$"
            )
        )
        for table in APPEND_ONLY:
            await conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}"))
            await conn.execute(
                text(
                    f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                    "FOR EACH ROW EXECUTE FUNCTION gputrace_append_only()"
                )
            )
            await conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}"))
            await conn.execute(
                text(
                    f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION gputrace_append_only()"
                )
            )
            # ALWAYS: the guards fire even in replica mode (session_replication_role), which
            # would otherwise silence them for anyone allowed to set it.
            for trigger in (f"{table}_append_only", f"{table}_no_truncate"):
                await conn.execute(text(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}"))
    else:
        for table in APPEND_ONLY:
            for op in ("UPDATE", "DELETE"):
                await conn.execute(
                    text(
                        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                        f"BEGIN SELECT RAISE(ABORT, 'ledger table {table} is append-only ({op} refused)'); END"
                    )
                )


@dataclass
class Appended:
    leaf_index: int
    leaf_hash: bytes


class LogWriter:
    """Appends within the caller's transaction. Created per batch: `open` takes the writer lock
    and rebuilds the right-edge frontier with O(log n) node reads."""

    def __init__(self, session: AsyncSession, head: LogHead, frontier: merkle.Frontier) -> None:
        self._session = session
        self._head = head
        self._frontier = frontier
        self.start_size = head.size
        # Written in two bulk INSERTs by finish(), not one ORM object at a time.
        self._entries: list[dict[str, Any]] = []
        self._nodes: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, session: AsyncSession) -> LogWriter:
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITER_LOCK})
        head = (await session.execute(select(LogHead).where(LogHead.id == 1).with_for_update())).scalar_one_or_none()
        if head is None:
            head = LogHead(id=1, size=0)
            session.add(head)
            await session.flush()
        nodes = await fetch_nodes(session, merkle.frontier_coords(head.size))
        return cls(session, head, merkle.Frontier.from_nodes(head.size, nodes))

    @property
    def size(self) -> int:
        return self._frontier.size

    def append(self, entry: dict[str, Any], **index_columns: Any) -> Appended:
        body = canonical_json(entry)
        leaf = merkle.leaf_hash(body)
        index = self._frontier.size
        self._nodes.extend({"level": lvl, "idx": i, "hash": h} for lvl, i, h in self._frontier.append(leaf))
        self._entries.append(
            {
                "leaf_index": index,
                "decision_id": entry["decision_id"],
                "entry": body.decode(),
                "leaf_hash": leaf,
                "appended_at": utcnow(),
                **index_columns,
            }
        )
        return Appended(index, leaf)

    def root(self) -> bytes:
        return self._frontier.root()

    async def finish(self, origin: str, key_name: str, key: Ed25519PrivateKey) -> SignedCheckpoint | None:
        """Advance the head and sign a checkpoint for the new size (one per batch of appends)."""
        if self._frontier.size == self.start_size:
            return None
        await self._session.execute(insert(LogEntry), self._entries)
        await self._session.execute(insert(LogNode), self._nodes)
        self._entries, self._nodes = [], []
        root = self._frontier.root()
        await _check_consistent_with_last(self._session, self._frontier.size, root)
        self._head.size = self._frontier.size
        self._session.add(self._head)
        note = sign_checkpoint(Checkpoint(origin=origin, size=self._frontier.size, root_hash=root), key_name, key)
        cp = SignedCheckpoint(size=self._frontier.size, root_hash=root, note=note)
        self._session.add(cp)
        await self._session.flush()
        return cp


async def _check_consistent_with_last(session: AsyncSession, size: int, root: bytes) -> None:
    """Refuse to sign a checkpoint that does not extend the last one signed: a log that signs
    two inconsistent checkpoints has forked, whatever the cause (tampered nodes, a bug)."""
    last = (
        await session.execute(select(SignedCheckpoint).order_by(col(SignedCheckpoint.size).desc()).limit(1))
    ).scalar_one_or_none()
    if last is None:
        return
    coords = merkle.consistency_proof_coords(last.size, size)
    nodes = await fetch_nodes(session, coords)
    proof = merkle.consistency_proof(last.size, size, nodes)
    if not merkle.verify_consistency(last.size, size, last.root_hash, root, proof):
        raise RuntimeError(f"log of size {size} is not consistent with the checkpoint at size {last.size}")


async def fetch_nodes(session: AsyncSession, coords: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """One query for a handful of nodes (a proof needs O(log n) of them)."""
    if not coords:
        return {}
    wanted = set(coords)
    rows = (
        await session.execute(
            select(LogNode.level, LogNode.idx, LogNode.hash).where(
                tuple_(col(LogNode.level), col(LogNode.idx)).in_(sorted(wanted))
            )
        )
    ).all()
    found = {(lvl, i): bytes(h) for lvl, i, h in rows}
    missing = wanted - found.keys()
    if missing:
        raise LookupError(f"log nodes missing: {sorted(missing)[:5]}")
    return found


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
