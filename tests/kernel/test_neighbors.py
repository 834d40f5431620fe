"""Other programs on meshaccel's hooks: a real second cgroup/connect4 program (a socket
load balancer rewriting a Service VIP to a backend, as Cilium's socket LB does) before
and after meshaccel's, what status and doctor say, and what the sidecar really sees."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from meshaccel.cli import format_status
from meshaccel.datapath import bpfsys, doctor, loader, neighbors
from meshaccel.datapath.pins import read_counters

VIP, VIP_PORT = "10.96.0.10", 80
BACKEND, BACKEND_PORT = "10.244.1.20", 9080
PROXY = 15001

# bpf_sock_addr holds addresses and ports in network byte order (a port in the low 16 bits)
PROGRAMS = r"""
int lb_vip4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 == VIP_N && ctx->user_port == VIP_PORT_N) {
        ctx->user_ip4 = BACKEND_N;
        ctx->user_port = BACKEND_PORT_N;
    }
    return 1;
}

int other_sockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optlen > 4096)
        ctx->optlen = 0; /* past a page: let the kernel's answer stand */
    return 1;
}

int other_lookup(struct bpf_sk_lookup *ctx)
{
    return 1; /* SK_PASS without selecting a socket */
}
"""


def _n32(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "little")


def _n16(port: int) -> int:
    return socket.htons(port)


@pytest.fixture(scope="module")
def compiled():
    from bcc import BPF

    cflags = [
        f"-DVIP_N={_n32(VIP)}u",
        f"-DVIP_PORT_N={_n16(VIP_PORT)}u",
        f"-DBACKEND_N={_n32(BACKEND)}u",
        f"-DBACKEND_PORT_N={_n16(BACKEND_PORT)}u",
    ]
    b = BPF(text=PROGRAMS.encode(), cflags=cflags)
    try:
        yield b
    finally:
        b.cleanup()


class Others:
    """The other programs one test attaches; detach_all() removes every one of them."""

    def __init__(self, b) -> None:
        from bcc import BPFProgType

        self.lb = b.load_func(
            b"lb_vip4", BPFProgType.CGROUP_SOCK_ADDR, attach_type=bpfsys.CGROUP_INET4_CONNECT
        ).fd
        self.sockopt = b.load_func(
            b"other_sockopt", BPFProgType.CGROUP_SOCKOPT, attach_type=bpfsys.CGROUP_GETSOCKOPT
        ).fd
        self.lookup = b.load_func(b"other_lookup", 30, attach_type=bpfsys.SK_LOOKUP).fd
        self.attached: list[tuple[int, str, int]] = []  # (prog fd, cgroup, attach type)
        self.links: list[int] = []

    @staticmethod
    def id(fd: int) -> int:
        return bpfsys.prog_info(fd).id

    def attach(self, fd: int, cgroup: str, attach_type: int) -> None:
        cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bpfsys.prog_attach(fd, cg, attach_type, bpfsys.F_ALLOW_MULTI)
        finally:
            os.close(cg)
        self.attached.append((fd, cgroup, attach_type))

    def link_into(self, fd: int, netns: str) -> None:
        ns = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
        try:
            self.links.append(bpfsys.link_create(fd, ns, bpfsys.SK_LOOKUP))
        finally:
            os.close(ns)

    def detach_all(self) -> None:
        for fd, cgroup, attach_type in reversed(self.attached):
            cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                bpfsys.prog_detach(fd, cg, attach_type)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            finally:
                os.close(cg)
            assert self.id(fd) not in neighbors._query_cgroup(cgroup, [attach_type]).get(
                attach_type, []
            )
        self.attached.clear()
        for link in self.links:  # an unpinned link goes with its last fd
            os.close(link)
        self.links.clear()


@pytest.fixture
def others(lab, compiled):
    """Detached in teardown, before the lab's (this fixture depends on it), also on
    failure."""
    o = Others(compiled)
    try:
        yield o
    finally:
        o.detach_all()


def _child(lab, parent: str) -> str:
    path = os.path.join(parent, "child")
    os.mkdir(path)
    lab.cgroups.append(path)  # removed before its parent
    return path


def _mine(found: list[dict], prog_id: int) -> dict:
    [entry] = [f for f in found if f["id"] == prog_id]
    return entry


# placement -> (meshaccel's cgroup, the LB's cgroup, the app's cgroup, LB attached first)
PLACEMENTS = {
    "same cgroup, LB attached first": ("cg", "cg", "cg", True),
    "same cgroup, LB attached later": ("cg", "cg", "cg", False),
    "LB on a descendant cgroup": ("cg", "child", "child", False),
    "LB on an ancestor cgroup": ("child", "cg", "child", True),
}


@pytest.mark.parametrize(
    "placement,order,where",
    [
        ("same cgroup, LB attached first", "before", "same cgroup"),
        ("same cgroup, LB attached later", "after", "same cgroup"),
        ("LB on a descendant cgroup", "before", "descendant"),
        ("LB on an ancestor cgroup", "after", "ancestor"),
    ],
)
def test_socket_lb_before_or_after_meshaccel(lab, others, placement, order, where):
    ma_at, lb_at, app_at, lb_first = PLACEMENTS[placement]
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10")
    cgroups = {"cg": lab.cgroup()}
    cgroups["child"] = _child(lab, cgroups["cg"])
    if lb_first:
        others.attach(others.lb, cgroups[lb_at], bpfsys.CGROUP_INET4_CONNECT)
    bpffs = lab.attach(cgroups[ma_at], pods=(ns,))
    if not lb_first:
        others.attach(others.lb, cgroups[lb_at], bpfsys.CGROUP_INET4_CONNECT)
    lb_id = others.id(others.lb)

    # (a) what status and doctor report
    st = loader.status(bpffs)
    lb = _mine(st["other_programs"], lb_id)
    assert (lb["hook"], lb["name"], lb["type"]) == ("connect4", "lb_vip4", "cgroup_sock_addr")
    assert (lb["order"], lb["where"], lb["attached_to"]) == (order, where, cgroups[lb_at])
    if order == "before":
        assert "socketLB.hostNamespaceOnly=true" in lb["warning"]
    else:
        assert lb["warning"] is None
    [line] = [x for x in format_status(st).splitlines() if f"id {lb_id} " in x]
    assert "lb_vip4" in line and f"runs {order} meshaccel's; on {cgroups[lb_at]}" in line
    check = doctor.check_other_programs(bpffs)
    assert not check.required
    assert f"lb_vip4 (id {lb_id}, runs {order} meshaccel's)" in check.detail
    assert (f"lb_vip4 (id {lb_id})" in check.fix) == (order == "before")

    # (b) what the sidecar sees: the backend when the LB rewrote first, else the Service
    expected = f"{BACKEND}:{BACKEND_PORT}" if order == "before" else f"{VIP}:{VIP_PORT}"
    before = read_counters(bpffs)
    sidecar = lab.listener("127.0.0.1", PROXY, netns=ns, cgroup=cgroups[app_at])
    app = lab.run_peer(
        "connect", VIP, VIP_PORT, "--send-bytes", 100, netns=ns, cgroup=cgroups[app_at]
    )
    assert "error" not in app, app
    [rec] = lab.records(sidecar)
    assert rec["orig_dst"] == expected and rec["bytes"] == 100
    assert app["peer"] == expected  # getpeername: what meshaccel recorded
    assert read_counters(bpffs)["connect_captured"] == before["connect_captured"] + 1


def test_getsockopt_after_and_sk_lookup_in_a_pod(lab, others):
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(ns,))
    others.attach(others.sockopt, cg, bpfsys.CGROUP_GETSOCKOPT)
    others.link_into(others.lookup, ns)

    found = loader.status(bpffs)["other_programs"]
    sockopt = _mine(found, others.id(others.sockopt))
    assert (sockopt["hook"], sockopt["order"], sockopt["where"]) == (
        "getsockopt",
        "after",
        "same cgroup",
    )
    assert "SO_ORIGINAL_DST" in sockopt["warning"]
    lookup = _mine(found, others.id(others.lookup))
    assert (lookup["hook"], lookup["order"], lookup["where"]) == ("sk_lookup", "after", "pod netns")
    assert lookup["attached_to"] == f"pod {ns} (netns /var/run/netns/{ns})"
    assert lookup["warning"] and lookup["type"] == "sk_lookup"
    check = doctor.check_other_programs(bpffs)
    assert not check.ok and not check.required and "other_lookup" in check.fix

    others.detach_all()
    found = loader.status(bpffs)["other_programs"]
    assert not [
        f for f in found if f["id"] in (others.id(others.sockopt), others.id(others.lookup))
    ]
