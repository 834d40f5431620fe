"""HTTP/2 multiplexing through real Envoy sidecars: ONE h2c (prior knowledge) connection
from the client app (tests/e2e/h2_client.py, the h2 library over a plain socket) carrying
50 concurrent streams: 40 GETs of 0 B to 3 MiB and 10 POST uploads of 0 B to 2 MiB,
opened at once, request and response bodies interleaved frame by frame under HTTP/2 flow
control, every body checksummed (SHA-256) per stream.

    client app (h2, one connection) -> client Envoy :15001 -> server Envoy :15006 -> app

Run three times, each with fresh Envoys: --no-shortcut (every byte on TCP: the
reference), attach's defaults (the sidecar-to-sidecar hop on the shortcut), and the
shortcut for apps too (all three hops). Each run gives the reference's statuses, bodies
and connection counts: one connection from the client (its own count, its Envoy's
listener and HTTP/2 codec, the datapath's connect4); the datapath's counters prove each
run's path and account for exactly the bytes the Envoys moved on it.

The shared sidecar config (meshaccel.lab.envoy) sets no upstream protocol: Envoy speaks
HTTP/1.1 upstream, so only the app -> client Envoy hop is multiplexed and the client
Envoy fans the streams out over a pool of HTTP/1.1 connections to the server Envoy (one
per request in flight). Parametrized "h2-upstream", the outbound PassthroughCluster
speaks the downstream's protocol (use_downstream_protocol_config, as Istio's
useClientProtocol): the sidecar-to-sidecar hop is then one multiplexed HTTP/2
connection too. The server Envoy -> app hop is HTTP/1.1 in both (the app speaks only
that), a pool as large as the requests in flight."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import sys

import pytest

from meshaccel.datapath import loader
from meshaccel.datapath.pins import read_counters
from tests.e2e import envoy
from tests.e2e.conftest import SERVER_IP, Pods
from tests.e2e.test_envoy import (  # noqa: F401 - sidecar_binary is a fixture
    ROOT,
    assert_maps_drain,
    counters_delta,
    sidecar_binary,
)
from tests.e2e.test_envoy_mesh import (
    INBOUND,
    INBOUND_PASSTHROUGH,
    OUTBOUND,
    PASSTHROUGH,
    PORT,
    shortcut_bytes,
    sidecar_stats,
    start_http_server,
    start_sidecars,
)
from tests.kernel.lab import Lab
from tests.kernel.peer import payload_sha

pytestmark = pytest.mark.usefixtures("sidecar_binary")

GET_SIZES = [0, 1, 1000, 16384, 16385, 65535, 65536, 262147, 1 << 20, (3 << 20) + 7] * 4
POST_SIZES = [0, 1, 4096, 16385, 65535, 65537, 100000, 262144, 1 << 20, (2 << 20) + 3]
STREAMS = [("GET", n) for n in GET_SIZES] + [("POST", n) for n in POST_SIZES]
random.Random(5).shuffle(STREAMS)  # big and small, GETs and POSTs interleaved
# One GET alone first, on the same connection, as a long-lived client's earlier calls:
# an ORIGINAL_DST cluster learns a destination host on Envoy's main thread, and until
# the worker sees it each request makes a host (and a connection pool) of its own, so
# streams arriving together with none before get one upstream connection each, even
# over HTTP/2 (measured: 50 streams, 50 HTTP/2 connections client Envoy -> server Envoy).
WARMUP = ("GET", 1024)
SPEC = [WARMUP, *STREAMS]
# streams in flight at once, at least: seen by the client, with a response begun and with
# body bytes arriving (measured 5 to 22 and 5 to 13 over 22 runs: timing, so a margin);
# requests at the server's sidecar, from its pool to the app (measured 49 to 50)
MIN_IN_FLIGHT = 3
MIN_UPSTREAM_IN_FLIGHT = 10

# (name, attach's keyword arguments), the reference first
MODES = (
    ("plain-tcp", {"shortcut": False}),
    ("defaults", {}),
    ("app-shortcut", {"app_shortcut": True}),
)


def h2_upstream(config: dict) -> dict:
    """The sidecar config with the outbound PassthroughCluster speaking the downstream's
    protocol: HTTP/2 from the client Envoy to the server Envoy. The inbound passthrough to
    the app stays HTTP/1.1 (the app speaks only that)."""
    config = copy.deepcopy(config)
    clusters = config["static_resources"]["clusters"]
    [cluster] = [c for c in clusters if c["name"] == envoy.PASSTHROUGH]
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "use_downstream_protocol_config": {
                "http_protocol_options": {},
                "http2_protocol_options": {},
            },
        }
    }
    return config


def h2_client(lab: Lab, pods: Pods) -> dict:
    """The client app: tests/e2e/h2_client.py in the client pod's netns and cgroup (as
    curl runs in test_app_patterns_envoy), so its connect() is captured."""
    argv = [sys.executable, "-m", "tests.e2e.h2_client", SERVER_IP, str(PORT)]
    argv += [json.dumps(SPEC), "--alone", "1", "--timeout", "40"]
    p = lab.spawn(argv, netns=pods.client, cgroup=pods.cgroup, cwd=ROOT)
    stdout, stderr = p.communicate(timeout=60)
    lines = stdout.strip().splitlines()
    assert lines, f"h2 client exited {p.returncode} printing nothing: {stderr}"
    rec = json.loads(lines[-1])
    summary = {k: v for k, v in rec.items() if k != "streams"}
    print("h2 client:", json.dumps(summary))
    assert p.returncode == 0 and "error" not in rec, f"{json.dumps(rec)}\n{stderr}"
    wrong = [s for s in rec["streams"] if s["status"] != 200 or "error" in s]
    print("h2 client, streams not 200:", json.dumps(wrong))
    return rec


def expected() -> list[dict]:
    out = []
    for i, (method, n) in enumerate(SPEC):
        if method == "GET":
            out.append({"i": i, "status": 200, "bytes": n, "sha256": payload_sha(n, 2)})
        else:
            sha = payload_sha(n, 1)
            got = {"bytes": n, "sha256": sha}
            out.append({"i": i, "status": 200, "sent": n, "sent_sha256": sha, "server": got})
    return out


def outcome(rec: dict) -> list[dict]:
    """What each stream got (a POST: what the server counted of it), as expected() has it."""
    get, post = ("i", "status", "bytes", "sha256"), ("i", "status", "sent", "sent_sha256", "server")
    return [{k: s[k] for k in (get if s["method"] == "GET" else post)} for s in rec["streams"]]


def connections(cstats: dict[str, int], sstats: dict[str, int]) -> dict[str, int]:
    """Connections and requests per hop, from both Envoys."""
    return {
        "app_to_client_envoy": cstats[f"{OUTBOUND}.downstream_cx_total"],
        "app_h2": cstats["http.outbound.downstream_cx_http2_total"],
        "client_requests": cstats["http.outbound.downstream_rq_total"],
        "client_2xx": cstats["http.outbound.downstream_rq_2xx"],
        "sidecar_to_sidecar": cstats[f"{PASSTHROUGH}.upstream_cx_total"],
        "sidecar_to_sidecar_h2": cstats[f"{PASSTHROUGH}.upstream_cx_http2_total"],
        "server_envoy_downstream": sstats[f"{INBOUND}.downstream_cx_total"],
        "server_requests_2xx": sstats["http.inbound.downstream_rq_2xx"],
        "server_envoy_to_app": sstats[f"{INBOUND_PASSTHROUGH}.upstream_cx_total"],
        "app_requests_2xx": sstats[f"{INBOUND_PASSTHROUGH}.upstream_rq_2xx"],
    }


def hop_bytes(cstats: dict[str, int], sstats: dict[str, int]) -> dict[str, int]:
    """Bytes (both ways) the Envoys moved on each hop."""

    def both(stats: dict[str, int], prefix: str, what: str) -> int:
        return sum(stats[f"{prefix}.{what}_cx_{d}_bytes_total"] for d in ("rx", "tx"))

    return {
        "app_to_client_envoy": both(cstats, "http.outbound", "downstream"),
        "sidecar_to_sidecar": both(cstats, PASSTHROUGH, "upstream"),
        "server_envoy_to_app": both(sstats, INBOUND_PASSTHROUGH, "upstream"),
    }


def drained(lab: Lab, bpffs: str) -> None:
    """assert_maps_drain, showing what is left (bpftool) when it fails."""
    try:
        assert_maps_drain(bpffs)
    except AssertionError:
        for name in ("orig_dst_by_cookie", "orig_dst_by_sock"):
            p = lab.spawn(["bpftool", "-j", "map", "dump", "pinned", f"{bpffs}/{name}"])
            print(f"{name} left:", p.communicate(timeout=30)[0][:20000])
        raise


def assert_path(
    mode: str, delta: dict[str, int], cx: dict[str, int], moved: dict, stats: tuple[dict, dict]
) -> None:
    """Every hop of every connection as the datapath saw it, counted against the Envoys'
    own counts, and the bytes of each hop carried where the mode puts them: none on the
    shortcut (plain TCP), the sidecar-to-sidecar hop's (defaults), all three hops' (app
    shortcut); exactly those, nothing refused, lost or fallen back.

    (test_envoy_mesh.assert_sidecar_to_sidecar holds the same invariants for one request
    per connection: it takes one inbound passthrough connection per sidecar-to-sidecar
    connection, which a multiplexed or pooled hop does not give.)"""
    # capture is the same in every mode: the client's one connection (captured), each
    # client Envoy upstream connection (left alone, remembered, handed by sk_lookup to the
    # server Envoy), each server Envoy connection to the app (127.0.0.6, remembered)
    assert delta["connect_captured"] == 1, delta
    assert delta["connect_captured_inbound"] == 0, delta
    sidecar_hops = delta["connect_sidecar_to_pod"]
    assert sidecar_hops == cx["sidecar_to_sidecar"] == delta["connect_skipped_proxy_uid"], delta
    assert delta["inbound_captured"] == sidecar_hops == cx["server_envoy_downstream"], delta
    assert delta["inbound_no_listener"] == delta["inbound_assign_failed"] == 0, delta
    passthrough = delta["connect_passthrough"]
    assert passthrough == delta["connect_skipped_local"] == cx["server_envoy_to_app"], delta
    # twice for the client Envoy's downstream (use_original_dst), once per server Envoy one
    assert delta["orig_dst_answered"] == 2 + sidecar_hops, delta
    assert delta["orig_dst_not_found"] == delta["connect_record_failed"] == 0, delta
    assert delta["sock_insert_failed"] == 0, delta
    assert delta["msg_fallback_bytes"] == delta["msg_fallback_no_peer"] == 0, delta
    app_hops = 1 + passthrough
    if mode == "plain-tcp":
        assert delta["sock_inserted"] == delta["sock_kept_off_app"] == 0, delta
        assert delta["msg_redirected_bytes"] == 0, delta
    elif mode == "defaults":  # both app hops kept off; the sidecars' hop on it
        assert delta["sock_kept_off_app"] == 2 * app_hops, delta
        assert delta["sock_inserted"] == 2 * sidecar_hops, delta
        assert delta["msg_redirected_bytes"] == moved["sidecar_to_sidecar"] > 0, (delta, moved)
    else:  # both ends of every connection of all three hops in the sockhash
        assert delta["sock_kept_off_app"] == 0, delta
        assert delta["sock_inserted"] == 2 * (app_hops + sidecar_hops), delta
        assert delta["msg_redirected_bytes"] == sum(moved.values()), (delta, moved)
        assert sum(moved.values()) == shortcut_bytes(*stats, "http"), moved  # the mirror too


@pytest.mark.parametrize("upstream", ["http1.1-upstream", "h2-upstream"])
def test_http2_multiplexed_streams_match_plain_tcp(lab, pods, envoy_dir, base_ids, upstream):
    """50 concurrent streams on one HTTP/2 connection through both Envoys, with no
    shortcut, attach's defaults and the app shortcut: every stream's status and body
    (SHA-256) right and the same in each run, one connection from the client, streams
    really concurrent, the kernel path proven by the counters, byte for byte."""
    if importlib.util.find_spec("h2") is None:  # the client's; fails, never skips
        pytest.fail("h2 not installed: pip install -e '.[test]' (or pip install h2)", pytrace=False)
    start_http_server(lab, pods)  # (http_peer: a backlog for a burst of 50 connections)
    config = envoy.sidecar_config(http=True)
    if upstream == "h2-upstream":
        config = h2_upstream(config)
    runs = {}
    for mode, settings in MODES:
        loader.attach(pods.cgroup, bpffs=pods.bpffs, **settings)
        # fresh Envoys per run: pooled upstream connections would carry one run's bytes
        # on another's path
        client_envoy, server_envoy = start_sidecars(lab, pods, config, envoy_dir, base_ids)
        before = read_counters(pods.bpffs)
        rec = h2_client(lab, pods)
        delta = counters_delta(pods.bpffs, before)
        cstats = sidecar_stats(client_envoy, "client")
        sstats = sidecar_stats(server_envoy, "server")
        for sidecar in (client_envoy, server_envoy):
            sidecar.proc.terminate()
            sidecar.proc.wait(timeout=30)
        cx, moved = connections(cstats, sstats), hop_bytes(cstats, sstats)
        print(f"{upstream} {mode}: connections {json.dumps(cx)} bytes {json.dumps(moved)}")

        # every stream right
        assert outcome(rec) == expected(), f"{mode}: {json.dumps(rec['streams'])}"
        # one TCP connection from the client: its own count, its sidecar's, the kernel's
        assert rec["connects"] == 1 and rec["peer"] == f"{SERVER_IP}:{PORT}", rec
        assert cx["app_to_client_envoy"] == cx["app_h2"] == 1, cx
        assert cx["client_requests"] == cx["client_2xx"] == len(SPEC), cx
        assert cx["server_requests_2xx"] == cx["app_requests_2xx"] == len(SPEC), cx
        # the streams were concurrent: all 50 open at once on the one connection, bodies
        # arriving on several at once, DATA frames of different streams interleaved
        assert rec["max_open"] == len(STREAMS), rec
        assert rec["max_responding"] >= MIN_IN_FLIGHT, rec
        assert rec["max_receiving"] >= MIN_IN_FLIGHT, rec
        assert rec["stream_switches"] >= len(STREAMS), rec
        # ... and at the server's sidecar: its HTTP/1.1 pool to the app opens a connection
        # only when every one it has is busy, so N connections = N requests at once
        assert MIN_UPSTREAM_IN_FLIGHT <= cx["server_envoy_to_app"] <= len(SPEC), cx
        # the sidecar-to-sidecar hop: one multiplexed HTTP/2 connection, or a pool of
        # HTTP/1.1 connections as large as the requests in flight
        if upstream == "h2-upstream":
            assert cx["sidecar_to_sidecar"] == cx["sidecar_to_sidecar_h2"] == 1, cx
        else:
            assert cx["sidecar_to_sidecar_h2"] == 0, cx
            assert MIN_UPSTREAM_IN_FLIGHT <= cx["sidecar_to_sidecar"] <= len(SPEC), cx
        assert_path(mode, delta, cx, moved, (cstats, sstats))
        drained(lab, pods.bpffs)
        runs[mode] = (outcome(rec), cx)

    # the same as over plain TCP, stream by stream and connection by connection (the
    # pools' sizes on the HTTP/1.1 hops depend on timing: reported, not compared)
    ref_streams, ref_cx = runs["plain-tcp"]
    exact = ("app_to_client_envoy", "app_h2", "client_requests", "client_2xx", "app_requests_2xx")
    for mode, (streams, cx) in runs.items():
        assert streams == ref_streams, mode
        assert {k: cx[k] for k in exact} == {k: ref_cx[k] for k in exact}, (mode, cx, ref_cx)
        if upstream == "h2-upstream":
            assert cx["sidecar_to_sidecar"] == ref_cx["sidecar_to_sidecar"] == 1, (mode, cx)
