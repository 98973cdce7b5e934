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

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import Checkpoint, sign_checkpoint
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    ScalarSelect,
    Select,
    Text,
    inspect,
    select,
    text,
    tuple_,
)
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import Session, SessionTransaction
from sqlmodel import Field, SQLModel, col
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.contract.cloudevents import canonical_json
from shared.runtime.aggregates import insert_many
from shared.runtime.db import utcnow

WRITER_LOCK = 0x6770_7574_7261_6365  # "gputrace"


class LogHead(SQLModel, table=True):
    """One row: the size of the log. Locked by the writer; the only mutable ledger row."""

    __tablename__ = "log_head"

    id: int = Field(default=1, primary_key=True)
    size: int = 0


class LogEntry(SQLModel, table=True):
    __tablename__ = "log_entries"
    # Lookup by leaf hash below a tree size, first index first: one index range, whatever the
    # planner's statistics say (with the hash alone it may walk the primary key instead).
    __table_args__ = (Index("ix_log_entries_leaf_hash_index", "leaf_hash", "leaf_index"),)

    leaf_index: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    decision_id: str = Field(unique=True, max_length=64)
    # The canonical JSON (RFC 8785) that the leaf hash covers, stored byte for byte.
    entry: str = Field(sa_column=Column(Text, nullable=False))
    leaf_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
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


class LogCosignature(SQLModel, table=True):
    """A witness's cosignature line on the checkpoint of one size, as the witness returned it and the
    ledger verified it (services/ledger/witnessing.py); served appended to that checkpoint's note."""

    __tablename__ = "log_cosignatures"
    # The last size each witness cosigned (witnessing.py), without reading every row (migration 0002).
    __table_args__ = (Index("ix_log_cosignatures_key_size", "key_id", "size"),)

    size: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    key_id: str = Field(primary_key=True, max_length=8, description="hex of the witness's cosignature key id")
    witness: str = Field(max_length=300)
    line: str = Field(sa_column=Column(Text, nullable=False))
    timestamp: int = Field(sa_column=Column(BigInteger, nullable=False))
    received_at: datetime = Field(default_factory=utcnow)


LOG_TABLES = [
    LogHead.__table__,
    LogEntry.__table__,
    LogNode.__table__,
    SignedCheckpoint.__table__,
    LogCosignature.__table__,
]
APPEND_ONLY = ("log_entries", "log_nodes", "log_checkpoints")


def guard_statements(dialect: str) -> list[str]:
    """The SQL of the append-only guards: UPDATE, DELETE (and TRUNCATE) on the log tables are
    refused by the database itself, and the head's size can only grow. The ledger's baseline
    migration (services/ledger/migrations/0001_baseline.py) runs these; a change to the guards is a
    new revision carrying its own SQL, not an edit here."""
    if dialect != "postgresql":
        return [
            *(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'ledger table {table} is append-only ({op} refused)'); END"
                for table in APPEND_ONLY
                for op in ("UPDATE", "DELETE")
            ),
            "CREATE TRIGGER IF NOT EXISTS log_head_grows BEFORE UPDATE ON log_head "
            "WHEN NEW.size < OLD.size OR NEW.id <> OLD.id "
            "BEGIN SELECT RAISE(ABORT, 'ledger log head can only grow (UPDATE refused)'); END",
            "CREATE TRIGGER IF NOT EXISTS log_head_no_delete BEFORE DELETE ON log_head "
            "BEGIN SELECT RAISE(ABORT, 'ledger log head can only grow (DELETE refused)'); END",
        ]
    sql = [
        "CREATE OR REPLACE FUNCTION gputrace_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'ledger table % is append-only (% refused)', TG_TABLE_NAME, TG_OP; END $$"
    ]
    for table in APPEND_ONLY:
        sql += [
            f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}",
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION gputrace_append_only()",
            f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION gputrace_append_only()",
        ]
        # ALWAYS: the guards fire even in replica mode (session_replication_role), which
        # would otherwise silence them for anyone allowed to set it.
        sql += [
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {t}" for t in (f"{table}_append_only", f"{table}_no_truncate")
        ]
    # The head may only grow: lowering it (or deleting it) would make the next appends
    # overwrite leaf indices and quietly start a shorter log.
    sql.append(
        "CREATE OR REPLACE FUNCTION gputrace_head_grows() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN IF TG_OP <> 'UPDATE' OR NEW.size < OLD.size OR NEW.id <> OLD.id THEN "
        "RAISE EXCEPTION 'ledger log head can only grow (% refused)', TG_OP; END IF; RETURN NEW; END $$"
    )
    for name, when in (("grows", "UPDATE OR DELETE"), ("no_truncate", "TRUNCATE")):
        each = "STATEMENT" if when == "TRUNCATE" else "ROW"
        sql += [
            f"DROP TRIGGER IF EXISTS log_head_{name} ON log_head",
            f"CREATE TRIGGER log_head_{name} BEFORE {when} ON log_head "
            f"FOR EACH {each} EXECUTE FUNCTION gputrace_head_grows()",
            f"ALTER TABLE log_head ENABLE ALWAYS TRIGGER log_head_{name}",
        ]
    return sql


SQLITE_GUARD_TRIGGERS = (
    *(f"{t}_no_{op}" for t in APPEND_ONLY for op in ("update", "delete")),
    "log_head_grows",
    "log_head_no_delete",
)


async def install_append_only_guards(conn: AsyncConnection) -> None:
    """At start-up, on a database kept by migrations (or not owned by this role: docs/ops.md): only
    check the guards are all there, and refuse to run on a log that has lost them; they are the
    migrations' to install. A ledger made without migrations (some tests) gets them here."""
    migrated = await conn.run_sync(lambda sync: inspect(sync).has_table("alembic_version_ledger"))
    if migrated or (conn.dialect.name == "postgresql" and not await _owns_log(conn)):
        missing = await missing_guards(conn)
        if missing:
            raise RuntimeError(f"the ledger's append-only triggers are missing: {', '.join(missing)}")
        return
    for statement in guard_statements(conn.dialect.name):
        await conn.execute(text(statement))


GUARD_TRIGGERS = (
    *(f"{t}_{kind}" for t in APPEND_ONLY for kind in ("append_only", "no_truncate")),
    "log_head_grows",
    "log_head_no_truncate",
)


async def _owns_log(conn: AsyncConnection) -> bool:
    owner = await conn.scalar(text("SELECT tableowner FROM pg_tables WHERE tablename = 'log_entries'"))
    return owner is None or owner == await conn.scalar(text("SELECT current_user"))


async def missing_guards(conn: AsyncConnection) -> list[str]:
    """The guard triggers that are absent (on PostgreSQL: or not enabled ALWAYS, 'A')."""
    if conn.dialect.name != "postgresql":
        rows = await conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
        present = {name for (name,) in rows}
        return [t for t in SQLITE_GUARD_TRIGGERS if t not in present]
    rows = await conn.execute(
        text("SELECT tgname FROM pg_trigger WHERE tgname = ANY(:names) AND tgenabled = 'A'"),
        {"names": list(GUARD_TRIGGERS)},
    )
    present = {name for (name,) in rows}
    return [t for t in GUARD_TRIGGERS if t not in present]


def runtime_grants(role: str) -> list[str]:
    """SQL giving the ledger's run-time role what it needs and no more: rows, not tables. Not the
    owner, it cannot DROP or DISABLE the triggers (or the tables); the triggers refuse its
    UPDATE/DELETE on the log. The owner runs these after creating the schema (docs/ops.md)."""
    quoted = '"' + role.replace('"', '""') + '"'
    return [
        f"GRANT USAGE ON SCHEMA public TO {quoted}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}",
    ]


@dataclass
class Appended:
    leaf_index: int
    leaf_hash: bytes


class LogWriter:
    """Appends within the caller's transaction. Created per batch: `open` takes the writer lock
    and rebuilds the right-edge frontier with O(log n) node reads. Opened outside any savepoint
    (a savepoint's rollback would release the lock); appends made inside a savepoint that rolls
    back are undone, frontier and all."""

    def __init__(self, session: AsyncSession, head: LogHead, frontier: merkle.Frontier) -> None:
        self._session = session
        self._head = head
        self._frontier = frontier
        self.start_size = head.size
        # Written in two bulk INSERTs by finish(), not one ORM object at a time.
        self._entries: list[dict[str, Any]] = []
        self._nodes: list[dict[str, Any]] = []
        # Per savepoint that appended: the state before its first append (frontier size and
        # hashes, entries, nodes), restored if it rolls back.
        self._marks: list[tuple[SessionTransaction, int, list[bytes], int, int]] = []
        sa_event.listen(session.sync_session, "after_soft_rollback", self._rolled_back)

    @classmethod
    async def open(cls, session: AsyncSession) -> LogWriter:
        if session.sync_session.in_nested_transaction():
            raise RuntimeError("the log writer must be opened outside any savepoint: its rollback frees the lock")
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

    def _remember(self) -> None:
        savepoint = self._session.sync_session.get_nested_transaction()
        if savepoint is not None and not (self._marks and self._marks[-1][0] is savepoint):
            f = self._frontier
            self._marks.append((savepoint, f.size, f.hashes(), len(self._entries), len(self._nodes)))

    def _rolled_back(self, _: Session, transaction: SessionTransaction) -> None:
        """A savepoint (or the transaction) rolled back: forget what was appended within it."""
        for i, (savepoint, size, hashes, entries, nodes) in enumerate(self._marks):
            if _within(savepoint, transaction):
                coords = merkle.frontier_coords(size)
                self._frontier = merkle.Frontier.from_nodes(size, dict(zip(coords, hashes, strict=True)))
                del self._entries[entries:], self._nodes[nodes:], self._marks[i:]
                return

    def append(self, entry: dict[str, Any], body: bytes | None = None, **index_columns: Any) -> Appended:
        """Append `entry`; `body`, when given, is canonical_json(entry) already made (the appender
        builds it from the decision's own canonical form, CloudEvent.canonical_with_data)."""
        self._remember()
        body = canonical_json(entry) if body is None else body
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
        # Straight through psycopg on PostgreSQL (shared.runtime.aggregates.insert_many): a batch's
        # entries and nodes cost a prepared statement each, not SQLAlchemy's per-row processing.
        await insert_many(self._session, LogEntry.__table__, self._entries)  # type: ignore[attr-defined]
        await insert_many(self._session, LogNode.__table__, self._nodes)  # type: ignore[attr-defined]
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


def _within(transaction: SessionTransaction | None, ancestor: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


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


# The API's hot reads on PostgreSQL: fixed statement texts run on the driver's connection, which
# psycopg prepares server-side after a few uses. Through SQLAlchemy, the expanding IN of (level, idx)
# pairs cost ~2.5 ms of CPU per proof (measured at 10^6 entries), five times the query itself. The
# head's size rides on every row, so a proof is one round trip. tests/test_query_plans.py EXPLAINs them.
PG_HEAD = "SELECT size FROM log_head WHERE id = 1"
PG_NODES = (
    f"SELECT ({PG_HEAD}), n.level, n.idx, n.hash FROM unnest(%s::integer[], %s::bigint[]) AS c(level, idx) "
    "JOIN log_nodes n ON n.level = c.level AND n.idx = c.idx"
)
PG_ENTRIES = (
    f"SELECT leaf_index, entry, leaf_hash, ({PG_HEAD}) FROM log_entries "
    "WHERE leaf_index >= %s AND leaf_index < %s ORDER BY leaf_index"
)
PG_LEAF = (
    f"SELECT ({PG_HEAD}), (SELECT leaf_index FROM log_entries WHERE leaf_hash = %s AND leaf_index < %s "
    "ORDER BY leaf_index LIMIT 1)"
)
Reader = AsyncConnection | AsyncSession


async def _pg(conn: AsyncConnection, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    raw = (await conn.get_raw_connection()).driver_connection
    try:
        cur = await raw.execute(sql, params)
        return await cur.fetchall()
    except psycopg.OperationalError:
        if raw.broken or raw.closed:
            # Past SQLAlchemy, so tell its pool: this connection is dead, never hand it out again.
            await conn.invalidate()
        raise


def _on_pg(conn: Reader) -> bool:
    return isinstance(conn, AsyncConnection) and conn.dialect.name == "postgresql"


def leaf_lookup_query(leaf_hash: bytes, tree_size: int) -> Select[tuple[int]]:
    """The first leaf with this hash below tree_size (ix_log_entries_leaf_hash_index answers it)."""
    return (
        select(LogEntry.leaf_index)
        .where(LogEntry.leaf_hash == leaf_hash, col(LogEntry.leaf_index) < tree_size)
        .order_by(col(LogEntry.leaf_index))
        .limit(1)
    )


def entries_query(start: int, end: int) -> Select[tuple[int, str, bytes]]:
    return (
        select(LogEntry.leaf_index, LogEntry.entry, LogEntry.leaf_hash)
        .where(col(LogEntry.leaf_index) >= start, col(LogEntry.leaf_index) < end)
        .order_by(col(LogEntry.leaf_index))
    )


def head_size() -> ScalarSelect[int]:
    """The committed log size, as a scalar subquery (0 rows before the first append)."""
    return select(LogHead.size).where(LogHead.id == 1).scalar_subquery()


async def current_size(conn: Reader) -> int:
    """The log's size from the head row: every leaf below it, and its nodes, are committed."""
    if _on_pg(conn):
        rows = await _pg(conn, PG_HEAD, ())  # type: ignore[arg-type]
        return rows[0][0] if rows else 0
    return (await conn.execute(select(LogHead.size).where(LogHead.id == 1))).scalar() or 0


async def size_and_nodes(conn: Reader, coords: Sequence[tuple[int, int]]) -> tuple[int, dict[tuple[int, int], bytes]]:
    """The head's size and the nodes at `coords` in ONE round trip, for the API's proofs. Nodes
    missing are left out: the caller checks the size first (coords beyond it are a 416, not
    storage damage), then that every node was found."""
    if not coords:
        return await current_size(conn), {}
    if _on_pg(conn):
        # As array literals (text), not lists: psycopg's list dumper cost ~0.1 ms of CPU per proof.
        levels, idxs = (
            "{" + ",".join(str(lvl) for lvl, _ in coords) + "}",
            "{" + ",".join(str(i) for _, i in coords) + "}",
        )
        rows = await _pg(conn, PG_NODES, (levels, idxs))  # type: ignore[arg-type]
    else:
        query = select(head_size(), LogNode.level, LogNode.idx, LogNode.hash).where(
            tuple_(col(LogNode.level), col(LogNode.idx)).in_(sorted(set(coords)))
        )
        rows = [tuple(r) for r in (await conn.execute(query)).all()]
    size = rows[0][0] if rows else await current_size(conn)
    return size or 0, {(lvl, i): bytes(h) for _, lvl, i, h in rows}


async def entries_and_size(conn: Reader, start: int, end: int) -> tuple[list[tuple[int, str, bytes]], int]:
    """Entries [start, end) and the head's size, in one round trip."""
    if _on_pg(conn):
        rows = await _pg(conn, PG_ENTRIES, (start, end))  # type: ignore[arg-type]
    else:
        rows = [tuple(r) for r in (await conn.execute(entries_query(start, end).add_columns(head_size()))).all()]
    size = rows[0][3] if rows else await current_size(conn)
    return [(i, e, bytes(h)) for i, e, h, _ in rows], size or 0


async def size_and_leaf_index(conn: Reader, leaf_hash: bytes, tree_size: int) -> tuple[int, int | None]:
    """The head's size and the first leaf with this hash below tree_size, in one round trip."""
    if _on_pg(conn):
        size, index = (await _pg(conn, PG_LEAF, (leaf_hash, tree_size)))[0]  # type: ignore[arg-type]
    else:
        lookup = leaf_lookup_query(leaf_hash, tree_size).scalar_subquery()
        size, index = (await conn.execute(select(head_size(), lookup))).one()
    return size or 0, index


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
