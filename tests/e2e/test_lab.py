"""`meshaccel lab up|down|status` in each mode, through the real command: bookinfo answers
through the sidecars (RBAC denies /denied in the mesh modes), the eBPF modes' counters show
the kernel path (ebpf: sidecar<->sidecar hops only, app sockets kept off; ebpf-apps: app
sockets too), and `down` leaves nothing behind. Each test uses its own prefix
(MESHACCEL_LAB_PREFIX=ma-tlab<pid>-<n>-), so it never touches a running lab."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshaccel.datapath import loader, pods
from meshaccel.datapath.pins import read_counters
from meshaccel.errors import MeshaccelError
from meshaccel.lab import lifecycle, topology
from tests.e2e.labcheck import assert_nothing_left

MESHACCEL = str(Path(sys.prefix) / "bin" / "meshaccel")
_ids = itertools.count()


def run(prefix: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "MESHACCEL_LAB_PREFIX": prefix}
    return subprocess.run(
        [MESHACCEL, "lab", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def up(prefix: str, *args: str) -> None:
    p = run(prefix, "up", *args)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "ready: client -> productpage 200" in p.stderr  # progress lines


def bookinfo(prefix: str, path: str = "/") -> dict:
    [r] = lifecycle.request(
        "client", [f"http://{topology.pod_ip('productpage', 2)}:9080{path}"], prefix
    )
    return r


def assert_bookinfo_ok(prefix: str) -> None:
    r = bookinfo(prefix)
    assert r.get("status") == 200, r
    body = json.loads(r["body"])
    assert body["service"] == "productpage"
    details, reviews = body["calls"]
    assert (details["service"], details["status"]) == ("details", 200)
    assert (reviews["service"], reviews["status"]) == ("reviews", 200)
    [ratings] = reviews["calls"]
    assert (ratings["service"], ratings["status"]) == ("ratings", 200)
    echoes = [f"http://{topology.pod_ip(p, 2)}:9080/" for p in ("echo", "echo-remote")]
    for e in lifecycle.request("client", echoes, prefix):
        assert (e.get("status"), len(e.get("body", ""))) == (200, topology.ECHO_BYTES), e


@pytest.mark.parametrize("mode", topology.MODES)
def test_lab_mode(prefix: str, mode: str) -> None:
    rbac = "--no-rbac" if mode == "nomesh" else "--rbac"
    up(prefix, "--mode", mode, "--nodes", "2", rbac)
    names = topology.Names(prefix)
    before = read_counters(names.bpffs) if topology.is_ebpf(mode) else {}

    assert_bookinfo_ok(prefix)
    denied = bookinfo(prefix, lifecycle.DENIED_PATH)
    assert denied.get("status") == (200 if mode == "nomesh" else 403), denied
    # across nodes too: the sidecar of echo-remote (node2) denies the client (node1)
    far = f"http://{topology.pod_ip('echo-remote', 2)}:9080{lifecycle.DENIED_PATH}"
    [denied] = lifecycle.request("client", [far], prefix)
    assert denied.get("status") == (200 if mode == "nomesh" else 403), denied

    st = json.loads(run(prefix, "status", "--json").stdout)
    assert (st["up"], st["mode"], st["nodes"]) == (True, mode, 2)
    for pod in st["pods"]:
        assert pod.get("app", {"alive": True})["alive"], pod
        assert ("envoy" in pod) == (mode != "nomesh"), pod
        if mode != "nomesh":
            assert pod["envoy"]["alive"] and pod["envoy"]["ready"], pod
    pids = [p[r]["pid"] for p in st["pods"] for r in ("app", "envoy") if r in p]
    assert len(pids) == (6 if mode == "nomesh" else 13)
    assert ("agent" in st) == topology.is_ebpf(mode)

    if topology.is_ebpf(mode):
        # the node agent attached the datapath and registered every pod from its pods file
        assert st["agent"]["alive"] and st["agent"]["ready"], st["agent"]
        pids.append(st["agent"]["pid"])
        registered = {p["name"] for p in pods.list_pods(names.bpffs)}
        assert registered == {f"lab/{p['name']}" for p in st["pods"]}
        apps = mode == "ebpf-apps"
        assert loader.status(names.bpffs)["config"]["app_shortcut"] == apps
        after = read_counters(names.bpffs)
        # ebpf: the sidecar<->sidecar hops on a node (client -> productpage -> details,
        # reviews -> ratings) take sk_msg, every app<->sidecar socket stays on TCP;
        # ebpf-apps: those app sockets take it too
        assert after["msg_redirected_bytes"] > before["msg_redirected_bytes"]
        assert after["connect_captured"] > before["connect_captured"]
        kept_off = after["sock_kept_off_app"] - before["sock_kept_off_app"]
        assert (kept_off > 0) != apps, kept_off

    p = run(prefix, "down")
    assert p.returncode == 0, p.stderr
    assert_nothing_left(prefix, pids)


def test_down_after_crash_finds_leftovers_by_name(prefix: str) -> None:
    """State file lost (a crash): down still removes netns, cgroup (and its processes)."""
    state = lifecycle.up("nomesh", nodes=1, prefix=prefix)
    pids = [p.pid for p in state.procs]
    state.names.state_file.unlink()
    assert run(prefix, "status").stdout.startswith(f"no lab '{prefix}' (leftovers: ")
    assert run(prefix, "up", "--mode", "nomesh").returncode != 0  # refuses: leftovers
    p = run(prefix, "down")
    assert p.returncode == 0, p.stderr
    assert_nothing_left(prefix, pids)


def test_failed_up_tears_down(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "envoy_binary", lambda: "/bin/false")
    # (whichever sidecar's /bin/false is seen gone first: at its start or while waiting)
    with pytest.raises(MeshaccelError, match=r"envoy of [a-z]+ exited"):
        lifecycle.up("iptables", nodes=1, prefix=prefix)
    assert_nothing_left(prefix, [])
