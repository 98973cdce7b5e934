"""`gputrace`: the project's command line (keys, topics, services)."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shared.audit import audit_app
from shared.settings import Settings

app = typer.Typer(help="gputrace: trace the national GPU programme from pledge to acceptance.", no_args_is_help=True)
keys_app = typer.Typer(help="Party keys, the party registry, API tokens and the ledger key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
console = Console()

SERVICE_MODULES = {
    "pledges": "services.pledges.main",
    "quotes": "services.quotes.main",
    "export_controls": "services.export_controls.main",
    "deliveries": "services.deliveries.main",
    "ledger": "services.ledger.main",
}


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Option(help="Where to write keys, registry.json and tokens.json")] = Path(
        "var/keys"
    ),
) -> None:
    """Generate a development party registry, a key per party, the ledger key and API tokens.

    Existing keys and tokens are kept, so running it again is safe.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from services.ledger.auth import write_dev_tokens
    from shared.parties import DEV_PARTIES, generate_dev_registry, write_private_key

    registry = generate_dev_registry(directory)
    ledger_key = directory / "ledger.key"
    if not ledger_key.exists():
        write_private_key(ledger_key, Ed25519PrivateKey.generate())
    partners = [pid for pid, _, roles in DEV_PARTIES]
    tokens = write_dev_tokens(directory / "tokens.json", partners)
    console.print(f"registry   {registry}")
    console.print(f"ledger key {ledger_key}")
    console.print(f"auditor token: [bold]{tokens['auditor']}[/bold]   (all tokens: {directory / 'tokens.json'})")


@app.command("topics")
def topics(
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers (default: KAFKA_BOOTSTRAP_SERVERS)")] = None,
) -> None:
    """Create the project's topics with their declared partition counts."""
    from shared.topics import ensure_topics

    servers = bootstrap or Settings().kafka_bootstrap_servers
    created = asyncio.run(ensure_topics(servers))
    console.print(f"created {len(created)} topic(s) on {servers}: {', '.join(created) or 'none missing'}")


@app.command("serve")
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICE_MODULES)}")],
) -> None:
    """Run one service in the foreground (settings from the environment)."""
    if service not in SERVICE_MODULES:
        raise typer.BadParameter(f"unknown service {service!r}; choose one of {', '.join(SERVICE_MODULES)}")
    importlib.import_module(SERVICE_MODULES[service]).main()


if __name__ == "__main__":
    app()
