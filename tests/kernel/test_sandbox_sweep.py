"""A test run killed mid-test (SIGKILL: no cleanup) leaves its sandbox (netns, a cgroup
with the datapath attached, pins, processes) or its e2e lab. The next run sweeps them,
and leaves alone those of runs that still live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from meshaccel.datapath import bpfsys, loader
from meshaccel.datapath.host import default_cgroup, remove_cgroup
from meshaccel.lab import lifecycle, network
from meshaccel.lab.sandbox import sweep_dead
from tests.kernel.lab import LAB_PREFIX, SANDBOX_PREFIX, lab_prefix, ours_on
from tests.wait import wait_for

REPO = str(Path(__file__).resolve().parents[2])
# a test run that builds a sandbox with a pod registered and a process in the pod's
# netns outside its cgroup, prints what it made, and waits to be killed
DYING_RUN = textwrap.dedent(
    """
    import json, sys
    from tests.kernel.lab import Lab, sandbox_prefix
    lab = Lab(sandbox_prefix("1"))
    node = lab.node()
    pod = lab.pod("app", node, "10.244.1.10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(pod,))
    sleeper = lab.spawn(["sleep", "600"], netns=pod)
    print(json.dumps({"prefix": lab.prefix, "netns": lab.netns, "cgroup": cg,
                      "bpffs": bpffs, "sleeper": sleeper.pid}), flush=True)
    sys.stdin.read()
    """
)


def test_a_killed_runs_sandbox_is_swept_and_a_living_ones_kept(lab):
    living = lab.new_netns("living")  # this run's: its process (pytest) still runs
    run = subprocess.Popen(
        [sys.executable, "-c", DYING_RUN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=REPO,
    )  # fmt: skip
    lab.procs.append(run)
    made = json.loads(run.stdout.readline())
    cg = made["cgroup"]
    assert ours_on(cg) and os.path.isdir(made["bpffs"])
    programs = [p["id"] for p in loader.status(made["bpffs"])["programs"]]
    run.send_signal(signal.SIGKILL)
    run.wait(10)
    assert os.path.exists(f"/proc/{made['sleeper']}")  # orphaned, still in the pod's netns

    logged: list[str] = []
    swept = sweep_dead(SANDBOX_PREFIX, log=logged.append)

    assert swept == [made["prefix"]], (swept, logged)
    assert all(made["prefix"] in line for line in logged), logged
    assert wait_for(lambda: not os.path.exists(f"/proc/{made['sleeper']}"), timeout=10)
    assert not any(network.exists(ns) for ns in made["netns"])
    assert not os.path.exists(cg) and not os.path.exists(made["bpffs"])
    assert not [n for n in os.listdir(default_cgroup()) if n.startswith(made["prefix"])]
    assert network.exists(living)
    assert wait_for(lambda: not any(map(_loaded, programs)), timeout=10)
    assert sweep_dead(SANDBOX_PREFIX) == []


def _loaded(prog_id: int) -> bool:
    try:
        os.close(bpfsys.prog_fd_by_id(prog_id))
        return True
    except OSError:
        return False


def test_a_killed_runs_lab_is_taken_down_and_a_living_ones_kept(lab):
    """The same for an e2e test's `meshaccel lab`, taken down by its names (a run killed
    before it wrote the lab's state file leaves none)."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead, living = f"ma-tlab{ended.pid}-0-", lab_prefix(99)
    node, other = f"{dead}node1", f"{living}node1"
    cg = os.path.join(default_cgroup(), f"{dead}lab")
    try:
        network.create_netns(node)
        network.create_netns(other)
        os.mkdir(cg)
        sleeper = lab.spawn(["sleep", "600"], cgroup=cg)
        logged: list[str] = []

        assert lifecycle.sweep_dead(LAB_PREFIX, log=logged.append) == [dead], logged

        assert sleeper.wait(10) == -signal.SIGKILL
        assert not network.exists(node) and not os.path.exists(cg)
        assert network.exists(other)
    finally:
        for ns in (node, other):
            if network.exists(ns):
                network.remove_netns(ns)
        remove_cgroup(cg, kill_members=True)
