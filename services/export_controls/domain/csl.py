"""Reading the US Consolidated Screening List (CSL) as trade.gov publishes it.

Two formats of the same records: the JSON file (`{"results": [...], "sources_used": [...]}`, list
fields as arrays, addresses as objects) and the CSV file (one row per record, list fields joined
with "; ", addresses written out as text). Both map onto ScreeningEntry; the list a record comes
from is named as the rule sets name it ("Entity List", not "Entity List (EL) - Bureau of Industry
and Security"), so screening outcomes by list keep working for imported snapshots.
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import date, datetime
from typing import Any

from .errors import RulesetDataError
from .screening import ScreeningEntry

# The CSL's source abbreviations, to the list names the rule sets' screening outcomes use.
LIST_NAMES: dict[str, str] = {
    "EL": "Entity List",
    "MEU": "Military End-User List",
    "UVL": "Unverified List",
    "DPL": "Denied Persons List",
    "SDN": "Specially Designated Nationals List",
    "SSI": "Sectoral Sanctions Identifications List",
    "FSE": "Foreign Sanctions Evaders List",
    "CMIC": "Non-SDN Chinese Military-Industrial Complex Companies List",
    "MBS": "Non-SDN Menu-Based Sanctions List",
    "CAP": "Correspondent Account or Payable-Through Account Sanctions List",
    "PLC": "Palestinian Legislative Council List",
    "DTC": "ITAR Debarred",
    "ISN": "Nonproliferation Sanctions",
}
_ABBREV = re.compile(r"\(([A-Z-]+)\)")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


def list_name(source: str) -> str:
    """'Entity List (EL) - Bureau of Industry and Security' → 'Entity List'."""
    m = _ABBREV.search(source)
    if m and m.group(1) in LIST_NAMES:
        return LIST_NAMES[m.group(1)]
    return source.split(" (")[0].split(" - ")[0].strip()


def _date(value: Any, field: str, record: str) -> date | None:
    if value in (None, ""):
        return None
    text = str(value).strip()
    for parse in (date.fromisoformat, lambda t: datetime.strptime(t, "%m/%d/%Y").date()):
        try:
            return parse(text[:10] if len(text) > 10 and text[4] == "-" else text)
        except ValueError:
            continue
    raise RulesetDataError(f"CSL record {record}: {field} {text!r} is not a date")


def _split(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(";") if v.strip()]


def _address(value: Any) -> tuple[str, str | None]:
    """An address as one line, and its country if given as a code."""
    if isinstance(value, dict):
        parts = [value.get(k) for k in ("address", "city", "state", "postal_code", "country")]
        country = str(value.get("country") or "").strip().upper()
        return ", ".join(str(p).strip() for p in parts if p), country if _COUNTRY.match(country) else None
    text = str(value).strip()
    tail = text.rsplit(",", 1)[-1].strip().upper()
    return text, tail if _COUNTRY.match(tail) else None


def _entry(rec: dict[str, Any], index: int) -> ScreeningEntry:
    record_id = str(rec.get("id") or rec.get("_id") or rec.get("entity_number") or f"row-{index}")
    name = str(rec.get("name") or "").strip()
    if not name:
        raise RulesetDataError(f"CSL record {record_id}: no name")
    source = str(rec.get("source") or "").strip()
    if not source:
        raise RulesetDataError(f"CSL record {record_id}: no source list")
    raw_addresses = rec.get("addresses") or []
    if not isinstance(raw_addresses, list):
        raw_addresses = _split(raw_addresses)
    addresses = [_address(a) for a in raw_addresses]
    country = next((c for _, c in addresses if c), None)
    programs = ", ".join(_split(rec.get("programs")))
    return ScreeningEntry(
        id=record_id,
        name=name,
        aliases=_split(rec.get("alt_names")),
        country=country,
        list=list_name(source),
        real=True,
        reason=str(rec.get("remarks") or rec.get("license_requirement") or programs or source).strip(),
        addresses=[a for a, _ in addresses if a],
        start_date=_date(rec.get("start_date"), "start_date", record_id),
        end_date=_date(rec.get("end_date"), "end_date", record_id),
        federal_register_notice=str(rec.get("federal_register_notice") or "").strip() or None,
    )


def parse_csl(raw: bytes) -> tuple[list[ScreeningEntry], date | None]:
    """The entries of a CSL file (JSON or CSV, told apart by its first character), and the newest
    `source_last_updated` the JSON names (None for CSV, which carries no date)."""
    text = raw.decode("utf-8-sig")
    stripped = text.lstrip()
    source_date: date | None = None
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise RulesetDataError(f"CSL JSON: {exc}") from exc
        records = doc.get("results") if isinstance(doc, dict) else doc
        if not isinstance(records, list):
            raise RulesetDataError("CSL JSON: expected a 'results' array")
        updated = [
            _date(s.get("source_last_updated"), "source_last_updated", "sources_used")
            for s in (doc.get("sources_used") or [] if isinstance(doc, dict) else [])
            if isinstance(s, dict)
        ]
        source_date = max((d for d in updated if d), default=None)
    else:
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "name" not in reader.fieldnames or "source" not in reader.fieldnames:
            raise RulesetDataError(f"CSL CSV: expected the columns source and name, found {reader.fieldnames}")
        records = list(reader)
    entries = [_entry(r, i) for i, r in enumerate(records) if isinstance(r, dict)]
    if len(entries) != len(records):
        raise RulesetDataError("CSL: every record must be an object")
    return entries, source_date
