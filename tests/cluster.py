"""Cluster chaos run: three Kafka brokers, two replicas of every service (one consumer group each),
two ledger instances (one appending, one standing by), a mixed signed workload on a fixed
schedule, and one machine lost at a time: a replica SIGSTOPped past the consumer session timeout
(then SIGCONT), a replica SIGKILLed, the broker leading a partition SIGKILLed, the appending
ledger SIGKILLed. Then everything is counted, record by record, as in tests/chaos.py.

    .venv/bin/python -m tests.cluster --events 4000 --seed 1      (make chaos-cluster EVENTS=4000 SEED=1)

Starts its own three-node cluster (infra/kafka/kafka.sh cluster), PostgreSQL and services;
KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are used when set, but then no broker is killed.

Prints per fault what was hit and its fail-over time: seconds from the fault until every
partition of the victim's consumer group (every group, for a broker) was consumed again; then
events, lost, duplicated, ledger entries against decisions, lag, the auditor's `verify`, and
the JSON summary. The exit status is non-zero when anything is off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.contract import DECIDING_SERVICES, TOPIC_PARTITIONS
from tests.chaos import ALL_SERVICES, Fault, Faults, Lag, Report, chaos_run, print_summary
from tests.infra import LocalKafka, LocalKafkaCluster, kafka_and_postgres
from tools.devstack import ServiceProcess, Stack, free_port

# The services' consumers keep aiokafka's session timeout: a member that stops heartbeating is
# taken out of the group (its partitions given to the other replica) after this long.
SESSION_TIMEOUT_S = 10.0
# A fault's fail-over is not declared before this: every busy partition has had new records by then.
SETTLE_S = 3.0


def replica_key(service: str, n: int) -> str:
    """The Stack's name of a service's n-th process (the first keeps the service's own name)."""
    return service if n == 1 else f"{service}-{n}"


def service_of(key: str) -> str:
    return key.split("-", 1)[0]  # service names have no '-'


def add_replicas(stack: Stack, replicas: int = 2, timeout: float = 180) -> None:
    """More processes of every service in the stack, each in its service's consumer group and on its
    database, with an HTTP port of its own. Started after the first ones are ready, so the first
    process of each service alone has created its schema."""
    for service in [k for k in list(stack.processes) if "-" not in k]:
        for n in range(2, replicas + 1):
            key = replica_key(service, n)
            stack.ports[key] = free_port()
            env = {**stack.env_for(service), "HTTP_PORT": str(stack.ports[key])}
            process = ServiceProcess(service, env, stack.log_dir / f"{key}.log")
            process.start()
            stack.processes[key] = process
    stack.wait_ready(timeout)


def ledger_role(stack: Stack, key: str) -> str | None:
    """What a ledger process says it is on /readyz: "active" (it appends) or "standby"."""
    try:
        doc = httpx.get(f"http://127.0.0.1:{stack.ports.get(key) or stack.api_port}/readyz", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    return doc.get("role") if isinstance(doc, dict) else None


def active_ledger(stack: Stack, timeout: float = 30) -> str:
    """The ledger instance appending now (the one holding the writer's lock)."""
    keys = [k for k in stack.processes if service_of(k) == "ledger" and stack.processes[k].running]
    deadline = time.monotonic() + timeout
    while True:
        active = [k for k in keys if ledger_role(stack, k) == "active"]
        if len(active) == 1:
            return active[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"no one active ledger among {keys}: {active}")
        time.sleep(0.5)


class ClusterFaults(Faults):
    """Faults of a cluster, named `<action>:<what>`:

    - `sigstop:<service>`: SIGSTOP one of its replicas for the fault's time, then SIGCONT;
    - `sigkill:<service>`: SIGKILL one of its replicas, start it again after the fault's time;
    - `broker:leader`: SIGKILL the broker leading a partition chosen by the seed, start it again;
    - `ledger:active`: SIGKILL the ledger instance appending now; started again, it stands by.

    Fail-over is measured from the fault itself, while the victim is still down: until every
    partition of the victim's group (every group, for a broker) is consumed again."""

    def __init__(self, stack: Stack, cluster: LocalKafkaCluster | None, lag: Lag, bootstrap: str, seed: int) -> None:
        super().__init__(stack, None, None, lag)
        self.cluster = cluster
        self.bootstrap = bootstrap
        self.rng = random.Random(seed)
        self._hit: dict[str, str | LocalKafka] = {}  # victim → the process key or node it resolved to

    def _replica(self, service: str) -> str:
        keys = sorted(k for k in self.stack.processes if service_of(k) == service)
        return self.rng.choice(keys)

    async def _leader(self) -> tuple[int, TopicPartition]:
        topic = self.rng.choice(sorted(TOPIC_PARTITIONS))
        tp = TopicPartition(topic, self.rng.randrange(TOPIC_PARTITIONS[topic]))
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            [described] = await admin.describe_topics([tp.topic])
        finally:
            await admin.close()
        [partition] = [p for p in described["partitions"] if p["partition"] == tp.partition]
        return int(partition["leader"]), tp

    async def take_down(self, fault: Fault) -> None:
        targets = []
        for victim in fault.victims:
            action, what = victim.split(":", 1)
            if action == "broker":
                assert self.cluster is not None
                node_id, tp = await self._leader()
                node = self._hit[victim] = self.cluster.node(node_id)
                targets.append(f"broker {node_id}, leader of {tp.topic}/{tp.partition}")
                await asyncio.to_thread(node.kill)
                continue
            key = await asyncio.to_thread(active_ledger, self.stack) if action == "ledger" else self._replica(what)
            self._hit[victim] = key
            process = self.stack.processes[key]
            assert process.proc is not None
            targets.append(f"{key} pid {process.proc.pid}")
            if action == "sigstop":
                process.proc.send_signal(signal.SIGSTOP)  # still running to the supervisor: not restarted
            else:
                self.down.add(key)
                process.kill()
        fault.target = "; ".join(targets)

    async def bring_up(self, fault: Fault) -> None:
        for victim in fault.victims:
            hit = self._hit.pop(victim)
            if isinstance(hit, LocalKafka):
                await asyncio.to_thread(hit.start)
            elif victim.startswith("sigstop:"):
                proc = self.stack.processes[hit].proc
                assert proc is not None
                proc.send_signal(signal.SIGCONT)
            else:
                self.stack.processes[hit].start()
                self.down.discard(hit)

    def watched(self, fault: Fault) -> list[str]:
        groups = set()
        for victim in fault.victims:
            action, what = victim.split(":", 1)
            if action == "broker":
                return list(ALL_SERVICES)
            groups.add("ledger" if action == "ledger" else what)
        return sorted(groups)

    async def inject(self, fault: Fault, started: float) -> None:
        fault.at_s = time.monotonic() - started
        t0 = time.monotonic()
        await self.take_down(fault)
        # Watched from now: the other replica (the standby, the other brokers) must take over while
        # the victim is still down.
        self.watching.append(asyncio.create_task(self._failover(fault, t0, self.watched(fault))))
        await asyncio.sleep(fault.down_s)
        await self.bring_up(fault)
        fault.restarted_s = time.monotonic() - t0

    async def _failover(self, fault: Fault, t0: float, services: list[str], timeout: float = 300) -> None:
        """Every partition of the groups either consumed past where it stood at the fault, or with
        nothing to read; not declared before SETTLE_S, by when every busy partition had new records."""
        base: dict[str, dict[TopicPartition, int]] = {}
        waited: set[tuple[str, TopicPartition]] = set()  # (group, partition) with records to read, not moving
        first: float | None = None  # when the first of those moved again: the take-over began
        waiting = set(services)
        while waiting and time.monotonic() - t0 < timeout:
            for s in sorted(waiting):
                with contextlib.suppress(Exception):  # a broker or group coordinator moving: ask again
                    if s not in base:
                        base[s] = await self.lag.committed(s)
                        continue
                    committed, pending = await self.lag.committed(s), await self.lag.pending(s)
                    stuck = {(s, tp) for tp, n in pending.items() if n and committed.get(tp, 0) <= base[s].get(tp, 0)}
                    if first is None and {w for w in waited if w[0] == s} - stuck:
                        first = time.monotonic() - t0
                    waited |= stuck
                    if not stuck and time.monotonic() - t0 >= SETTLE_S:
                        waiting.discard(s)
            await asyncio.sleep(0.5)
        if not waiting:
            fault.recovery_s = round(time.monotonic() - t0, 1)
        # How many partitions had to wait for the take-over (none: the victim held nothing busy), and
        # when the first of them moved (the rest is the survivors working through the backlog).
        moved = "" if first is None else f", the first moving again after {first:.1f} s"
        fault.target += f"; {len(waited)} partition(s) waited{moved}"


def cluster_plan(rng: random.Random, brokers: bool, down_s: float = SESSION_TIMEOUT_S + 5) -> list[Fault]:
    """One of each fault, on services chosen by the seed, in a seeded order; each lasts past the
    session timeout, so the group (not the victim's return) has to move its partitions."""
    stopped, killed = rng.sample(DECIDING_SERVICES, 2)
    plan = [Fault((f"sigstop:{stopped}",), down_s), Fault((f"sigkill:{killed}",), down_s)]
    plan.append(Fault(("ledger:active",), down_s))
    if brokers:
        plan.append(Fault(("broker:leader",), down_s))
    rng.shuffle(plan)
    return plan


async def cluster_run(
    *,
    bootstrap: str,
    stack: Stack,
    tokens: dict[str, str],
    keys_dir: Path,
    workdir: Path,
    cluster: LocalKafkaCluster | None,
    events: int,
    seed: int,
    rate: float,
    plan: list[Fault] | None = None,
    fault_span: float = 0.7,
    settle_timeout: float = 600,
    grace: float = 180,
    say: Callable[[str], None] = print,
) -> Report:
    """chaos_run with the cluster's faults, all over by about `fault_span` of the publishing window
    (a broker takes tens of seconds to start again), so each fail-over is measured under load."""
    plan = plan if plan is not None else cluster_plan(random.Random(seed), cluster is not None)
    return await chaos_run(
        bootstrap=bootstrap,
        stack=stack,
        tokens=tokens,
        keys_dir=keys_dir,
        workdir=workdir,
        kafka=None,
        pg=None,
        events=events,
        seed=seed,
        rate=rate,
        plan=plan,
        faults=lambda lag: ClusterFaults(stack, cluster, lag, bootstrap, seed),
        fault_span=fault_span,
        settle_timeout=settle_timeout,
        grace=grace,
        say=say,
    )


def failover_lines(report: Report) -> list[str]:
    out = []
    for f in report.faults:
        took = "never" if f["recovery_s"] is None else f"{f['recovery_s']:.1f} s"
        out.append(f"  fail-over {f['label']:<22} {took:>8}   ({f['target']}, down {f['down_s']:.0f} s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=20.0, help="records per second the partners publish")
    parser.add_argument("--replicas", type=int, default=2, help="processes of every service")
    parser.add_argument("--json", type=Path, help="write the summary here too")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data) even when all is well")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gputrace-cluster-"))
    work.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    started = time.monotonic()
    with contextlib.ExitStack() as infra:
        bootstrap, admin_url, kafka, _pg = infra.enter_context(kafka_and_postgres(work, brokers=3))
        cluster = kafka if isinstance(kafka, LocalKafkaCluster) else None
        from tests.stack import start_stack

        stack, tokens = start_stack(bootstrap, admin_url, work / "stack")
        infra.callback(stack.stop)  # before the brokers and PostgreSQL stop (callbacks run last-in first)
        add_replicas(stack, args.replicas)
        print(f"cluster: {bootstrap}; {len(stack.processes)} service processes ({args.replicas} of each)")
        report = asyncio.run(
            cluster_run(
                bootstrap=bootstrap,
                stack=stack,
                tokens=tokens,
                keys_dir=work / "stack" / "keys",
                workdir=work,
                cluster=cluster,
                events=args.events,
                seed=args.seed,
                rate=args.rate,
            )
        )
    print_summary(report)
    for line in failover_lines(report):
        print(line)
    load = os.getloadavg()
    summary = json.dumps(
        {**asdict(report), "brokers": 3, "replicas": args.replicas, "wall_s": round(time.monotonic() - started)}
        | {"load_average": [round(x, 1) for x in load]},
        indent=1,
    )
    print(summary)
    if args.json:
        args.json.write_text(summary)
    if report.ok() and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work / 'stack' / 'logs'}", file=sys.stderr)
    sys.exit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
