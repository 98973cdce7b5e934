"""`python -m gputrace_verifier ...` is `gputrace-audit ...`."""

from gputrace_verifier.cli import run

run()
