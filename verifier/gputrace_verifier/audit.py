"""The auditor's checks and the ledger client behind `gputrace-audit` (its command line is cli.py).
It trusts the ledger's key and nothing the server says: it checks every signed checkpoint, checks
that each new one extends the last one it trusted, re-hashes every entry it downloads, recomputes
the root and checks inclusion proofs.

State (the last checkpoint it trusted, per log origin) lives in a small JSON file, so that a
log that rewrites history is caught on the next run even if it re-signs everything.

Exit codes (stable; scripts and cron jobs rely on them):

    0  everything verified
    1  usage or configuration error (no key, bad key, unreadable state file)
    2  network or HTTP error (server unreachable, 4xx/5xx, malformed response)
    3  checkpoint signature invalid (wrong key, wrong origin, altered note)
    4  inconsistent: the log forked or shrank relative to the trusted checkpoint
    5  entry or root mismatch: stored entries do not hash to what the log signed
    6  proof failure: an inclusion or consistency proof served by the log does not verify
    8  an entry is not signed by the service that decided it (checked with --service-keys)
    7  no witness quorum: fewer than --witness-quorum valid cosignatures (--witness) on the checkpoint
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

import httpx
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gputrace_verifier import merkle
from gputrace_verifier.checkpoint import Checkpoint, CheckpointError, parse_and_verify, parse_vkey
from gputrace_verifier.cosignature import parse_witness_vkey, verify_cosignatures
from gputrace_verifier.service_keys import ServiceKeyError, public_key, read_service_keys, signature_problem

PAGE_MAX = 1000  # the server's per-call limit on /v1/log/entries


class Exit(IntEnum):
    OK = 0
    USAGE = 1
    NETWORK = 2
    SIGNATURE = 3
    INCONSISTENT = 4
    MISMATCH = 5
    PROOF = 6
    ENTRY_SIGNATURE = 8
    WITNESS = 7


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 usage/config; 2 network/HTTP error; 3 checkpoint signature invalid; "
    "4 inconsistent with the trusted checkpoint (fork or shrink); 5 entry/root mismatch; 6 proof failure; "
    "7 no witness quorum (fewer valid --witness cosignatures than --witness-quorum); "
    "8 an entry not signed by the service that decided it (--service-keys)."
)


class AuditFailure(Exception):
    """Ends the command with `code` and a message that names what failed."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fail(code: Exit, message: str) -> NoReturn:
    raise AuditFailure(code, message)


class Ui:
    """Where the checks report progress and notices. This base is silent (library use); the
    command line's subclass writes to stderr, so that stdout carries only the verdict."""

    def notice(self, message: str, *, warning: bool = False) -> None:
        """A line for the human running the audit (which key is trusted, what was checked)."""

    def progress(self, description: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
        """A context whose value is called with the number of items done so far."""
        return nullcontext(lambda done: None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, code: Exit = Exit.NETWORK) -> bytes:
    try:
        if not isinstance(value, str):
            raise binascii.Error
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        fail(code, f"{what} is not standard base64: {str(value)[:60]!r}")


# --------------------------------------------------------------------------- state file


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gputrace" / "audit.json"


@dataclass
class Trusted:
    """The last checkpoint this auditor verified for one log, and its right-edge subtrees
    (the frontier) so that `--incremental` can extend the root without the old entries."""

    note: str
    size: int
    root_hash: bytes
    frontier: list[bytes] | None
    url: str
    verified_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "note": self.note,
            "size": self.size,
            "root_hash": b64(self.root_hash),
            "frontier": None if self.frontier is None else [b64(h) for h in self.frontier],
            "url": self.url,
            "verified_at": self.verified_at,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Trusted:
        frontier = doc.get("frontier")
        return cls(
            note=doc["note"],
            size=int(doc["size"]),
            root_hash=_unb64(doc["root_hash"], "root_hash", Exit.USAGE),
            frontier=None if frontier is None else [_unb64(h, "frontier hash", Exit.USAGE) for h in frontier],
            url=doc.get("url", ""),
            verified_at=doc.get("verified_at", ""),
        )


@dataclass
class State:
    path: Path
    pinned_vkey: str | None = None
    # The services' decision keys (name -> base64), pinned from the first --service-keys.
    service_keys: dict[str, str] | None = None
    logs: dict[str, Trusted] = field(default_factory=dict)  # by log origin, not by URL: a mirror
    # or a moved server must extend the same history

    @classmethod
    def load(cls, path: Path) -> State:
        if not path.exists():
            return cls(path)
        try:
            doc = json.loads(path.read_text())
            logs = {origin: Trusted.from_json(t) for origin, t in doc.get("logs", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            fail(Exit.USAGE, f"state file {path} is unreadable ({e}); fix it or pass another --state")
        service_keys = doc.get("service_keys")
        if service_keys is not None and not isinstance(service_keys, dict):
            fail(Exit.USAGE, f"state file {path}: service_keys is not an object")
        return cls(path, pinned_vkey=doc.get("pinned_vkey"), logs=logs, service_keys=service_keys)

    def save(self) -> None:
        doc = {
            "version": 1,
            "pinned_vkey": self.pinned_vkey,
            "service_keys": self.service_keys,
            "logs": {origin: t.to_json() for origin, t in self.logs.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash mid-write must not lose the trusted checkpoint.
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- HTTP client


class LedgerClient:
    """The few ledger routes the auditor reads. Any HTTP or shape problem is exit code 2."""

    def __init__(
        self, url: str, token: str | None, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        # transport: an in-memory ledger in the verifier's own tests; the network otherwise.
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, **params: Any) -> httpx.Response:
        query = {k: v for k, v in params.items() if v is not None}
        try:
            response = self._http.get(path, params=query)
        except httpx.HTTPError as e:
            fail(Exit.NETWORK, f"GET {self.url}{path}: {type(e).__name__}: {e}")
        if response.status_code != 200:
            fail(Exit.NETWORK, f"GET {response.request.url}: HTTP {response.status_code}: {_detail(response)}")
        return response

    def _json(self, path: str, **params: Any) -> Any:
        response = self._get(path, **params)
        try:
            return response.json()
        except ValueError:
            fail(Exit.NETWORK, f"GET {response.request.url}: response is not JSON")

    def checkpoint_note(self, witnessed: bool = False) -> str:
        # witnessed: the latest checkpoint the ledger's witnesses all cosigned (the newest one may
        # still be on its way to them); a ledger without witnesses serves its latest.
        return self._get("/v1/log/checkpoint", witnessed="true" if witnessed else None).text

    def public_key(self) -> dict[str, Any]:
        return _expect(self._json("/v1/log/public-key"), dict, "/v1/log/public-key")

    def entries(self, start: int, end: int) -> list[dict[str, Any]]:
        page = _expect(self._json("/v1/log/entries", start=start, end=end), list, "/v1/log/entries")
        return [_expect(item, dict, "/v1/log/entries item") for item in page]

    def inclusion_proof(self, leaf_index: int, tree_size: int) -> list[bytes]:
        doc = _expect(
            self._json("/v1/log/proof/inclusion", leaf_index=leaf_index, tree_size=tree_size), dict, "inclusion proof"
        )
        if doc.get("leaf_index") != leaf_index or doc.get("tree_size") != tree_size:
            fail(
                Exit.PROOF,
                f"inclusion proof for leaf {leaf_index} at size {tree_size}: server answered for "
                f"leaf {doc.get('leaf_index')} at size {doc.get('tree_size')}",
            )
        return _proof_hashes(doc, f"inclusion proof for leaf {leaf_index}")

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        doc = _expect(self._json("/v1/log/proof/consistency", first=first, second=second), dict, "consistency proof")
        if doc.get("first") != first or doc.get("second") != second:
            fail(
                Exit.PROOF,
                f"consistency proof {first}->{second}: server answered for {doc.get('first')}->{doc.get('second')}",
            )
        return _proof_hashes(doc, f"consistency proof {first}->{second}")

    def batch(self, batch_id: str) -> dict[str, Any]:
        return _expect(self._json(f"/v1/batches/{batch_id}"), dict, f"/v1/batches/{batch_id}")


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail)[:300]


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        fail(Exit.NETWORK, f"{what}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _proof_hashes(doc: dict[str, Any], what: str) -> list[bytes]:
    proof = doc.get("proof")
    if not isinstance(proof, list):
        fail(Exit.PROOF, f"{what}: no proof list in the response")
    return [_unb64(p, f"{what}: element {k}", Exit.PROOF) for k, p in enumerate(proof)]


# --------------------------------------------------------------------------- keys


def _read_vkey(value: str) -> str:
    """--key is a vkey string or a file holding one (as published by the ledger operator)."""
    path = Path(value).expanduser()
    text = path.read_text().strip() if "+" not in value and path.is_file() else value.strip()
    try:
        parse_vkey(text)
    except CheckpointError as e:
        fail(Exit.USAGE, f"--key: {e}")
    return text


def resolve_key(key: str | None, tofu: bool, state: State, client: LedgerClient, ui: Ui) -> str:
    """The one key the auditor trusts: given out of band (--key), or pinned on first use."""
    if key:
        vkey = _read_vkey(key)
        if state.pinned_vkey and state.pinned_vkey != vkey:
            ui.notice(f"note: --key differs from the key pinned in {state.path}; using --key", warning=True)
        return vkey
    if state.pinned_vkey:
        ui.notice(f"using the key pinned on first use in {state.path}: {state.pinned_vkey}")
        return state.pinned_vkey
    if not tofu:
        fail(
            Exit.USAGE,
            "no ledger key: pass --key VKEY|FILE (or set GPUTRACE_LEDGER_VKEY) with the key the ledger operator "
            "published out of band, or --tofu to pin the server's key on first use",
        )
    vkey = str(client.public_key().get("vkey", ""))
    try:
        parse_vkey(vkey)
    except CheckpointError as e:
        fail(Exit.NETWORK, f"/v1/log/public-key served an unusable key: {e}")
    ui.notice(
        "TRUST ON FIRST USE: pinning the key the server itself served:\n"
        f"{vkey}\n"
        "Compare it with the key the ledger operator published out of band. From now on only this key "
        f"is trusted (stored in {state.path}).",
        warning=True,
    )
    state.pinned_vkey = vkey
    return vkey


def verify_saved(trusted: Trusted, vkey: str, origin: str, state: State) -> None:
    """Re-check the saved checkpoint: the state file is just a file, and the key may have changed."""
    try:
        cp = parse_and_verify(trusted.note, vkey, expected_origin=origin)
    except CheckpointError as e:
        fail(
            Exit.USAGE,
            f"the trusted checkpoint saved in {state.path} does not verify with this key ({e}); "
            "was the key rotated? Use another --state to start afresh",
        )
    if cp.size != trusted.size or cp.root_hash != trusted.root_hash:
        fail(Exit.USAGE, f"the state file {state.path} is inconsistent with its own saved note")


# --------------------------------------------------------------------------- local tree


def _largest_pow2_below(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_path_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges [lo, hi) whose hashes make up PATH(index, D[0:size]) (RFC 9162 §2.1.3.1),
    deepest first, so a failing proof element can be named by the leaves it covers."""
    ranges: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _largest_pow2_below(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo += k
    ranges.reverse()
    return ranges


def describe_range(lo: int, hi: int) -> str:
    """How the server stores the hash of leaves [lo, hi): one node if it is a complete subtree."""
    width = hi - lo
    if width & (width - 1) == 0 and lo % width == 0:
        level = width.bit_length() - 1
        return f"leaves [{lo}, {hi}) = stored node (level {level}, index {lo >> level})"
    return f"leaves [{lo}, {hi}) (built from several stored nodes)"


class Leaves:
    """Leaf hashes this auditor computed itself, for leaves [start, start + len)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self._hashes = bytearray()  # 32 bytes per leaf: a million leaves is 32 MB

    def __len__(self) -> int:
        return len(self._hashes) // merkle.HASH_SIZE

    def append(self, leaf_hash: bytes) -> None:
        self._hashes += leaf_hash

    def get(self, index: int) -> bytes | None:
        k = index - self.start
        if not 0 <= k < len(self):
            return None
        return bytes(self._hashes[k * merkle.HASH_SIZE : (k + 1) * merkle.HASH_SIZE])

    def covers(self, lo: int, hi: int) -> bool:
        return self.start <= lo and hi <= self.start + len(self)

    def mth(self, lo: int, hi: int) -> bytes:
        """RFC 9162 MTH(D[lo:hi]); only used to diagnose a failure, so plain recursion is fine."""
        if hi - lo == 1:
            leaf = self.get(lo)
            assert leaf is not None
            return leaf
        k = _largest_pow2_below(hi - lo)
        return merkle.node_hash(self.mth(lo, lo + k), self.mth(lo + k, hi))


# --------------------------------------------------------------------------- checks


def check_entry(expected_index: int, item: dict[str, Any]) -> tuple[bytes, list[str]]:
    """Our own leaf hash of a served entry, and what is wrong with the entry (if anything)."""
    problems: list[str] = []
    index = item.get("leaf_index")
    if index != expected_index:
        fail(Exit.MISMATCH, f"leaf {expected_index}: the server returned leaf_index {index!r} in its place")
    entry = item.get("entry")
    if not isinstance(entry, str):
        fail(Exit.NETWORK, f"leaf {expected_index}: entry is not a string")
    try:
        data = entry.encode("utf-8")
    except UnicodeEncodeError:
        data = entry.encode("utf-8", "surrogatepass")
        problems.append(f"leaf {expected_index}: entry is not valid UTF-8 text")
    computed = merkle.leaf_hash(data)
    claimed = _unb64(item.get("leaf_hash"), f"leaf {expected_index}: leaf_hash")
    if computed != claimed:
        problems.append(f"leaf {expected_index}: entry bytes hash to {b64(computed)} but server says {b64(claimed)}")
    problems.extend(_canonical_problems(expected_index, entry, data))
    return computed, problems


def _canonical_problems(index: int, entry: str, data: bytes) -> list[str]:
    # One JSON value must have one byte string, or the same decision could be logged twice
    # under different hashes: re-canonicalise (RFC 8785) and demand identical bytes.
    try:
        again = rfc8785.dumps(json.loads(entry))
    except Exception as e:  # invalid JSON, or a value JCS cannot represent (huge int, NaN)
        return [f"leaf {index}: entry is not canonicalisable JSON ({type(e).__name__}: {e})"]
    if again != data:
        at = next((k for k, (a, b) in enumerate(zip(again, data, strict=False)) if a != b), min(len(again), len(data)))
        return [f"leaf {index}: entry is not RFC 8785 canonical JSON (re-canonicalised bytes differ at byte {at})"]
    return []


def diagnose_inclusion(index: int, size: int, proof: Sequence[bytes], leaves: Leaves) -> str:
    """Name the proof elements that differ from what the downloaded entries imply."""
    ranges = inclusion_path_ranges(index, size)
    if len(proof) != len(ranges):
        return f"; the proof has {len(proof)} hashes, a tree of size {size} needs {len(ranges)} for leaf {index}"
    wrong = [
        f"element {k} ({describe_range(lo, hi)}) is {b64(p)}, the entries give {b64(leaves.mth(lo, hi))}"
        for k, ((lo, hi), p) in enumerate(zip(ranges, proof, strict=True))
        if leaves.covers(lo, hi) and leaves.mth(lo, hi) != p
    ]
    return "; " + "; ".join(wrong) if wrong else ""


def locate_root_mismatch(client: LedgerClient, leaves: Leaves, size: int) -> str:
    """Bisect with the server's inclusion proofs (built from its stored nodes, which the
    signed root was computed from) to the first leaf our hashes disagree with: O(log n) calls."""
    if not leaves.covers(0, size):
        return ""
    probe = 0
    for _ in range(size.bit_length() + 2):
        proof = client.inclusion_proof(probe, size)
        ranges = inclusion_path_ranges(probe, size)
        if len(proof) != len(ranges):
            return f"; the server's inclusion proof for leaf {probe} is malformed, cannot locate the leaf"
        differing = [(lo, hi) for (lo, hi), p in zip(ranges, proof, strict=True) if leaves.mth(lo, hi) != p]
        if not differing:
            # Every other subtree agrees, so the disagreement is this leaf itself.
            return f"; the log's stored tree disagrees with the served entry at leaf {probe}"
        lo, hi = min(differing)
        if hi - lo == 1:
            return f"; the log's stored tree disagrees with the served entry at leaf {lo}"
        probe = lo
    return ""


def spot_check_indices(size: int, count: int, rng: random.Random) -> list[int]:
    """The first and last leaf (the last one's proof climbs the whole right edge), plus random ones."""
    if size == 0 or count <= 0:
        return []
    chosen = {size - 1} if count == 1 else {0, size - 1}
    pool = size - len(chosen)
    extra = min(count - len(chosen), pool)
    if extra > 0:
        chosen.update(rng.sample(range(1, size - 1), extra))
    return sorted(chosen)


# --------------------------------------------------------------------------- verify


@dataclass
class Options:
    url: str
    token: str | None
    state: Path
    key: str | None
    origin: str | None
    tofu: bool
    witnesses: list[str] = field(default_factory=list)  # witness vkeys (or files holding one)
    witness_quorum: int | None = None  # None: every given witness
    service_keys: str | None = None  # a party registry file: its `service` entries sign the decisions


@dataclass
class Report:
    origin: str
    size: int
    root_hash: bytes
    previous_size: int | None
    downloaded: int
    spot_checked: int
    signatures_checked: int | None = None  # None: no service keys, service signatures not checked


def _pages(start: int, end: int, page: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, end, page):
        yield lo, min(lo + page, end)


def verify(
    opts: Options,
    *,
    incremental: bool = False,
    spot_checks: int = 16,
    page_size: int = PAGE_MAX,
    seed: int | None = None,
    ui: Ui | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Report:
    """Verify the latest checkpoint and the whole log behind it; on success, trust it (save it)."""
    state = State.load(opts.state)
    client = LedgerClient(opts.url, opts.token, transport=transport)
    try:
        return _verify(client, state, opts, incremental, spot_checks, page_size, random.Random(seed), ui or Ui())
    finally:
        client.close()


def _verify(
    client: LedgerClient,
    state: State,
    opts: Options,
    incremental: bool,
    spot_checks: int,
    page_size: int,
    rng: random.Random,
    ui: Ui,
) -> Report:
    vkey = resolve_key(opts.key, opts.tofu, state, client, ui)
    origin = opts.origin or parse_vkey(vkey)[0]  # C2SP: the key name is the log's origin
    trusted = state.logs.get(origin)
    if trusted is not None:
        verify_saved(trusted, vkey, origin, state)

    note = client.checkpoint_note(witnessed=bool(opts.witnesses))
    try:
        cp = parse_and_verify(note, vkey, expected_origin=origin)
    except CheckpointError as e:
        fail(Exit.SIGNATURE, f"checkpoint signature invalid: {e}")
    ui.notice(f"checkpoint of {origin}: size {cp.size}, root {b64(cp.root_hash)} (signature ok)")
    check_witness_quorum(note, opts, ui)

    consistency_problem = _check_consistency(client, trusted, cp)
    resume = incremental and trusted is not None and trusted.frontier is not None
    if consistency_problem and resume:  # without the old entries we cannot tell a fork from bad nodes
        fail(Exit.INCONSISTENT, consistency_problem)
    keys = resolve_service_keys(opts.service_keys, state, ui)
    frontier, leaves, prefix_root = _download(
        client, cp, trusted if resume else None, trusted, page_size, ui, service_keys=keys
    )

    root = frontier.root()
    if root != cp.root_hash:
        where = locate_root_mismatch(client, leaves, cp.size)
        fail(
            Exit.MISMATCH,
            f"root mismatch at size {cp.size}: recomputed {b64(root)}, checkpoint says {b64(cp.root_hash)}{where}",
        )
    if trusted is not None and prefix_root is not None and prefix_root != trusted.root_hash:
        fail(
            Exit.INCONSISTENT,
            f"checkpoint at size {cp.size} is not consistent with the trusted checkpoint at size "
            f"{trusted.size}: the log's first {trusted.size} entries now hash to {b64(prefix_root)}, "
            f"the trusted checkpoint says {b64(trusted.root_hash)}",
        )
    if consistency_problem:
        # The entries extend the trusted history and match the new root, so it is the proof
        # (built from stored nodes) that is wrong, not the history.
        assert trusted is not None
        fail(
            Exit.PROOF,
            f"{consistency_problem}, yet the entries are consistent with both checkpoints: the "
            f"log's stored nodes are corrupt{_diagnose_consistency(client, trusted.size, cp.size, leaves)}",
        )

    checked = _spot_check(client, cp, leaves, spot_check_indices(cp.size, spot_checks, rng))
    state.logs[origin] = Trusted(
        note=note,
        size=cp.size,
        root_hash=cp.root_hash,
        frontier=frontier.hashes(),
        url=client.url,
        verified_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    state.save()
    signed = len(leaves) if keys is not None else None
    return Report(origin, cp.size, cp.root_hash, trusted.size if trusted else None, len(leaves), checked, signed)


def resolve_service_keys(path: str | None, state: State, ui: Ui) -> dict[str, Ed25519PublicKey] | None:
    """The services' keys: from the party registry given (--service-keys), pinned in the state file
    on first use; else the pinned ones; else None (entries' service signatures are not checked)."""
    if path:
        try:
            given = read_service_keys(Path(path))
        except ServiceKeyError as e:
            fail(Exit.USAGE, f"--service-keys: {e}")
        if state.service_keys and state.service_keys != given:
            ui.notice(
                f"note: --service-keys differ from the service keys pinned in {state.path}; using them", warning=True
            )
        state.service_keys = given
    elif state.service_keys:
        ui.notice(f"checking service signatures with the service keys pinned in {state.path}")
    else:
        ui.notice(
            "service signatures NOT checked: pass --service-keys REGISTRY (the programme's party registry) to check "
            "that every entry is signed by the service that decided it",
            warning=True,
        )
        return None
    try:
        return {name: public_key(name, key) for name, key in state.service_keys.items()}
    except ServiceKeyError as e:
        fail(Exit.USAGE, f"service keys: {e}")


def check_witness_quorum(note: str, opts: Options, ui: Ui) -> None:
    """Require `witness_quorum` of the given witnesses to have cosigned this very checkpoint: each
    cosigned only after checking it extends everything it saw of this log, so a forked (split)
    view would need that many witnesses to sign both sides."""
    if not opts.witnesses:
        if opts.witness_quorum:
            fail(Exit.USAGE, "--witness-quorum needs the witnesses' keys: pass --witness VKEY (repeatable)")
        return
    keys = sorted({_read_key(w, "--witness", parse_witness_vkey) for w in opts.witnesses})
    quorum = len(keys) if opts.witness_quorum is None else opts.witness_quorum
    if not 1 <= quorum <= len(keys):
        fail(Exit.USAGE, f"--witness-quorum {quorum} must be between 1 and the {len(keys)} --witness key(s) given")
    try:
        cosigned = verify_cosignatures(note, keys)
    except CheckpointError as e:
        fail(Exit.WITNESS, f"no witness quorum: {e}")
    if len(cosigned) < quorum:
        missing = sorted({parse_witness_vkey(k)[0] for k in keys} - {c.name for c in cosigned})
        fail(
            Exit.WITNESS,
            f"no witness quorum: {len(cosigned)} of the required {quorum} witness cosignature(s) on the "
            f"checkpoint (none from {', '.join(missing)}); a witness refuses a checkpoint that does not extend "
            "what it saw, so this may be a fork",
        )
    when = ", ".join(
        f"{c.name} at {datetime.fromtimestamp(c.timestamp, UTC).isoformat(timespec='seconds')}" for c in cosigned
    )
    ui.notice(f"witnessed: {len(cosigned)} cosignature(s), quorum {quorum} ({when})")


def _read_key(value: str, option: str, parse: Callable[[str], object]) -> str:
    """A key option is a vkey string or a file holding one."""
    path = Path(value).expanduser()
    text = path.read_text().strip() if "+" not in value and path.is_file() else value.strip()
    try:
        parse(text)
    except CheckpointError as e:
        fail(Exit.USAGE, f"{option}: {e}")
    return text


def _check_consistency(client: LedgerClient, trusted: Trusted | None, cp: Checkpoint) -> str | None:
    """None if the new checkpoint provably extends the trusted one; otherwise what is wrong.
    A shrunken log or a different root at the same size is a fork outright."""
    if trusted is None:
        return None
    head = f"checkpoint at size {cp.size} is not consistent with the trusted checkpoint at size {trusted.size}"
    if cp.size < trusted.size:
        fail(Exit.INCONSISTENT, f"{head}: the log shrank")
    if cp.size == trusted.size:
        if cp.root_hash != trusted.root_hash:
            fail(Exit.INCONSISTENT, f"{head}: same size, root {b64(cp.root_hash)} instead of {b64(trusted.root_hash)}")
        return None
    proof = client.consistency_proof(trusted.size, cp.size)
    if merkle.verify_consistency(trusted.size, cp.size, trusted.root_hash, cp.root_hash, proof):
        return None
    return f"{head}: the consistency proof {trusted.size}->{cp.size} does not verify"


def _diagnose_consistency(client: LedgerClient, first: int, second: int, leaves: Leaves) -> str:
    if not leaves.covers(0, second):
        return ""
    coords = merkle.consistency_proof_coords(first, second)
    local = {(lvl, i): leaves.mth(i << lvl, (i + 1) << lvl) for lvl, i in coords}
    expected = merkle.consistency_proof(first, second, local)
    served = client.consistency_proof(first, second)
    if len(served) != len(expected):
        return f"; the proof has {len(served)} hashes, {len(expected)} expected"
    wrong = [
        f"element {k} is {b64(s)}, the entries give {b64(e)}"
        for k, (s, e) in enumerate(zip(served, expected, strict=True))
        if s != e
    ]
    return "; " + "; ".join(wrong) if wrong else ""


def _download(
    client: LedgerClient,
    cp: Checkpoint,
    resume_from: Trusted | None,
    trusted: Trusted | None,
    page_size: int,
    ui: Ui,
    service_keys: dict[str, Ed25519PublicKey] | None = None,
) -> tuple[merkle.Frontier, Leaves, bytes | None]:
    """Fetch entries, re-hash each one, and fold them into a frontier. Returns the frontier at
    cp.size, our own leaf hashes, and the root we computed at the trusted size (if we passed it)."""
    start = 0
    frontier = merkle.Frontier()
    if resume_from is not None and resume_from.frontier is not None:
        start = resume_from.size
        coords = merkle.frontier_coords(start)
        try:
            frontier = merkle.Frontier.from_nodes(start, dict(zip(coords, resume_from.frontier, strict=True)))
            folds = frontier.root() == resume_from.root_hash
        except ValueError:  # wrong number or length of saved hashes
            folds = False
        if not folds:
            fail(
                Exit.USAGE,
                "the saved frontier in the state file does not fold to the trusted root; run without --incremental",
            )
    leaves = Leaves(start)
    prefix_root = frontier.root() if trusted is not None and start == trusted.size else None
    if trusted is not None and trusted.size == 0:
        prefix_root = merkle.EMPTY_ROOT
    problems: list[str] = []
    unsigned: list[str] = []  # entries whose service signature fails (checked with service_keys)
    with ui.progress("re-hashing entries", cp.size - start) as advance:
        for lo, hi in _pages(start, cp.size, page_size):
            index = lo
            while index < hi:  # a server may return fewer than asked; ask again from where it stopped
                page = client.entries(index, hi)
                if not page:
                    fail(
                        Exit.MISMATCH,
                        f"leaf {index}: the server returned no entries, but the checkpoint has size {cp.size}",
                    )
                for item in page:
                    if index >= hi:
                        fail(Exit.MISMATCH, f"the server returned more entries than asked for [{lo}, {hi})")
                    leaf, found = check_entry(index, item)
                    problems.extend(found)
                    if service_keys is not None and not found:
                        if (why := signature_problem(index, item["entry"], service_keys)) is not None:
                            unsigned.append(why)
                    frontier.append(leaf)
                    leaves.append(leaf)
                    index += 1
                    if trusted is not None and index == trusted.size:
                        prefix_root = frontier.root()
                advance(index - start)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        fail(Exit.MISMATCH, "; ".join(problems[:10]) + more)
    if unsigned:
        more = f" (and {len(unsigned) - 10} more)" if len(unsigned) > 10 else ""
        fail(Exit.ENTRY_SIGNATURE, "not signed by the deciding service: " + "; ".join(unsigned[:10]) + more)
    return frontier, leaves, prefix_root


def _spot_check(client: LedgerClient, cp: Checkpoint, leaves: Leaves, indices: list[int]) -> int:
    for index in indices:
        leaf = leaves.get(index)
        if leaf is None:  # --incremental: an old leaf we did not download this time
            leaf, _ = _fetch_entry(client, index)
        proof = client.inclusion_proof(index, cp.size)
        if not merkle.verify_inclusion(leaf, index, cp.size, proof, cp.root_hash):
            fail(
                Exit.PROOF,
                f"inclusion proof for leaf {index} in the tree of size {cp.size} does not verify "
                f"against the checkpoint root{diagnose_inclusion(index, cp.size, proof, leaves)}",
            )
    return len(indices)


def _fetch_entry(client: LedgerClient, index: int) -> tuple[bytes, str]:
    """One entry, checked like the bulk download: our own leaf hash and the entry text."""
    page = client.entries(index, index + 1)
    if len(page) != 1:
        fail(Exit.MISMATCH, f"leaf {index}: the server returned {len(page)} entries for it")
    leaf, problems = check_entry(index, page[0])
    if problems:
        fail(Exit.MISMATCH, "; ".join(problems))
    return leaf, page[0]["entry"]


# --------------------------------------------------------------------------- batch


# Fields a timeline step copies from its ledger entry; each is compared with the entry itself.
STEP_FIELDS = ("service", "event_type", "status", "reason_code", "message", "party_id", "decided_at")


def verify_batch_steps(
    client: LedgerClient, state: State, opts: Options, batch_id: str, steps: list[dict[str, Any]], ui: Ui | None = None
) -> list[str]:
    """Check each timeline step against its ledger entry and prove the entry's inclusion in the
    last checkpoint this auditor verified. Returns a status per step; fails on the first problem."""
    vkey = resolve_key(opts.key, opts.tofu, state, client, ui or Ui())
    origin = opts.origin or parse_vkey(vkey)[0]
    trusted = state.logs.get(origin)
    if trusted is None:
        fail(Exit.USAGE, f"no verified checkpoint of {origin} in {state.path}: run `gputrace audit verify` first")
    verify_saved(trusted, vkey, origin, state)
    statuses: list[str] = []
    for n, step in enumerate(steps, start=1):
        index = step.get("leaf_index")
        if not isinstance(index, int) or isinstance(index, bool):
            fail(Exit.MISMATCH, f"step {n}: no ledger index, so it cannot be proven")
        if index >= trusted.size:
            fail(
                Exit.PROOF,
                f"step {n} (leaf {index}) is beyond the verified checkpoint (size {trusted.size}); "
                "run `gputrace audit verify` and try again",
            )
        leaf, entry = _fetch_entry(client, index)
        _compare_step(n, index, step, json.loads(entry), batch_id)
        proof = client.inclusion_proof(index, trusted.size)
        if not merkle.verify_inclusion(leaf, index, trusted.size, proof, trusted.root_hash):
            fail(
                Exit.PROOF,
                f"step {n}: inclusion proof for leaf {index} in the tree of size {trusted.size} "
                "does not verify against the verified checkpoint",
            )
        statuses.append(f"✓ in {trusted.size}")
    return statuses


def _same(name: str, shown: Any, logged: Any) -> bool:
    if shown == logged:
        return True
    if name == "decided_at" and isinstance(shown, str) and isinstance(logged, str):
        # The view may print the same instant differently (Z vs +00:00, precision).
        try:
            return datetime.fromisoformat(shown) == datetime.fromisoformat(logged)
        except ValueError:
            return False
    return False


def _compare_step(n: int, index: int, step: dict[str, Any], entry: dict[str, Any], batch_id: str) -> None:
    for name in STEP_FIELDS:
        if name in step and not _same(name, step[name], entry.get(name)):
            fail(
                Exit.MISMATCH,
                f"step {n} (leaf {index}): the batch view says {name} {step[name]!r}, "
                f"the ledger entry says {entry.get(name)!r}",
            )
    if entry.get("batch_id") not in (None, batch_id):
        fail(Exit.MISMATCH, f"step {n} (leaf {index}): the ledger entry is about batch {entry['batch_id']!r}")
