"""Real Kafka 4.x and PostgreSQL for tests and dev tools, with or without Docker.

Without Docker, the one mechanism is the scripts infra/kafka/kafka.sh and infra/postgres/postgres.sh;
the classes here only call them and add what a crash test needs (SIGKILL, restart on the same port
and data). With a Docker engine, `kafka_container` / `postgres_container` use testcontainers.
The fixtures in tests/conftest.py choose: env var, else Docker, else the scripts.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "infra" / "kafka" / "kafka.sh"
POSTGRES_SH = ROOT / "infra" / "postgres" / "postgres.sh"

KAFKA_IMAGE = "apache/kafka:4.1.1"
POSTGRES_IMAGE = "postgres:17"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the usual small race applies)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def docker_available() -> bool:
    """True when a docker client reaches an engine within ~2 s (False on the no-Docker dev/CI box)."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=2,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def _script(script: Path, *args: str, timeout: float = 600) -> str:
    """Run one of the infra scripts; return the last line it printed on stdout (its result)."""
    done = subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Running, not a zombie (a SIGKILLed process stays one until its parent reaps it)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    """Wait until the processes are reaped, not just dead: PostgreSQL and kafka.sh read a pid that
    still exists as a zombie as a server still running. Our own children we reap ourselves; the
    servers are orphans (their starter script exited), reaped by init a moment later."""
    deadline = time.monotonic() + timeout
    while pending := [p for p in pids if _stat(p) is not None]:
        for p in pending:
            stat = _stat(p)
            if stat is not None and stat[0] == "Z" and int(stat[1]) == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p, os.WNOHANG)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {pending} not gone {timeout}s after SIGKILL")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    kids = []
    for proc in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(proc.name))
        if stat is not None and int(stat[1]) == pid:
            kids.append(int(proc.name))
    return kids


@functools.cache
def kafka_credentials() -> Path:
    """One credentials dir per process (a <principal>.password each: the admin, every service, every
    development party), shared by every LocalKafka it starts, so this process has one admin identity."""
    from shared.contract import SERVICES
    from shared.runtime.kafka_auth import KAFKA_ADMIN
    from tools.devkeys import DEV_PARTIES
    from tools.kafka_access import write_credentials

    directory = Path(tempfile.mkdtemp(prefix="gputrace-kafka-credentials-"))
    write_credentials(directory, [KAFKA_ADMIN, *SERVICES, *(p for p, _, _ in DEV_PARTIES)])
    return directory


def speak_as_admin(credentials: Path) -> None:
    """From now on this process (the test harness: watchers, probes, fault injectors, in-process
    services) is the ops admin of the secured broker: Settings() reads the admin's identity from the
    environment, and aiokafka clients made without a security_protocol get it too. A client that
    names its own (the authorization tests) keeps it. Service processes started by a Stack with
    `kafka_principals` speak as themselves."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    from shared.runtime.kafka_auth import KAFKA_ADMIN, read_password

    os.environ.update(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": KAFKA_ADMIN,
            "KAFKA_SASL_PASSWORD": read_password(credentials, KAFKA_ADMIN),
            "KAFKA_CREDENTIALS_DIR": str(credentials),
        }
    )
    options = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": KAFKA_ADMIN,
        "sasl_plain_password": read_password(credentials, KAFKA_ADMIN),
    }
    for cls in (AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient):
        original = cls.__init__
        if getattr(original, "_gputrace_admin", False):
            continue

        def init(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            _original(self, *args, **(kwargs if "security_protocol" in kwargs else {**options, **kwargs}))

        init._gputrace_admin = True  # type: ignore[attr-defined]
        cls.__init__ = init  # type: ignore[method-assign]


@dataclass
class LocalKafka:
    """A single-node KRaft broker run by infra/kafka/kafka.sh; its directory keeps data and ports.

    Secured like production (SASL/SCRAM, ACLs; infra/kafka/kafka.sh) unless `secure=False`; the
    process that starts it becomes its admin (`speak_as_admin`)."""

    directory: Path
    bootstrap: str = ""
    secure: bool = True

    @property
    def credentials(self) -> Path | None:
        return kafka_credentials() if self.secure else None

    def start(self) -> LocalKafka:
        """Start (or restart after stop/kill) on the directory's port; returns when it answers."""
        args = ["--credentials", str(self.credentials)] if self.credentials else []
        self.bootstrap = _script(KAFKA_SH, "start", "--dir", str(self.directory), *args)
        if self.credentials:
            speak_as_admin(self.credentials)
        return self

    def stop(self) -> None:
        """Clean shutdown (SIGTERM; SIGKILL after 30 s). A no-op when not running."""
        _script(KAFKA_SH, "stop", "--dir", str(self.directory), timeout=120)

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would; returns once it is gone. `restart()` brings it back."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_gone([pid])

    def restart(self) -> LocalKafka:
        """Stop if running, start again: same port, same data."""
        self.stop()
        return self.start()

    @property
    def pid(self) -> int | None:
        try:
            pid = int((self.directory / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None


def start_kafka(data_dir: Path | str) -> LocalKafka:
    return LocalKafka(Path(data_dir)).start()


@dataclass
class LocalKafkaCluster:
    """`size` combined KRaft nodes run by `kafka.sh cluster` (one static quorum, topics with three
    copies); each node is a LocalKafka on its own dir, to kill and start again alone."""

    directory: Path
    size: int = 3
    bootstrap: str = ""
    secure: bool = True

    @property
    def credentials(self) -> Path | None:
        return kafka_credentials() if self.secure else None

    def start(self) -> LocalKafkaCluster:
        """Start every node (or those not running); returns when each answers."""
        args = ["--credentials", str(self.credentials)] if self.credentials else []
        self.bootstrap = _script(
            KAFKA_SH, "cluster", "start", "--dir", str(self.directory), "--nodes", str(self.size), *args
        )
        if self.credentials:
            speak_as_admin(self.credentials)
        return self

    def stop(self) -> None:
        _script(KAFKA_SH, "cluster", "stop", "--dir", str(self.directory), timeout=180)

    def node(self, node_id: int) -> LocalKafka:
        """Node `node_id` (1..size, Kafka's node.id), e.g. the leader of a partition."""
        return LocalKafka(self.directory / f"node{node_id}", secure=self.secure)

    @property
    def nodes(self) -> list[LocalKafka]:
        return [self.node(i) for i in range(1, self.size + 1)]


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster run by infra/postgres/postgres.sh (as user postgres when we are root).

    Its directory must be reachable by that user: as root, use a directory under /tmp rather than
    pytest's tmp_path (which sits in a root-only 0700 parent).
    """

    directory: Path
    url: str = ""

    def start(self) -> LocalPostgres:
        self.url = _script(POSTGRES_SH, "start", "--dir", str(self.directory))
        return self

    def stop(self) -> None:
        _script(POSTGRES_SH, "stop", "--dir", str(self.directory), timeout=120)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend, as a crash of the server would.

        Backends are in their own process groups (PostgreSQL setsid()s them), so they are found by
        parent pid. `restart()` then runs crash recovery on the same data and port.
        """
        pid = self.pid
        if pid is None:
            return
        victims = [pid, *_children(pid)]
        for p in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        _wait_gone(victims)

    def restart(self) -> LocalPostgres:
        self.stop()
        return self.start()

    def create_database(self, name: str) -> str:
        return create_database(self.url, name)

    @property
    def pid(self) -> int | None:
        try:
            pid = int((self.directory / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None


def start_postgres(data_dir: Path | str) -> LocalPostgres:
    return LocalPostgres(Path(data_dir)).start()


def create_database(admin_url: str, name: str) -> str:
    """Create database `name` (if missing) on the server of `admin_url`; return its URL.

    Works for any of the three sources (env, Docker, local), hence plain psycopg, not the script.
    """
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)


# --- Docker (testcontainers), only where an engine answers -------------------------------------


@contextlib.contextmanager
def kafka_container(image: str = KAFKA_IMAGE) -> Iterator[str]:
    """apache/kafka (KRaft) in a container; yields its bootstrap address.

    testcontainers' KafkaContainer is written for Confluent's image, so this drives apache/kafka
    directly, with the same trick: the container waits for its advertised listener (which needs
    the mapped host port, known only after start), then runs the image's own entry point.
    """
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    env = {
        "CLUSTER_ID": "4L6g3nShT-eMCtK--X86sw",
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:9092,BROKER://0.0.0.0:9093,CONTROLLER://0.0.0.0:9094",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,BROKER:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9094",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "10",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_MIN_INSYNC_REPLICAS": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    }
    flag = "/tmp/advertised"
    container = DockerContainer(image).with_exposed_ports(9092)
    for key, value in env.items():
        container = container.with_env(key, value)
    container = container.with_command(
        [
            "bash",
            "-c",
            f"while [ ! -s {flag} ]; do sleep 0.1; done; "
            f'export KAFKA_ADVERTISED_LISTENERS="$(cat {flag})"; exec /etc/kafka/docker/run',
        ]
    )
    with container:
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(9092))
        advertised = f"PLAINTEXT://{host}:{port},BROKER://localhost:9093"
        container.get_wrapped_container().exec_run(["bash", "-c", f"echo '{advertised}' > {flag}"])
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield f"{host}:{port}"


@contextlib.contextmanager
def postgres_container(image: str = POSTGRES_IMAGE) -> Iterator[str]:
    """PostgreSQL in a container; yields a postgresql+psycopg:// URL whose user may create databases."""
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer(image, driver="psycopg") as pg:
        yield pg.get_connection_url()


@contextlib.contextmanager
def kafka_and_postgres(
    work: Path, brokers: int = 1
) -> Iterator[tuple[str, str, LocalKafka | LocalKafkaCluster | None, LocalPostgres | None]]:
    """For the long runs outside pytest (bench, chaos): the Kafka and PostgreSQL the environment names
    (KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL), else local ones started under `work` and stopped on exit.
    Yields (bootstrap, admin URL, the local Kafka (a LocalKafkaCluster when `brokers` > 1) or None,
    the local PostgreSQL or None)."""
    kafka: LocalKafka | LocalKafkaCluster | None = None
    pg = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    admin_url = os.environ.get("DATABASE_URL")
    try:
        if not bootstrap:
            kafka = (LocalKafkaCluster(work / "kafka", brokers) if brokers > 1 else LocalKafka(work / "kafka")).start()
            bootstrap = kafka.bootstrap
        if not admin_url:
            pg = LocalPostgres(work / "pg").start()
            admin_url = pg.url
        yield bootstrap, admin_url, kafka, pg
    finally:
        if kafka:
            kafka.stop()
        if pg:
            pg.stop()
