"""Real Kafka and PostgreSQL for the tests: from the environment, testcontainers, or local scripts.

Order (issue: Foundation): KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL when set; else testcontainers
when a Docker engine answers; else infra/kafka/kafka.sh and infra/postgres/postgres.sh.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "infra" / "kafka" / "kafka.sh"
POSTGRES_SH = ROOT / "infra" / "postgres" / "postgres.sh"


def docker_available() -> bool:
    try:
        out = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def _script(script: Path, *args: str) -> str:
    done = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


@dataclass
class LocalKafka:
    directory: Path
    bootstrap: str = ""

    def start(self) -> LocalKafka:
        self.bootstrap = _script(KAFKA_SH, "start", "--dir", str(self.directory))
        return self

    def stop(self) -> None:
        _script_quiet(KAFKA_SH, "stop", "--dir", str(self.directory))

    def kill(self) -> None:
        """SIGKILL the broker: what a crash looks like. `start` brings it back, same port and data."""
        pid = (self.directory / "kafka.pid").read_text().strip()
        os.kill(int(pid), signal.SIGKILL)


@dataclass
class LocalPostgres:
    directory: Path
    url: str = ""

    def start(self) -> LocalPostgres:
        self.url = _script(POSTGRES_SH, "start", "--dir", str(self.directory))
        return self

    def stop(self) -> None:
        _script_quiet(POSTGRES_SH, "stop", "--dir", str(self.directory))


def _script_quiet(script: Path, *args: str) -> None:
    subprocess.run(["bash", str(script), *args], capture_output=True, timeout=120)
