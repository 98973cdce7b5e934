"""The witness's key and the two published verifier keys, for `gputrace keys init` and `gputrace run`.

ledger.vkey is what the ledger operator publishes (auditors' --key, the witness's WITNESS_LOGS);
witness.vkey what the witness operator publishes (the ledger's WITNESSES, auditors' --witness).
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from gputrace_verifier.checkpoint import make_vkey
from gputrace_verifier.cosignature import make_witness_vkey

from shared.contract.parties import load_private_key, write_private_key
from shared.runtime.settings import Settings


def write_witness_keys(directory: Path, settings: Settings | None = None) -> Path:
    """witness.key (kept if present), and ledger.vkey / witness.vkey from the keys and names."""
    settings = settings or Settings()
    witness_key = directory / "witness.key"
    if not witness_key.exists():
        write_private_key(witness_key, Ed25519PrivateKey.generate())
    ledger = load_private_key(directory / "ledger.key").public_key()
    # The ledger signs with its origin as the key name (C2SP), so its vkey names the origin.
    (directory / "ledger.vkey").write_text(make_vkey(settings.ledger_origin, ledger) + "\n")
    witness = load_private_key(witness_key).public_key()
    (directory / "witness.vkey").write_text(make_witness_vkey(settings.witness_name, witness) + "\n")
    return witness_key


def witness_env(keys: Path, witness_port: int) -> dict[str, str]:
    """The environment of a local witness for the ledger, and of the ledger for that witness."""
    return {
        "WITNESS_SIGNING_KEY": str(keys / "witness.key"),
        "WITNESS_LOGS": json.dumps([str(keys / "ledger.vkey")]),
        "WITNESSES": json.dumps([{"url": f"http://127.0.0.1:{witness_port}", "vkey": str(keys / "witness.vkey")}]),
    }
