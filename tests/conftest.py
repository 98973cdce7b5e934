"""Session fixtures: real Kafka 4.x and PostgreSQL, then the services as processes on top."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from shared.devstack import Stack
from tests.infra import LocalKafka, LocalPostgres, docker_available
from tests.partner import PartnerClient, TopicWatcher
from tests.stack import auditor_headers, dump_logs, start_stack

# --- infrastructure -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    """The broker this session started itself (None when it uses an external one)."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or docker_available():
        yield None
        return
    kafka = LocalKafka(tmp_path_factory.mktemp("kafka")).start()
    yield kafka
    kafka.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(local_kafka: LocalKafka | None) -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif local_kafka is not None:
        yield local_kafka.bootstrap
    else:
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL (postgresql+psycopg://) of an admin database on a real PostgreSQL."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    elif docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver="psycopg") as pg:
            yield pg.get_connection_url()
    else:
        # Not under pytest's tmp dir: that is private to root and the cluster runs as `postgres`.
        directory = Path(tempfile.mkdtemp(prefix="gputrace-pg-"))
        directory.chmod(0o755)
        pg = LocalPostgres(directory).start()
        yield pg.url
        pg.stop()
        shutil.rmtree(directory, ignore_errors=True)


# --- the services -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def running(kafka_bootstrap: str, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[Stack, dict[str, str], Path]
]:
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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On a failing end-to-end test, append the services' last log lines to the report."""
    report = yield
    if report.failed and "running" in getattr(item, "fixturenames", ()):
        running = item.funcargs.get("running") if hasattr(item, "funcargs") else None
        if running:
            report.sections.append(("service logs", dump_logs(running[0])))
    return report
