"""A per-batch cache of the rows a batch's handlers read by primary key.

Without it every `session.get` of a handler costs a round trip and, worse, an autoflush of the
previous record's changes first: a batch of 500 events did 500 selects and 500 single-row
flushes. With it a service loads the rows its batch touches in one query (`load`) before the
first record is decided; `get` then answers from memory, including "no such row" for keys the
load did not find, and the batch's changes are flushed once, in bulk, at its end.

The cache lives on the session of one fast-path transaction (BatchProcessor attaches it). It is
never attached in safe mode: a savepoint rolled back would leave it stale, so there `get` is
plain `session.get`. Handlers add rows with `session.add` as usual; the cache sees them
(SQLAlchemy's transient_to_pending event), so a later record of the same batch finds a row an
earlier one created even though it is not flushed (pending rows are not in the identity map).

Replicas: every row a batch's transaction reads through the ORM (the cache's loads, `get`,
`session.get`, `select(Model)` and column selects of a service's tables) is locked `FOR UPDATE` on
PostgreSQL (`lock_rows_read`, attached by BatchProcessor to every batch's transaction, fast or
safe). Two replicas deciding events about one row are thus serialised: the second waits for the
first to commit and then reads the row as the first left it, so it can never decide on a stale
copy (lost update). One mechanism for every service, no version column to maintain. A deadlock
between two batches is an OperationalError like an outage: the batch is retried. SQLite
serialises its writers anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from psycopg import sql as pgsql
from sqlalchemy import Table, any_, bindparam, insert, inspect, select, tuple_
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapper, ORMExecuteState
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import Over
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Select, TableClause
from sqlmodel.ext.asyncio.session import AsyncSession

from shared.runtime.db import MECHANISM_TABLES

_CACHE = "gputrace.aggregates"
# Stay well below PostgreSQL's bind-parameter limit, as the idempotency-key query does.
_CHUNK = 500

T = TypeVar("T")


class AggregateCache:
    """Rows by (model, primary key); None records a key known to have no row."""

    def __init__(self, session: AsyncSession) -> None:
        self._rows: dict[tuple[type, tuple[Any, ...]], Any] = {}
        # Plain values a service keeps for the batch by name (`known`), e.g. a table's rows by key.
        self.values: dict[str, dict[Any, Any]] = {}
        # Upserts deferred to the batch's end (`upsert`): per (table, key columns, updated
        # columns), the rows by key, a later row of a key replacing the earlier one.
        self.upserts: dict[tuple[Table, tuple[str, ...], tuple[str, ...]], dict[Any, dict[str, Any]]] = {}
        # How many upserts were deferred: the BatchProcessor tells a handler's changes by it.
        self.deferred = 0
        # (model, column position) -> values for which every row was loaded (see load_where).
        self._complete: dict[tuple[type, int], set[Any]] = {}
        sa_event.listen(session.sync_session, "transient_to_pending", self._added)

    @classmethod
    def attach(cls, session: AsyncSession) -> AggregateCache:
        cache = session.info[_CACHE] = cls(session)
        return cache

    def _added(self, _: Any, instance: Any) -> None:
        mapper: Mapper[Any] = inspect(type(instance))
        key = tuple(mapper.primary_key_from_instance(instance))
        if None not in key:  # an autoincrement key is unknown until flushed; nobody gets it by key
            self._rows[(type(instance), key)] = instance

    def _known(self, model: type, key: tuple[Any, ...]) -> tuple[bool, Any]:
        if (model, key) in self._rows:
            return True, self._rows[(model, key)]
        for (m, position), values in self._complete.items():
            if m is model and key[position] in values:
                return True, None
        return False, None

    async def load(self, session: AsyncSession, model: type, keys: Iterable[Any]) -> None:
        """Load the rows of these primary keys (scalars, or tuples for a composite key) in one
        query; keys without a row are remembered as missing."""
        known = {k for m, k in self._rows if m is model}
        wanted = [k for k in dict.fromkeys(_as_tuple(k) for k in keys) if k not in known]
        columns = inspect(model).primary_key
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            where = columns[0].in_([k[0] for k in chunk]) if len(columns) == 1 else tuple_(*columns).in_(chunk)
            for row in (await session.execute(select(model).where(where))).scalars():
                self._rows[(model, _pk(row))] = row
            for key in chunk:
                self._rows.setdefault((model, key), None)

    async def load_where(self, session: AsyncSession, model: type, column: str, values: Iterable[Any]) -> None:
        """Load every row whose `column` (part of the primary key) is one of `values`; a key with
        such a value and no row is then known to be missing."""
        mapper: Mapper[Any] = inspect(model)
        position = [c.key for c in mapper.primary_key].index(column)
        done = self._complete.setdefault((model, position), set())
        wanted = [v for v in dict.fromkeys(values) if v not in done]
        for start in range(0, len(wanted), _CHUNK):
            chunk = wanted[start : start + _CHUNK]
            rows = await session.execute(select(model).where(mapper.columns[column].in_(chunk)))
            for row in rows.scalars():
                self._rows.setdefault((model, _pk(row)), row)
            done.update(chunk)

    async def get(self, session: AsyncSession, model: type[T], key: Any) -> T | None:
        known, row = self._known(model, _as_tuple(key))
        if known:
            return row
        row = await session.get(model, key)
        self._rows[(model, _as_tuple(key))] = row
        return row


def cache_of(session: AsyncSession) -> AggregateCache | None:
    return session.info.get(_CACHE)


async def get(session: AsyncSession, model: type[T], key: Any) -> T | None:
    """`session.get`, answered from the batch's cache when the batch has one."""
    cache = cache_of(session)
    return await cache.get(session, model, key) if cache else await session.get(model, key)


async def load(session: AsyncSession, model: type, keys: Iterable[Any]) -> None:
    """Prefetch by primary key for this batch; a no-op without a cache (safe mode, API reads)."""
    cache = cache_of(session)
    if cache:
        await cache.load(session, model, keys)


async def load_where(session: AsyncSession, model: type, column: str, values: Iterable[Any]) -> None:
    """Prefetch every row with one of these values in a primary-key column; no-op without a cache."""
    cache = cache_of(session)
    if cache:
        await cache.load_where(session, model, column, values)


def known(session: AsyncSession, name: str) -> dict[Any, Any] | None:
    """The batch's dict `name` of plain values a service reads and keeps up to date itself (its
    prefetch fills it; a later record sees what an earlier one wrote); None without a cache
    (safe mode), where the service reads the database."""
    cache = cache_of(session)
    return cache.values.setdefault(name, {}) if cache else None


async def upsert(
    session: AsyncSession, table: Table, row: dict[str, Any], keys: Sequence[str], update: Sequence[str]
) -> None:
    """INSERT `row`, or UPDATE its `update` columns if a row with its `keys` exists. On the fast
    path the write waits for the batch's end (`write_deferred`): one statement for all the batch's
    rows of this table instead of an ORM object and a flush per row. Without a cache (safe mode)
    it runs now, inside the record's savepoint, so a rolled-back record leaves nothing."""
    cache = cache_of(session)
    if cache is None:
        await session.execute(_upsert(session, table, keys, update), [row])
        return
    cache.deferred += 1
    rows = cache.upserts.setdefault((table, tuple(keys), tuple(update)), {})
    key = tuple(row[k] for k in keys)
    # Re-inserted at the end: the batch's rows go in the order of their last write.
    rows.pop(key, None)
    rows[key] = row


def deferred_writes(session: AsyncSession) -> int:
    """How many upserts this batch has deferred so far (0 without a cache)."""
    cache = cache_of(session)
    return cache.deferred if cache else 0


async def driver_cursor(session: AsyncSession) -> Any | None:
    """A psycopg cursor on the session's own connection, inside its transaction (and savepoint),
    or None when the database is not PostgreSQL. For the bulk writes of every batch: SQLAlchemy's
    per-row parameter processing and its ever-different multi-VALUES statements (which psycopg
    parses afresh each time) cost more than the work; psycopg's COPY, or its executemany (one
    prepared statement per row, pipelined), cost a fraction."""
    if session.bind is None or session.bind.dialect.name != "postgresql":
        return None
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection.cursor()  # type: ignore[union-attr]


def _insert_sql(table: Table, columns: Sequence[str], returning: str | None = None, suffix: str = "") -> Any:
    key = (table.name, tuple(columns), returning, suffix)
    stmt = _SQL.get(key)
    if stmt is None:
        stmt = pgsql.SQL("INSERT INTO {} ({}) VALUES ({}){}{}").format(
            pgsql.Identifier(table.name),
            pgsql.SQL(", ").join(map(pgsql.Identifier, columns)),
            pgsql.SQL(", ").join(pgsql.Placeholder() * len(columns)),
            pgsql.SQL(suffix),
            pgsql.SQL(" RETURNING {}").format(pgsql.Identifier(returning)) if returning else pgsql.SQL(""),
        )
        _SQL[key] = stmt
    return stmt


_SQL: dict[tuple[Any, ...], Any] = {}
_NEXTVALS = "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)"


def _copy_sql(table: Table, columns: Sequence[str]) -> Any:
    key = ("copy", table.name, tuple(columns))
    stmt = _SQL.get(key)
    if stmt is None:
        stmt = _SQL[key] = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
            pgsql.Identifier(table.name), pgsql.SQL(", ").join(map(pgsql.Identifier, columns))
        )
    return stmt


async def insert_many(
    session: AsyncSession, table: Table, rows: Sequence[dict[str, Any]], returning: str | None = None
) -> list[Any]:
    """INSERT these rows (dicts with the same keys) in the session's transaction, in order; with
    `returning`, that column of each row, in the rows' order. PostgreSQL: psycopg's COPY, or its
    executemany with `returning` (driver_cursor); elsewhere a SQLAlchemy Core insert."""
    if not rows:
        return []
    columns = list(rows[0])
    cursor = await driver_cursor(session)
    if cursor is None:
        stmt = insert(table)
        if returning is None:
            await session.execute(stmt, list(rows))
            return []
        result = await session.execute(stmt.returning(table.c[returning], sort_by_parameter_order=True), list(rows))
        return list(result.scalars())
    params = [tuple(r[c] for c in columns) for r in rows]
    async with cursor:
        ids: list[Any] = []
        if returning is not None:
            # A serial key's values drawn first (ascending, so in the rows' order), then COPY.
            await cursor.execute(_NEXTVALS, (table.name, returning, len(params)))
            ids = sorted(r[0] for r in await cursor.fetchall() if r[0] is not None)
            if len(ids) == len(params):
                columns, params = [returning, *columns], [(i, *p) for i, p in zip(ids, params, strict=True)]
            else:  # not a serial column: executemany ... RETURNING below
                ids = []
        if returning is None or ids:
            # COPY: the cheapest way in.
            async with cursor.copy(_copy_sql(table, columns)) as copy:
                for row in params:
                    await copy.write_row(row)
            return ids
        await cursor.executemany(_insert_sql(table, columns, returning), params, returning=True)
        out = []
        while True:
            row = await cursor.fetchone()
            out.append(row[0] if row else None)
            if not cursor.nextset():
                return out


async def upsert_many(
    session: AsyncSession, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str], update: Sequence[str]
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET the `update` columns, for these rows (a key at
    most once). PostgreSQL: psycopg's executemany; elsewhere a SQLAlchemy Core upsert."""
    if not rows:
        return
    cursor = await driver_cursor(session)
    if cursor is None:
        await session.execute(_upsert(session, table, keys, update), list(rows))
        return
    columns = list(rows[0])
    conflict = pgsql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
        pgsql.SQL(", ").join(map(pgsql.Identifier, keys)),
        pgsql.SQL(", ").join(pgsql.SQL("{0} = EXCLUDED.{0}").format(pgsql.Identifier(c)) for c in update),
    )
    stmt = _insert_sql(table, columns, None, conflict.as_string(None))
    async with cursor:
        await cursor.executemany(stmt, [tuple(r[c] for c in columns) for r in rows])


async def write_deferred(session: AsyncSession) -> None:
    """The batch's deferred upserts, one statement per table (called by the BatchProcessor once
    the batch's records are decided, before its outbox rows). A key appears once per statement:
    PostgreSQL refuses an upsert that would touch a row twice."""
    cache = cache_of(session)
    if cache is None:
        return
    upserts, cache.upserts = cache.upserts, {}
    for (table, keys, update), rows in upserts.items():
        await upsert_many(session, table, list(rows.values()), keys, update)


def _upsert(session: AsyncSession, table: Table, keys: Sequence[str], update: Sequence[str]) -> Any:
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    stmt = (pg_insert if dialect == "postgresql" else sqlite_insert)(table)
    return stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in update})


def among(session: AsyncSession, column: Any, values: list[Any]) -> Any:
    """`column IN values`; on PostgreSQL `column = ANY(array)`, one parameter: the same statement
    text for every batch, which SQLAlchemy and psycopg cache (an IN list of 500 is not)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=ARRAY(column.type)))
    return column.in_(values)


def strings(values: Iterable[Any]) -> list[str]:
    """The non-empty strings among ids taken from events' data, for a prefetch: the data is not
    validated yet, and a malformed value must not break the batch's query."""
    return [v for v in values if isinstance(v, str) and v]


def _as_tuple(key: Any) -> tuple[Any, ...]:
    return tuple(key) if isinstance(key, tuple | list) else (key,)


def _pk(row: Any) -> tuple[Any, ...]:
    return tuple(inspect(type(row)).primary_key_from_instance(row))


# The runtime's own rows (idempotency keys, failure counts, outbox) are never a domain aggregate.
_UNLOCKED = frozenset(t.name for t in MECHANISM_TABLES)


def lock_rows_read(session: AsyncSession) -> None:
    """For this session's transaction: every ORM read of a service's table takes the rows FOR
    UPDATE (PostgreSQL), so no other replica's transaction can change them until this one ends."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        sa_event.listen(session.sync_session, "do_orm_execute", _lock_reads)


def _lock_reads(state: ORMExecuteState) -> None:
    if state.is_select and not state.is_column_load and not state.is_relationship_load:
        if _lockable(state.statement):
            state.statement = state.statement.with_for_update()  # type: ignore[attr-defined]


def _lockable(stmt: Any) -> bool:
    """A plain SELECT of rows of a service's tables: PostgreSQL refuses FOR UPDATE with GROUP
    BY, DISTINCT, aggregates or windows, and a join or subquery would lock more than asked."""
    if not isinstance(stmt, Select) or stmt._for_update_arg is not None:
        return False
    # Private attributes, but the only way to see these clauses on a built statement.
    if stmt._group_by_clauses or stmt._having_criteria or stmt._distinct or stmt._setup_joins:
        return False
    froms = stmt.get_final_froms()
    if not froms or not all(isinstance(f, TableClause) and f.name not in _UNLOCKED for f in froms):
        return False
    return not any(isinstance(e, FunctionElement | Over) for c in stmt.selected_columns for e in visitors.iterate(c))
