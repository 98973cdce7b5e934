"""`gputrace`: the project's command line (keys, topics, services)."""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path
from typing import Annotated

import typer
from gputrace_verifier.cli import main as audit_main
from rich.console import Console

from shared.contract import SERVICES
from shared.runtime.settings import Settings

app = typer.Typer(help="gputrace: trace the national GPU programme from pledge to acceptance.", no_args_is_help=True)
keys_app = typer.Typer(help="Party keys, the party registry, API tokens and the ledger key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(importlib.import_module("tools.kafka_access").kafka_app, name="kafka")
app.command("docs")(importlib.import_module("tools.docs").docs_command)
app.command("migrate")(importlib.import_module("tools.migrate").migrate_command)


# A pass-through, so that `gputrace audit ...` and `gputrace-audit ...` are one command line.
@app.command(
    "audit", add_help_option=False, context_settings={"ignore_unknown_options": True, "allow_extra_args": True}
)
def audit(ctx: typer.Context) -> None:
    """Audit the ledger from outside (the verifier's gputrace-audit); see `gputrace audit --help`."""
    raise typer.Exit(audit_main(ctx.args, prog="gputrace audit"))


console = Console()

SERVICE_MODULES = {name: f"services.{name}.main" for name in SERVICES}


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Option(help="Where to write keys, registry.json and tokens.json")] = Path(
        "var/keys"
    ),
) -> None:
    """Generate a development party registry, a key per party and per deciding service, the ledger
    key and API tokens.

    Existing keys and tokens are kept, so running it again is safe.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from services.ledger.auth import write_dev_tokens
    from shared.contract import DECIDING_SERVICES
    from shared.contract.parties import write_private_key
    from tools.devkeys import DEV_PARTIES, generate_dev_registry

    registry = generate_dev_registry(directory)
    ledger_key = directory / "ledger.key"
    if not ledger_key.exists():
        write_private_key(ledger_key, Ed25519PrivateKey.generate())
    partners = [pid for pid, _, roles in DEV_PARTIES]
    tokens = write_dev_tokens(directory / "tokens.json", partners)
    console.print(f"registry   {registry}")
    console.print(f"ledger key {ledger_key}")
    from tools.witness_keys import write_witness_keys

    console.print(f"witness key {write_witness_keys(directory)}   (published: ledger.vkey, witness.vkey)")
    # A Kafka password per principal (admin, each service, each partner): tools/kafka_access.py.
    from shared.contract.parties import PartyRegistry
    from tools.kafka_access import principals, write_credentials

    write_credentials(directory / "kafka", principals(PartyRegistry.load(registry)))
    console.print(f"kafka      {directory / 'kafka'}/<principal>.password")
    console.print(f"service keys {', '.join(str(directory / f'{s}.key') for s in DECIDING_SERVICES)}")
    # tokens.json holds only hashes; the plain development tokens are in tokens.dev.json.
    console.print(f"auditor token: [bold]{tokens['auditor']}[/bold]   (all tokens: {directory / 'tokens.dev.json'})")


@app.command("topics")
def topics(
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (default: KAFKA_BOOTSTRAP_SERVERS)")
    ] = None,
) -> None:
    """Create the project's topics with their declared partition counts."""
    from shared.runtime.topics import ensure_topics
    from tools.kafka_access import tool_options

    servers = bootstrap or Settings().kafka_bootstrap_servers
    created = asyncio.run(ensure_topics(servers, client_options=tool_options("admin")))
    console.print(f"created {len(created)} topic(s) on {servers}: {', '.join(created) or 'none missing'}")


@app.command("serve")
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICE_MODULES)}")],
) -> None:
    """Run one service in the foreground (settings from the environment)."""
    if service not in SERVICE_MODULES:
        raise typer.BadParameter(f"unknown service {service!r}; choose one of {', '.join(SERVICE_MODULES)}")
    importlib.import_module(SERVICE_MODULES[service]).main()


@app.command("publish")
def publish(
    party: Annotated[str, typer.Argument(help="The sending party's id, e.g. nhn-cloud")],
    short_type: Annotated[
        str, typer.Argument(help="Event type without the gputrace. prefix, e.g. pledge.committed.v1")
    ],
    data: Annotated[str, typer.Argument(help="The event's data as JSON ('-' reads standard input)")],
    keys: Annotated[Path, typer.Option(help="Directory with <party>.key files")] = Path("var/keys"),
    bootstrap: Annotated[
        str | None, typer.Option(help="Kafka bootstrap servers (default: KAFKA_BOOTSTRAP_SERVERS)")
    ] = None,
) -> None:
    """Sign an event as PARTY and publish it on its topic, as a partner system would."""
    import sys
    import uuid

    from aiokafka import AIOKafkaProducer

    from shared.contract import EVENTS, party_source
    from shared.contract.cloudevents import CloudEvent, now_rfc3339
    from shared.contract.parties import load_private_key

    spec = EVENTS.get(f"gputrace.{short_type}")
    if spec is None:
        raise typer.BadParameter(f"unknown type; one of: {', '.join(t.removeprefix('gputrace.') for t in EVENTS)}")
    body = json.loads(sys.stdin.read() if data == "-" else data)
    event = CloudEvent(
        id=str(uuid.uuid4()),
        source=party_source(party),
        type=spec.type,
        subject=str(body.get(spec.aggregate_field, "")) or None,
        time=now_rfc3339(),
        data=body,
    ).signed(load_private_key(keys / f"{party}.key"))
    servers = bootstrap or Settings().kafka_bootstrap_servers

    async def send() -> None:
        # As the party's own Kafka principal: the broker lets it write only its partner topics.
        from tools.kafka_access import tool_options

        producer = AIOKafkaProducer(
            bootstrap_servers=servers, acks="all", enable_idempotence=True, **tool_options(party, keys)
        )
        await producer.start()
        try:
            key, value, headers = event.as_record()
            await producer.send_and_wait(spec.topic, value, key=key, headers=headers)
        finally:
            await producer.stop()

    asyncio.run(send())
    console.print(f"published {spec.type} id={event.id} to {spec.topic}; its outcome comes on gputrace.outcomes.v1")


@app.command("run")
def run(
    kafka_port: Annotated[
        int, typer.Option(help="Port of the local Kafka broker started when none is given (0: pick a free one)")
    ] = 9092,
    api_port: Annotated[int, typer.Option(help="Port of the ledger API (0: pick a free one)")] = 8000,
    var_dir: Annotated[Path, typer.Option(help="Keys, embedded databases, Kafka data and logs")] = Path("var"),
) -> None:
    """Start the whole system on this machine: Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set), the
    topics, and every service as its own process. Ctrl-C stops everything cleanly.

    Each service keeps its data in its own SQLite file under VAR_DIR/data unless DATABASE_URL_<SERVICE>
    (e.g. DATABASE_URL_LEDGER) points it at PostgreSQL.

    It refuses to start, naming the process, when a port it needs is taken: it never joins
    whatever else answers there.
    """
    import os
    import signal
    import subprocess
    import time

    from rich.markup import escape

    from tools.devstack import Stack
    from tools.ports import PortTaken, choose

    var_dir = var_dir.resolve()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    # Before anything starts. Our own broker from an earlier run may hold its port: kafka.sh reuses it.
    try:
        if not bootstrap:
            pid_file = var_dir / "kafka" / "kafka.pid"
            pid_text = pid_file.read_text().strip() if pid_file.exists() else ""
            ours = int(pid_text) if pid_text.isdigit() else None
            kafka_port, note = choose(kafka_port, "Kafka", "--kafka-port", ours=ours)
            if note:
                console.print(note, soft_wrap=True)
        api_port, note = choose(api_port, "the ledger API", "--api-port")
        if note:
            console.print(note, soft_wrap=True)
    except PortTaken as exc:
        # soft_wrap: one line whatever the terminal's width; escape: a command line may hold [brackets].
        console.print(f"[red]cannot start[/red]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    keys = var_dir / "keys"
    keys_init(keys)
    root = Path(__file__).resolve().parent.parent
    started_kafka = False
    if not bootstrap:
        console.print("starting Kafka (first run fetches its jars from Maven Central)...")
        out = subprocess.run(
            [
                "bash",
                str(root / "infra/kafka/kafka.sh"),
                "start",
                "--dir",
                str(var_dir / "kafka"),
                "--port",
                str(kafka_port),
                # Secured like production: SASL/SCRAM, one principal each, ACLs (docs/ops.md).
                "--credentials",
                str(keys / "kafka"),
            ],
            check=False,
            stdout=subprocess.PIPE,
            text=True,
        )
        if out.returncode != 0:
            console.print("[red]Kafka did not start[/red] (kafka.sh said why, above)")
            raise typer.Exit(1)
        bootstrap = out.stdout.strip().splitlines()[-1]
        started_kafka = True
    from shared.runtime.topics import ensure_topics
    from tools.kafka_access import apply_acls, declared_acls, tool_options

    # Our broker: topics and ACLs as its admin, and each service as its own principal. A broker
    # named by KAFKA_BOOTSTRAP_SERVERS: the identity (and ACLs) the environment gives.
    admin = tool_options("admin", keys) if started_kafka else Settings().kafka_client_options()
    asyncio.run(ensure_topics(bootstrap, client_options=admin))
    if started_kafka:
        from shared.contract.parties import PartyRegistry

        asyncio.run(apply_acls(bootstrap, admin, declared_acls(PartyRegistry.load(keys / "registry.json"))))
    from tools.devstack import free_port
    from tools.witness_keys import witness_env

    witness_port = free_port()  # a witness cosigns each checkpoint; the ledger's WITNESSES names it
    stack = Stack(
        kafka_principals=started_kafka,
        base_env={
            **({"KAFKA_CREDENTIALS_DIR": str(keys / "kafka")} if started_kafka else {}),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "PARTY_REGISTRY": str(keys / "registry.json"),
            "VAR_DIR": str(var_dir),
            "LEDGER_SIGNING_KEY": str(keys / "ledger.key"),
            "API_TOKENS": str(keys / "tokens.json"),
            **witness_env(keys, witness_port),
        },
        log_dir=var_dir / "logs",
        database_urls={
            s: os.environ[f"DATABASE_URL_{s.upper()}"] for s in SERVICES if f"DATABASE_URL_{s.upper()}" in os.environ
        },
        api_port=api_port,
    )
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    from tools.migrate import MIGRATED, migrate_one

    signal.signal(signal.SIGTERM, _stop)
    try:
        # Each database brought to its code's schema first, as compose's migrate job does: a
        # service refuses to start on an older one (docs/ops.md, "Schema migrations").
        for name in MIGRATED:
            url = Settings(database_url=stack.database_urls.get(name), var_dir=var_dir).sqlalchemy_url(name)
            console.print(f"  migrate    {asyncio.run(migrate_one(url, name))}")
        stack.ports["witness"] = witness_port
        stack.start(("witness", *SERVICES))
        stack.wait_ready(timeout=120)
        # The hashed tokens.json cannot give it back: the development file keeps the plain tokens.
        auditor = json.loads((keys / "tokens.dev.json").read_text())["auditor"]
        ports = ", ".join(f"{n} :{stack.ports[n]}" for n in SERVICES)
        console.print(f"  /healthz, /readyz and /metrics: {ports}")
        console.print(f"[green]gputrace is running[/green]: Kafka {bootstrap}, services {', '.join(SERVICES)}")
        console.print(f"  API        {stack.api_url}/docs   (Authorization: Bearer {auditor})")
        console.print(f"  dashboard  {stack.api_url}/")
        console.print(f"  witness    http://127.0.0.1:{witness_port}   (audit: --witness {keys / 'witness.vkey'})")
        console.print(f"  logs       {var_dir / 'logs'}")
        console.print("Ctrl-C stops everything.")
        while not stopping:
            dead = [n for n, p in stack.processes.items() if not p.running]
            if dead:
                console.print(f"[red]service(s) exited: {', '.join(dead)}[/red]; see {var_dir / 'logs'}")
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping services...")
        stack.stop()
        if started_kafka:
            console.print("stopping Kafka...")
            subprocess.run(
                ["bash", str(root / "infra/kafka/kafka.sh"), "stop", "--dir", str(var_dir / "kafka")], check=False
            )
        console.print("stopped.")


app.command("demo")(importlib.import_module("tools.demo").demo)

ops_app = typer.Typer(help="Operations: what needs a person.", no_args_is_help=True)
app.add_typer(ops_app, name="ops")


@ops_app.command("parked")
def ops_parked(
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help="Service to look at (repeatable; default: all)")
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="The service's database (default: DATABASE_URL_<SERVICE>, then DATABASE_URL; "
            "else its SQLite file under --var-dir)"
        ),
    ] = None,
    var_dir: Annotated[Path, typer.Option(help="Where the embedded SQLite databases live")] = Path("var"),
    limit: Annotated[int, typer.Option(min=1, help="Most rows shown per service")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row instead of a table")] = False,
) -> None:
    """Outbox rows that can never be sent (too large, refused by the broker), parked so that the
    rows behind them flow: what they were, where they were going, and why they stay."""
    import dataclasses
    import os

    from rich.table import Table
    from sqlalchemy.exc import SQLAlchemyError

    from shared.runtime.db import make_engine
    from shared.runtime.outbox import ParkedRow, list_parked

    services = service or list(SERVICE_MODULES)
    unknown = [s for s in services if s not in SERVICE_MODULES]
    if unknown:
        raise typer.BadParameter(f"unknown service {unknown[0]!r}; choose from {', '.join(SERVICE_MODULES)}")
    if database_url and len(services) != 1:
        raise typer.BadParameter("--database-url names one service's database: give one --service")

    async def read(svc: str) -> list[ParkedRow] | str:
        url = database_url or os.environ.get(f"DATABASE_URL_{svc.upper()}") or os.environ.get("DATABASE_URL")
        if not url and not (var_dir / "data" / f"{svc}.db").exists():
            return "no database"
        engine = make_engine(Settings(database_url=url, var_dir=var_dir).sqlalchemy_url(svc))
        try:
            return await list_parked(engine, limit)
        except SQLAlchemyError as exc:  # unreachable, or a database the service never started on
            return f"unreadable: {str(exc).splitlines()[0]}"
        finally:
            await engine.dispose()

    found = {svc: asyncio.run(read(svc)) for svc in services}
    if as_json:
        for svc, rows in found.items():
            for row in rows if isinstance(rows, list) else []:
                typer.echo(json.dumps({"service": svc, **dataclasses.asdict(row)}))
        return
    table = Table(title="Parked outbox rows")
    for column in ("service", "id", "outbox id", "topic", "key", "bytes", "parked at", "reason"):
        table.add_column(column, overflow="fold")  # wrapped, never cut: ops need all of it
    for svc, rows in found.items():
        if isinstance(rows, str):
            console.print(f"{svc}: {rows}")
            continue
        for r in rows:
            table.add_row(svc, str(r.id), str(r.outbox_id), r.topic, r.key, f"{r.size:,}", r.parked_at, r.reason)
    total = sum(len(rows) for rows in found.values() if isinstance(rows, list))
    if total:
        console.print(table)
    console.print(f"{total} parked row(s)")


screening_app = typer.Typer(help="Restricted-party screening lists (see docs/screening.md).", no_args_is_help=True)
app.add_typer(screening_app, name="screening")


@screening_app.command("import")
def screening_import(
    file: Annotated[
        Path, typer.Argument(help="The Consolidated Screening List, as trade.gov publishes it (JSON or CSV)")
    ],
    var_dir: Annotated[Path, typer.Option(help="Where snapshots are kept (VAR_DIR/screening)")] = Path("var"),
    source_date: Annotated[
        str | None, typer.Option(help="The file's date (YYYY-MM-DD); required for CSV, which names none")
    ] = None,
    activate: Annotated[bool, typer.Option(help="Make the new snapshot the active one")] = True,
) -> None:
    """Store a CSL file as an immutable, content-hashed snapshot and make it the active one."""
    from datetime import date

    from services.export_controls.domain import ExportControlError
    from services.export_controls.domain.snapshots import import_csl

    try:
        when = date.fromisoformat(source_date) if source_date else None
    except ValueError as exc:
        raise typer.BadParameter(f"--source-date: {exc}") from None
    try:
        snap = import_csl(file.read_bytes(), var_dir, source_file=file.name, source_date=when, activate=activate)
    except (OSError, ExportControlError) as exc:
        typer.echo(f"import failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        json.dumps(
            {
                "sha256": snap.sha256,
                "source_date": snap.snapshot_date.isoformat(),
                "entries": len(snap.entries),
                "active": activate,
            }
        )
    )


@screening_app.command("list")
def screening_list(
    var_dir: Annotated[Path, typer.Option(help="Where snapshots are kept (VAR_DIR/screening)")] = Path("var"),
) -> None:
    """The stored snapshots, one JSON object per line (hash, source date, entries, active)."""
    from services.export_controls.domain.snapshots import list_snapshots

    for row in list_snapshots(var_dir):
        typer.echo(json.dumps(row))


if __name__ == "__main__":
    app()
