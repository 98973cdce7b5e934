"""`gputrace-audit` (also `gputrace audit`): the auditor's command line.

Plain argparse, so that the verifier installs with its three dependencies only. Global options go
before the command (`gputrace-audit --key ledger.vkey verify`). The verdict goes to stdout; notices,
the progress bar (on a terminal only) and failures go to stderr. Exit codes: see `audit.Exit`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NoReturn

from gputrace_verifier.audit import (
    EXIT_CODES_HELP,
    PAGE_MAX,
    AuditFailure,
    Exit,
    LedgerClient,
    Options,
    State,
    Ui,
    b64,
    default_state_path,
    fail,
    verify,
    verify_batch_steps,
)

PROG = "gputrace-audit"
ENV_URL, ENV_TOKEN, ENV_VKEY = "GPUTRACE_URL", "GPUTRACE_TOKEN", "GPUTRACE_LEDGER_VKEY"
ENV_SERVICE_KEYS = "GPUTRACE_SERVICE_KEYS"
DEFAULT_URL = "http://127.0.0.1:8000"

# ANSI styles, used only when the stream is a terminal and NO_COLOR is unset (https://no-color.org).
GREEN, RED, YELLOW = "32", "1;31", "33"


def _paint(stream: IO[str], text: str, style: str) -> str:
    if not style or os.environ.get("NO_COLOR") or not stream.isatty():
        return text
    return f"\033[{style}m{text}\033[0m"


class TerminalUi(Ui):
    """Notices on stderr; a progress bar too when stderr is a terminal (quiet in logs and pipes)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def notice(self, message: str, *, warning: bool = False) -> None:
        print(_paint(self.stream, message, YELLOW if warning else ""), file=self.stream, flush=True)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.stream.isatty() or total <= 0:
            yield lambda done: None
            return
        width, shown = 30, -1

        def advance(done: int) -> None:
            nonlocal shown
            filled = width * done // total
            if filled == shown and done != total:
                return  # redraw only when the bar moves: a million leaves is a million calls
            shown = filled
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r{description} [{bar}] {done}/{total}")
            self.stream.flush()

        advance(0)
        try:
            yield advance
        finally:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1, the documented code, not argparse's 2 (which means network here)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(int(Exit.USAGE))


def _int_in(lo: int, hi: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"{lo}<=x<={hi}" if hi is not None else f"x>={lo}"
            raise argparse.ArgumentTypeError(f"{value} is not in the range {bounds}")
        return value

    return parse


def _env(name: str) -> str | None:
    return os.environ.get(name) or None  # an empty variable counts as unset


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """Built per call, so the environment variables are read when the command runs."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=prog,
        description="Audit the ledger: verify its signed checkpoints, its history and every entry, from outside.\n\n"
        f"Options go before the command: {prog} --key ledger.vkey verify",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    parser.add_argument(
        "--url",
        default=_env(ENV_URL) or DEFAULT_URL,
        help=f"Base URL of the ledger API (env {ENV_URL}; default %(default)s).",
    )
    parser.add_argument(
        "--token", default=_env(ENV_TOKEN), help=f"Bearer token, role auditor or ops (env {ENV_TOKEN})."
    )
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        help="State file with the last trusted checkpoint (default: $XDG_STATE_HOME/gputrace/audit.json"
        " or ~/.local/state/gputrace/audit.json).",
    )
    parser.add_argument(
        "--key",
        default=_env(ENV_VKEY),
        help="The ledger's verifier key (<name>+<id>+<base64>), or a file holding it, as published out of band"
        f" (env {ENV_VKEY}). Required unless a key was pinned with --tofu.",
    )
    parser.add_argument(
        "--service-keys",
        default=_env(ENV_SERVICE_KEYS),
        metavar="REGISTRY",
        help="The programme's party registry (JSON, as published by the programme office): `verify` checks that"
        " every entry is signed by the service that decided it with the key of its `service` entry, else exit 8."
        f" Pinned in the state file on first use (env {ENV_SERVICE_KEYS}).",
    )
    parser.add_argument("--origin", help="Expected log origin (default: the key's name, as C2SP recommends).")
    parser.add_argument(
        "--tofu",
        action="store_true",
        help="Trust on first use: fetch the server's /public-key and pin it in the state file.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    verify_cmd = commands.add_parser(
        "verify",
        help="Verify the latest checkpoint and the whole log behind it; on success, trust it.",
        description="Verify the latest checkpoint and the whole log behind it; on success, trust it.\n\n"
        "Checks the checkpoint's signature (key and origin) and that it extends the last trusted one"
        " (consistency proof).\nRe-hashes every entry (and checks it is RFC 8785 canonical JSON), recomputes"
        " the root, checks inclusion proofs.\nAny mismatch exits non-zero and names what failed.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    verify_cmd.add_argument(
        "--incremental", action="store_true", help="Download only the entries added since the trusted checkpoint."
    )
    verify_cmd.add_argument(
        "--spot-checks",
        type=_int_in(0, None),
        default=16,
        help="Inclusion proofs to check: the first and last leaf plus random ones (default %(default)s).",
    )
    verify_cmd.add_argument(
        "--page-size", type=_int_in(1, PAGE_MAX), default=PAGE_MAX, help="Entries per request (default %(default)s)."
    )
    verify_cmd.add_argument(
        "--seed", type=int, default=None, help="Seed for choosing the spot-checked leaves (reproducible runs)."
    )
    verify_cmd.add_argument(
        "--witness",
        dest="witnesses",
        action="append",
        default=[],
        metavar="VKEY",
        help="A witness's cosignature key (<name>+<id>+<base64>, type 0x04, C2SP tlog-cosignature), or a file"
        " holding it; repeatable. The checkpoint must carry valid cosignatures from --witness-quorum of them"
        " (each witness cosigns only a checkpoint that extends what it saw), else exit 7.",
    )
    verify_cmd.add_argument(
        "--witness-quorum",
        type=_int_in(1, None),
        default=None,
        metavar="N",
        help="How many of the --witness keys must have cosigned (default: all of them).",
    )

    batch_cmd = commands.add_parser(
        "batch",
        help="Show one batch's timeline (each step with its ledger index); optionally prove every step.",
        description="Show one batch's timeline (each step with its ledger index); optionally prove every step.",
        epilog=EXIT_CODES_HELP,
        formatter_class=formatter,
    )
    batch_cmd.add_argument("batch_id", metavar="BATCH_ID", help="The batch id.")
    batch_cmd.add_argument(
        "--verify",
        dest="verify_steps",
        action="store_true",
        help="Check each step against its ledger entry and prove it is in the last checkpoint `verify` trusted.",
    )
    return parser


# --------------------------------------------------------------------------- commands


def _verify_command(opts: Options, args: argparse.Namespace, stdout: IO[str], ui: Ui) -> None:
    report = verify(
        opts,
        incremental=args.incremental,
        spot_checks=args.spot_checks,
        page_size=args.page_size,
        seed=args.seed,
        ui=ui,
    )
    since = "first run" if report.previous_size is None else f"consistent with trusted size {report.previous_size}"
    print(
        f"{_paint(stdout, 'OK', GREEN)} {report.origin}: size {report.size}, root {b64(report.root_hash)}; "
        f"{since}; {report.downloaded} entries re-hashed; {report.spot_checked} inclusion proofs checked; "
        f"{_signatures(report.signatures_checked)}; "
        f"trusted checkpoint saved to {opts.state}",
        file=stdout,
    )


def _signatures(checked: int | None) -> str:
    if checked is None:
        return "service signatures NOT checked (no --service-keys)"
    return f"{checked} service signatures verified"


def _batch_command(opts: Options, args: argparse.Namespace, stdout: IO[str], ui: Ui) -> None:
    client = LedgerClient(opts.url, opts.token)
    try:
        doc = client.batch(args.batch_id)
        steps = doc.get("timeline")
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            fail(Exit.NETWORK, f"/v1/batches/{args.batch_id}: no timeline list in the response")
        statuses = (
            verify_batch_steps(client, State.load(opts.state), opts, args.batch_id, steps, ui)
            if args.verify_steps
            else None
        )
    finally:
        client.close()
    lines = [
        f"batch {args.batch_id}",
        *_batch_summary(doc),
        "",
        "timeline",
        *_timeline_table(steps, statuses),
    ]
    print("\n".join(lines), file=stdout)
    if statuses is not None:
        print(f"{_paint(stdout, 'OK', GREEN)} {len(steps)} step(s) proven in the verified checkpoint", file=stdout)


def _batch_summary(doc: dict[str, Any]) -> list[str]:
    rows = [
        (name, json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value))
        for name, value in doc.items()
        if name != "timeline" and value is not None
    ]
    width = max((len(name) for name, _ in rows), default=0)
    return [f"  {name.ljust(width)}  {value}" for name, value in rows]


TIMELINE_COLUMNS = (
    ("#", None),
    ("leaf", "leaf_index"),
    ("decided at", "decided_at"),
    ("service", "service"),
    ("event", "event_type"),
    ("status", "status"),
    ("reason", "reason_code"),
    ("party", "party_id"),
    ("message", "message"),
)


def _timeline_table(steps: list[dict[str, Any]], statuses: list[str] | None) -> list[str]:
    headers = [title for title, _ in TIMELINE_COLUMNS] + (["proof"] if statuses is not None else [])
    rows = [
        [str(n), *("" if step.get(key) is None else str(step.get(key)) for _, key in TIMELINE_COLUMNS[1:])]
        + ([statuses[n - 1]] if statuses is not None else [])
        for n, step in enumerate(steps, start=1)
    ]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    # Aligned columns, never folded: a message is evidence and is printed whole.
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]


# --------------------------------------------------------------------------- entry points


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the command line; return the exit code (see audit.Exit). Reads sys.stdout/sys.stderr
    when called, so callers (tests, `gputrace audit`) can redirect them."""
    stdout, stderr = sys.stdout, sys.stderr
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help(stdout)
        return int(Exit.USAGE)
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("a command is required: verify or batch")
    except SystemExit as e:  # --help (0) or a usage error (1)
        return e.code if isinstance(e.code, int) else int(Exit.USAGE)
    opts = Options(
        url=args.url,
        token=args.token,
        state=args.state or default_state_path(),
        key=args.key,
        origin=args.origin,
        tofu=args.tofu,
        witnesses=getattr(args, "witnesses", []),
        witness_quorum=getattr(args, "witness_quorum", None),
        service_keys=args.service_keys,
    )
    command = _verify_command if args.command == "verify" else _batch_command
    try:
        command(opts, args, stdout, TerminalUi(stderr))
    except AuditFailure as e:
        print(f"{_paint(stderr, f'FAILED (exit {int(e.code)}):', RED)} {e.message}", file=stderr)
        return int(e.code)
    return int(Exit.OK)


def run() -> NoReturn:
    """The `gputrace-audit` console script."""
    sys.exit(main())
