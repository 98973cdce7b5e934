"""gputrace's verifier: checks a gputrace ledger from outside, trusting only the ledger's key.

- `gputrace_verifier.merkle`: RFC 9162 Merkle trees, inclusion and consistency proofs.
- `gputrace_verifier.checkpoint`: C2SP tlog-checkpoints in the C2SP signed-note format (Ed25519).
- `gputrace_verifier.audit`: the auditor's checks and the ledger HTTP client.
- `gputrace_verifier.cli`: the `gputrace-audit` command (also `gputrace audit`).

It depends on cryptography, rfc8785 and httpx only, and on no other part of gputrace.
"""
