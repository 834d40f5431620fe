"""The lab's processes: the state file that records them (with the lab's settings), how
they are started (in a pod's netns and the lab cgroup, in a session of their own so they
outlive the CLI), waited for, and stopped: only by PID, checked against the start time
the state file recorded, so that a recycled PID is never ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshaccel.datapath import netns as netns_mod
from meshaccel.errors import MeshaccelError
from meshaccel.lab.topology import Names

Log = Callable[[str], None]


@dataclass
class Proc:
    """A process the lab started, as the state file records it."""

    pid: int
    start: int  # /proc/PID/stat starttime: a recycled PID is not ours
    role: str  # app / envoy / agent
    pod: str


@dataclass
class LabState:
    """A lab's settings, phase and processes: the state file's content."""

    prefix: str
    mode: str = "nomesh"
    nodes: int = 1
    concurrency: int = 1
    rbac: bool = False
    phase: str = "starting"  # starting / up
    procs: list[Proc] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return Names(self.prefix)


def save(state: LabState) -> None:
    """Write the state file atomically (rename), so a crash leaves the old one or the new."""
    path = state.names.state_file
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(path)


def load(prefix: str) -> LabState | None:
    """The state of the lab with this prefix; None without a state file."""
    try:
        raw = json.loads(Names(prefix).state_file.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise MeshaccelError(f"{Names(prefix).state_file}: not valid JSON ({e})") from None
    raw["procs"] = [Proc(**p) for p in raw.get("procs", [])]
    return LabState(**raw)


def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie is gone


def alive(proc: Proc) -> bool:
    return _starttime(proc.pid) == proc.start


def spawn(
    argv: list[str],
    ns: str,
    cgroup: str | None,
    log_path: Path,
    uid: int | None = None,
) -> subprocess.Popen:
    """A process in netns ns (and cgroup), in its own session so it outlives the CLI."""
    fd = os.open(netns_mod.path_of(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=netns_mod.entering(fd, cgroup, uid), start_new_session=True, cwd="/",
            )  # fmt: skip
    finally:
        os.close(fd)


def track(state: LabState, p: subprocess.Popen, role: str, pod: str) -> subprocess.Popen:
    """Record p (PID and start time) in the state file before anything else can fail."""
    start = _starttime(p.pid)
    if start is None:
        raise MeshaccelError(f"{role} of {pod} exited at once (rc {p.poll()})")
    state.procs.append(Proc(p.pid, start, role, pod))
    save(state)
    return p


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, log_path: Path, proc: subprocess.Popen
) -> None:
    """Until check() holds; raise, with the log's tail, if proc exits or timeout passes."""
    deadline = time.monotonic() + timeout
    why = f"not ready after {timeout:g}s"
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            why = f"exited with status {proc.returncode}"
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-400:].strip() if log_path.exists() else ""
    raise MeshaccelError(f"{what} {why} (log {log_path}: {tail!r})")


def run_in_pod(
    names: Names, pod: str, argv: list[str], timeout: float
) -> subprocess.CompletedProcess:
    """Run argv to completion in pod's netns and in the lab cgroup (entered first, then
    setns, then exec), so that it is captured like any app; stdout and stderr captured."""
    cg = names.cgroup if os.path.isdir(names.cgroup) else None
    fd = os.open(netns_mod.path_of(names.pod(pod)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            preexec_fn=netns_mod.entering(fd, cg),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise MeshaccelError(f"{Path(argv[0]).name} did not finish within {timeout:g}s") from None
    finally:
        os.close(fd)


def terminate(procs: list[Proc], log: Log) -> None:
    """SIGTERM, then SIGKILL, each recorded process that is still the one we started."""
    mine = [p for p in procs if alive(p)]
    for p in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while any(alive(p) for p in mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in mine:
        if alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 2  # until reaped (by init, or by us if they are ours)
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p.pid}") for p in mine):
        for p in mine:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)
        time.sleep(0.02)
    if mine:
        log(f"stopped {len(mine)} process(es)")


def empty_cgroup(cgroup: str) -> None:
    """Kill what is left in the lab's own cgroup (cgroup.kill), wait, remove it."""
    procs = Path(cgroup, "cgroup.procs")
    if procs.read_text().strip():
        Path(cgroup, "cgroup.kill").write_text("1")
    for _ in range(100):
        try:
            os.rmdir(cgroup)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != 16:  # EBUSY: killed processes leave asynchronously
                raise
            time.sleep(0.05)
    raise MeshaccelError(f"cgroup {cgroup} still busy")
