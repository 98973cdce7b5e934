"""What `gputrace demo` prints, and its command line."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from aiokafka.errors import KafkaError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tools.demo.programme import Programme
from tools.demo.publish import (
    DemoConfig,
    DemoFailure,
    DemoReport,
    PhaseResult,
    Unreachable,
    read_auditor_token,
    run_demo,
)

# --- output ---------------------------------------------------------------------------------


def batch_table(p: Programme, batches: dict[str, dict[str, Any]]) -> Table:
    table = Table(
        title=f"the ledger's batches, programme {p.program_id}",
        box=box.SIMPLE_HEAD,
        caption=f"batch ids: {p.program_id}-<batch>-<model>-{p.run_id}; scale {p.scale:g}",
    )
    for col in ("batch", "model", "vendor", "status", "export"):
        table.add_column(col)
    for col in ("awarded", "shipped", "damaged", "installed", "accepted", "failed"):
        table.add_column(col, justify="right")
    for b in p.batches:
        doc = batches.get(b.batch_id, {})
        q = doc.get("quantities") or {}
        table.add_row(
            b.code,
            b.alloc.model,
            doc.get("vendor_id") or "-",
            doc.get("status", "?"),
            (doc.get("export") or {}).get("status") or "-",
            *(f"{q.get(k, 0):,}" for k in ("awarded", "dispatched", "damaged", "installed", "accepted", "failed")),
        )
    return table


def _money(totals: dict[str, str] | None) -> str:
    return ", ".join(f"{Decimal(v):,} {c}" for c, v in (totals or {}).items()) or "none"


def phase_table(phases: Sequence[PhaseResult]) -> Table:
    table = Table(title="outcomes per phase (gputrace.outcomes.v1)", box=box.SIMPLE_HEAD)
    for col in ("phase", "events", "accepted", "rejected", "resent", "seconds"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for r in phases:
        table.add_row(
            r.name,
            str(len(r.decided)),
            str(r.count("accepted")),
            str(r.count("rejected")),
            str(r.retried),
            f"{r.seconds:.1f}",
        )
    return table


def print_report(console: Console, report: DemoReport, cfg: DemoConfig) -> None:
    console.print(phase_table(report.phases))
    console.print(batch_table(report.programme, report.batches))
    prog = report.program
    gpus = ", ".join(f"{n:,} {m}" for m, n in (prog.get("gpus") or {}).items())
    console.print(
        f"programme {report.programme.program_id} (all runs): in-kind GPUs {gpus} = "
        f"{prog.get('gpus_total', 0):,} against a target of {prog.get('target_gpus', 0):,}; capital pledged "
        f"{_money(prog.get('capital'))}, disbursed {_money(prog.get('disbursed'))}"
    )
    flow = prog.get("pipeline_gpus") or {}
    if flow:
        console.print("GPUs through the pipeline: " + ", ".join(f"{k} {v:,}" for k, v in flow.items()))
    token = cfg.token or read_auditor_token(cfg.keys_dir)
    api = cfg.api_url.rstrip("/")
    console.print(f"[bold green]demo done[/bold green] in {report.seconds:.1f} s. Where to look:")
    console.print(f"  API docs   {api}/docs   (Authorization: Bearer <auditor token>)")
    console.print(f"  dashboard  {api}/")
    console.print(f"  batches    {api}/v1/batches?program_id={report.programme.program_id}")
    # The full audit: the log's checkpoint, every entry's service signature, the witness's cosignature.
    keys = cfg.keys_dir
    extra = f" --service-keys {keys / 'registry.json'}" if (keys / "registry.json").exists() else ""
    witness = f" --witness {keys / 'witness.vkey'}" if (keys / "witness.vkey").exists() else ""
    console.print(
        f"  verify     gputrace audit --url {api} --token {token} --tofu{extra} verify{witness}", soft_wrap=True
    )
    source = "--token" if cfg.token else f"{cfg.keys_dir / 'tokens.dev.json'} (auditor)"
    console.print(f"  auditor token: {source}")


# --- command line ---------------------------------------------------------------------------

RUN_ID = re.compile(r"^[A-Za-z0-9]{1,16}$")


def demo(
    bootstrap: Annotated[str, typer.Option(envvar="KAFKA_BOOTSTRAP_SERVERS", help="Kafka bootstrap servers.")] = (
        "127.0.0.1:9092"
    ),
    keys: Annotated[Path, typer.Option(help="Directory of <party>.key files, tokens.dev.json.")] = Path("var/keys"),
    api: Annotated[str, typer.Option(help="Base URL of the ledger API.")] = "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(help="Auditor token (default: <keys>/tokens.dev.json).")] = None,
    program_id: Annotated[str, typer.Option(help="Programme id of every pledge and batch.")] = "KR-NAICC-2025",
    scale: Annotated[float, typer.Option(min=0.0001, max=10.0, help="Fraction of the real quantities.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed of the random choices (damaged and failed units).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Suffix of every id (default: random), so runs never collide.")] = (
        None
    ),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each phase's outcomes.")] = 300.0,
    serials: Annotated[
        bool,
        typer.Option(
            "--serials/--no-serials",
            help="Every serial dispatched, cleared, received, installed and accepted (--no-serials: stop at "
            "export clearance).",
        ),
    ] = True,
) -> None:
    """Publish the 260,000-GPU programme of 2025-10-31, signed by simulated partner systems, against a
    running gputrace (--scale 1.0: every GPU; 0.01: a hundredth of each tranche).

    Waits for every event's outcome and for the ledger to show each batch accepted.

    Exits non-zero if anything expected to be accepted was not: a smoke test of the whole system.
    """
    if run_id is not None and not RUN_ID.match(run_id):
        raise typer.BadParameter("letters and digits only, at most 16", param_hint="--run-id")
    cfg = DemoConfig(
        bootstrap, keys, api, token, program_id, scale, seed, run_id or secrets.token_hex(3), timeout, serials
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and CI: wide enough for the tables
    console.print(
        f"gputrace demo: programme {program_id}, run {cfg.run_id}, scale {scale:g}, Kafka {bootstrap}, ledger {api}"
    )
    try:
        report = asyncio.run(run_demo(cfg, console))
    except Unreachable as exc:
        console.print(f"[bold red]cannot reach the system:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    except DemoFailure as exc:
        console.print(f"[bold red]demo failed:[/bold red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    except (KafkaError, OSError, httpx.HTTPError) as exc:
        console.print(f"[bold red]cannot reach the system:[/bold red] {type(exc).__name__}: {escape(str(exc))}")
        raise typer.Exit(2) from None
    print_report(console, report, cfg)
