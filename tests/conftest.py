"""Session fixtures: real Kafka 4.x and PostgreSQL, then the services as processes on top."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.infra import LocalKafka, LocalPostgres, docker_available, kafka_container, postgres_container
from tests.partner import PartnerClient, TopicWatcher
from tests.stack import auditor_headers, dump_logs, start_stack
from tools.devstack import Stack

# === infrastructure (owner: infra; keep this section compact and first) =======================
# Session-wide real Kafka 4.x and PostgreSQL. Source, in order: KAFKA_BOOTSTRAP_SERVERS /
# DATABASE_URL when set; else testcontainers when a Docker engine answers; else the local scripts
# infra/kafka/kafka.sh and infra/postgres/postgres.sh in temp dirs (no Docker needed).
#   kafka_bootstrap -> "host:port"              local_kafka    -> LocalKafka, or None if not ours
#   postgres_url    -> admin postgresql+psycopg:// URL (may CREATE DATABASE)
#   local_postgres  -> LocalPostgres, or None if not ours
# local_* allow kill()/restart() (same port, same data) in crash tests; skip such a test on None.


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or docker_available():
        yield None
        return
    kafka = LocalKafka(tmp_path_factory.mktemp("kafka")).start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(local_kafka: LocalKafka | None) -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif local_kafka is not None:
        yield local_kafka.bootstrap
    else:
        with kafka_container() as bootstrap:
            yield bootstrap


@pytest.fixture(scope="session")
def local_postgres() -> Iterator[LocalPostgres | None]:
    if os.environ.get("DATABASE_URL") or docker_available():
        yield None
        return
    # Not under pytest's tmp dir: as root the cluster runs as `postgres`, which can't enter it.
    directory = Path(tempfile.mkdtemp(prefix="gputrace-pg-"))
    pg = LocalPostgres(directory).start()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(local_postgres: LocalPostgres | None) -> Iterator[str]:
    if url := os.environ.get("DATABASE_URL"):
        scheme, rest = url.split("://", 1)
        yield ("postgresql+psycopg" if scheme in ("postgres", "postgresql") else scheme) + "://" + rest
    elif local_postgres is not None:
        yield local_postgres.url
    else:
        with postgres_container() as url:
            yield url


# --- the services -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def running(
    kafka_bootstrap: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, dict[str, str], Path]]:
    workdir = tmp_path_factory.mktemp("stack")
    stack, tokens = start_stack(kafka_bootstrap, postgres_url, workdir)
    yield stack, tokens, workdir
    stack.stop()


@pytest.fixture(scope="session")
def stack(running: tuple[Stack, dict[str, str], Path]) -> Stack:
    return running[0]


@pytest.fixture(scope="session")
def tokens(running: tuple[Stack, dict[str, str], Path]) -> dict[str, str]:
    return running[1]


@pytest.fixture(scope="session")
def keys_dir(running: tuple[Stack, dict[str, str], Path]) -> Path:
    return running[2] / "keys"


@pytest.fixture(scope="session")
def database_urls(stack: Stack) -> dict[str, str]:
    return stack.database_urls


@pytest.fixture(scope="session")
async def partner(kafka_bootstrap: str, keys_dir: Path) -> AsyncIterator[PartnerClient]:
    async with PartnerClient(kafka_bootstrap, keys_dir) as client:
        yield client


@pytest.fixture(scope="session")
async def outcomes(kafka_bootstrap: str, stack: Stack) -> AsyncIterator[TopicWatcher]:
    watcher = await TopicWatcher(kafka_bootstrap, "gputrace.outcomes.v1").start()
    yield watcher
    await watcher.stop()


@pytest.fixture(scope="session")
async def dlq(kafka_bootstrap: str, stack: Stack) -> AsyncIterator[TopicWatcher]:
    watcher = await TopicWatcher(kafka_bootstrap, "gputrace.dlq.v1").start()
    yield watcher
    await watcher.stop()


@pytest.fixture(scope="session")
async def api(stack: Stack, tokens: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auditor_headers(tokens), timeout=30) as client:
        yield client


# --- the same services on the embedded default (SQLite), for the tests that matter -------------
# Opt in per test with @pytest.mark.parametrize("backend", ["postgres", "sqlite"]) and read the
# stack's parts from `e2e`. The SQLite stack has a broker of its own: two stacks on one broker would
# both decide every event. Started on first use (a second broker and five services: ~30 s).


@pytest.fixture(scope="session")
def sqlite_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or docker_available():
        pytest.skip("the SQLite stack needs a broker of its own (local Kafka; not an external or container one)")
    kafka = LocalKafka(tmp_path_factory.mktemp("sqlite-kafka")).start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def sqlite_running(
    sqlite_kafka: LocalKafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, dict[str, str], Path]]:
    workdir = tmp_path_factory.mktemp("sqlite-stack")
    stack, tokens = start_stack(sqlite_kafka.bootstrap, None, workdir)
    yield stack, tokens, workdir
    stack.stop()


@pytest.fixture(scope="session")
async def sqlite_partner(
    sqlite_kafka: LocalKafka, sqlite_running: tuple[Stack, dict[str, str], Path]
) -> AsyncIterator[PartnerClient]:
    async with PartnerClient(sqlite_kafka.bootstrap, sqlite_running[2] / "keys") as client:
        yield client


@pytest.fixture(scope="session")
async def sqlite_outcomes(
    sqlite_kafka: LocalKafka, sqlite_running: tuple[Stack, dict[str, str], Path]
) -> AsyncIterator[TopicWatcher]:
    watcher = await TopicWatcher(sqlite_kafka.bootstrap, "gputrace.outcomes.v1").start()
    yield watcher
    await watcher.stop()


@pytest.fixture(scope="session")
async def sqlite_api(sqlite_running: tuple[Stack, dict[str, str], Path]) -> AsyncIterator[httpx.AsyncClient]:
    stack, tokens, _ = sqlite_running
    async with httpx.AsyncClient(base_url=stack.api_url, headers=auditor_headers(tokens), timeout=30) as client:
        yield client


@dataclass
class E2E:
    """One running system: its broker, services, keys and the clients the tests drive it with."""

    backend: str
    kafka_bootstrap: str
    stack: Stack
    tokens: dict[str, str]
    keys_dir: Path
    partner: PartnerClient
    outcomes: TopicWatcher
    api: httpx.AsyncClient

    @property
    def database_urls(self) -> dict[str, str]:
        return self.stack.database_urls


@pytest.fixture(scope="session")
def backend() -> str:
    """PostgreSQL unless a test parametrises `backend` (then also "sqlite")."""
    return "postgres"


@pytest.fixture
def e2e(backend: str, request: pytest.FixtureRequest) -> E2E:
    get = request.getfixturevalue
    if backend == "sqlite":
        stack, tokens, workdir = get("sqlite_running")
        kafka = get("sqlite_kafka").bootstrap
        return E2E(
            backend, kafka, stack, tokens, workdir / "keys", get("sqlite_partner"), get("sqlite_outcomes"),
            get("sqlite_api"),
        )  # fmt: skip
    return E2E(
        backend, get("kafka_bootstrap"), get("stack"), get("tokens"), get("keys_dir"), get("partner"),
        get("outcomes"), get("api"),
    )  # fmt: skip


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On a failing end-to-end test, append the services' last log lines to the report."""
    report = yield
    if report.failed and "running" in getattr(item, "fixturenames", ()):
        running = item.funcargs.get("running") if hasattr(item, "funcargs") else None
        if running:
            report.sections.append(("service logs", dump_logs(running[0])))
    elif report.failed and "e2e" in getattr(item, "fixturenames", ()):
        e2e = item.funcargs.get("e2e") if hasattr(item, "funcargs") else None
        if isinstance(e2e, E2E):
            report.sections.append((f"service logs ({e2e.backend})", dump_logs(e2e.stack)))
    return report
