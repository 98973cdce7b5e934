"""docker-compose.yml and infra/Dockerfile agree with the code, checked without a Docker engine.

A compose file is only exercised when someone runs it; these tests catch what would break
there: a service module renamed, a setting misspelt in the environment, a dependency on a
service that has no healthcheck, a missing volume or COPY source.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.contract import SERVICES
from shared.runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES_YML: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = ROOT / "infra" / "Dockerfile"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):  # short form: no condition, i.e. service_started
        return dict.fromkeys(deps, "service_started")
    return {name: spec["condition"] for name, spec in deps.items()}


ONE_SHOT = {
    dep
    for s in SERVICES_YML.values()
    for dep, cond in _depends_on(s).items()
    if cond == "service_completed_successfully"
}
LONG_RUNNING = sorted(set(SERVICES_YML) - ONE_SHOT)
# The services built from our image, i.e. gputrace processes (the rest are Kafka and PostgreSQL).
OURS = sorted(name for name, s in SERVICES_YML.items() if "build" in s)
# More nodes and replicas of the services above, in the cluster profile only (tested on their own).
CLUSTER_ONLY = {name for name, s in SERVICES_YML.items() if "cluster" in s.get("profiles", [])}


def _module(command: list[str] | str) -> str | None:
    argv = shlex.split(command) if isinstance(command, str) else command
    return argv[argv.index("-m") + 1] if "-m" in argv else None


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in SERVICES_YML.items():
        assert "image" in service or "build" in service, name


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_a_healthcheck(name: str) -> None:
    check = SERVICES_YML[name].get("healthcheck")
    assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_one_shot_jobs_are_not_restarted() -> None:
    assert ONE_SHOT, "expected the keys and topics jobs"
    for name in ONE_SHOT:
        assert str(SERVICES_YML[name].get("restart", "no")) in {"no", "False", "false"}, name


def test_depends_on_names_existing_services_with_a_condition_they_can_meet() -> None:
    for name, service in SERVICES_YML.items():
        for dep, condition in _depends_on(service).items():
            assert dep in SERVICES_YML, f"{name} depends on unknown service {dep}"
            assert condition in CONDITIONS, f"{name} -> {dep}: unknown condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES_YML[dep], f"{name} waits for {dep} to be healthy; it has no check"


def test_every_gputrace_service_is_composed() -> None:
    modules = {_module(SERVICES_YML[n].get("command", [])) for n in OURS}
    for service in SERVICES:
        assert f"services.{service}" in modules, f"no compose service runs services.{service}"


@pytest.mark.parametrize("name", OURS)
def test_command_names_a_module_that_exists(name: str) -> None:
    command = SERVICES_YML[name].get("command")
    assert command, f"{name} has no command"
    module = _module(command)
    if module is None:  # the `gputrace` CLI itself, or a shell chaining `gputrace` commands
        argv = command if isinstance(command, list) else shlex.split(command)
        steps = [shlex.split(step) for step in argv[2].split("&&")] if argv[:2] == ["sh", "-c"] else [argv]
        assert all(step[0] == "gputrace" for step in steps), name
        return
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{name}: no module {module}"
    if spec.submodule_search_locations is not None:  # a package runs its __main__
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{name}: {module} has no __main__"


@pytest.mark.parametrize("name", OURS)
def test_environment_names_known_settings(name: str) -> None:
    env = SERVICES_YML[name].get("environment", {})
    names = [e.split("=", 1)[0] for e in env] if isinstance(env, list) else list(env)
    unknown = [n for n in names if n.lower() not in Settings.model_fields]
    assert not unknown, f"{name} sets {unknown}, which no Settings field reads (shared/runtime/settings.py)"


def test_each_service_has_its_own_database_created_by_the_init_script() -> None:
    created = set(SERVICES_YML["postgres"]["environment"]["GPUTRACE_DATABASES"].split())
    seen: set[str] = set()
    for name in [n for n in OURS if n not in ONE_SHOT | CLUSTER_ONLY]:  # a migrate job works on its service's
        url = SERVICES_YML[name].get("environment", {}).get("DATABASE_URL")
        if url is None:
            continue
        database = url.rsplit("/", 1)[1]
        assert database in created, f"{name} uses {database}, which postgres-init.sh is not told to create"
        assert database not in seen, f"{database} is shared; each service has its own database"
        seen.add(database)
    assert len(seen) == len(SERVICES) + 1  # and the witness's


def test_kafka_is_kraft_4_without_auto_topic_creation() -> None:
    kafka = SERVICES_YML["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"]), kafka["image"]
    # The secured broker is configured by the script compose runs as its entrypoint (its
    # server.properties heredoc), no longer by KAFKA_* variables.
    script = (ROOT / "infra" / "docker" / kafka["entrypoint"][-1].rsplit("/", 1)[1]).read_text()
    conf = dict(
        line.split("=", 1) for line in script.split("<<EOF\n", 1)[1].split("\nEOF", 1)[0].splitlines() if "=" in line
    )
    assert conf["auto.create.topics.enable"] == "false"
    assert set(conf["process.roles"].split(",")) == {"broker", "controller"}
    internal = next(a for a in conf["advertised.listeners"].split(",") if a.startswith("INTERNAL://"))
    internal = internal.replace("$SELF", "kafka")  # node 1's name (the script's name_of)
    for name in OURS:
        servers = SERVICES_YML[name].get("environment", {}).get("KAFKA_BOOTSTRAP_SERVERS")
        default = re.sub(r"\$\{\w+:-(.*)\}", r"\1", servers or "")  # ${KAFKA_CLUSTER_BOOTSTRAP:-kafka:9092}
        assert servers is None or default == internal.removeprefix("INTERNAL://"), f"{name} does not use the listener"


def _volume_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
        sources.append(source)
    return sources


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    used = set()
    for name, service in SERVICES_YML.items():
        for source in _volume_sources(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"


def test_dockerfile_copies_what_exists_and_runs_as_non_root() -> None:
    for name in OURS:
        build = SERVICES_YML[name]["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.resolve() == DOCKERFILE, f"{name} is not built from infra/Dockerfile"
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    copies = [shlex.split(line)[1:] for line in lines if line.upper().startswith("COPY ")]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        if any(a.startswith("--from") for a in args):
            continue  # from another stage, not the build context
        for source in [a for a in args if not a.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, "the image must run as a non-root user"
    assert any(line.upper().startswith("FROM PYTHON:3.11") for line in lines)


@pytest.mark.parametrize("name", [n for n in OURS if n in LONG_RUNNING])
def test_gputrace_services_are_healthy_only_when_ready(name: str) -> None:
    # /healthz only says the process runs; /readyz that it consumes, publishes and reaches Kafka.
    check = " ".join(SERVICES_YML[name]["healthcheck"]["test"])
    assert "/readyz" in check and "/healthz" not in check, check


# --- the ledger's two roles and its witness (issue 9) -------------------------------------------


def _db_user_and_name(url: str) -> tuple[str, str]:
    user = url.split("://", 1)[1].split(":", 1)[0]
    return user, url.rsplit("/", 1)[1]


def test_the_ledger_runs_as_the_runtime_role_after_the_owner_s_migrate_job() -> None:
    ledger, schema = SERVICES_YML["ledger"], SERVICES_YML["ledger-migrate"]
    assert _db_user_and_name(ledger["environment"]["DATABASE_URL"]) == ("gputrace_ledger_app", "gputrace_ledger")
    assert _db_user_and_name(schema["environment"]["DATABASE_URL"]) == ("gputrace_ledger_owner", "gputrace_ledger")
    assert _depends_on(ledger)["ledger-migrate"] == "service_completed_successfully"
    assert schema["command"][-2:] == ["--runtime-role", "gputrace_ledger_app"]
    # The postgres image's init script makes both roles; its passwords are the ones the URLs use.
    init = (ROOT / "infra" / "docker" / "postgres-init.sh").read_text()
    assert "CREATE ROLE gputrace_ledger_owner" in init and "CREATE ROLE gputrace_ledger_app" in init
    postgres_env = SERVICES_YML["postgres"]["environment"]
    for role, variable in (("app", "LEDGER_APP_PASSWORD"), ("owner", "LEDGER_OWNER_PASSWORD")):
        assert f"${{{variable}:-${{POSTGRES_PASSWORD}}}}" in init
        url = (ledger if role == "app" else schema)["environment"]["DATABASE_URL"]
        assert postgres_env[variable] in url, f"{variable} differs between postgres and the {role} URL"


@pytest.mark.parametrize(
    "name", [n for n in OURS if n not in ONE_SHOT | CLUSTER_ONLY and _module(SERVICES_YML[n]["command"])]
)
def test_each_service_starts_after_its_own_migrate_job(name: str) -> None:
    """A service refuses to start on an older schema (shared/runtime/migrations): the job before it
    runs `gputrace migrate` for that service, on that service's database."""
    service = SERVICES_YML[name]
    module = _module(service["command"])
    assert module is not None and module.startswith("services.")
    job = SERVICES_YML.get(f"{name}-migrate")
    assert job is not None, f"no {name}-migrate job"
    assert _depends_on(service)[f"{name}-migrate"] == "service_completed_successfully"
    assert job["command"][:4] == ["gputrace", "migrate", "--service", module.removeprefix("services.")]
    assert str(job.get("restart")) in {"no", "False", "false"}
    assert _depends_on(job) == {"postgres": "service_healthy"}
    service_db = service["environment"]["DATABASE_URL"].rsplit("/", 1)[1]
    assert job["environment"]["DATABASE_URL"].rsplit("/", 1)[1] == service_db


def test_a_witness_cosigns_the_ledger_s_checkpoints() -> None:
    import json

    witness, ledger = SERVICES_YML["witness"], SERVICES_YML["ledger"]
    assert _module(witness["command"]) == "services.witness"
    env = witness["environment"]
    assert env["WITNESS_SIGNING_KEY"].startswith("/keys/") and json.loads(env["WITNESS_LOGS"]) == ["/keys/ledger.vkey"]
    assert "kafka" not in _depends_on(witness)  # not a Kafka service
    [endpoint] = json.loads(ledger["environment"]["WITNESSES"])
    assert endpoint == {"url": "http://witness:8000", "vkey": "/keys/witness.vkey"}
    # The keys job writes both published keys under the names the services are configured with.
    keys_env = SERVICES_YML["keys"]["environment"]
    assert keys_env["LEDGER_ORIGIN"] == ledger["environment"]["LEDGER_ORIGIN"]
    assert keys_env["WITNESS_NAME"] == env["WITNESS_NAME"]


# --- the cluster profile (issue 13) ----------------------------------------------------------------


def test_the_cluster_profile_runs_three_kafka_nodes_and_a_standby_ledger() -> None:
    nodes = [SERVICES_YML[n] for n in ("kafka", "kafka-2", "kafka-3")]
    assert [n["environment"]["KAFKA_NODE_ID"] for n in nodes] == ["1", "2", "3"]
    assert {n["environment"]["CLUSTER_ID"] for n in nodes} == {nodes[0]["environment"]["CLUSTER_ID"]}
    assert {n["entrypoint"][-1] for n in nodes} == {nodes[0]["entrypoint"][-1]}
    # Each node its own data, one shared volume (the broker's password), its own host port.
    data = [next(v for v in n["volumes"] if v.endswith(":/var/lib/kafka")) for n in nodes]
    assert len(set(data)) == 3 and all("kafka-shared:/var/lib/kafka-shared" in n["volumes"] for n in nodes)
    assert len({n["ports"][0] for n in nodes}) == 3
    assert CLUSTER_ONLY == {"kafka-2", "kafka-3", "ledger-standby"} and "profiles" not in SERVICES_YML["kafka"]
    # The env file of the profile: three voters, all three nodes to bootstrap from, two replicas.
    env = dict(
        line.split("=", 1)
        for line in (ROOT / "infra" / "docker" / "cluster.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["COMPOSE_PROFILES"] == "cluster" and env["KAFKA_NODES"] == "3"
    assert env["KAFKA_CLUSTER_BOOTSTRAP"].split(",") == ["kafka:9092", "kafka-2:9092", "kafka-3:9092"]
    assert int(env["SERVICE_REPLICAS"]) >= 2
    assert "${KAFKA_CLUSTER_BOOTSTRAP:-kafka:9092}" == SERVICES_YML["topics"]["environment"]["KAFKA_BOOTSTRAP_SERVERS"]
    # Topics are made only once the three brokers are up (else fewer copies); outside the profile
    # the two extra nodes are not required.
    for node in ("kafka-2", "kafka-3"):
        assert SERVICES_YML["topics"]["depends_on"][node] == {"condition": "service_healthy", "required": False}
    standby, ledger = SERVICES_YML["ledger-standby"], SERVICES_YML["ledger"]
    assert standby["command"] == ledger["command"] and standby["environment"] == ledger["environment"]
    assert standby["depends_on"] == ledger["depends_on"] and "ports" not in standby
    assert (
        ledger["deploy"]["replicas"] == 1 and SERVICES_YML["pledges"]["deploy"]["replicas"] == "${SERVICE_REPLICAS:-1}"
    )
