"""Istio-shaped sidecar-to-sidecar traffic with real Envoy on both sides, no iptables rule
anywhere. Two pods on one node, both registered (`meshaccel pod add`), each with an Envoy
sidecar (uid 1337) shaped like Istio's: virtualOutbound 15001 and virtualInbound 15006,
both with the original_dst listener filter, to ORIGINAL_DST passthrough clusters; the
inbound one binds 127.0.0.6 for the hop to the app.

    client app --connect4--> client Envoy :15001 (SO_ORIGINAL_DST from getsockopt)
    client Envoy (uid 1337) --connect serverIP:9080, left alone, remembered--> sk_lookup in
      the server pod --> server Envoy :15006 (SO_ORIGINAL_DST = serverIP:9080, no NAT)
    server Envoy --127.0.0.6 -> serverIP:9080, not captured (-s 127.0.0.6 RETURN)--> app

app <-> client Envoy and client Envoy <-> server Envoy go socket to socket through sk_msg;
server Envoy -> app stays loopback TCP (the datapath does not shortcut that hop today)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from meshaccel.datapath.pins import read_counters
from tests.e2e import envoy
from tests.e2e.conftest import CLIENT_IP, SERVER_IP, Pods
from tests.e2e.test_envoy import (  # noqa: F401 - sidecar_binary is a fixture
    assert_maps_drain,
    assert_no_iptables_rules,
    counters_delta,
    http_peer,
    sidecar_binary,
)
from tests.kernel.lab import Lab
from tests.kernel.peer import payload_sha

N = 64 << 20  # bytes each way
PORT = 9080
OUTBOUND = f"listener.0.0.0.0_{envoy.OUTBOUND_PORT}"
INBOUND = f"listener.0.0.0.0_{envoy.INBOUND_PORT}"
PASSTHROUGH = f"cluster.{envoy.PASSTHROUGH}"
INBOUND_PASSTHROUGH = f"cluster.{envoy.INBOUND_PASSTHROUGH}"
DENIED = "/denied"
# the listeners', clusters' and filters' connection, byte, request and RBAC counters
SHOWN_STATS = re.compile(
    r"(listener\.0\.0\.0\.0_1500[16]|cluster\.\w+|(http|tcp)\.(in|out)bound)\."
    r"(\w+_(cx|bytes|rq)_total|\w+_rq_[0-9][0-9x]{2}|rbac\.\w+)$"
)

pytestmark = pytest.mark.usefixtures("sidecar_binary")  # envoy runs as uid 1337, or fail


def start_sidecars(
    lab: Lab, pods: Pods, config: dict, workdir: Path, base_ids: tuple[int, int]
) -> tuple[envoy.Envoy, envoy.Envoy]:
    """Both pods' Envoys, started after `pod add` (as after istio-init), so the datapath
    sees the inbound listener's listen(). No hot restart: nothing left in /dev/shm."""

    def start(ns: str, base_id: int, name: str) -> envoy.Envoy:
        args = ("--disable-hot-restart",)
        return envoy.start_named(lab, ns, pods.cgroup, config, workdir, base_id, name, args)

    return start(pods.client, base_ids[0], "client"), start(pods.server, base_ids[1], "server")


def sidecar_stats(sidecar: envoy.Envoy, side: str) -> dict[str, int]:
    stats = sidecar.stats()
    shown = {k: v for k, v in sorted(stats.items()) if SHOWN_STATS.match(k)}
    print(f"{side} envoy stats:", json.dumps(shown))
    return stats


def shortcut_bytes(client: dict[str, int], server: dict[str, int], proto: str) -> int:
    """What the Envoys moved on the three shortcut hops: client app <-> client Envoy (its
    downstream), client Envoy <-> server Envoy (its upstream; the server's downstream,
    mirrored), server Envoy <-> server app (the inbound passthrough upstream)."""
    up = {d: client[f"{PASSTHROUGH}.upstream_cx_{d}_bytes_total"] for d in ("rx", "tx")}
    down = {d: server[f"{proto}.inbound.downstream_cx_{d}_bytes_total"] for d in ("rx", "tx")}
    assert (up["rx"], up["tx"]) == (down["tx"], down["rx"]), (up, down)
    app = sum(client[f"{proto}.outbound.downstream_cx_{d}_bytes_total"] for d in ("rx", "tx"))
    inbound = sum(
        server[f"{INBOUND_PASSTHROUGH}.upstream_cx_{d}_bytes_total"] for d in ("rx", "tx")
    )
    return app + up["rx"] + up["tx"] + inbound


def established_on(lab: Lab, netns: str, port: int) -> list[tuple[str, str, str]]:
    """(local, peer, process) of the established TCP sockets with local port `port`."""
    argv = ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"]
    p = lab.spawn(argv, netns=netns)
    stdout, stderr = p.communicate(timeout=10)
    assert p.returncode == 0, stderr
    out = []
    for line in stdout.splitlines():
        _, _, local, peer, *proc = line.split()
        name = proc[0].split('"')[1] if proc and '"' in proc[0] else "?"
        out.append((local, peer, name))
    return out


def assert_sidecar_to_sidecar(delta: dict[str, int]) -> None:
    """Every hop of every connection as the datapath saw it, nothing refused or lost."""
    # client app captured; client Envoy's upstream connect() left alone but remembered
    assert delta["connect_captured"] >= 1, delta
    assert delta["connect_sidecar_to_pod"] >= 1, delta
    assert delta["connect_skipped_proxy_uid"] == delta["connect_sidecar_to_pod"], delta
    # ... handed by sk_lookup to the server's Envoy; both Envoys' original_dst answered
    assert delta["inbound_captured"] == delta["connect_sidecar_to_pod"], delta
    assert delta["inbound_no_listener"] == delta["inbound_assign_failed"] == 0, delta
    assert delta["orig_dst_answered"] >= 2, delta
    assert delta["orig_dst_not_found"] == 0, delta
    # the server Envoy's 127.0.0.6 -> podIP:9080 is not captured again (no loop to 15006),
    # but remembered: its inbound passthrough hop to the app takes the shortcut too
    assert delta["connect_captured_inbound"] == 0, delta
    assert delta["connect_skipped_local"] >= 1, delta
    assert delta["connect_passthrough"] == delta["connect_sidecar_to_pod"], delta
    # both ends of all three shortcut hops in the sockhash; no byte took the TCP path
    hops = (
        delta["connect_captured"] + delta["connect_sidecar_to_pod"] + delta["connect_passthrough"]
    )
    assert delta["sock_inserted"] == 2 * hops, delta
    assert delta["sock_insert_failed"] == delta["connect_record_failed"] == 0, delta
    assert delta["msg_fallback_bytes"] == delta["msg_fallback_no_peer"] == 0, delta


def test_tcp_proxy_sidecar_to_sidecar_64mib_each_way(lab, pods, envoy_dir, base_ids):
    app = lab.listener("0.0.0.0", PORT, "--reply-bytes", N, netns=pods.server, cgroup=pods.cgroup)
    config = envoy.sidecar_config(http=False)
    client_envoy, server_envoy = start_sidecars(lab, pods, config, envoy_dir, base_ids)
    assert_no_iptables_rules(lab)
    before = read_counters(pods.bpffs)

    rec = lab.run_peer(
        "connect", SERVER_IP, PORT, "--send-bytes", N, "--timeout", 60,
        netns=pods.client, cgroup=pods.cgroup, timeout=180,
    )  # fmt: skip
    [srv] = lab.records(app, timeout=60)
    delta = counters_delta(pods.bpffs, before)
    cstats = sidecar_stats(client_envoy, "client")
    sstats = sidecar_stats(server_envoy, "server")
    print("client app:", json.dumps(rec), "server app:", json.dumps(srv))

    # every byte, in order, exactly once, both ways
    assert "error" not in rec, rec
    assert rec["sent"] == N and srv["bytes"] == N and srv["sha256"] == rec["sent_sha256"]
    assert rec["received"] == N and rec["received_sha256"] == payload_sha(N, 2)
    assert rec["peer"] == f"{SERVER_IP}:{PORT}", rec  # the app sees whom it called
    # the server app got it from its own sidecar's inbound passthrough, as in Istio
    assert srv["peer"].startswith(f"{envoy.INBOUND_PASSTHROUGH_SRC}:"), srv
    assert srv["orig_dst"] == f"{SERVER_IP}:{PORT}", srv
    # each Envoy carried it once: client outbound -> server inbound -> app
    assert cstats[f"{OUTBOUND}.downstream_cx_total"] == 1
    assert cstats[f"{INBOUND}.downstream_cx_total"] == 0
    assert sstats[f"{INBOUND}.downstream_cx_total"] == 1
    assert sstats[f"{OUTBOUND}.downstream_cx_total"] == 0
    for stats, cluster in ((cstats, PASSTHROUGH), (sstats, INBOUND_PASSTHROUGH)):
        assert stats[f"{cluster}.upstream_cx_total"] == 1
        assert stats[f"{cluster}.upstream_cx_tx_bytes_total"] == N
        assert stats[f"{cluster}.upstream_cx_rx_bytes_total"] == N
    # the kernel path, hop by hop
    assert_sidecar_to_sidecar(delta)
    assert delta["connect_captured"] == 1 and delta["connect_sidecar_to_pod"] == 1, delta
    # client Envoy twice (use_original_dst, as Istio's virtualOutbound: Envoy asks again to
    # look for a listener on the restored address), server Envoy once, and the server app
    # (peer.py asks; for a connection to its pod's address conntrack answers the same)
    assert delta["orig_dst_answered"] == 2 + 1 + 1, delta
    assert delta["sock_inserted"] == 6, delta
    # app <-> client Envoy <-> server Envoy <-> server app: N each way on each of 3 hops
    assert delta["msg_redirected_bytes"] == 3 * N * 2, delta
    assert delta["msg_redirected_bytes"] == shortcut_bytes(cstats, sstats, "tcp"), delta
    assert_maps_drain(pods.bpffs)


def run_requests(lab: Lab, pods: Pods, paths: list[str]) -> list[dict]:
    got = envoy.http_gets(lab, pods.client, pods.cgroup, SERVER_IP, PORT, paths)
    print("requests:", json.dumps(got))
    return got


def start_http_server(lab: Lab, pods: Pods) -> subprocess.Popen:
    server = http_peer(lab, "serve", "0.0.0.0", PORT, netns=pods.server, cgroup=pods.cgroup)
    ready = server.stdout.readline()
    assert json.loads(ready or "{}").get("ready") is True, f"{ready} {server.stderr.read()}"
    return server


def test_http_sidecar_to_sidecar_64mib_post_and_get(lab, pods, envoy_dir, base_ids):
    start_http_server(lab, pods)
    config = envoy.sidecar_config(http=True, deny_paths=(DENIED,))
    client_envoy, server_envoy = start_sidecars(lab, pods, config, envoy_dir, base_ids)
    assert_no_iptables_rules(lab)
    before = read_counters(pods.bpffs)

    client = http_peer(
        lab, "client", SERVER_IP, PORT, "--post-bytes", N, "--get-bytes", N, "--timeout", 60,
        netns=pods.client, cgroup=pods.cgroup,
    )  # fmt: skip
    stdout, stderr = client.communicate(timeout=180)
    assert client.returncode == 0 and stdout.strip(), f"rc {client.returncode}: {stdout} {stderr}"
    rec = json.loads(stdout.strip().splitlines()[-1])
    print("client app:", json.dumps(rec))
    small = run_requests(lab, pods, ["/bytes/4096", "/bytes/0"])
    sockets = established_on(lab, pods.server, PORT)  # Envoy keeps its upstreams pooled
    print("server pod, established on :9080:", sockets)
    delta = counters_delta(pods.bpffs, before)
    cstats = sidecar_stats(client_envoy, "client")
    sstats = sidecar_stats(server_envoy, "server")

    post, get = rec["post"], rec["get"]
    assert post["status"] == 200 and get["status"] == 200, rec
    assert post["server"] == {"bytes": N, "sha256": post["sent_sha256"]}, rec
    assert get["received"] == N and get["received_sha256"] == payload_sha(N, 2), rec
    assert rec["connects"] == 1 and rec["same_socket"], rec
    assert [r.get("status") for r in small] == [200, 200], small
    assert small[0]["bytes"] == 4096 and small[0]["sha256"] == payload_sha(4096, 2), small
    # in the server pod, no NAT: the server Envoy's downstream socket is serverIP:9080 from
    # the client pod; the app's sockets have the inbound passthrough's 127.0.0.6 as peer
    assert sockets, "no established connection on :9080 in the server pod"
    for local, peer, proc in sockets:
        assert local == f"{SERVER_IP}:{PORT}", sockets
        host = CLIENT_IP if proc == "envoy" else envoy.INBOUND_PASSTHROUGH_SRC
        assert peer.startswith(f"{host}:"), sockets
    assert {proc == "envoy" for _, _, proc in sockets} == {True, False}, sockets
    # four requests, all through both Envoys
    assert cstats[f"{OUTBOUND}.downstream_cx_total"] == 3
    assert cstats["http.outbound.downstream_rq_2xx"] == 4
    assert sstats["http.inbound.downstream_rq_2xx"] == 4
    assert sstats[f"{INBOUND_PASSTHROUGH}.upstream_rq_2xx"] == 4
    # the kernel path, and the datapath's count of connections equals Envoy's
    assert_sidecar_to_sidecar(delta)
    assert delta["connect_captured"] == 3, delta
    assert delta["connect_sidecar_to_pod"] == cstats[f"{PASSTHROUGH}.upstream_cx_total"], delta
    assert delta["inbound_captured"] == sstats[f"{INBOUND}.downstream_cx_total"], delta
    # twice per client Envoy downstream (use_original_dst), once per server Envoy downstream
    answered = 2 * delta["connect_captured"] + delta["inbound_captured"]
    assert delta["orig_dst_answered"] == answered, delta
    # request and response bodies (plus headers) socket to socket on both hops
    assert delta["msg_redirected_bytes"] >= 2 * N * 2, delta
    # ... and exactly the bytes Envoy moved on those hops, no more, no less
    assert delta["msg_redirected_bytes"] == shortcut_bytes(cstats, sstats, "http"), delta

    # once the sidecars are gone, no per-connection entry is left behind
    for sidecar in (client_envoy, server_envoy):
        sidecar.proc.terminate()
        sidecar.proc.wait(timeout=30)
    assert_maps_drain(pods.bpffs)


def test_inbound_rbac_denial_holds_through_the_ebpf_path(lab, pods, envoy_dir, base_ids):
    """The server's inbound RBAC denies /denied: the client gets Envoy's 403 across the
    eBPF path, the request never reaches the app; the other requests are served."""
    start_http_server(lab, pods)
    config = envoy.sidecar_config(http=True, deny_paths=(DENIED,))
    client_envoy, server_envoy = start_sidecars(lab, pods, config, envoy_dir, base_ids)
    assert_no_iptables_rules(lab)
    before = read_counters(pods.bpffs)

    got = run_requests(lab, pods, ["/bytes/1024", DENIED, "/bytes/0", DENIED])
    delta = counters_delta(pods.bpffs, before)
    cstats = sidecar_stats(client_envoy, "client")
    sstats = sidecar_stats(server_envoy, "server")

    assert [r.get("status") for r in got] == [200, 403, 200, 403], got
    assert all(r.get("text") == "RBAC: access denied" for r in got if r["path"] == DENIED), got
    assert sstats["http.inbound.rbac.denied"] == 2
    assert sstats["http.inbound.rbac.allowed"] == 2
    assert sstats[f"{INBOUND_PASSTHROUGH}.upstream_rq_total"] == 2  # denied never forwarded
    assert cstats["http.outbound.downstream_rq_4xx"] == 2
    assert cstats[f"{PASSTHROUGH}.upstream_rq_403"] == 2
    assert_sidecar_to_sidecar(delta)
    assert delta["connect_captured"] == 4, delta
    assert delta["msg_redirected_bytes"] == shortcut_bytes(cstats, sstats, "http"), delta
