"""Real Envoy (uid 1337) as the sidecar, with no iptables rule anywhere: the app's connect()
is captured by connect4, Envoy's original_dst listener filter gets the destination from
the getsockopt program, and app<->Envoy bytes go socket to socket through sk_msg.

Acceptance items 3 (Envoy unmodified, tcp_proxy and HTTP, 64 MiB each way, SHA-256 equal)
and 4 (the datapath counters account for every connection and every byte)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.datapath import loader
from meshaccel.datapath.pins import read_counters
from tests.e2e import envoy
from tests.kernel.lab import Lab
from tests.kernel.peer import payload_sha

ROOT = Path(__file__).resolve().parents[2]
N = 64 << 20  # bytes each way
APP_IP, SERVER_IP, PORT = "10.244.1.10", "10.244.1.20", 9080
ENVOY_LISTENER = f"listener.0.0.0.0_{envoy.OUTBOUND_PORT}"
PER_CONNECTION_MAPS = ("orig_dst_by_cookie", "orig_dst_by_sock", "sock_hash", "fell_back")


@dataclass
class Mesh:
    app: str  # pod netns with Envoy as its sidecar, in the attached cgroup
    server: str  # pod netns on the same node bridge, outside the cgroup
    cgroup: str
    bpffs: str


@pytest.fixture
def mesh(lab: Lab) -> Mesh:
    node = lab.node()
    app = lab.pod("app", node, APP_IP)
    server = lab.pod("srv", node, SERVER_IP)
    cg = lab.cgroup()
    return Mesh(app, server, cg, lab.attach(cg, pods=(app,)))


@pytest.fixture
def sidecar_binary(lab: Lab) -> str:
    """The envoy binary, checked to run as uid 1337 (fails, never skips, when it cannot)."""
    try:
        path = envoy.binary()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    p = lab.spawn([path, "--version"], uid=envoy.PROXY_UID, gid=envoy.PROXY_UID)
    stdout, stderr = p.communicate(timeout=30)
    if p.returncode or "version:" not in stdout:
        msg = f"{path} --version as uid {envoy.PROXY_UID}: rc {p.returncode} {stdout} {stderr}"
        pytest.fail(msg, pytrace=False)
    return path


def assert_no_iptables_rules(lab: Lab) -> None:
    """No netfilter rule in any of the lab's netns: capture is eBPF's alone."""
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: apt-get install iptables", pytrace=False)
        for ns in lab.netns:
            p = lab.spawn([tool], netns=ns)
            stdout, stderr = p.communicate(timeout=30)
            assert p.returncode == 0, f"{tool} in {ns}: {stderr}"
            rules = [ln for ln in stdout.splitlines() if ln.startswith("-A")]
            assert "REDIRECT" not in stdout, f"{tool} in {ns}:\n{stdout}"
            assert not rules, f"{tool} in {ns} shows rules:\n{stdout}"


def counters_delta(bpffs: str, before: dict[str, int]) -> dict[str, int]:
    after = read_counters(bpffs)
    delta = {k: after[k] - before[k] for k in after}
    print("datapath counters (delta):", json.dumps(delta))
    return delta


def assert_kernel_path(delta: dict[str, int], connections: int) -> None:
    """Each app connection was captured by connect4, its original destination answered by
    getsockopt, both its sockets put in the sockhash; Envoy's own connect()s skipped."""
    assert delta["connect_captured"] == connections, delta
    assert delta["orig_dst_answered"] == connections, delta
    assert delta["orig_dst_not_found"] == 0, delta
    assert delta["sock_inserted"] >= 2 * connections, delta
    assert delta["sock_insert_failed"] == 0, delta
    assert delta["connect_record_failed"] == 0, delta
    assert delta["connect_skipped_proxy_uid"] >= connections, delta  # Envoy -> server


def assert_maps_drain(bpffs: str, timeout: float = 5) -> None:
    """Once the connections are closed, no per-connection entry is left behind."""
    deadline = time.monotonic() + timeout
    while True:
        maps = loader.status(bpffs)["maps"]
        left = {name: maps[name]["entries"] for name in PER_CONNECTION_MAPS}
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"entries left after {timeout}s: {left}"
        time.sleep(0.1)


def envoy_stats(sidecar: envoy.Envoy) -> dict[str, int]:
    stats = sidecar.stats()
    ours = (f"cluster.{envoy.CLUSTER}.", f"{ENVOY_LISTENER}.", "http.outbound", "tcp.outbound")
    shown = {
        k: v
        for k, v in sorted(stats.items())
        if k.startswith(ours) and (k.endswith("_total") or "_rq_2" in k)
    }
    print("envoy stats:", json.dumps(shown))
    return stats


def http_peer(lab: Lab, *args: object, **kw) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.e2e.http_peer", *map(str, args)]
    return lab.spawn(argv, cwd=ROOT, **kw)


def test_tcp_proxy_64mib_each_way(lab, mesh, sidecar_binary, envoy_dir, base_id):
    server = lab.listener("0.0.0.0", PORT, "--reply-bytes", N, netns=mesh.server)
    sidecar = envoy.start(lab, mesh.app, mesh.cgroup, envoy.tcp_proxy_config(), envoy_dir, base_id)
    assert_no_iptables_rules(lab)
    before = read_counters(mesh.bpffs)

    app = lab.run_peer(
        "connect", SERVER_IP, PORT, "--send-bytes", N, "--timeout", 60,
        netns=mesh.app, cgroup=mesh.cgroup, timeout=180,
    )  # fmt: skip
    [srv] = lab.records(server, timeout=60)
    delta = counters_delta(mesh.bpffs, before)
    stats = envoy_stats(sidecar)
    print("app:", json.dumps(app), "server:", json.dumps(srv))

    # every byte, in order, exactly once, both ways
    assert "error" not in app, app
    assert app["sent"] == N and srv["bytes"] == N and srv["sha256"] == app["sent_sha256"]
    assert app["received"] == N and app["received_sha256"] == payload_sha(N, 2)
    # ... carried by Envoy: the server's peer is Envoy in the app pod, upstream of the cluster
    assert srv["peer"].startswith(f"{APP_IP}:"), srv
    assert stats[f"{ENVOY_LISTENER}.downstream_cx_total"] == 1
    assert stats[f"cluster.{envoy.CLUSTER}.upstream_cx_total"] == 1
    assert stats[f"cluster.{envoy.CLUSTER}.upstream_cx_tx_bytes_total"] == N
    assert stats[f"cluster.{envoy.CLUSTER}.upstream_cx_rx_bytes_total"] == N
    # ... and the kernel path: all app<->Envoy bytes went socket to socket, none by TCP
    assert_kernel_path(delta, connections=1)
    assert delta["msg_redirected_bytes"] == app["sent"] + app["received"], delta
    assert delta["msg_fallback_bytes"] == 0, delta
    assert delta["msg_fallback_no_peer"] == 0, delta
    assert_maps_drain(mesh.bpffs)


def test_http_64mib_post_and_get(lab, mesh, sidecar_binary, envoy_dir, base_id):
    server = http_peer(lab, "serve", "0.0.0.0", PORT, netns=mesh.server)
    ready = server.stdout.readline()
    assert json.loads(ready or "{}").get("ready") is True, f"{ready} {server.stderr.read()}"
    sidecar = envoy.start(lab, mesh.app, mesh.cgroup, envoy.http_config(), envoy_dir, base_id)
    assert_no_iptables_rules(lab)
    before = read_counters(mesh.bpffs)

    client = http_peer(
        lab, "client", SERVER_IP, PORT, "--post-bytes", N, "--get-bytes", N,
        netns=mesh.app, cgroup=mesh.cgroup,
    )  # fmt: skip
    stdout, stderr = client.communicate(timeout=180)
    assert client.returncode == 0 and stdout.strip(), (
        f"client rc {client.returncode}: {stdout} {stderr}"
    )
    rec = json.loads(stdout.strip().splitlines()[-1])
    delta = counters_delta(mesh.bpffs, before)
    stats = envoy_stats(sidecar)
    print("client:", json.dumps(rec))

    post, get = rec["post"], rec["get"]
    assert post["status"] == 200 and get["status"] == 200, rec
    assert post["server"] == {"bytes": N, "sha256": post["sent_sha256"]}, rec
    assert get["received"] == N and get["received_sha256"] == payload_sha(N, 2), rec
    assert rec["connects"] == 1 and rec["same_socket"], rec  # one keep-alive connection
    assert stats[f"{ENVOY_LISTENER}.downstream_cx_total"] == 1
    assert stats["http.outbound_http.downstream_rq_2xx"] == 2
    assert stats[f"cluster.{envoy.CLUSTER}.upstream_rq_2xx"] == 2
    assert_kernel_path(delta, connections=1)
    # request and response bodies (plus headers) went socket to socket
    assert delta["msg_redirected_bytes"] >= post["sent"] + get["received"], delta
    assert delta["msg_fallback_bytes"] == 0, delta
    assert_maps_drain(mesh.bpffs)
