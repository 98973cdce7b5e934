"""Who holds a TCP port on this machine.

`gputrace run` and infra/kafka/kafka.sh refuse to start on a port another process listens on, and
name that process, instead of quietly talking to whatever answers there. Standard library only:
kafka.sh runs this file with the system python (`python3 tools/ports.py check PORT`). Reads
Linux's /proc (the listening sockets, then which process has one open); elsewhere it still
knows a port is taken, only not by whom.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


class PortTaken(Exception):
    """A port we were asked to use is held by another process; the message names it."""


@dataclass(frozen=True)
class Holder:
    pid: int | None
    command: str

    def __str__(self) -> str:
        if self.pid is None:
            return "a process this user cannot see"
        return f"pid {self.pid} ({self.command})"


def in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when binding host:port fails, which is what the server about to start would hit."""
    with socket.socket() as sock:
        # As servers do (uvicorn, the JVM): a socket in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _sockets_of(pid: str) -> set[str]:
    found = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # gone, or another user's process
        return found
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def _command(pid: str) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    text = " ".join(" ".join(a.decode(errors="replace").split()) for a in argv if a)
    # Head and tail: a JVM's options come first, what it runs (kafka.Kafka ...) last.
    return text if len(text) <= 160 else f"{text[:60]} ... {text[-95:]}"


def holders(port: int) -> list[Holder]:
    """The processes listening on `port` (any address), as far as /proc shows them."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    found = [
        Holder(int(entry.name), _command(entry.name))
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _sockets_of(entry.name) & inodes
    ]
    return found or [Holder(None, "")]


def owns(pid: int, port: int) -> bool:
    """True when process `pid` itself listens on `port`: the answer came from our server."""
    return bool(_listening_inodes(port) & _sockets_of(str(pid)))


def taken_message(port: int, what: str) -> str | None:
    """Why `port` cannot be used for `what`, naming the holder; None when it is free."""
    if not in_use(port):
        return None
    held = holders(port) or [Holder(None, "")]
    return f"port {port} ({what}) is already in use by {', '.join(str(h) for h in held)}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def choose(port: int, what: str, option: str, ours: int | None = None) -> tuple[int, str | None]:
    """The port to use for `what`: `port` if free (or held by `ours`, our own server from an
    earlier run), a free one when `port` is 0. Returns it and a note to print when it was picked;
    raises PortTaken naming the holder otherwise."""
    if port == 0:
        picked = free_port()
        return picked, f"{what}: picked free port {picked} ({option} 0)"
    why = taken_message(port, what)
    if why is None or (ours is not None and owns(ours, port)):
        return port, None
    raise PortTaken(f"{why}; stop it, or pass {option} PORT (or {option} 0 to pick a free one)")


def main(argv: list[str]) -> int:
    """`ports.py check PORT [WHAT]`: exit 1 and say who holds PORT; `ports.py owns PID PORT`."""
    if len(argv) >= 2 and argv[0] == "check":
        why = taken_message(int(argv[1]), argv[2] if len(argv) > 2 else "requested")
        if why:
            print(why)
            return 1
        return 0
    if len(argv) == 3 and argv[0] == "owns":
        return 0 if owns(int(argv[1]), int(argv[2])) else 1
    print("usage: ports.py check PORT [WHAT] | ports.py owns PID PORT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
