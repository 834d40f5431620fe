"""The lab `meshaccel lab` builds: an Istio-shaped mesh on one machine, as a plan (modes,
nodes, pods and their addresses), the names of everything it creates, and its network.

One or two lab "nodes" (each a netns with a bridge; two nodes linked by a veth and routed
to each other), pods as netns on a node's bridge, their apps (meshaccel.lab.apps: the
bookinfo call graph, a client and an echo server) and, in every mode but nomesh, a real
Envoy sidecar per pod (meshaccel.lab.envoy) shaped like Istio's. In the eBPF modes the
node agent (`meshaccel run --source file`, as the DaemonSet runs it) attaches the datapath
and registers the pods from a pods file: in ebpf mode with the agent's default (only
sidecar<->sidecar sockets on the sk_msg shortcut), in ebpf-apps mode with --app-shortcut
(app sockets on the shortcut too). Everything is named with a prefix (default `ma-`, or
$MESHACCEL_LAB_PREFIX): netns PREFIXnode1, PREFIX<pod>; cgroup PREFIXlab; bpffs
/sys/fs/bpf/PREFIXlab; state and logs under /run/meshaccel-lab/. meshaccel.lab.lifecycle
brings it up and down, meshaccel.lab.processes runs and tracks its processes.

Lab network rules (docs DESIGN.md): nothing is created in the root netns; pod addresses
(10.244.0.0/16) exist only inside the lab's namespaces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from meshaccel.datapath.host import default_cgroup
from meshaccel.errors import MeshaccelError
from meshaccel.lab import network

MODES = ("nomesh", "iptables", "ebpf", "ebpf-apps")
# the modes in which the node agent attaches the eBPF datapath, and whether each puts the
# app<->sidecar sockets on the shortcut too (the agent's --app-shortcut)
EBPF_MODES = {"ebpf": False, "ebpf-apps": True}
STATE_DIR = Path("/run/meshaccel-lab")
APP_PORT = 9080
ECHO_BYTES = 1024
NODE_LINK = ("10.244.0.1", "10.244.0.2")  # node1 and node2 ends of the node-to-node veth


def is_ebpf(mode: str) -> bool:
    """Does the lab run meshaccel's datapath (the node agent, bpffs, counters) in mode?"""
    return mode in EBPF_MODES


def default_prefix() -> str:
    return os.environ.get("MESHACCEL_LAB_PREFIX") or "ma-"


# ---------------------------------------------------------------- the pods


@dataclass(frozen=True)
class LabPod:
    name: str
    node: int  # 1 or 2
    host: int  # last octet: ip = 10.244.<node>.<host>
    calls: tuple[str, ...] = ()  # pods it calls on APP_PORT
    size: int = 0  # answer this many filler bytes (echo)

    @property
    def ip(self) -> str:
        return f"10.244.{self.node}.{self.host}"


def plan(nodes: int) -> list[LabPod]:
    """Bookinfo plus client and echo. With two nodes: client, productpage, details and echo
    on node1, reviews, ratings and echo-remote on node2, so client->productpage and
    productpage->details and reviews->ratings stay on a node, productpage->reviews and
    client->echo-remote cross nodes."""
    if nodes not in (1, 2):
        raise MeshaccelError(f"--nodes {nodes}: 1 or 2")
    far = 2 if nodes == 2 else 1
    specs = [
        LabPod("client", 1, 10),
        LabPod("productpage", 1, 11, ("details", "reviews")),
        LabPod("details", 1, 12),
        LabPod("echo", 1, 13, size=ECHO_BYTES),
        LabPod("reviews", far, 21, ("ratings",)),
        LabPod("ratings", far, 22),
    ]
    if nodes == 2:
        specs.append(LabPod("echo-remote", 2, 23, size=ECHO_BYTES))
    return specs


def pod_ip(name: str, nodes: int) -> str:
    return next(p.ip for p in plan(nodes) if p.name == name)


@dataclass(frozen=True)
class Names:
    prefix: str

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.prefix}lab.json"

    @property
    def workdir(self) -> Path:
        return STATE_DIR / f"{self.prefix}lab"

    @property
    def cgroup(self) -> str:
        return os.path.join(default_cgroup(), f"{self.prefix}lab")

    @property
    def bpffs(self) -> str:
        return f"/sys/fs/bpf/{self.prefix}lab"

    def node(self, n: int) -> str:
        return f"{self.prefix}node{n}"

    def pod(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def all_netns(self) -> list[str]:
        """Every netns a lab with this prefix may create, pods first."""
        pod_names = {p.name for p in plan(2)} | {p.name for p in plan(1)}
        return [self.pod(n) for n in sorted(pod_names)] + [self.node(1), self.node(2)]


def make_node(names: Names, n: int) -> None:
    """Node netns with bridge br0 (10.244.n.1/24, the pods' gateway), forwarding on."""
    ns = names.node(n)
    network.create_netns(ns)
    network.add_bridge(ns, f"10.244.{n}.1", 24)
    network.sysctl(ns, "net.ipv4.ip_forward", "1")


def link_nodes(names: Names) -> None:
    """A veth between node1 and node2 (10.244.0.1/30 - 10.244.0.2/30), routes each way."""
    network.link_nodes(
        ((names.node(1), "to-node2", NODE_LINK[0]), (names.node(2), "to-node1", NODE_LINK[1])),
        30,
        ("10.244.1.0/24", "10.244.2.0/24"),
    )


def make_pod(names: Names, spec: LabPod) -> None:
    """Pod netns: eth0 (ip/24) on its node's bridge, default route via 10.244.node.1."""
    ns, node = names.pod(spec.name), names.node(spec.node)
    network.create_netns(ns)
    network.plug_pod(
        node, ns, f"v-{spec.name}"[:15], [(spec.ip, 24)], gateway=f"10.244.{spec.node}.1"
    )
