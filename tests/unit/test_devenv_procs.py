"""Process bookkeeping with a real (tiny) process: start in its own group, stop by pid, nothing left."""
import sys
import time

from kubetune.devenv import procs


def test_spawn_and_stop_kills_the_whole_group(tmp_path):
    # The child starts a grandchild; stopping must take both.
    code = "import subprocess, time; subprocess.Popen(['sleep', '300']); print('up', flush=True); time.sleep(300)"
    p = procs.spawn("t", [sys.executable, "-c", code], tmp_path / "t.log")
    deadline = time.monotonic() + 10
    while len(procs.group_members(p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs.alive(p)
    assert len(procs.group_members(p.pid)) == 2
    assert procs.stop(p, timeout=5)
    assert not procs.alive(p)
    assert procs.group_members(p.pid) == []


def test_a_reused_pid_is_not_ours(tmp_path):
    p = procs.spawn("t", ["sleep", "30"], tmp_path / "t.log")
    impostor = procs.Proc.from_dict(p.to_dict() | {"start_ticks": p.start_ticks + 1})
    assert not procs.alive(impostor)
    assert procs.stop(p)


def test_free_ports_are_distinct_loopback_ports():
    ports = procs.free_ports(5)
    assert len(set(ports)) == 5 and all(1024 < x < 65536 for x in ports)
