"""`gputrace run` and kafka.sh own their ports: a port someone else listens on is refused, naming
the process, before anything starts; never joined."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.infra import KAFKA_SH, ROOT
from tools.ports import PortTaken, choose, free_port, in_use, owns, taken_message


def _answer_like_kafka(server: socket.socket) -> None:
    """Reply to every request with its correlation id, which is all kafka.sh's probe checks."""
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # closed: the test is over
            return
        with conn:
            try:
                size = struct.unpack(">i", conn.recv(4))[0]
                body = conn.recv(size)
                conn.sendall(struct.pack(">i", 4) + body[4:8])
            except (OSError, struct.error):
                pass


@contextmanager
def someone_listening(like_kafka: bool = False) -> Iterator[int]:
    """A port held by this test process (another program, as far as gputrace is concerned)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    if like_kafka:
        threading.Thread(target=_answer_like_kafka, args=(server,), daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def test_the_holder_of_a_port_is_named() -> None:
    with someone_listening() as port:
        assert in_use(port)
        why = taken_message(port, "Kafka")
        assert why is not None and f"port {port} (Kafka)" in why and f"pid {os.getpid()}" in why, why
        assert owns(os.getpid(), port)
        assert not owns(1, port)
    assert taken_message(port, "Kafka") is None


def test_choose_a_port() -> None:
    picked, note = choose(0, "Kafka", "--kafka-port")
    assert picked > 0 and note == f"Kafka: picked free port {picked} (--kafka-port 0)"
    port = free_port()
    assert choose(port, "Kafka", "--kafka-port") == (port, None)
    with someone_listening() as port:
        with pytest.raises(PortTaken, match=rf"port {port} .*pid {os.getpid()}.*--kafka-port 0"):
            choose(port, "Kafka", "--kafka-port")
        # Our own broker from an earlier run holding it is fine: kafka.sh reuses it.
        assert choose(port, "Kafka", "--kafka-port", ours=os.getpid()) == (port, None)


@pytest.mark.parametrize("taken", ["kafka", "api"])
def test_run_refuses_a_taken_port_before_starting_anything(taken: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    var = tmp_path / "var"
    with someone_listening(like_kafka=taken == "kafka") as port:
        ports = {"kafka": free_port(), "api": free_port(), taken: port}
        port_options = ["--kafka-port", str(ports["kafka"]), "--api-port", str(ports["api"])]
        done = subprocess.run(
            [sys.executable, "-m", "tools.cli", "run", "--var-dir", str(var), *port_options],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stdout + done.stderr
    option = "--kafka-port" if taken == "kafka" else "--api-port"
    assert f"cannot start: port {port}" in done.stdout and f"pid {os.getpid()}" in done.stdout, done.stdout
    assert f"{option} 0" in done.stdout
    # No keys, no Kafka, no services: nothing was started.
    assert not var.exists(), sorted(var.rglob("*"))


@pytest.mark.skipif(shutil.which("java") is None, reason="kafka.sh needs a JDK")
def test_kafka_sh_will_not_report_someone_elses_broker_as_ready(tmp_path: Path) -> None:
    with someone_listening(like_kafka=True) as port:
        done = subprocess.run(
            ["bash", str(KAFKA_SH), "start", "--dir", str(tmp_path / "kafka"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
    assert done.returncode != 0, done.stderr
    assert done.stdout == "" and "kafka.sh: ready" not in done.stderr, done.stderr
    assert f"port {port} (Kafka) is already in use by pid {os.getpid()}" in done.stderr, done.stderr
    assert not (tmp_path / "kafka" / "kafka.pid").exists()
