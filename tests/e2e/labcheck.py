"""Shared by the lab and bench tests: the check that a lab left nothing behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from meshaccel.lab import lifecycle, topology


def lab_processes(prefix: str) -> list[str]:
    """Command lines of live processes that mention the lab's work directory (Envoy's
    config and log live there) or the lab's netns names."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (f"{prefix}lab" in cmd or f"/{prefix}" in cmd) and running(int(d.name)):
            found.append(f"{d.name}: {cmd}")
    return found


def assert_nothing_left(prefix: str, pids: list[int]) -> None:
    names = topology.Names(prefix)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert [ln for ln in netns.splitlines() if ln.startswith(prefix)] == []
    assert not os.path.exists(names.cgroup)
    assert not os.path.exists(names.bpffs)
    assert not names.state_file.exists()
    assert not names.workdir.exists()
    assert [pid for pid in pids if running(pid)] == []
    assert lifecycle.leftovers(prefix) == []
    assert lab_processes(prefix) == []


def running(pid: int) -> bool:
    """Alive and not a zombie (a child of this test process, killed, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
