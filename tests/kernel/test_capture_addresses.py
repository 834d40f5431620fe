"""Inbound capture of destinations other than the addresses `pod add` registered: the
pod's IPv6 link-local address (with a zone), an address added to the pod after `pod add`,
and a prefix the pod accepts locally though no interface holds it (AnyIP: `ip route add
local 10.77.0.0/24 dev lo`, the node routing the prefix to the pod).

istio-iptables' PREROUTING REDIRECT to 15006 is the reference: it captures every TCP
connection arriving at the pod, whatever local address it is for, and SO_ORIGINAL_DST is
the address and port the caller asked for; an excluded inbound port (-d) reaches the app.
Each case runs once under the iptables mode (Istio's own rules) and once under eBPF
(sk_lookup + getsockopt), each in a topology of its own; for each the test names the
listener that accepted the connection (the sidecar's 15006 or the app's own port: the
other must not see it), its SO_ORIGINAL_DST, and checks 4 KB each way by SHA-256.

The pod calling a prefix routed into it is local to it (istio-iptables' `-o lo`): its
app's call reaches the app (RETURN), its sidecar's goes to 15006 (ISTIO_IN_REDIRECT).

    node (br0 10.244.1.1, fd00:244::1, fe80::1; routes 10.77.0.0/24, fd00:77::/64 to pod)
      pod   10.244.1.10 fd00:244::10 + its kernel-made fe80:: on eth0; sidecar + app
            local routes 10.77.0.0/24, fd00:77::/64 on lo (before pod add);
            10.244.1.30, fd00:244::30 added to eth0 after pod add
      peer  10.244.1.20 fd00:244::20 (unmeshed), routes 10.77.0.0/24 via the pod
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from socket import AF_INET6

import pytest
from pyroute2 import NetNS

from meshaccel.datapath import bpfsys, inbound, iptables_mode, loader, lookup_tag, pods
from meshaccel.datapath.capture import parse_istio_args
from meshaccel.datapath.pins import LINK_PREFIX, Pins, prog_id, read_counters
from meshaccel.datapath.programs import PROGRAMS
from tests.kernel.lab import PEER as PEER_PY
from tests.kernel.lab import Lab, sandbox_prefix
from tests.kernel.peer import payload_sha

MODES = ("iptables", "ebpf")
# Istio's injection defaults with one more excluded inbound port (9081)
ARGS = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020,9081"
POD = ("10.244.1.10", "fd00:244::10")
PEER = ("10.244.1.20", "fd00:244::20")
NODE = ("10.244.1.1", "fd00:244::1")
ADDED = ("10.244.1.30", "fd00:244::30")  # put on the pod's eth0 after pod add
ANYIP = ("10.77.0.0/24", "fd00:77::/64")  # local routes in the pod, routed to it by the node
ANYIP_DST = ("10.77.0.5", "fd00:77::5")
NODAD = 0x02  # IFA_F_NODAD
TENTATIVE = 0x40  # IFA_F_TENTATIVE
SEND, REPLY = 4096, 4096
APP_UID, PROXY_UID = 1000, 1337


@dataclass(frozen=True)
class Case:
    group: str  # link-local, added, anyip
    source: str  # node, peer, or the pod itself: its app or its sidecar (SELF)
    dst: str  # an address, "LL" for the pod's eth0 link-local one
    port: int

    @property
    def id(self) -> str:
        return f"{self.source} -> {self.dst}:{self.port}"

    @property
    def counter(self) -> str:
        """The counter that moves once for the path eBPF takes: sk_lookup's capture for a
        call from outside the pod; connect4/6's decision for the pod calling itself."""
        return SELF[self.source][1] if self.source in SELF else "inbound_captured"


# the pod calling itself: as this user, and the connect4/6 counter its call moves
SELF = {
    "app": (APP_UID, "connect_skipped_local"),
    "sidecar": (PROXY_UID, "connect_captured_inbound"),
}


CASES = [
    Case("link-local", "node", "LL", 9080),
    Case("link-local", "node", "LL", 9081),  # excluded inbound port
    Case("link-local", "peer", "LL", 9080),
    Case("added", "node", ADDED[0], 9080),
    Case("added", "node", ADDED[1], 9080),
    Case("added", "peer", ADDED[0], 9080),
    Case("added", "node", ADDED[0], 9081),
    Case("anyip", "node", ANYIP_DST[0], 9080),
    Case("anyip", "node", ANYIP_DST[1], 9080),
    Case("anyip", "peer", ANYIP_DST[0], 9080),
    Case("anyip", "node", ANYIP_DST[0], 9081),
    Case("anyip", "app", ANYIP_DST[0], 9080),
    Case("anyip", "app", ANYIP_DST[1], 9080),
    Case("anyip", "sidecar", ANYIP_DST[0], 9080),
]


def expected(case: Case, ll: str) -> str:
    """Where istio-iptables sends it: captured ports to 15006 with the asked-for
    destination as SO_ORIGINAL_DST, the excluded port to the app; the pod's app calling
    itself to the app."""
    dst = ll if case.dst == "LL" else case.dst
    asked = f"[{dst}]:{case.port}" if ":" in dst else f"{dst}:{case.port}"
    return "app" if case.port == 9081 or case.source == "app" else f"15006 orig {asked}"


@dataclass
class Topology:
    mode: str
    ns: dict[str, str]  # node, pod, peer -> netns name
    ll: dict[str, str]  # pod, peer -> the link-local address of its eth0
    cgroup: str | None = None
    bpffs: str | None = None


def link_local(ns: str, ifname: str, timeout: float = 10) -> str:
    """The kernel-made link-local address of ifname in ns, once DAD is done with it (a
    tentative address neither answers nor sources a connection)."""
    deadline = time.monotonic() + timeout
    while True:
        with NetNS(ns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)[0]
            found = [
                (a.get_attr("IFA_ADDRESS"), a.get_attr("IFA_FLAGS") or a["flags"])
                for a in ipr.get_addr(index=idx, family=AF_INET6)
                if ipaddress.ip_address(a.get_attr("IFA_ADDRESS")).is_link_local
            ]
        if found and not found[0][1] & TENTATIVE:
            return found[0][0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no usable link-local address on {ns} {ifname}: {found}")
        time.sleep(0.1)


def ip(lab: Lab, ns: str, *args: str) -> None:
    p = lab.spawn(["ip", *args], netns=ns)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, (args, err)


def build(lab: Lab, mode: str) -> Topology:
    m = mode[0]
    node = lab.node(f"{m}-node")
    ns = {"node": node}
    ns["pod"] = lab.pod(f"{m}-pod", node, *POD)
    ns["peer"] = lab.pod(f"{m}-peer", node, *PEER)
    with NetNS(node) as ipr:
        br = ipr.link_lookup(ifname="br0")[0]
        ipr.addr("add", index=br, address=NODE[0], prefixlen=24)
        for addr in (NODE[1], "fe80::1"):
            ipr.addr("add", index=br, address=addr, prefixlen=64, flags=NODAD)
        ipr.route("add", dst=ANYIP[0], gateway=POD[0])
        ipr.route("add", dst=ANYIP[1], gateway=POD[1], family=AF_INET6)
    with NetNS(ns["peer"]) as ipr:
        ipr.route("add", dst=ANYIP[0], gateway=POD[0])
    for prefix in ANYIP:  # AnyIP: accepted locally, on no interface
        ip(lab, ns["pod"], "route", "add", "local", prefix, "dev", "lo")
    ll = {role: link_local(ns[role], "eth0") for role in ("pod", "peer")}
    topo = Topology(mode, ns, ll)
    if mode == "iptables":
        iptables_mode.install(ns["pod"], parse_istio_args(ARGS))
    else:
        topo.cgroup = lab.cgroup(f"{m}-cg")
        topo.bpffs = lab.attach(topo.cgroup)
        summary = lab.register(topo.bpffs, ns["pod"], istio_args=ARGS)
        assert ll["pod"] in summary, summary  # pod add registered the link-local address
    with NetNS(ns["pod"]) as ipr:  # after pod add (or istio-init)
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=ADDED[0], prefixlen=24)
        ipr.addr("add", index=eth0, address=ADDED[1], prefixlen=64, flags=NODAD)
    return topo


# peer.py connect, its connect() given the address as getaddrinfo() spells it: a 4-tuple
# with the scope id of a zoned link-local address ("fe80::1%br0"), which a 2-tuple loses
ZONED_PEER = (
    "import socket, sys; sys.path.insert(0, sys.argv.pop(1)); import peer; "
    "c = socket.socket.connect; "
    "socket.socket.connect = lambda s, a: c(s, socket.getaddrinfo(*a, s.family, s.type)[0][4]); "
    "peer.main()"
)


def destination(topo: Topology, case: Case) -> str:
    if case.dst != "LL":
        return case.dst
    # the pod's link-local address, zoned by the caller's interface toward it
    return f"{topo.ll['pod']}%{'br0' if case.source == 'node' else 'eth0'}"


def land_one(lab: Lab, topo: Topology, case: Case, seed: int) -> tuple[str, int | None]:
    """One connection of case in topo: where it landed, and in the eBPF mode by how much
    the case's counter moved."""
    dst = destination(topo, case)
    wildcard = "::" if ":" in dst else "0.0.0.0"  # the family's own listeners, as Envoy's
    # the sidecar starts after the capture is in place, as after istio-init
    listeners = {
        "15006": (PROXY_UID, 15006),
        "app": (APP_UID, case.port),
    }
    procs = {
        name: lab.listener(
            wildcard, port, "--reply-bytes", REPLY,
            netns=topo.ns["pod"], cgroup=topo.cgroup, uid=uid,
        )
        for name, (uid, port) in listeners.items()
    }  # fmt: skip
    before = read_counters(topo.bpffs) if topo.bpffs else None
    argv = [sys.executable, "-c", ZONED_PEER, os.path.dirname(PEER_PY), "connect", dst,
            str(case.port), "--send-bytes", str(SEND), "--seed", str(seed)]  # fmt: skip
    if case.source in SELF:
        client = lab.spawn(argv, netns=topo.ns["pod"], cgroup=topo.cgroup, uid=SELF[case.source][0])
    else:
        client = lab.spawn(argv, netns=topo.ns[case.source])
    stdout, stderr = client.communicate(timeout=60)
    lines = stdout.strip().splitlines()
    assert lines, f"client printed nothing (rc {client.returncode}): {stderr}"
    rec = json.loads(lines[-1])
    # the listener that accepted it prints its record, then exits (--conns 1)
    deadline = time.monotonic() + (0.5 if "error" in rec else 10)
    while time.monotonic() < deadline and all(p.poll() is None for p in procs.values()):
        time.sleep(0.02)
    got = []
    for name, p in procs.items():
        if p.poll() is None:
            p.kill()
        out, _ = p.communicate(timeout=30)
        got += [(name, json.loads(line)) for line in out.splitlines() if line]
    delta = None
    if before is not None:
        delta = read_counters(topo.bpffs)[case.counter] - before[case.counter]
    return describe(rec, got), delta


def land(lab: Lab, topo: Topology) -> dict[str, tuple[str, int | None]]:
    """Every case in topo: case id -> (where it landed, inbound_captured delta)."""
    return {c.id: land_one(lab, topo, c, seed) for seed, c in enumerate(CASES, start=10)}


def describe(client: dict, got: list[tuple[str, dict]]) -> str:
    """'15006 orig X' or 'app', and whatever went wrong with the bytes either way."""
    if not got:
        return f"refused or unreachable ({client.get('error')})"
    if len(got) > 1:
        return f"accepted {len(got)} times: {got}"
    [(name, rec)] = got
    where = f"15006 orig {rec['orig_dst']}" if name == "15006" else "app"
    sent_ok = rec["bytes"] == SEND and rec["sha256"] == client.get("sent_sha256")
    reply_ok = client.get("received") == REPLY and client.get("received_sha256") == payload_sha(
        REPLY, seed=2
    )
    if not (sent_ok and reply_ok):
        where += f", bytes differ: client {client}, listener {rec}"
    return where


Results = dict[str, tuple[dict[str, tuple[str, int | None]], dict[str, str]]]


@pytest.fixture(scope="module")
def landed() -> Iterator[Results]:
    """Every case in both modes, each mode in a topology of its own (built one after
    the other, so no conntrack entry or datapath of one mode meets the other)."""
    lab = Lab(sandbox_prefix("ca"))
    out: Results = {}
    try:
        for mode in MODES:
            topo = build(lab, mode)
            out[mode] = (land(lab, topo), topo.ll)
            if topo.bpffs:
                loader.detach(bpffs=topo.bpffs)
        yield out
    finally:
        lab.cleanup()


def check(results: Results, group: str, mode: str) -> None:
    """Every case of group landed in mode where istio-iptables sends it; in the eBPF mode
    also as it did in the iptables mode (each topology's own link-local address read as
    LL), and sk_lookup's counter moved exactly for the captured ones (the kernel path),
    connect4/6's for each call of the pod to itself."""
    rows, wrong = [], []
    for case in [c for c in CASES if c.group == group]:
        got, delta = results[mode][0][case.id]
        want = expected(case, results[mode][1]["pod"])
        rows.append(f"{mode} {case.id}: {got}")
        if got != want:
            wrong.append(f"{mode} {case.id}: {got}, expected {want}")
        if mode == "ebpf":
            ref = results["iptables"][0][case.id][0].replace(results["iptables"][1]["pod"], "LL")
            if got.replace(results["ebpf"][1]["pod"], "LL") != ref:
                wrong.append(f"ebpf {case.id}: {got}, but the iptables mode: {ref}")
            moved = 1 if want.startswith("15006") or case.source in SELF else 0
            if delta != moved:
                wrong.append(f"ebpf {case.id}: {case.counter} +{delta}, not +{moved}")
    assert not wrong, "\n".join([*wrong, "", *rows])


def by_mode(*ebpf_marks: pytest.MarkDecorator) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("mode", ["iptables", pytest.param("ebpf", marks=ebpf_marks)])


@by_mode()
def test_link_local(landed: Results, mode: str):
    """A connection to the pod's kernel-made fe80:: address (zoned by the caller's
    interface), from the node and from another pod on the bridge, lands on 15006 with
    SO_ORIGINAL_DST [fe80::...]:port; the excluded port (-d 9081) reaches the app. eBPF:
    pod add registers the link-local address among the pod's."""
    check(landed, "link-local", mode)


@by_mode()
def test_address_added_after_pod_add(landed: Results, mode: str):
    """An IPv4 and a global IPv6 address put on the pod's eth0 after pod add (or after
    istio-init): Istio's PREROUTING matches no address, so it captures them at once."""
    check(landed, "added", mode)


@by_mode()
def test_prefix_routed_into_the_pod(landed: Results, mode: str):
    """A destination the pod accepts through a local route (AnyIP) rather than an
    interface address, routed to the pod by the node or a peer pod: captured by Istio,
    SO_ORIGINAL_DST the address asked for; no interface holds it, so no registration of
    addresses could capture it. The pod calling it itself: its app's call reaches the
    app, its sidecar's goes to 15006 (pod add registers the prefix as local to the pod)."""
    check(landed, "anyip", mode)


def _run_order(ns: str, want: list[int], timeout: float = 10) -> list[int]:
    """Ids of the sk_lookup programs linked into a netns, in run order, once they are
    want (or timeout passed): an unpinned link goes once bpffs frees its inode, after an
    RCU grace period."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        try:
            got = bpfsys.prog_query(fd, bpfsys.SK_LOOKUP)
        finally:
            os.close(fd)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def _gone(prog_id: int, timeout: float = 10) -> bool:
    """The kernel freed the program (after an RCU grace period)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.close(bpfsys.prog_fd_by_id(prog_id))
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_tag_link_runs_first_and_goes_with_the_pod():
    """pod add links the pod's tag program ahead of sk_lookup, each pinned; pod remove
    takes both away, and the tag program (held by its link alone) is freed. A pod linked
    without a tag (as by a release before tags: simulated by unpinning its tag link)
    still has its registered address captured, by address alone."""
    lab = Lab(sandbox_prefix("ct"))
    try:
        topo = build(lab, "ebpf")
        pins, pod_ns = Pins(topo.bpffs), topo.ns["pod"]
        [link], [tag] = pins.links(), pins.tag_links()
        cookie = int(os.path.basename(link).removeprefix(LINK_PREFIX))
        assert tag == pins.tag_link(cookie)
        tag_id, main_id = inbound.link_prog_id(tag), inbound.link_prog_id(link)
        fd = bpfsys.prog_fd_by_id(tag_id)
        try:
            assert bpfsys.prog_info(fd).name.decode() == lookup_tag.NAME
        finally:
            os.close(fd)
        assert main_id == prog_id(pins.prog(next(p for p in PROGRAMS if p.hook == "netns")))
        assert _run_order(pod_ns, [tag_id, main_id]) == [tag_id, main_id]

        pods.remove(topo.bpffs, POD[0])
        assert not [n for n in os.listdir(topo.bpffs) if n.startswith("link_")]
        assert _run_order(pod_ns, []) == []
        assert _gone(tag_id), f"tag program {tag_id} outlived its pod"

        lab.register(topo.bpffs, pod_ns, istio_args=ARGS)
        [link], [tag] = pins.links(), pins.tag_links()
        os.unlink(tag)
        main_id = inbound.link_prog_id(link)
        assert _run_order(pod_ns, [main_id]) == [main_id]
        registered = Case("untagged", "peer", POD[0], 9080)
        assert land_one(lab, topo, registered, 40) == (expected(registered, ""), 1)
        # ... by address alone: the tag is what captures a prefix routed into the pod
        # (ADDED is registered now: pod add registers every address the pod has)
        anyip = Case("untagged", "peer", ANYIP_DST[0], 9080)
        assert land_one(lab, topo, anyip, 41) == ("app", 0)
        pods.remove(topo.bpffs, POD[0])
        assert not [n for n in os.listdir(topo.bpffs) if n.startswith("link_")]
        assert _run_order(pod_ns, []) == []
        loader.detach(bpffs=topo.bpffs)
    finally:
        lab.cleanup()


def test_cases_cover_each_group_and_an_excluded_port():
    groups = {c.group for c in CASES}
    assert groups == {"link-local", "added", "anyip"}
    assert all(any(c.group == g and c.port == 9081 for c in CASES) for g in groups)
    assert {c.source for c in CASES} == {"node", "peer", *SELF}
