"""Per-pod capture: only registered pods are captured, each by its own istio-iptables
settings and annotations, with Istio's treatment of the pod's own addresses."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
import sys

import pytest
from pyroute2 import NetlinkError, NetNS

from meshaccel.datapath import bpfsys, pods, structs
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.loader import status
from meshaccel.datapath.pins import read_counters
from meshaccel.errors import MeshaccelError

APP_IP, OTHER_IP = "10.244.1.10", "10.244.1.20"
MESHACCEL = os.path.join(os.path.dirname(sys.executable), "meshaccel")
# every map pod add writes for a pod
POD_MAPS = ("pod_config", "pod_by_netns", "pod_shortcut", "pod_local_routes", "inbound_listener")


@pytest.fixture
def mesh(lab):
    """An app pod (in the attached cgroup, not yet registered) and a server pod."""
    node = lab.node()
    app = lab.pod("app", node, APP_IP, "fd00:244::10")
    server = lab.pod("srv", node, OTHER_IP)
    cg = lab.cgroup()
    return app, server, cg, lab.attach(cg)


def where_it_lands(lab, mesh, dst, port, uid=None) -> str:
    """Connect from the app pod to dst:port (the app pod itself or the server pod); name
    the listener that got it: a sidecar port with the original dst, or "app"/"server"."""
    app, server, cg, _ = mesh
    listeners = {p: lab.listener("127.0.0.1", p, netns=app, cgroup=cg) for p in (15001, 15006)}
    target = "app" if dst == APP_IP else "server"
    listeners[target] = lab.listener("0.0.0.0", port, netns=app if dst == APP_IP else server)
    rec = lab.run_peer("connect", dst, port, "--send-bytes", 1, netns=app, cgroup=cg, uid=uid)
    assert "error" not in rec, rec
    landed = []
    for name, listener in listeners.items():
        listener.kill()
        for line in listener.stdout.read().splitlines():
            orig = json.loads(line)["orig_dst"]
            landed.append(f"{name} orig {orig}" if isinstance(name, int) else name)
    return " ".join(landed)


def test_unregistered_pods_are_not_captured(lab, mesh):
    app, _, cg, bpffs = mesh
    before = read_counters(bpffs)
    assert where_it_lands(lab, mesh, OTHER_IP, 9080) == "server"
    after = read_counters(bpffs)
    assert after["connect_skipped_no_pod"] > before["connect_skipped_no_pod"]
    assert after["connect_captured"] == before["connect_captured"]


def test_the_pods_own_address(lab, mesh):
    """The app calling its own pod IP is not captured; the sidecar calling it goes to its
    inbound listener (istio-iptables: -o lo ... --uid-owner 1337 -j ISTIO_IN_REDIRECT)."""
    app, _, cg, bpffs = mesh
    lab.register(bpffs, app)
    assert where_it_lands(lab, mesh, APP_IP, 9080) == "app"
    assert where_it_lands(lab, mesh, APP_IP, 9080, uid=1337) == f"15006 orig {APP_IP}:9080"
    assert read_counters(bpffs)["connect_captured_inbound"] == 1


def test_per_pod_args_annotations_and_remove(lab, mesh):
    app, server, cg, bpffs = mesh
    lab.register(bpffs, app, istio_args="-p 15001 -z 15006 -u 1337 -i 10.244.1.32/28")
    assert where_it_lands(lab, mesh, OTHER_IP, 9080) == "server"
    lab.register(bpffs, app, istio_args="-p 15001 -z 15006 -u 1337 -i 10.244.1.16/28")
    assert where_it_lands(lab, mesh, OTHER_IP, 9080) == f"15001 orig {OTHER_IP}:9080"

    lab.register(
        bpffs, app, annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "9080"}
    )  # the attach defaults (-i '*') plus the annotation
    assert where_it_lands(lab, mesh, OTHER_IP, 9080) == "server"
    assert where_it_lands(lab, mesh, OTHER_IP, 9081) == f"15001 orig {OTHER_IP}:9081"

    assert pods.remove(bpffs, APP_IP) == f"pod {app} removed"
    assert pods.remove(bpffs, APP_IP) == f"no pod with address {APP_IP}"
    assert where_it_lands(lab, mesh, OTHER_IP, 9081) == "server"


def test_pod_cli(lab, mesh):
    app, server, cg, bpffs = mesh

    def cli(*args: str) -> subprocess.CompletedProcess:
        argv = [MESHACCEL, "pod", *args, "--bpffs", bpffs]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    r = cli("add", "--name", "default/app", "--ip", APP_IP, "--ip", "fd00:244::10",
            "--netns", f"/var/run/netns/{app}",
            "--annotation", "traffic.sidecar.istio.io/excludeInboundPorts=8080")  # fmt: skip
    assert r.returncode == 0, r.stderr
    with NetNS(app) as ipr:  # as istio-iptables: ::6 for Envoy's IPv6 inbound passthrough
        lo = ipr.link_lookup(ifname="lo")[0]
        assert "::6" in [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=10)]
    [listed] = json.loads(cli("list", "--json").stdout)
    assert listed["name"] == "default/app" and listed["ips"] == [APP_IP, "fd00:244::10"]
    assert "-d 15090,15021,8080,15020" in listed["istio_iptables_args"]  # Istio's merge
    assert "default/app" in cli("list").stdout

    errors = {
        ("add", "--name", "x", "--ip", "10.0.0.300", "--netns", "/x"): "--ip 10.0.0.300: not an IP",
        ("add", "--name", "x", "--ip", "10.244.1.99", "--netns", "/nonexistent"):
            "--netns /nonexistent: No such file",
        ("add", "--name", "x", "--ip", "10.244.1.99", "--netns", __file__):
            f"--netns {__file__}: not a network namespace",
        ("add", "--name", "x", "--ip", APP_IP, "--netns", f"/var/run/netns/{server}"):
            f"--ip {APP_IP}: already the address of pod 'default/app' in another netns",
        ("add", "--name", "x", "--ip", "10.244.1.99", "--pid", "1", "--istio-iptables-args",
         "-p 0"): "-p",
        ("add", "--name", "x", "--ip", "10.244.1.99", "--netns", "/x", "--pid", "1"):
            "--netns PATH or --pid PID",
        ("add", "--name", "x", "--ip", "10.244.1.99", "--pid", "1", "--annotation", "nokey"):
            "--annotation nokey: expected KEY=VALUE",
    }  # fmt: skip
    for args, message in errors.items():
        r = cli(*args)
        assert r.returncode == 1, (args, r.stdout)
        [line] = r.stderr.strip().splitlines()
        assert line.startswith("meshaccel: error: ") and message in line, (args, line)
    assert len(json.loads(cli("list", "--json").stdout)) == 1  # nothing half-written

    with NetNS(app) as ipr:  # the pod loses its IPv6 address
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("del", index=eth0, address="fd00:244::10", prefixlen=64)
    r = cli("add", "--name", "default/app", "--ip", APP_IP, "--netns", f"/var/run/netns/{app}")
    assert r.returncode == 0, r.stderr  # an update: the IPv6 address is gone
    [listed] = json.loads(cli("list", "--json").stdout)
    assert listed["ips"] == [APP_IP]
    # still captured: every other address of the pod (here eth0's IPv6 link-local one)
    others = [a for a in listed["addresses"] if a != APP_IP]
    assert [ipaddress.ip_address(a).is_link_local for a in others] == [True], listed
    assert status(bpffs)["maps"]["pod_config"]["entries"] == 2

    assert cli("remove", "--ip", APP_IP).stdout.strip() == "pod default/app removed"
    assert json.loads(cli("list", "--json").stdout) == []


def test_pod_add_without_datapath_is_a_clear_error(lab):
    ns = lab.pod("app", lab.node(), APP_IP)
    with pytest.raises(MeshaccelError, match="no datapath attached at /sys/fs/bpf/ma-none"):
        pods.add("/sys/fs/bpf/ma-none", "x", [APP_IP], netns=f"/var/run/netns/{ns}")


def test_a_netns_whose_routes_cannot_be_read_is_a_clear_error(lab, mesh, monkeypatch):
    """A netlink error reading the pod's addresses and routes is one line naming the
    netns (not pyroute2's exception), and nothing is registered."""
    app, _, _, bpffs = mesh

    def refused(*_args: object, **_kw: object) -> None:
        raise NetlinkError(errno.EPERM, "injected")

    monkeypatch.setattr(netns_mod.IPRoute, "get_routes", refused, raising=False)
    why = f"cannot read the addresses and routes in /var/run/netns/{app}: Operation not permitted"
    with pytest.raises(MeshaccelError, match=why):
        lab.register(bpffs, app)
    monkeypatch.undo()
    assert pods.list_pods(bpffs) == []
    assert all(status(bpffs)["maps"][name]["entries"] == 0 for name in POD_MAPS)


@pytest.mark.parametrize(
    "src,dst,port,expected",
    [
        ("server", APP_IP, 9080, f"15006 orig {APP_IP}:9080"),
        ("server", APP_IP, 15020, "app"),  # excluded inbound port (-d): straight to the app
        ("node", APP_IP, 9080, f"15006 orig {APP_IP}:9080"),
        ("server", "fd00:244::10", 9080, "15006 orig [fd00:244::10]:9080"),
        ("server", "fd00:244::10", 15090, "app"),
    ],
)
def test_inbound_capture(lab, mesh, src, dst, port, expected):
    """From another pod or the node: captured ports reach the sidecar's inbound listener
    with SO_ORIGINAL_DST = podIP:port; excluded ports reach the app. (sk_lookup)"""
    app, server, cg, bpffs = mesh
    lab.register(bpffs, app)
    # the sidecar starts after `pod add`, as after istio-init: its listen() is seen
    sidecar = lab.listener("::", 15006, netns=app, cgroup=cg, uid=1337)
    local = lab.listener("::", port, netns=app, cgroup=cg)
    before = read_counters(bpffs)
    if src == "server":
        from_ns = server
    else:
        from_ns = lab.netns[0]  # the node netns: give it an address on the bridge
        with NetNS(from_ns) as ipr:
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.addr("add", index=br, address="10.244.1.1", prefixlen=24)
            ipr.addr("add", index=br, address="fd00:244::1", prefixlen=64, flags=0x02)
    if ":" in dst:
        with NetNS(server) as ipr:
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address="fd00:244::20", prefixlen=64, flags=0x02)
    rec = lab.run_peer("connect", dst, port, "--send-bytes", 7, netns=from_ns)
    assert "error" not in rec, rec
    landed = []
    for name, listener in (("15006", sidecar), ("app", local)):
        listener.kill()
        for line in listener.stdout.read().splitlines():
            orig = json.loads(line)["orig_dst"]
            landed.append(f"15006 orig {orig}" if name == "15006" else "app")
    assert " ".join(landed) == expected
    captured = read_counters(bpffs)["inbound_captured"] - before["inbound_captured"]
    assert captured == (1 if expected.startswith("15006") else 0)


def test_sidecar_to_sidecar_on_one_node_takes_the_shortcut(lab, mesh):
    """The client pod's sidecar (uid 1337) calls the server pod: sk_lookup hands it to the
    server's sidecar (15006), and sk_msg carries the bytes between the two sidecars."""
    app, server, cg, bpffs = mesh
    lab.register(bpffs, app)
    lab.register(bpffs, server)
    sidecar = lab.listener("0.0.0.0", 15006, "--reply-bytes", 300_000, netns=server, cgroup=cg,
                           uid=1337)  # fmt: skip
    before = read_counters(bpffs)
    rec = lab.run_peer("connect", OTHER_IP, 9080, "--send-bytes", 500_000,
                       netns=app, cgroup=cg, uid=1337)  # fmt: skip
    [got] = lab.records(sidecar)
    after = read_counters(bpffs)
    delta = {k: after[k] - before[k] for k in after}

    assert "error" not in rec, rec
    assert got["orig_dst"] == f"{OTHER_IP}:9080" and got["bytes"] == 500_000
    assert got["sha256"] == rec["sent_sha256"] and rec["received"] == 300_000
    assert delta["connect_sidecar_to_pod"] == 1 and delta["inbound_captured"] == 1
    assert delta["sock_inserted"] == 2
    assert delta["msg_redirected_bytes"] == 500_000 + 300_000, delta


def test_sidecar_listening_before_registration_is_adopted(lab, mesh):
    """The sidecar was up before its pod was registered (e.g. while the agent was down):
    pod add finds its inbound listener (pidfd_getfd) and inbound capture works."""
    app, server, cg, bpffs = mesh
    sidecar = lab.listener("::", 15006, netns=app, cgroup=cg, uid=1337)
    lab.register(bpffs, app)
    assert status(bpffs)["maps"]["inbound_listener"]["entries"] == 2  # v4 and v6 address
    rec = lab.run_peer("connect", APP_IP, 9080, "--send-bytes", 3, netns=server)
    assert "error" not in rec, rec
    sidecar.kill()
    [line] = sidecar.stdout.read().splitlines()
    assert json.loads(line)["orig_dst"] == f"{APP_IP}:9080"


def _lo_v6(ns: str) -> list[str]:
    with NetNS(ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        return sorted(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=10))


def test_remove_undoes_what_add_did(lab, mesh):
    """pod remove leaves the datapath and the pod's netns as they were before pod add: no
    map entry, no sk_lookup link, no inbound listener entry, no ::6 that pod add put on
    lo."""
    app, _, cg, bpffs = mesh
    assert _lo_v6(app) == ["::1"]
    sidecar = lab.listener("::", 15006, netns=app, cgroup=cg, uid=1337)  # adopted by pod add
    _local_route(app, "10.77.0.0/24")
    lab.register(bpffs, app)
    maps = status(bpffs)["maps"]
    assert maps["inbound_listener"]["entries"] == 2 and maps["pod_by_netns"]["entries"] == 1
    assert maps["pod_local_routes"]["entries"] == 1
    assert _lo_v6(app) == ["::1", "::6"]

    assert pods.remove(bpffs, APP_IP) == f"pod {app} removed"
    maps = status(bpffs)["maps"]
    for name in POD_MAPS:
        assert maps[name]["entries"] == 0, name
    assert not [n for n in os.listdir(bpffs) if n.startswith("link_")]
    assert _lo_v6(app) == ["::1"]
    assert sidecar.poll() is None  # the sidecar's socket is its own: only the entry goes


def test_remove_keeps_a_passthrough_address_it_did_not_add(lab, mesh):
    """::6 on lo put there before pod add (by istio-init, as istio-iptables does) stays."""
    app, _, _, bpffs = mesh
    with NetNS(app) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.addr("add", index=lo, address="::6", prefixlen=128)
    lab.register(bpffs, app)
    pods.remove(bpffs, APP_IP)
    assert _lo_v6(app) == ["::1", "::6"]


def test_a_failed_update_restores_the_earlier_registration(lab, mesh, monkeypatch):
    """An update that fails half-way puts the pod's earlier entries back, also that of
    an address the update would have dropped, and keeps its capture as it was."""
    app, _, _, bpffs = mesh
    _local_route(app, "10.77.0.0/24")
    lab.register(bpffs, app, annotations={"meshaccel.io/shortcut": "true"})
    before = {p["name"]: p for p in pods.list_pods(bpffs)}
    assert before[app]["local_routes"] == ["10.77.0.0/24"]
    entries = status(bpffs)["maps"]

    def fail(*_args: object) -> None:
        raise OSError(errno.EIO, "injected")

    with NetNS(app) as ipr:  # the update would drop the pod's IPv6 address and its prefix
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("del", index=eth0, address="fd00:244::10", prefixlen=64)
    _local_route(app, "10.77.0.0/24", "del")
    monkeypatch.setattr(pods, "_write_shortcut", fail)
    with pytest.raises(MeshaccelError, match="its earlier registration kept: .*injected"):
        pods.add(bpffs, app, [APP_IP], netns=f"/var/run/netns/{app}", istio_args="-i 10.0.0.0/8")
    monkeypatch.undo()
    assert {p["name"]: p for p in pods.list_pods(bpffs)} == before
    after = status(bpffs)["maps"]
    for name in POD_MAPS:
        assert after[name]["entries"] == entries[name]["entries"], name
    assert before[app]["shortcut"] == "apps"


def test_a_failed_update_takes_back_the_prefixes_it_wrote(lab, mesh, monkeypatch):
    """An update that fails half-way through the pod's new local-route prefixes (the map
    full at the second) is reported in one line and takes back the one it wrote: the pod
    keeps the prefixes it had."""
    app, _, _, bpffs = mesh
    _local_route(app, "10.77.0.0/24")
    lab.register(bpffs, app)
    _local_route(app, "10.88.0.0/24")
    _local_route(app, "10.99.0.0/24")
    real, written = bpfsys.map_update, []

    def full_at_the_second(fd: int, key: object, value: object) -> None:
        if isinstance(key, structs.LocalRouteKey):
            written.append(key)
            if len(written) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, key, value)

    monkeypatch.setattr(bpfsys, "map_update", full_at_the_second)
    with pytest.raises(MeshaccelError, match="its earlier registration kept: .* maps are full"):
        lab.register(bpffs, app)
    monkeypatch.undo()
    assert len(written) == 2
    assert [p["local_routes"] for p in pods.list_pods(bpffs)] == [["10.77.0.0/24"]]


def _local_route(ns: str, prefix: str, op: str = "add") -> None:
    """A prefix the pod accepts on no interface (AnyIP): `ip route add local PREFIX dev lo`
    (op "del": its removal)."""
    with NetNS(ns) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route(op, dst=prefix, type="local", table=255, oif=lo, scope="host")
