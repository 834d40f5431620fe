"""Lab networking: network namespaces with lo up, a node's bridge, a pod plugged into it by
a veth, two nodes linked and routed. `meshaccel lab` (topology) and the Sandbox of tests
and benchmarks both build with these.

Every link is made and configured from inside a lab netns (meshaccel.datapath.netns
enters it), never in the root netns: lab addresses exist only in the lab's namespaces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute, netns

from meshaccel.datapath import netns as netns_mod

BRIDGE = "br0"
POD_IF = "eth0"
_IFA_F_NODAD = 0x02  # an IPv6 address usable at once, without duplicate detection

T = TypeVar("T")


def _in(ns: str, fn: Callable[[IPRoute], T]) -> T:
    """fn(ipr) with a netlink socket opened inside netns ns."""

    def run() -> T:
        with IPRoute() as ipr:
            return fn(ipr)

    return netns_mod.in_netns(netns_mod.path_of(ns), run)


def create_netns(name: str, loopback_up: bool = True) -> None:
    """A named netns (/var/run/netns/NAME), its lo up unless told otherwise."""
    netns.create(name)
    if loopback_up:
        set_loopback_up(name)


def set_loopback_up(ns: str) -> None:
    _in(ns, lambda ipr: ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up"))


def remove_netns(name: str) -> None:
    netns.remove(name)


def exists(name: str) -> bool:
    return Path(netns_mod.path_of(name)).exists()


def add_bridge(ns: str, address: str | None = None, prefixlen: int = 24) -> None:
    """Bridge br0 in ns, up, with address/prefixlen (the pods' gateway) if given."""

    def add(ipr: IPRoute) -> None:
        ipr.link("add", ifname=BRIDGE, kind="bridge")
        br = ipr.link_lookup(ifname=BRIDGE)[0]
        if address:
            ipr.addr("add", index=br, address=address, prefixlen=prefixlen)
        ipr.link("set", index=br, state="up")

    _in(ns, add)


def plug_pod(
    node: str,
    pod: str,
    host_if: str,
    addresses: Sequence[tuple[str, int]],
    gateway: str | None = None,
) -> None:
    """A veth from node's br0 (end host_if) to pod's eth0, which gets addresses
    ((address, prefixlen); IPv6 ones without duplicate detection) and, with gateway, a
    default route through it."""

    def node_end(ipr: IPRoute) -> None:
        ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": POD_IF, "net_ns_fd": pod})
        idx = ipr.link_lookup(ifname=host_if)[0]
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname=BRIDGE)[0], state="up")

    def pod_end(ipr: IPRoute) -> None:
        idx = ipr.link_lookup(ifname=POD_IF)[0]
        for address, prefixlen in addresses:
            nodad = {"flags": _IFA_F_NODAD} if ":" in address else {}
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen, **nodad)
        ipr.link("set", index=idx, state="up")
        if gateway:
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway)

    _in(node, node_end)
    _in(pod, pod_end)


def link_nodes(
    ends: tuple[tuple[str, str, str], tuple[str, str, str]],
    prefixlen: int,
    routes: tuple[str, str],
) -> None:
    """A veth between two node netns, ends ((netns, ifname, address), ...), each end up
    with its address/prefixlen and a route to the other node's pods (routes: the network
    behind the first node, then behind the second) through the other end."""
    (ns_a, if_a, _), (ns_b, if_b, _) = ends
    _in(
        ns_a,
        lambda ipr: ipr.link(
            "add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b}
        ),
    )
    for (ns, ifname, mine), (_, _, other), remote in (
        (ends[0], ends[1], routes[1]),
        (ends[1], ends[0], routes[0]),
    ):

        def configure(
            ipr: IPRoute,
            ifname: str = ifname,
            mine: str = mine,
            other: str = other,
            remote: str = remote,
        ) -> None:
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=mine, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=remote, gateway=other)

        _in(ns, configure)


def sysctl(ns: str, key: str, value: str) -> None:
    """Write a (per-netns) sysctl inside ns."""

    def write() -> None:
        Path("/proc/sys", key.replace(".", "/")).write_text(value)

    netns_mod.in_netns(netns_mod.path_of(ns), write)
