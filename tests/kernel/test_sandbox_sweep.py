"""A test run killed mid-test (SIGKILL: no cleanup) leaves its sandbox: netns, a cgroup
with the datapath attached, pins, processes. The next run sweeps it, and leaves alone
the sandboxes of runs that still live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from meshaccel.datapath import bpfsys, loader
from meshaccel.datapath.host import default_cgroup
from meshaccel.lab import network
from meshaccel.lab.sandbox import sweep_dead
from tests.kernel.lab import SANDBOX_PREFIX, ours_on
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
