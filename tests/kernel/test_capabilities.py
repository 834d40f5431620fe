"""The agent's capability set in deploy/daemonset.yaml is what the code needs: as root
with only those capabilities (as in the agent container), attach, pod add of a dual-stack
pod by the PID of a process of another user (setns, ::6 on the pod's lo, the sidecar's
listener taken with pidfd_getfd), the watch of its netns for address changes, pod list
and detach all work; without CAP_SYS_ADMIN
attach fails with nothing left attached, and without CAP_SYS_PTRACE or CAP_NET_ADMIN pod
add says why in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from meshaccel.datapath import loader
from tests.kernel.lab import ours_on

MESHACCEL = os.path.join(os.path.dirname(sys.executable), "meshaccel")
MANIFEST = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "daemonset.yaml")
POD_IP, POD_IP6 = "10.244.1.10", "fd00:244::10"


def agent_caps() -> list[str]:
    for doc in yaml.safe_load_all(open(MANIFEST)):
        if (doc or {}).get("kind") == "DaemonSet" and doc["metadata"]["name"] == "meshaccel":
            [agent] = [c for c in doc["spec"]["template"]["spec"]["containers"]]
            return [c.lower() for c in agent["securityContext"]["capabilities"]["add"]]
    raise AssertionError(f"no meshaccel DaemonSet in {MANIFEST}")


def with_caps(caps: list[str], *args: str, argv0: str = MESHACCEL) -> subprocess.CompletedProcess:
    """meshaccel as root holding only these capabilities (bounding set; none inherited)."""
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    argv = ["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}", argv0, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


# the agent's watch of a pod's netns for address changes, by the PID of its sidecar
WATCH = """
import sys
from meshaccel.agent.address_watch import AddressWatch
path = f"/proc/{sys.argv[1]}/ns/net"
print(AddressWatch().follow([path]) == {path})
"""


def test_the_daemonsets_capabilities_are_enough_and_needed(lab):
    caps = agent_caps()
    assert {"sys_admin", "sys_ptrace", "net_admin"} <= set(caps), caps
    node = lab.node()
    pod = lab.pod("a", node, POD_IP, POD_IP6)
    cg = lab.cgroup()
    sidecar = lab.listener("::", 15006, netns=pod, uid=1337)  # not root's process
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)

    without_admin = with_caps([c for c in caps if c != "sys_admin"], "attach", "--cgroup", cg,
                              "--bpffs", bpffs)  # fmt: skip
    assert without_admin.returncode != 0
    assert not os.path.exists(bpffs) and ours_on(cg) == []

    attach = with_caps(caps, "attach", "--cgroup", cg, "--bpffs", bpffs)
    assert attach.returncode == 0, attach.stderr
    add = ["pod", "add", "--name", "a", "--ip", POD_IP, "--ip", POD_IP6,
           "--pid", str(sidecar.pid), "--bpffs", bpffs]  # fmt: skip
    no_ptrace = with_caps([c for c in caps if c != "sys_ptrace"], *add)
    assert no_ptrace.returncode != 0
    assert f"--pid {sidecar.pid}: may not open its network namespace (needs CAP_SYS_PTRACE)" in (
        no_ptrace.stderr
    )
    no_net_admin = with_caps([c for c in caps if c != "net_admin"], *add)
    assert no_net_admin.returncode != 0
    assert "cannot add ::6/128 to lo in " in no_net_admin.stderr.strip().splitlines()[-1]
    added = with_caps(caps, *add)
    assert added.returncode == 0, added.stderr
    watch = with_caps(caps, "-c", WATCH, str(sidecar.pid), argv0=sys.executable)
    assert watch.stdout.strip() == "True", watch.stderr
    listed = with_caps(caps, "pod", "list", "--json", "--bpffs", bpffs)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert set(entry["ips"]) == {POD_IP, POD_IP6}
    # the sidecar's listener was taken from its process (pidfd_getfd) for inbound capture
    assert loader.status(bpffs)["maps"]["inbound_listener"]["entries"] == 2, added.stdout
    detach = with_caps(caps, "detach", "--bpffs", bpffs)
    assert detach.returncode == 0, detach.stderr
    assert not os.path.exists(bpffs) and ours_on(cg) == []
