"""The reconciler and the pods-file source against the real pinned maps."""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from meshaccel.agent.file_source import FileSource
from meshaccel.agent.reconciler import PodSpec, Reconciler
from meshaccel.datapath import pods
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
