"""The Merkle log as auditors read it: signed checkpoints, the public key, raw entries and proofs.

Everything here is evidence the auditor re-checks, so the routes serve stored bytes and stored
hashes as they are and never recompute what the client is meant to recompute: `entries` gives
the canonical JSON exactly as it was hashed, alongside the leaf hash the server believes in.

Proofs are built for any tree size up to the current one from the stored complete subtrees,
O(log n) node reads each (`merkle.*_coords` + `fetch_nodes`).

Roles: auditor and ops read the log (it holds every party's decisions, so partners do not);
the public key is public, since auditors are meant to obtain it out of band anyway.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import make_vkey
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.ledger.api import BIGINT_MAX, FORBIDDEN, MALFORMED, NO_TOKEN, Conn, RefuseMalformed, refusals
from services.ledger.auth import require
from services.ledger.log import (
    LogHead,
    SignedCheckpoint,
    b64,
    current_size,
    entries_and_size,
    size_and_leaf_index,
    size_and_nodes,
)
from services.ledger.responses import CheckpointJSON, ConsistencyProof, Entry, InclusionProof, PublicKey
from services.ledger.witnessing import cosigned_note, latest_witnessed
from shared.contract.parties import load_private_key

MAX_ENTRIES = 1000  # per /entries call; clients page (the auditor CLI does)
NOTE_MEDIA_TYPE = "text/plain; charset=utf-8"

log_router = APIRouter(prefix="/v1/log", tags=["log"], route_class=RefuseMalformed)
_READERS = require("auditor", "ops")
# Not router-wide: the public key is public and takes no parameters.
_REFUSALS = {400: MALFORMED, 401: NO_TOKEN, 403: FORBIDDEN}
_BEYOND = "Beyond the current log size: the log has not grown that far (yet)"


async def _session(request: Request):  # type: ignore[no-untyped-def]
    async with request.app.state.sessions() as session:
        yield session


Session = Annotated[AsyncSession, Depends(_session)]
Format = Annotated[Literal["note", "json"], Query(description="`note` (text/plain signed note) or `json`")]


_CHECKPOINT_CONTENT: dict[str, Any] = {
    "description": "The signed note (`format=note`, the default) or its parts (`format=json`)",
    "model": CheckpointJSON,
    "content": {"text/plain": {"schema": {"type": "string"}}},
}
# Sizes and indexes: BIGINT at most, so a query can always be built; the routes check them
# against the log's current size (416 beyond it).
Size = Annotated[int, Query(ge=0, le=BIGINT_MAX)]
# Standard base64 of 32 bytes is always 43 characters and one "=".
LEAF_HASH_PATTERN = r"^[A-Za-z0-9+/]{43}=$"


# --------------------------------------------------------------------------- helpers


async def _current_size(session: AsyncSession) -> int:
    """The log's size from the head row: every leaf below it, and its nodes, are committed."""
    head = await session.get(LogHead, 1)
    return head.size if head is not None else 0


def _bad(detail: str) -> HTTPException:
    return HTTPException(400, detail)


def _beyond(what: str, value: int, size: int) -> HTTPException:
    # 416: the request is well formed but the log has not grown that far (yet); retry later.
    return HTTPException(416, f"{what} {value} is beyond the current log size {size}")


def _check_tree_size(tree_size: int, size: int) -> None:
    if tree_size < 1:
        raise _bad(f"tree_size must be at least 1, got {tree_size}")
    if tree_size > size:
        raise _beyond("tree_size", tree_size, size)


async def _checkpoint_response(session: AsyncSession, cp: SignedCheckpoint, fmt: str) -> Response:
    # The note as signed, with the witnesses' cosignature lines appended (services.ledger.witnessing).
    note = await cosigned_note(session, cp)
    if fmt == "json":
        return JSONResponse(
            {"size": cp.size, "root_hash": b64(cp.root_hash), "note": note, "signed_at": cp.signed_at.isoformat()}
        )
    return PlainTextResponse(note, media_type=NOTE_MEDIA_TYPE)


def _decoded_or_none(value: str | None) -> bytes | None:
    try:
        return None if value is None else _decode_hash(value)
    except HTTPException:
        return None


def _complete(nodes: dict[tuple[int, int], bytes], coords: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """Every node below the head exists: one missing is storage damage, never a shorter proof."""
    missing = set(coords) - nodes.keys()
    if missing:
        raise LookupError(f"log nodes missing: {sorted(missing)[:5]}")
    return nodes


def _decode_hash(value: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, and the ValueError non-ASCII text raises
        raise _bad("leaf_hash is not standard base64 (remember to URL-encode '+' and '/')") from None
    if len(raw) != merkle.HASH_SIZE:
        raise _bad(f"leaf_hash must decode to {merkle.HASH_SIZE} bytes, got {len(raw)}")
    return raw


def _no_leaf(tree_size: int) -> HTTPException:
    return HTTPException(404, f"no leaf with that hash in the tree of size {tree_size}")


def _json(content: Any) -> Response:
    # The hot routes build their body as plain dicts: the same JSON as their model would give,
    # without a pydantic round trip per request (`response_model` still documents the shape).
    return JSONResponse(content)


# Built once: building a select per request costs more CPU than running it.
LATEST_CHECKPOINT = select(SignedCheckpoint).order_by(col(SignedCheckpoint.size).desc()).limit(1)


# --------------------------------------------------------------------------- routes


@log_router.get(
    "/checkpoint",
    summary="The latest signed checkpoint (C2SP tlog-checkpoint signed note)",
    dependencies=[_READERS],
    responses={
        200: _CHECKPOINT_CONTENT,
        **refusals({**_REFUSALS, 404: "The log is empty: no checkpoint signed yet"}),
    },
)
async def get_checkpoint(
    request: Request,
    session: Session,
    format: Format = "note",
    witnessed: Annotated[
        bool,
        Query(
            description="The latest checkpoint cosigned by every witness the ledger uses (the newest may still be "
            "on its way to them); the latest checkpoint if none is"
        ),
    ] = False,
) -> Response:
    # No witnesses configured (or an app without them): the latest checkpoint, as without the flag.
    key_ids = getattr(request.app.state, "witness_key_ids", [])
    cp = await latest_witnessed(session, key_ids) if witnessed else None
    if cp is None:
        cp = (await session.exec(LATEST_CHECKPOINT)).first()
    if cp is None:
        raise HTTPException(404, "the log has not signed a checkpoint yet (it is empty)")
    return await _checkpoint_response(session, cp, format)


@log_router.get(
    "/checkpoints/{size}",
    summary="The checkpoint signed at a past size, if one was signed at exactly that size",
    dependencies=[_READERS],
    responses={
        200: _CHECKPOINT_CONTENT,
        **refusals({**_REFUSALS, 404: "No checkpoint was signed at exactly this size", 416: _BEYOND}),
    },
)
async def get_past_checkpoint(
    size: Annotated[int, Path(ge=0, le=BIGINT_MAX)], session: Session, format: Format = "note"
) -> Response:
    if size > await _current_size(session):
        # Checked first, so no query is built with a number the size column cannot hold.
        raise _beyond("size", size, await _current_size(session))
    cp = await session.get(SignedCheckpoint, size)
    if cp is None:
        raise HTTPException(404, f"no checkpoint was signed at size {size}")
    return await _checkpoint_response(session, cp, format)


@log_router.get(
    "/public-key",
    summary="The log's origin and Ed25519 verifier key (public)",
    # No token needed, but a query parameter is still refused (RefuseMalformed), in the Problem shape.
    responses=refusals({400: "A query parameter (this route takes none)"}),
)
async def get_public_key(request: Request) -> PublicKey:
    settings = request.app.state.settings
    public_key = getattr(request.app.state, "log_public_key", None)
    if public_key is None:
        # The service loaded (or generated) this key at start-up; read it once and keep it.
        public_key = request.app.state.log_public_key = load_private_key(settings.ledger_signing_key).public_key()
    # The appender signs with the origin as the key name, as C2SP recommends.
    origin = settings.ledger_origin
    raw = public_key.public_bytes_raw()
    return PublicKey(origin=origin, key_name=origin, vkey=make_vkey(origin, public_key), public_key=b64(raw))


@log_router.get(
    "/entries",
    summary=f"Entries [start, end) as the canonical JSON that was hashed (at most {MAX_ENTRIES} per call)",
    dependencies=[_READERS],
    responses=refusals({**_REFUSALS, 416: _BEYOND}),
    response_model=list[Entry],
)
async def get_entries(
    conn: Conn,
    start: Size,
    end: Annotated[
        int | None, Query(ge=1, le=BIGINT_MAX, description=f"exclusive; default min(start + {MAX_ENTRIES}, size)")
    ] = None,
) -> Response:
    size: int | None = None
    if end is None:
        # The default end depends on the size: read it first.
        size = await current_size(conn)
        end = min(start + MAX_ENTRIES, size)
        if start >= size:
            raise _beyond("start", start, size)
    if end <= start:
        raise _bad(f"end ({end}) must be greater than start ({start})")
    if end - start > MAX_ENTRIES:
        raise _bad(f"at most {MAX_ENTRIES} entries per call (asked for {end - start})")
    rows, head = await entries_and_size(conn, start, end)
    size = head if size is None else size
    if end > size:
        raise _beyond("end", end, size)
    if len(rows) != end - start:
        # Below the head every index exists; a gap is storage damage and must not look like success.
        raise HTTPException(500, f"log entries missing in [{start}, {end}): found {len(rows)}")
    return _json([{"leaf_index": i, "entry": entry, "leaf_hash": b64(h)} for i, entry, h in rows])


@log_router.get(
    "/proof/inclusion",
    summary="RFC 9162 inclusion proof of a leaf (by index or by leaf hash) in a tree of any past size",
    dependencies=[_READERS],
    responses=refusals({**_REFUSALS, 404: "No leaf with this hash in the tree of that size", 416: _BEYOND}),
    response_model=InclusionProof,
)
async def get_inclusion_proof(
    conn: Conn,
    tree_size: Annotated[int | None, Query(ge=1, le=BIGINT_MAX, description="default: the current size")] = None,
    leaf_index: Annotated[int | None, Query(ge=0, le=BIGINT_MAX)] = None,
    leaf_hash: Annotated[
        str | None,
        Query(
            min_length=44,
            max_length=44,
            pattern=LEAF_HASH_PATTERN,
            description="standard base64 of the 32-byte leaf hash ('+' and '/' URL-encoded)",
        ),
    ] = None,
) -> Response:
    raw = _decoded_or_none(leaf_hash)
    well_formed = (
        tree_size is not None
        and (leaf_index is None) != (leaf_hash is None)
        and (leaf_hash is None or raw is not None)
        and (leaf_index is None or leaf_index < tree_size)
    )
    if not well_formed:
        # A default or a refusal: the size first, then the checks in their documented order.
        size = await current_size(conn)
        tree_size = size if tree_size is None else tree_size
        _check_tree_size(tree_size, size)
        if (leaf_index is None) == (leaf_hash is None):
            raise _bad("give exactly one of leaf_index and leaf_hash")
        if leaf_hash is not None:
            _, leaf_index = await size_and_leaf_index(conn, _decode_hash(leaf_hash), tree_size)
            if leaf_index is None:
                raise _no_leaf(tree_size)
    elif raw is not None:
        size, leaf_index = await size_and_leaf_index(conn, raw, tree_size)
        _check_tree_size(tree_size, size)
        if leaf_index is None:
            raise _no_leaf(tree_size)
    assert leaf_index is not None and tree_size is not None
    if not 0 <= leaf_index < tree_size:
        raise _bad(f"leaf_index {leaf_index} is not in a tree of size {tree_size}")
    coords = merkle.inclusion_proof_coords(leaf_index, tree_size)
    size, nodes = await size_and_nodes(conn, coords)
    # By index this is the first look at the size (one query for the whole proof); after a
    # lookup it only confirms it (the head never shrinks).
    _check_tree_size(tree_size, size)
    proof = merkle.inclusion_proof(leaf_index, tree_size, _complete(nodes, coords))
    return _json({"leaf_index": leaf_index, "tree_size": tree_size, "proof": [b64(p) for p in proof]})


@log_router.get(
    "/proof/consistency",
    summary="RFC 9162 consistency proof between two tree sizes (empty when first is 0 or equals second)",
    dependencies=[_READERS],
    responses=refusals({**_REFUSALS, 416: _BEYOND}),
    response_model=ConsistencyProof,
)
async def get_consistency_proof(
    conn: Conn,
    first: Size,
    second: Annotated[int | None, Query(ge=0, le=BIGINT_MAX, description="default: the current size")] = None,
) -> Response:
    if second is None:
        second = await current_size(conn)
    if first < 0 or second < first:
        raise _bad(f"need 0 <= first <= second, got first={first}, second={second}")
    coords = merkle.consistency_proof_coords(first, second)
    # The head's size and the proof's nodes in one round trip.
    size, nodes = await size_and_nodes(conn, coords)
    if second > size:
        raise _beyond("second", second, size)
    proof = merkle.consistency_proof(first, second, _complete(nodes, coords))
    return _json({"first": first, "second": second, "proof": [b64(p) for p in proof]})


__all__ = ["MAX_ENTRIES", "log_router"]
