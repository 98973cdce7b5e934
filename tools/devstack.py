"""Runs the services as separate processes on one machine: `make run` and the tests use it.

Each service is its own OS process with its own database and consumer group, exactly as in
production; this module only starts, watches, kills and restarts them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.contract import SERVICES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    name: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush; what a crash looks like."""
        if self.proc and self.running:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15) -> None:
        if self.proc and self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class Stack:
    """The set of service processes sharing one Kafka and one database server (or SQLite)."""

    base_env: dict[str, str]
    log_dir: Path
    database_urls: dict[str, str] = field(default_factory=dict)
    api_port: int = 8000
    # Each service serves /healthz and /metrics on its own port; the ledger's is the API.
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    # Each service speaks to Kafka as its own principal (KAFKA_SASL_USERNAME=<service>, password
    # from KAFKA_CREDENTIALS_DIR), whatever identity this process has. False: the environment's.
    kafka_principals: bool = False

    def env_for(self, name: str) -> dict[str, str]:
        env = {**os.environ, **self.base_env}
        env.pop("DATABASE_URL", None)
        if self.kafka_principals:
            env["KAFKA_SASL_USERNAME"] = name
            env.pop("KAFKA_SASL_PASSWORD", None)
        if name in self.database_urls:
            env["DATABASE_URL"] = self.database_urls[name]
        env["HTTP_PORT"] = str(self.port_of(name))
        return env

    def port_of(self, name: str) -> int:
        if name == "ledger":
            return self.api_port
        return self.ports.get(name) or free_port()

    def start(self, names: tuple[str, ...] = SERVICES) -> None:
        for name in names:
            self.ports.setdefault(name, self.port_of(name))
            p = ServiceProcess(name, self.env_for(name), self.log_dir / f"{name}.log")
            p.start()
            self.processes[name] = p

    def stop(self) -> None:
        for p in reversed(list(self.processes.values())):
            p.stop()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def health_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/healthz"

    def ready_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/readyz"

    def wait_ready(self, timeout: float = 120, names: tuple[str, ...] | None = None) -> None:
        """Every service answers /readyz with 200: its tables exist, its subscriber and relay run,
        and the broker answers (shared.runtime.health)."""
        deadline = time.monotonic() + timeout
        waiting = set(names or self.processes)
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = [n for n in waiting if not self.processes[n].running]
            if dead:
                tails = {n: self.processes[n].log_path.read_text()[-2000:] for n in dead}
                raise RuntimeError(f"service(s) exited: {dead}\n{tails}")
            for name in list(waiting):
                try:
                    # Longer than READINESS_PROBE_SECONDS, so a slow broker answer is not a miss.
                    answer = httpx.get(self.ready_url(name), timeout=5)
                except httpx.HTTPError as exc:
                    last[name] = f"{type(exc).__name__}"
                    continue
                if answer.status_code == 200:
                    waiting.discard(name)
                last[name] = answer.text[:500]
            if not waiting:
                return
            time.sleep(0.3)
        why = {n: last.get(n, "no answer") for n in sorted(waiting)}
        raise TimeoutError(f"services not ready in time: {why}")
