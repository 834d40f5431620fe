"""The reconciler and the pods-file source against the real pinned maps."""

from __future__ import annotations

import ipaddress
import threading
import time

import pytest
import yaml
from pyroute2 import NetNS

from meshaccel.agent.file_source import FileSource
from meshaccel.agent.reconciler import PodSpec, Reconciler
from meshaccel.datapath import pods
from meshaccel.datapath.pins import read_counters
from tests.wait import wait_for


@pytest.fixture
def node(lab):
    n = lab.node()
    a = lab.pod("a", n, "10.244.1.10", "fd00:244::10")
    b = lab.pod("b", n, "10.244.1.11")
    return a, b, lab.attach(lab.cgroup())


def spec(ns: str, ips: tuple[str, ...], **annotations: str) -> PodSpec:
    return PodSpec(f"default/{ns}", ips, f"/var/run/netns/{ns}", annotations)


def registered(bpffs: str) -> dict[str, dict]:
    return {p["name"]: p for p in pods.list_pods(bpffs)}


def test_reconciler_adds_updates_removes_and_is_idempotent(node):
    a, b, bpffs = node
    r = Reconciler(bpffs)
    pa, pb = spec(a, ("10.244.1.10", "fd00:244::10")), spec(b, ("10.244.1.11",))
    res = r.sync([pa, pb])
    assert sorted(res.added) == [f"default/{a}", f"default/{b}"] and not res.failed
    assert r.sync([pa, pb]).added == []  # safe to run again: nothing to do

    annotated = spec(a, pa.ips, **{"traffic.sidecar.istio.io/excludeOutboundPorts": "9"})
    assert r.sync([annotated, pb]).updated == [f"default/{a}"]
    assert "-o 9" in registered(bpffs)[f"default/{a}"]["istio_iptables_args"]

    assert r.sync([annotated]).removed == [f"default/{b}"]
    assert list(registered(bpffs)) == [f"default/{a}"]

    # a restarted agent finds the pod as it wants it: nothing rewritten
    again = Reconciler(bpffs).sync([annotated])
    assert again.added == again.updated == again.removed == []
    # and rewrites one whose settings changed meanwhile (here only its shortcut setting)
    opted_in = spec(a, pa.ips, **annotated.annotations, **{"meshaccel.io/shortcut": "true"})
    assert Reconciler(bpffs).sync([opted_in]).updated == [f"default/{a}"]
    assert registered(bpffs)[f"default/{a}"]["shortcut"] == "apps"

    # a pod deleted while the agent was down: a new reconciler (fresh agent) removes it
    assert Reconciler(bpffs).sync([]).removed == [f"default/{a}"]
    assert registered(bpffs) == {}


def test_bad_pod_fails_alone(node):
    a, b, bpffs = node
    bad = PodSpec("default/bad", ("10.244.1.99",), "/nonexistent/netns", {})
    res = Reconciler(bpffs).sync([bad, spec(b, ("10.244.1.11",))])
    assert res.added == [f"default/{b}"] and "/nonexistent/netns" in res.failed["default/bad"]


def test_file_source_follows_edits(node, tmp_path):
    a, b, bpffs = node
    path = tmp_path / "pods.yaml"

    def write(*items: dict) -> None:
        path.write_text(yaml.safe_dump({"pods": list(items)}))

    pod_a = {"name": a, "ips": ["10.244.1.10"], "netns": f"/var/run/netns/{a}"}
    pod_b = {"name": b, "namespace": "shop", "ips": ["10.244.1.11"], "netns": f"/var/run/netns/{b}"}
    write(pod_a, pod_b)
    r, stop = Reconciler(bpffs), threading.Event()
    t = threading.Thread(target=FileSource(str(path), 0.05).run, args=(r.sync, stop))
    t.start()
    try:
        assert wait_for(lambda: set(registered(bpffs)) == {f"default/{a}", f"shop/{b}"}, 10)
        write(pod_a)
        assert wait_for(lambda: set(registered(bpffs)) == {f"default/{a}"}, 10)
        path.write_text("pods: [")  # broken edit: the last good state stays
        time.sleep(0.3)  # a few polls of the file
        assert set(registered(bpffs)) == {f"default/{a}"}
    finally:
        stop.set()
        t.join(10)


def addresses(bpffs: str, name: str) -> list[str]:
    """The pod's registered addresses but its kernel-made IPv6 link-local one."""
    found = registered(bpffs)[name]["addresses"]
    return [a for a in found if not ipaddress.ip_address(a).is_link_local]


def test_an_address_put_on_a_pod_later_is_registered_by_the_address_check(lab):
    """An address put on a registered pod's eth0 (a second interface's, as Multus or
    DHCP may add late), or a prefix routed into it (AnyIP: a local route), is registered
    by the agent's address check, and one taken off is forgotten: from then on the app's
    call to its own new address reaches the app directly (connect_skipped_local), as under
    Istio's rules (`-o lo` RETURN), instead of its sidecar's outbound listener. A sync
    alone does not read the netns."""
    node = lab.node()
    ns = lab.pod("a", node, "10.244.1.10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg)
    r = Reconciler(bpffs)
    pa = spec(ns, ("10.244.1.10",))
    assert r.sync([pa]).added == [pa.name]
    assert r.register_new_addresses([pa]).updated == []
    with NetNS(ns) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address="10.244.1.30", prefixlen=24)

    def self_call(dst: str = "10.244.1.30") -> tuple[str, dict]:
        """Where the app's call to dst:9080 lands, and the connect counters."""
        listeners = {
            "sidecar": lab.listener("0.0.0.0", 15001, netns=ns, cgroup=cg, uid=1337),
            "app": lab.listener("0.0.0.0", 9080, netns=ns, cgroup=cg, uid=1000),
        }
        before = read_counters(bpffs)
        lab.run_peer("connect", dst, 9080, "--send-bytes", 1000, netns=ns, cgroup=cg,
                     uid=1000)  # fmt: skip
        wait_for(lambda: any(p.poll() is not None for p in listeners.values()), 10)
        landed = [name for name, p in listeners.items() if p.poll() is not None]
        for p in listeners.values():
            p.kill()
        after = read_counters(bpffs)
        return ",".join(landed), {k: after[k] - before[k] for k in after if k.startswith("connect")
                                  and after[k] != before[k]}  # fmt: skip

    assert r.sync([pa]).updated == []  # a sync alone does not see the new address
    assert addresses(bpffs, pa.name) == ["10.244.1.10"]
    assert self_call() == ("sidecar", {"connect_captured": 1})

    assert r.register_new_addresses([pa]).updated == [pa.name]
    assert addresses(bpffs, pa.name) == ["10.244.1.10", "10.244.1.30"]
    assert r.register_new_addresses([pa]).updated == []  # (nothing changed since)
    assert r.sync([pa]).updated == []
    assert self_call() == ("app", {"connect_skipped_local": 1})
    route = lab.spawn(["ip", "route", "add", "local", "10.77.0.0/24", "dev", "lo"], netns=ns)
    assert route.wait(10) == 0, route.stderr.read()
    assert self_call("10.77.0.5") == ("sidecar", {"connect_captured": 1})  # not yet
    assert r.register_new_addresses([pa]).updated == [pa.name]
    assert registered(bpffs)[pa.name]["local_routes"] == ["10.77.0.0/24"]
    assert self_call("10.77.0.5") == ("app", {"connect_skipped_local": 1})
    route = lab.spawn(["ip", "route", "del", "local", "10.77.0.0/24", "dev", "lo"], netns=ns)
    assert route.wait(10) == 0, route.stderr.read()
    assert r.register_new_addresses([pa]).updated == [pa.name]
    assert registered(bpffs)[pa.name]["local_routes"] == []

    with NetNS(ns) as ipr:
        ipr.addr("del", index=eth0, address="10.244.1.30", prefixlen=24)
    assert r.register_new_addresses([pa]).updated == [pa.name]
    assert addresses(bpffs, pa.name) == ["10.244.1.10"]
    # a pod whose spec changed since its last sync is left to that sync
    changed = spec(ns, pa.ips, **{"traffic.sidecar.istio.io/excludeOutboundPorts": "9"})
    with NetNS(ns) as ipr:
        ipr.addr("add", index=eth0, address="10.244.1.31", prefixlen=24)
    assert r.register_new_addresses([changed]).updated == []
    assert r.sync([changed]).updated == [pa.name]
    assert addresses(bpffs, pa.name) == ["10.244.1.10", "10.244.1.31"]
