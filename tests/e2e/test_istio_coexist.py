"""meshaccel added to a mesh that already runs Istio: every pod keeps the nat rules
istio-init installed (`meshaccel iptables install`, Istio's injection defaults), beside
the eBPF datapath. Two pods on one node, each with Istio's rules and a real Envoy sidecar
of Istio's shape (tests/e2e/test_envoy_mesh.py: 15001 and 15006 with original_dst, the
inbound passthrough from 127.0.0.6), all processes in one attached cgroup.

Both captures see every connection, and must agree:

    client app --connect4 to 127.0.0.1:15001 (OUTPUT: not the proxy, out lo: RETURN)-->
      client Envoy; SO_ORIGINAL_DST serverIP:9080 (conntrack saw only 127.0.0.1:15001)
    client Envoy --connect serverIP:9080 (OUTPUT: the proxy's own: RETURN)--> the server
      pod, where PREROUTING REDIRECTs it to 15006 (and sk_lookup would hand it to the
      same listener) --> server Envoy :15006; SO_ORIGINAL_DST serverIP:9080; both ends
      of this hop must still pair up on the shortcut
    server Envoy --127.0.0.6 -> serverIP:9080 (-s 127.0.0.6 RETURN)--> app

The failure these tests are for: with the PREROUTING REDIRECT in front of sk_lookup, the
server Envoy's accepted socket is serverIP:15006; a datapath that answers SO_ORIGINAL_DST
with that local address (instead of conntrack's serverIP:9080) makes the server Envoy
forward each connection to its own inbound port, in a loop (thousands of connections,
every request failing). Every test here ends its traffic with the loop guard
(assert_no_loop): no sidecar may accept, or open to a passthrough cluster, more
connections than the client apps opened.

- rules installed before attach + pod add (sidecars up first, as in a running mesh), and
  rules installed after attach + pod add and after the sidecars started: tcp_proxy and
  HTTP sidecars, 8 MiB each way checksummed, RBAC denial, hop-by-hop counters;
- the client sidecar calls from a source port it already used under iptables alone
  (pinned, so that the server pod's conntrack still holds that call): the case the load
  test below meets by chance;
- a connection captured just before detach and accepted after it began;
- attach, detach and attach again while a bounded HTTP load (keep-alive and
  new-connection requests, each response checked) runs through both sidecars; in
  between, iptables alone carries the traffic.

Everything is removed by the lab fixture, also on failure: processes (Envoys included)
are killed by PID, then the datapath detached, then the netns removed, and Istio's rules
with them (nat rules live in their netns).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshaccel.datapath import iptables_mode, loader
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS, parse_istio_args
from meshaccel.datapath.pins import read_counters
from tests.e2e import envoy
from tests.e2e.test_envoy import (  # noqa: F401 - sidecar_binary is a fixture
    ROOT,
    assert_maps_drain,
    counters_delta,
    http_peer,
    sidecar_binary,
)
from tests.e2e.test_envoy_mesh import (
    CLIENT_IP,
    DENIED,
    INBOUND,
    INBOUND_PASSTHROUGH,
    OUTBOUND,
    PASSTHROUGH,
    PORT,
    SERVER_IP,
    Pods,
    assert_sidecar_to_sidecar,
    shortcut_bytes,
    sidecar_stats,
    start_http_server,
    start_sidecars,
)
from tests.kernel.lab import Lab, ours_on
from tests.kernel.peer import payload_sha

N = 8 << 20  # bytes each way per checked transfer
TCP_CONNS = 2  # checked TCP transfers (one connection each)
ISTIO = parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS)
LOAD_BYTES = 64 << 10  # each load request's GET or POST body
LOAD_STEP_REQUESTS = 40  # load requests that must succeed after each attach/detach step
LOAD_STEP_SECONDS = 2.0  # ... and at least this long after it
RECYCLE = 10  # HTTP sidecars under load: requests per upstream connection
SOURCE_PORT = 40123  # the client sidecar's upstream source port in the port reuse test
# the connections each sidecar accepts and opens (the loop guard's numbers)
GUARDED = (
    f"{OUTBOUND}.downstream_cx_total",
    f"{INBOUND}.downstream_cx_total",
    f"{PASSTHROUGH}.upstream_cx_total",
    f"{INBOUND_PASSTHROUGH}.upstream_cx_total",
)

pytestmark = pytest.mark.usefixtures("sidecar_binary")  # envoy runs as uid 1337, or fail


@pytest.fixture
def pods(lab: Lab) -> Pods:
    """Two pods on one node and their cgroup; not attached yet (each test picks when).
    bpffs is where attach() pins the datapath."""
    node = lab.node()
    client = lab.pod("cli", node, CLIENT_IP)
    server = lab.pod("srv", node, SERVER_IP)
    return Pods(client, server, lab.cgroup(), bpffs=f"/sys/fs/bpf/{lab.prefix}")


def attach(lab: Lab, pods: Pods) -> None:
    """meshaccel attach (Istio's defaults), then pod add for both pods."""
    assert lab.attach(pods.cgroup, pods=(pods.client, pods.server)) == pods.bpffs
    maps = loader.status(pods.bpffs)["maps"]
    print("attached; maps:", json.dumps(maps))


def detach(lab: Lab, pods: Pods) -> None:
    loader.detach(bpffs=pods.bpffs)
    assert ours_on(pods.cgroup) == [], "meshaccel programs left on the cgroup after detach"
    assert not loader.status(pods.bpffs)["attached"]


def nat_rules(lab: Lab, netns: str) -> str:
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        p = lab.spawn([tool, "-t", "nat"], netns=netns)
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 0, f"{tool} in {netns}: {stderr}"
        out.append(stdout)
    return "\n".join(out)


def install_istio_rules(lab: Lab, pods: Pods) -> None:
    """`meshaccel iptables install` in both pods (istio-init's rules, Istio's defaults)."""
    for ns in (pods.client, pods.server):
        iptables_mode.install(ns, ISTIO)
        rules = nat_rules(lab, ns)
        for line in (
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A OUTPUT -j ISTIO_OUTPUT",
            f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {envoy.INBOUND_PORT}",
            f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {envoy.OUTBOUND_PORT}",
        ):
            assert rules.count(line) == 2, f"{line!r} not in {ns}'s nat rules (v4 and v6):\n{rules}"


def start_envoys(
    lab: Lab,
    pods: Pods,
    proto: str,
    workdir: Path,
    base_id: int,
    recycle: int = 0,
    source_port: int = 0,
) -> tuple[envoy.Envoy, envoy.Envoy]:
    """Both pods' sidecars (tcp_proxy or HTTP with RBAC denying DENIED), as uid 1337 in
    the pods' cgroup; their --base-ids as test_envoy_mesh's base_ids fixture picks them.
    recycle=N (HTTP): the passthrough clusters close an upstream connection after N
    requests, so that a load keeps opening new sidecar-to-sidecar and inbound passthrough
    connections (else Envoy keeps using the ones it pooled before a step). source_port=P:
    the client's PassthroughCluster binds CLIENT_IP:P for every upstream connection."""
    config = envoy.sidecar_config(http=proto == "http", deny_paths=(DENIED,))
    if source_port:  # (the server's PassthroughCluster is never used: no call leaves it)
        # SO_REUSEADDR: the port may still be in TIME_WAIT from the call before
        reuse = {"level": 1, "name": 2, "int_value": 1, "state": "STATE_PREBIND"}
        bind = {
            "source_address": {"address": CLIENT_IP, "port_value": source_port},
            "socket_options": [reuse],
        }
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == envoy.PASSTHROUGH:
                cluster["upstream_bind_config"] = bind
    if recycle:
        options = {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_requests_per_connection": recycle},
            "explicit_http_config": {"http_protocol_options": {}},
        }
        for cluster in config["static_resources"]["clusters"]:
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options
            }
    return start_sidecars(lab, pods, config, workdir, (base_id, base_id + 50))


def envoy_diag(sidecar: envoy.Envoy) -> dict[str, int]:
    """The sidecar's non-zero listener, passthrough cluster and proxy filter stats."""
    ours = re.compile(r"(listener\.0\.0\.0\.0_1500[16]|cluster\.\w*Passthrough\w*|(tcp|http)\.)")
    return {k: v for k, v in sorted(sidecar.stats().items()) if v and ours.match(k)}


def source_remapped(lab: Lab, netns: str) -> list[str]:
    """The netns's conntrack entries whose source the NAT changed (the reply does not go
    back to the port the connection came from): a peer that sees such a connection under
    another 4-tuple than its sender's cannot find what connect4 remembered for it."""
    p = lab.spawn(["cat", "/proc/net/nf_conntrack"], netns=netns)
    stdout, _ = p.communicate(timeout=30)
    out = []
    for line in stdout.splitlines():
        kv = [w.split("=", 1) for w in line.split() if "=" in w]
        ports = [v for k, v in kv if k in ("sport", "dport")]
        addrs = [v for k, v in kv if k in ("src", "dst")]
        if len(ports) >= 4 and (ports[0], addrs[0]) != (ports[3], addrs[3]):
            out.append(line)
    return out


def explain(lab: Lab, pods: Pods, sidecars: tuple[envoy.Envoy, envoy.Envoy]) -> None:
    """Prints what explains a failure: the datapath's counters (while attached), both
    Envoys' non-zero connection stats, the pods' conntrack entries with a NATed source."""
    if os.path.exists(pods.bpffs):
        print("datapath counters:", json.dumps(read_counters(pods.bpffs)))
    for sidecar, side in zip(sidecars, ("client", "server"), strict=True):
        try:
            print(f"{side} envoy:", json.dumps(envoy_diag(sidecar)))
        except RuntimeError as e:
            print(f"{side} envoy: no stats: {e}")
    for ns in (pods.client, pods.server):
        remapped = source_remapped(lab, ns)
        print(f"{ns}: {len(remapped)} conntrack entries with a NATed source:", remapped[:10])


def assert_no_loop(
    lab: Lab, pods: Pods, sidecars: tuple[envoy.Envoy, envoy.Envoy], opened: int
) -> tuple[dict[str, int], dict[str, int]]:
    """The loop guard: `opened` is every connection the client apps opened since the
    sidecars started; no sidecar may have accepted more on 15001 or 15006, nor opened more
    to its passthrough clusters (an Envoy forwarding to its own inbound port accepts and
    opens connections without end). Returns both Envoys' stats."""
    cstats = sidecar_stats(sidecars[0], "client")
    sstats = sidecar_stats(sidecars[1], "server")
    seen = {
        f"{side} envoy {name}": stats.get(name, 0)
        for side, stats in (("client", cstats), ("server", sstats))
        for name in GUARDED
    }
    print(f"loop guard: the client apps opened {opened} connection(s); sidecars:", seen)
    over = {k: v for k, v in seen.items() if v > opened}
    if over:
        explain(lab, pods, sidecars)
    assert not over, (
        f"forwarding loop? the client apps opened {opened} connection(s), but {over} (all: {seen})"
    )
    return cstats, sstats


# ------------------------------------------------------- 1 and 2: checked transfers


def tcp_transfers(lab: Lab, pods: Pods, sidecars: tuple[envoy.Envoy, envoy.Envoy]) -> None:
    """TCP_CONNS connections through both sidecars (tcp_proxy), N bytes each way, each
    checksummed; the counters account for every hop."""
    app = lab.listener(
        "0.0.0.0", PORT, "--conns", TCP_CONNS, "--reply-bytes", N,
        netns=pods.server, cgroup=pods.cgroup,
    )  # fmt: skip
    before = read_counters(pods.bpffs)
    recs = []
    for seed in range(1, TCP_CONNS + 1):
        rec = lab.run_peer(
            "connect", SERVER_IP, PORT, "--send-bytes", N, "--seed", seed, "--timeout", 20,
            netns=pods.client, cgroup=pods.cgroup, timeout=60,
        )  # fmt: skip
        print("client app:", json.dumps(rec))
        recs.append(rec)
        if "error" in rec:
            break
    delta = counters_delta(pods.bpffs, before)
    cstats, sstats = assert_no_loop(lab, pods, sidecars, opened=len(recs))
    assert all("error" not in r for r in recs), recs
    srvs = lab.records(app, timeout=30)
    print("server app:", json.dumps(srvs))

    # every byte, in order, exactly once, both ways, on every connection
    assert len(srvs) == TCP_CONNS, srvs
    for rec, srv in zip(recs, srvs, strict=True):
        assert rec["sent"] == N and srv["bytes"] == N and srv["sha256"] == rec["sent_sha256"]
        assert rec["received"] == N and rec["received_sha256"] == payload_sha(N, 2), rec
        assert rec["peer"] == f"{SERVER_IP}:{PORT}", rec  # the app sees whom it called
        # the server app got it from its sidecar's inbound passthrough, for its own port
        assert srv["peer"].startswith(f"{envoy.INBOUND_PASSTHROUGH_SRC}:"), srv
        assert srv["orig_dst"] == f"{SERVER_IP}:{PORT}", srv
    # each Envoy carried each connection once: client outbound -> server inbound -> app
    assert cstats[f"{OUTBOUND}.downstream_cx_total"] == TCP_CONNS
    assert sstats[f"{INBOUND}.downstream_cx_total"] == TCP_CONNS
    assert cstats[f"{INBOUND}.downstream_cx_total"] == 0
    assert sstats[f"{OUTBOUND}.downstream_cx_total"] == 0
    for stats, cluster in ((cstats, PASSTHROUGH), (sstats, INBOUND_PASSTHROUGH)):
        assert stats[f"{cluster}.upstream_cx_total"] == TCP_CONNS
        assert stats[f"{cluster}.upstream_cx_tx_bytes_total"] == TCP_CONNS * N
        assert stats[f"{cluster}.upstream_cx_rx_bytes_total"] == TCP_CONNS * N
    # the kernel path, hop by hop, despite the nat rules
    assert_sidecar_to_sidecar(delta)
    assert delta["connect_captured"] == delta["connect_sidecar_to_pod"] == TCP_CONNS, delta
    # client Envoy twice (use_original_dst), server Envoy once, the server app once: all
    # from the map, none left to conntrack (every connection was rewritten or remembered)
    assert delta["orig_dst_answered"] == 4 * TCP_CONNS, delta
    assert delta.get("orig_dst_by_conntrack", 0) == 0, delta
    assert delta["sock_inserted"] == 6 * TCP_CONNS, delta
    assert delta["msg_redirected_bytes"] > 0, delta
    assert delta["msg_redirected_bytes"] == TCP_CONNS * 3 * N * 2, delta
    assert delta["msg_redirected_bytes"] == shortcut_bytes(cstats, sstats, "tcp"), delta


def http_transfers(lab: Lab, pods: Pods, sidecars: tuple[envoy.Envoy, envoy.Envoy]) -> None:
    """A POST and a GET of N bytes on one keep-alive connection (checksummed both ways),
    then small requests and RBAC-denied ones, one connection each, through both sidecars."""
    start_http_server(lab, pods)
    before = read_counters(pods.bpffs)
    client = http_peer(
        lab, "client", SERVER_IP, PORT, "--post-bytes", N, "--get-bytes", N, "--timeout", 20,
        netns=pods.client, cgroup=pods.cgroup,
    )  # fmt: skip
    stdout, stderr = client.communicate(timeout=90)
    print("client app:", stdout.strip(), stderr.strip())
    assert_no_loop(lab, pods, sidecars, opened=1)  # before more requests pile onto a loop
    assert client.returncode == 0 and stdout.strip(), f"rc {client.returncode}: {stdout} {stderr}"
    rec = json.loads(stdout.strip().splitlines()[-1])
    paths = ["/bytes/4096", DENIED, "/bytes/0", DENIED]
    got = envoy.http_gets(lab, pods.client, pods.cgroup, SERVER_IP, PORT, paths)
    print("requests:", json.dumps(got))
    delta = counters_delta(pods.bpffs, before)
    opened = rec["connects"] + len(paths)
    cstats, sstats = assert_no_loop(lab, pods, sidecars, opened=opened)

    post, get = rec["post"], rec["get"]
    assert post["status"] == 200 and get["status"] == 200, rec
    assert post["server"] == {"bytes": N, "sha256": post["sent_sha256"]}, rec
    assert get["received"] == N and get["received_sha256"] == payload_sha(N, 2), rec
    assert rec["connects"] == 1 and rec["same_socket"], rec
    assert rec["peer"] == f"{SERVER_IP}:{PORT}", rec
    # RBAC in the server's sidecar still denies, across both captures
    assert [r.get("status") for r in got] == [200, 403, 200, 403], got
    assert got[0]["bytes"] == 4096 and got[0]["sha256"] == payload_sha(4096, 2), got
    assert all(r.get("text") == "RBAC: access denied" for r in got if r["path"] == DENIED), got
    assert sstats["http.inbound.rbac.denied"] == 2
    assert sstats["http.inbound.rbac.allowed"] == 4
    assert sstats[f"{INBOUND_PASSTHROUGH}.upstream_rq_total"] == 4  # denied never forwarded
    assert cstats["http.outbound.downstream_rq_2xx"] == 4
    assert cstats["http.outbound.downstream_rq_4xx"] == 2
    assert cstats[f"{PASSTHROUGH}.upstream_rq_403"] == 2
    # every client connection through the client Envoy, none through the server's outbound
    assert cstats[f"{OUTBOUND}.downstream_cx_total"] == opened
    assert (
        cstats[f"{INBOUND}.downstream_cx_total"] == sstats[f"{OUTBOUND}.downstream_cx_total"] == 0
    )
    # the kernel path, and the datapath's count of connections equals Envoy's
    assert_sidecar_to_sidecar(delta)
    assert delta["connect_captured"] == opened, delta
    assert delta["connect_sidecar_to_pod"] == cstats[f"{PASSTHROUGH}.upstream_cx_total"], delta
    assert delta["inbound_captured"] == sstats[f"{INBOUND}.downstream_cx_total"], delta
    answered = 2 * delta["connect_captured"] + delta["inbound_captured"]
    assert delta["orig_dst_answered"] == answered, delta
    assert delta.get("orig_dst_by_conntrack", 0) == 0, delta
    assert delta["msg_redirected_bytes"] >= 2 * N * 2, delta
    assert delta["msg_redirected_bytes"] == shortcut_bytes(cstats, sstats, "http"), delta


def transfers(lab: Lab, pods: Pods, proto: str, sidecars: tuple[envoy.Envoy, envoy.Envoy]) -> None:
    (tcp_transfers if proto == "tcp" else http_transfers)(lab, pods, sidecars)
    # once the sidecars are gone, no per-connection entry is left behind
    for sidecar in sidecars:
        sidecar.proc.terminate()
        sidecar.proc.wait(timeout=30)
    assert_maps_drain(pods.bpffs)


@pytest.mark.parametrize("proto", ["tcp", "http"])
def test_istio_rules_before_attach(lab, pods, envoy_dir, base_id, proto):
    """As in a running mesh: Istio's rules and both sidecars up, then attach + pod add
    (which adopts the running sidecars' inbound listeners)."""
    install_istio_rules(lab, pods)
    sidecars = start_envoys(lab, pods, proto, envoy_dir, base_id)
    attach(lab, pods)
    transfers(lab, pods, proto, sidecars)


@pytest.mark.parametrize("proto", ["tcp", "http"])
def test_istio_rules_after_attach(lab, pods, envoy_dir, base_id, proto):
    """attach + pod add, the sidecars start, then Istio's rules arrive."""
    attach(lab, pods)
    sidecars = start_envoys(lab, pods, proto, envoy_dir, base_id)
    install_istio_rules(lab, pods)
    transfers(lab, pods, proto, sidecars)


@pytest.mark.parametrize("proto", ["tcp", "http"])
def test_sidecar_port_used_under_iptables_then_attached(lab, pods, envoy_dir, base_id, proto):
    """The client sidecar calls the server pod from one source port, first under Istio's
    rules alone, then after attach + pod add. The first call leaves in the server pod's
    conntrack clientIP:P -> serverIP:9080, REDIRECTed (reply serverIP:15006 -> clientIP:P),
    in TIME_WAIT for 120 s. A datapath that sends the second to serverIP:15006 directly
    (785cc1a) gives it that same reply tuple, so the server pod's NAT moves its source
    port, and the server's end no longer matches what connect4 remembered. Any sidecar
    connection after attach whose ephemeral port was used before it meets this (the load
    test hits it by chance); pinning the port makes it certain."""
    install_istio_rules(lab, pods)
    n = 1 << 20
    if proto == "tcp":
        app = lab.listener(
            "0.0.0.0", PORT, "--conns", 2, "--reply-bytes", n, netns=pods.server, cgroup=pods.cgroup
        )
    else:
        start_http_server(lab, pods)
    # (HTTP: one request per upstream connection, so that the second request needs a new one)
    sidecars = start_envoys(
        lab, pods, proto, envoy_dir, base_id, recycle=int(proto == "http"), source_port=SOURCE_PORT
    )
    recs = []
    for step in ("iptables only", "attached"):
        if step == "attached":
            attach(lab, pods)
            before = read_counters(pods.bpffs)
        if proto == "tcp":
            rec = lab.run_peer(
                "connect", SERVER_IP, PORT, "--send-bytes", n, "--timeout", 10,
                netns=pods.client, cgroup=pods.cgroup, timeout=30,
            )  # fmt: skip
        else:
            [rec] = envoy.http_gets(lab, pods.client, pods.cgroup, SERVER_IP, PORT, [f"/bytes/{n}"])
        print(f"{step}: client app:", json.dumps(rec))
        recs.append(rec)
    delta = counters_delta(pods.bpffs, before)
    explain(lab, pods, sidecars)  # (shown when the test fails)
    cstats, sstats = assert_no_loop(lab, pods, sidecars, opened=2)

    assert all("error" not in r for r in recs), recs
    if proto == "tcp":
        srvs = lab.records(app, timeout=30)
        print("server app:", json.dumps(srvs))
        for rec, srv in zip(recs, srvs, strict=True):
            assert rec["sent"] == srv["bytes"] == n and srv["sha256"] == rec["sent_sha256"]
            assert rec["received"] == n and rec["received_sha256"] == payload_sha(n, 2), rec
            assert srv["orig_dst"] == f"{SERVER_IP}:{PORT}", srv
    else:
        assert [(r["status"], r["bytes"]) for r in recs] == [(200, n)] * 2, recs
        assert all(r["sha256"] == payload_sha(n, 2) for r in recs), recs
    # both calls left the client sidecar from the pinned port, each on its own connection
    assert cstats[f"{PASSTHROUGH}.upstream_cx_total"] == 2
    assert sstats[f"{INBOUND}.downstream_cx_total"] == 2
    # the second took the kernel path, its original destination from the map
    assert_sidecar_to_sidecar(delta)
    assert delta["connect_captured"] == delta["connect_sidecar_to_pod"] == 1, delta
    assert delta.get("orig_dst_by_conntrack", 0) == 0, delta
    assert delta["msg_redirected_bytes"] > 0, delta


def test_connection_captured_just_before_detach(lab, pods):
    """A connection connect4 rewrote to the sidecar just before `detach`, accepted by the
    sidecar only after detach began (a sidecar under load accepts late), must still get its
    original destination: conntrack cannot give it (the rewrite happened before the NAT:
    it would answer 127.0.0.1:15001, and an Envoy with use_original_dst then forwards the
    connection to itself, and each of those again: the loop the load test's detach step
    meets). A stand-in sidecar (uid 1337, accepting a second after it listens) makes the
    timing certain."""
    install_istio_rules(lab, pods)
    attach(lab, pods)
    sidecar = lab.listener(
        "0.0.0.0", envoy.OUTBOUND_PORT, "--accept-delay", 1,
        netns=pods.client, cgroup=pods.cgroup, uid=envoy.PROXY_UID, gid=envoy.PROXY_UID,
    )  # fmt: skip
    app = lab.peer(
        "connect", SERVER_IP, PORT, "--send-bytes", 100, "--hold",
        netns=pods.client, cgroup=pods.cgroup, stdin=subprocess.PIPE,
    )  # fmt: skip
    connected = json.loads(app.stdout.readline() or "{}")
    assert connected.get("connected"), f"{connected} {app.stderr.read()}"
    done: list[BaseException | None] = []

    def run_detach() -> None:
        try:
            detach(lab, pods)
            done.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            done.append(e)

    detaching = threading.Thread(target=run_detach)
    detaching.start()  # the sidecar has not accepted yet
    app.stdin.write("go\n")
    app.stdin.flush()
    [rec] = lab.records(sidecar, timeout=30)
    print("stand-in sidecar:", json.dumps(rec), "app:", app.communicate(timeout=30)[0].strip())
    detaching.join(timeout=60)
    assert done == [None], done
    assert rec["bytes"] == 100, rec
    assert rec["orig_dst"] == f"{SERVER_IP}:{PORT}", rec


# ------------------------------------------------------- 4: attach and detach under load


class Load:
    """tests/e2e/http_load.py as the client pod's app: keep-alive and new-connection
    requests through both sidecars until stop(), every response checked."""

    def __init__(
        self, lab: Lab, pods: Pods, diagnose: Callable[[], None], deadline: float = 90
    ) -> None:
        self.diagnose = diagnose  # prints what explains a failed step
        argv = [
            sys.executable, "-m", "tests.e2e.http_load", SERVER_IP, str(PORT),
            "--bytes", str(LOAD_BYTES), "--deadline", str(deadline),
        ]  # fmt: skip
        self.proc = lab.spawn(
            argv, cwd=ROOT, netns=pods.client, cgroup=pods.cgroup, stdin=subprocess.PIPE
        )
        self.record: dict | None = None
        self._line()  # {"started": true}

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            _, stderr = self.proc.communicate(timeout=10)
            raise RuntimeError(f"load exited {self.proc.returncode}: {stderr}")
        return json.loads(line)

    def mark(self, name: str) -> dict:
        self.proc.stdin.write(f"mark {name}\n")
        self.proc.stdin.flush()
        rec = self._line()
        print("load:", json.dumps(rec))
        return rec

    def run_on(self, name: str, timeout: float = 30) -> dict:
        """Mark `name`, then let the load run until LOAD_STEP_REQUESTS more requests are
        done and LOAD_STEP_SECONDS have passed; then every one of them must have succeeded
        (on failure: the load's record, and what self.diagnose prints)."""
        start = self.mark(name)
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(0.25)
            now = self.mark(f"{name} +")
            done = now["requests"] - start["requests"] >= LOAD_STEP_REQUESTS
            if (done and now["t"] - start["t"] >= LOAD_STEP_SECONDS) or (
                time.monotonic() > deadline
            ):
                break
        ok = now["ok"] - start["ok"]
        if now["failed"] or now["corrupted"] or ok < LOAD_STEP_REQUESTS:
            self.diagnose()
            rec = self.stop()
            raise AssertionError(
                f"load {name!r}: {ok} requests succeeded after it in {now['t'] - start['t']:.1f}s"
                f"; in all {now['failed']} failed, {now['corrupted']} corrupted: {rec['errors']}"
            )
        return now

    def stop(self) -> dict:
        if self.record is not None:  # stopped already
            return self.record
        stdout, stderr = self.proc.communicate("stop\n", timeout=60)
        lines = stdout.strip().splitlines()
        if self.proc.returncode or not lines:
            raise RuntimeError(f"load exited {self.proc.returncode}: {stdout} {stderr}")
        self.record = json.loads(lines[-1])
        print("load record:", json.dumps(self.record))
        return self.record


def assert_load_clean(rec: dict) -> None:
    assert rec["requests"] > 0 and rec["ok"] == rec["requests"], rec
    assert rec["failed"] == 0 and rec["corrupted"] == 0, rec
    assert rec["bytes"] == rec["ok"] * LOAD_BYTES, rec


def assert_kernel_carried(delta: dict[str, int]) -> None:
    """The datapath carried part of the load: app connections captured, sockets paired,
    bytes handed socket to socket; nothing refused, lost or unanswered."""
    assert delta["connect_captured"] > 0, delta
    assert delta["connect_sidecar_to_pod"] > 0 and delta["connect_passthrough"] > 0, delta
    assert delta["sock_inserted"] > 0 and delta["msg_redirected_bytes"] > 0, delta
    assert delta["orig_dst_answered"] > 0, delta
    assert delta["orig_dst_not_found"] == 0, delta
    assert delta["sock_insert_failed"] == delta["connect_record_failed"] == 0, delta
    assert delta["inbound_no_listener"] == delta["inbound_assign_failed"] == 0, delta


@pytest.mark.parametrize("proto", ["tcp", "http"])
def test_attach_and_detach_under_load_with_istio_rules(lab, pods, envoy_dir, base_id, proto):
    """Pods with Istio's rules and sidecars, a load running: attach + pod add, detach, (and
    iptables alone carries it), attach + pod add again; no request fails or is corrupted.
    With tcp_proxy sidecars every new-connection request opens new connections on every
    hop; HTTP sidecars recycle their upstream connections every RECYCLE requests, so new
    ones open on every hop in every step while older ones live across it."""
    install_istio_rules(lab, pods)
    start_http_server(lab, pods)
    sidecars = start_envoys(
        lab, pods, proto, envoy_dir, base_id, recycle=RECYCLE if proto == "http" else 0
    )
    opened = 0  # connections the client apps opened, for the loop guard

    load = Load(lab, pods, lambda: explain(lab, pods, sidecars))
    load.run_on("iptables only")
    attach(lab, pods)
    before = read_counters(pods.bpffs)
    load.run_on("attached")
    delta = counters_delta(pods.bpffs, before)
    detach(lab, pods)
    load.run_on("detached")
    rec = load.stop()
    opened += rec["connects"]
    assert_no_loop(lab, pods, sidecars, opened=opened)
    assert_load_clean(rec)
    assert_kernel_carried(delta)

    # detached: Istio's rules alone carry the traffic through both sidecars
    c0, s0 = (sidecar.stats() for sidecar in sidecars)
    load = Load(lab, pods, lambda: explain(lab, pods, sidecars))
    load.run_on("iptables only, after detach")
    rec = load.stop()
    opened += rec["connects"]
    cstats, sstats = assert_no_loop(lab, pods, sidecars, opened=opened)
    assert_load_clean(rec)
    carried = f"{OUTBOUND}.downstream_cx_total"
    assert cstats[carried] - c0[carried] == rec["connects"], "client Envoy missed connections"
    if proto == "tcp":  # every app connection reached the server Envoy, once
        served, expected = "tcp.inbound.downstream_cx_total", rec["connects"]
    else:  # every request
        served, expected = "http.inbound.downstream_rq_2xx", rec["ok"]
    assert sstats[served] - s0[served] == expected, (served, s0[served], sstats[served])

    # attach + pod add again, under load
    load = Load(lab, pods, lambda: explain(lab, pods, sidecars))
    load.run_on("iptables only, before attaching again")
    attach(lab, pods)
    before = read_counters(pods.bpffs)
    load.run_on("attached again")
    delta = counters_delta(pods.bpffs, before)
    rec = load.stop()
    opened += rec["connects"]
    assert_no_loop(lab, pods, sidecars, opened=opened)
    assert_load_clean(rec)
    assert_kernel_carried(delta)
