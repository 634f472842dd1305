"""Start, watch and stop the ground's processes, by recorded pid only.

Each process is started in a session of its own, so its process group id equals its pid and holds only it
and its descendants; stopping signals that group. The process start time (from /proc) is recorded with the
pid, so a pid the kernel reused for something else is never signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Popen objects of children started by this Python process: polling them reaps zombies, which a plain
# kill(pid, 0) would still report as alive.
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass
class Proc:
    name: str
    pid: int
    argv: list[str]
    log: str
    start_ticks: int
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # only the variables added to os.environ

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Proc:
        return cls(**d)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may itself contain spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: start time since boot, in ticks


def _is_ours(proc: Proc) -> bool:
    return start_ticks(proc.pid) == proc.start_ticks


def alive(proc: Proc) -> bool:
    child = _CHILDREN.get(proc.pid)
    if child is not None and child.poll() is not None:
        return False
    fields = _stat(proc.pid)
    if not fields:
        return False
    return fields[0] != "Z" and int(fields[19]) == proc.start_ticks


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in the process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def spawn(
    name: str,
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    append_log: bool = False,
) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab" if append_log else "wb") as out:
        child = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=os.environ | (env or {}),
            start_new_session=True,
        )
    _CHILDREN[child.pid] = child
    ticks = start_ticks(child.pid) or 0
    return Proc(name, child.pid, argv, str(log), ticks, str(cwd) if cwd else None, dict(env or {}))


def respawn(proc: Proc) -> Proc:
    """The same command again (same ports, same data), appending to the same log."""
    return spawn(proc.name, proc.argv, Path(proc.log), proc.env, Path(proc.cwd) if proc.cwd else None, append_log=True)


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = child


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop(proc: Proc, timeout: float = 15.0) -> bool:
    """SIGTERM the process group, SIGKILL what is left after `timeout`; True when nothing remains."""
    if not _is_ours(proc):
        _reap(proc.pid)
        return not group_members(proc.pid) or not _is_ours(proc)
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(proc.pid)
        if not group_members(proc.pid):
            return True
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    for _ in range(50):
        _reap(proc.pid)
        if not group_members(proc.pid):
            return True
        time.sleep(0.1)
    return False


def free_port() -> int:
    """A loopback port nothing listens on now. Another process could take it before ours binds; the
    readiness checks would then fail loudly, which is acceptable for a dev ground."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def log_tail(path: str | Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
