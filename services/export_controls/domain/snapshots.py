"""Screening-list snapshots: immutable, content-addressed files under VAR_DIR/screening.

Each import becomes `<sha256>.json`, the hash taken over the snapshot's own canonical JSON
(entries and the matching policy it was imported with), so a decision that records the hash can
be re-derived from exactly the list it saw. A file is written once and never rewritten; `ACTIVE`
names the snapshot the service screens against. Files, not a table: the import command needs no
database, and an auditor can read a snapshot with any JSON tool.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from .csl import parse_csl
from .errors import RulesetDataError
from .screening import MatchingConfig, Screener, ScreeningList, load_screening_list

ACTIVE = "ACTIVE"


def snapshot_dir(var_dir: Path) -> Path:
    return var_dir / "screening"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _write_once(path: Path, data: bytes) -> None:
    # Atomic: a reader never sees half a snapshot; an existing one is never replaced.
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(data)
    try:
        os.link(tmp.name, path)
    except FileExistsError:
        if path.read_bytes() != data:
            raise RulesetDataError(f"{path}: a different snapshot with this hash already exists") from None
    finally:
        os.unlink(tmp.name)


def import_csl(
    raw: bytes,
    var_dir: Path,
    *,
    source_file: str,
    source_date: date | None = None,
    matching: MatchingConfig | None = None,
    activate: bool = True,
) -> ScreeningList:
    """Parse a CSL file, store it as a snapshot and (by default) make it the active one.

    The source date is the file's own (`sources_used` in the JSON) unless given; the matching
    policy is the shipped list's unless given, and is frozen into the snapshot with the entries.
    """
    entries, file_date = parse_csl(raw)
    when = source_date or file_date
    if when is None:
        raise RulesetDataError(f"{source_file}: the file names no date; give the date it was downloaded")
    body = ScreeningList(
        snapshot_date=when,
        source=f"Consolidated Screening List ({source_file}, sha256 {hashlib.sha256(raw).hexdigest()})",
        matching=matching or load_screening_list().matching,
        entries=entries,
    ).model_dump(mode="json", exclude={"sha256"})
    data = _canonical(body)
    digest = hashlib.sha256(data).hexdigest()
    directory = snapshot_dir(var_dir)
    directory.mkdir(parents=True, exist_ok=True)
    _write_once(directory / f"{digest}.json", data)
    if activate:
        set_active(var_dir, digest)
    return ScreeningList.model_validate({**body, "sha256": digest})


def set_active(var_dir: Path, digest: str) -> None:
    load_snapshot(var_dir, digest)  # only a snapshot that exists and verifies can become active
    directory = snapshot_dir(var_dir)
    tmp = directory / f".{ACTIVE}.{os.getpid()}"
    tmp.write_text(f"{digest}\n")
    os.replace(tmp, directory / ACTIVE)


def active_hash(var_dir: Path) -> str | None:
    path = snapshot_dir(var_dir) / ACTIVE
    return path.read_text().strip() if path.exists() else None


def load_snapshot(var_dir: Path, digest: str) -> ScreeningList:
    """A stored snapshot, its bytes checked against its name (a tampered file is refused)."""
    path = snapshot_dir(var_dir) / f"{digest}.json"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RulesetDataError(f"{path}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise RulesetDataError(f"{path}: content does not match its hash")
    try:
        return ScreeningList.model_validate({**json.loads(data), "sha256": digest})
    except ValueError as exc:
        raise RulesetDataError(f"{path}: {exc}") from exc


def load_active(var_dir: Path) -> ScreeningList | None:
    digest = active_hash(var_dir)
    return None if digest is None else load_snapshot(var_dir, digest)


def list_snapshots(var_dir: Path) -> list[dict[str, Any]]:
    directory = snapshot_dir(var_dir)
    active = active_hash(var_dir)
    rows = []
    for path in sorted(directory.glob("*.json")) if directory.exists() else []:
        snap = load_snapshot(var_dir, path.stem)
        rows.append(
            {
                "sha256": snap.sha256,
                "source_date": snap.snapshot_date.isoformat(),
                "entries": len(snap.entries),
                "active": snap.sha256 == active,
                "stored_at": datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds"),
            }
        )
    return rows


class ActiveScreening:
    """The screener decisions use, following `ACTIVE` while the service runs.

    `gputrace screening import` moves the pointer (an atomic rename, so a new inode); `current()`
    costs one stat() while it has not moved, and when it has, loads and verifies the snapshot it
    names before any decision uses it. A snapshot that does not verify raises RulesetDataError:
    no decision is made against it, and none silently against the previous list either (the
    event is retried, and dead-lettered if it stays broken). No pointer (never imported, or
    removed): the list shipped with the service, as at start-up.
    """

    def __init__(self, var_dir: Path | None, shipped: Screener, initial: Screener) -> None:
        self._pointer = None if var_dir is None else snapshot_dir(var_dir) / ACTIVE
        self._var_dir = var_dir
        self._shipped = shipped
        self._screener = initial
        self._seen: tuple[int, int, int] | None = None

    def current(self) -> Screener:
        if self._pointer is None or self._var_dir is None:
            return self._screener
        try:
            st = self._pointer.stat()
        except FileNotFoundError:
            self._seen = None
            self._screener = self._shipped
            return self._screener
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            digest = self._pointer.read_text().strip()
            if digest != self._screener.list.sha256:
                self._screener = Screener(load_snapshot(self._var_dir, digest))
            self._seen = seen
        return self._screener
