"""A server app that stops reading while a client app uploads, through two real Envoys
(tcp_proxy, Istio's sidecar shape):

    client app -> client Envoy :15001 -> server Envoy :15006 -> server app (stops reading)

Envoy's flow control (per_connection_buffer_limit_bytes, 1 MiB) makes the server Envoy
stop reading its downstream socket once the app's socket is full; on plain TCP that fills
every socket buffer back to the client app, whose writes then stall (EAGAIN). On the
shortcut a redirected sendmsg() never blocks: the bytes queue in the receiving socket's
psock ingress queue, bounded by no socket buffer, only by the system-wide tcp_mem.

The client app writes 256 MiB non-blocking (the case marked long: 1 GiB)
and reports how much it could write before it stalled (no progress for a second), or
that it wrote everything; while it waits, the test measures each hop's socket memory
(`ss -tmi` in the pods' netns: Recv-Q/Send-Q and skmem), /proc/net/sockstat's TCP mem and
each Envoy's heap (admin /memory); then the server app reads everything and the SHA-256
is checked. Three ways: plain TCP (Istio's iptables rules, no datapath: the reference),
attach's defaults (only the sidecar-to-sidecar hop on the shortcut) and the shortcut for
apps too; then what keeps a pod off it (meshaccel.io/shortcut: "false" keeps only app
hops off and does not bound it; "none" on the server pod, its port in
shortcut-exclude-ports and attach --no-shortcut do), and an Envoy setting that bounds it
on the shortcut (HTTP/2 between the sidecars). Each run has fresh Envoys and its path proven by
the datapath's counters. Note that Recv-Q (and FIONREAD-based monitoring) reads 0 for
the queued bytes on the shortcut: only skmem's r (rmem_alloc) and sockstat show them."""

# ruff: noqa: F811 - pods: test_istio_coexist's fixture (pods not yet attached), as parameter
from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshaccel.datapath import iptables_mode, loader
from meshaccel.datapath import pods as registry
from meshaccel.datapath.pins import read_counters
from tests.e2e import envoy
from tests.e2e.conftest import Pods
from tests.e2e.test_envoy import ROOT, counters_delta, sidecar_binary  # noqa: F401 - a fixture
from tests.e2e.test_envoy_mesh import (
    INBOUND_PASSTHROUGH,
    PASSTHROUGH,
    PORT,
    SERVER_IP,
    sidecar_stats,
    start_sidecars,
)
from tests.e2e.test_istio_coexist import (  # noqa: F401 - pods: the fixture, not attached
    install_istio_rules,
    pods,
)
from tests.kernel.lab import Lab, ours_on

pytestmark = pytest.mark.usefixtures("sidecar_binary")

UPLOAD = 256 << 20  # what the client app has to write (the long case: 1 GiB)
MiB = 1 << 20
WAIT = 120  # the longest any one step may take
# a hop's sockets by netns, process, and the ports that tell them apart
HOPS = (
    "client app",
    "client envoy downstream",
    "client envoy upstream",
    "server envoy downstream",
    "server envoy upstream",
    "server app",
)
SKMEM = re.compile(r"skmem:\(r(\d+),rb(\d+),t(\d+),tb(\d+),f(\d+),w(\d+),o(\d+),bl(\d+),d(\d+)\)")


class Child:
    """A backpressure_child process; its JSON lines read by a thread, so that each wait for
    the next one is bounded."""

    def __init__(self, lab: Lab, pods: Pods, netns: str, *args: object) -> None:
        argv = [sys.executable, "-m", "tests.e2e.backpressure_child", "--budget", str(4 * WAIT)]
        self.proc = lab.spawn(
            [*argv, *map(str, args)], netns=netns, cgroup=pods.cgroup, cwd=ROOT,
            stdin=subprocess.PIPE,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def record(self, timeout: float = WAIT) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.proc.args[3:]}: no record in {timeout} s") from None
        if line is None:
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"{self.proc.args[3:]} exited {self.proc.returncode}: {self.proc.stderr.read()}"
            )
        return json.loads(line)

    def tell(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()


def tcp_mem() -> int:
    """/proc/net/sockstat's TCP mem: bytes charged to TCP sockets, node-wide."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    raise AssertionError("no TCP line in /proc/net/sockstat")


def sockets(lab: Lab, netns: str) -> list[dict]:
    """The netns's established TCP sockets (`ss -tnmiHp`), admin probes left out: local,
    peer, process, Recv-Q, Send-Q and skmem (r: receive memory, w: send queue memory)."""
    argv = ["ss", "-tnmiHp", "state", "established"]
    p = lab.spawn(argv, netns=netns)
    stdout, stderr = p.communicate(timeout=10)
    assert p.returncode == 0, stderr
    out: list[dict] = []
    for line in stdout.splitlines():
        if not line[:1].isspace():  # a socket's first line; -m and -i add indented ones
            recvq, sendq, local, peer, *proc = line.split()
            name = proc[0].split('"')[1] if proc and '"' in proc[0] else "?"
            out.append({"local": local, "peer": peer, "proc": name, "recvq": int(recvq),
                        "sendq": int(sendq)})  # fmt: skip
        if m := SKMEM.search(line):
            r, rb, t, tb, f, w, *_ = map(int, m.groups())
            out[-1].update(r=r, rb=rb, t=t, tb=tb, w=w)
    return [s for s in out if ":15000" not in s["local"] + s["peer"]]


def heap_allocated(sidecar: envoy.Envoy) -> int:
    """What Envoy's allocator has handed out (admin /memory): its buffers included."""
    r = envoy.admin_get(sidecar.lab, sidecar.netns, "/memory")
    assert r.get("status") == 200, r
    return int(json.loads(r["body"])["allocated"])


def hop_of(side: str, s: dict) -> str:
    if s["proc"] != "envoy":
        return f"{side} app"
    lport = int(s["local"].rsplit(":", 1)[1])
    return f"{side} envoy {'downstream' if lport in (PORT, 15001, 15006) else 'upstream'}"


def hop_memory(lab: Lab, pods: Pods) -> dict[str, dict]:
    """Each hop's socket, by name (HOPS): exactly one each."""
    found: dict[str, list[dict]] = {}
    for side, ns in (("client", pods.client), ("server", pods.server)):
        for s in sockets(lab, ns):
            found.setdefault(hop_of(side, s), []).append(s)
    assert sorted(found) == sorted(HOPS) and all(len(v) == 1 for v in found.values()), found
    return {hop: found[hop][0] for hop in HOPS}


@dataclass
class Run:
    mode: str
    stall: dict  # the client's report: stalled, written (before the stall), after_s
    hops: dict[str, dict]  # each hop's socket while the client waits
    sockstat_delta: int  # TCP mem (bytes) while the client waits, less before it started
    envoy_heap: dict[str, int]  # each Envoy's heap (admin /memory allocated): the same
    client: dict  # the client's last record: written, sha256, seconds
    server: dict  # the server app's: bytes, sha256, seconds
    delta: dict[str, int] = field(default_factory=dict)  # datapath counters (attached runs)
    cstats: dict[str, int] = field(default_factory=dict)
    sstats: dict[str, int] = field(default_factory=dict)
    size: int = UPLOAD  # what the client app wrote

    def queued(self, hop: str) -> int:
        return self.hops[hop]["r"] + self.hops[hop]["w"]

    def total_queued(self) -> int:
        return sum(self.queued(h) for h in HOPS)

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "stalled": self.stall["stalled"],
            "written_before_stall_MiB": round(self.stall["written"] / MiB, 1),
            "after_s": self.stall["after_s"],
            "queued_MiB": {h: round(self.queued(h) / MiB, 2) for h in HOPS},
            "queued_total_MiB": round(self.total_queued() / MiB, 1),
            "recvq_sendq": {h: (self.hops[h]["recvq"], self.hops[h]["sendq"]) for h in HOPS},
            "sockstat_tcp_mem_delta_MiB": round(self.sockstat_delta / MiB, 1),
            "envoy_heap_delta_MiB": {k: round(v / MiB, 1) for k, v in self.envoy_heap.items()},
            "upload_s": self.client["seconds"],
            "server_read_s": self.server["seconds"],
        }


def upload(
    lab: Lab,
    pods: Pods,
    mode: str,
    workdir: Path,
    base_ids: tuple[int, int],
    config: dict | None = None,
    size: int = UPLOAD,
) -> Run:
    """One upload of `size` bytes to a server app that stops reading, through fresh Envoys
    (tcp_proxy; or config: HTTP sidecars, the upload one POST's body); the memory queued
    while the client waits; then every byte read and checksummed."""
    http = ("--http",) if config else ()
    server = Child(lab, pods, pods.server, "server", PORT, *http)
    assert server.record() == {"ready": True}
    attached = os.path.exists(pods.bpffs)
    config = config or envoy.sidecar_config(http=False)
    client_envoy, server_envoy = start_sidecars(lab, pods, config, workdir, base_ids)
    sidecars = {"client": client_envoy, "server": server_envoy}
    heap0 = {side: heap_allocated(e) for side, e in sidecars.items()}
    before = read_counters(pods.bpffs) if attached else {}
    mem0 = tcp_mem()
    client = Child(lab, pods, pods.client, "client", SERVER_IP, PORT, "--bytes", size, *http)
    accepted = server.record()
    assert accepted["accepted"].startswith(f"{envoy.INBOUND_PASSTHROUGH_SRC}:"), accepted
    stall = client.record()
    time.sleep(0.2)  # (what is in flight settles)
    hops = hop_memory(lab, pods)
    sockstat_delta = tcp_mem() - mem0
    heap = {side: heap_allocated(e) - heap0[side] for side, e in sidecars.items()}
    server.tell("read")
    client.tell("go")
    done, got = client.record(), server.record()
    for child in (client, server):
        child.proc.wait(timeout=WAIT)
    delta = counters_delta(pods.bpffs, before) if attached else {}
    cstats = sidecar_stats(client_envoy, "client")
    sstats = sidecar_stats(server_envoy, "server")
    for sidecar in (client_envoy, server_envoy):
        sidecar.proc.terminate()
        sidecar.proc.wait(timeout=30)
    run = Run(mode, stall, hops, sockstat_delta, heap, done, got, delta, cstats, sstats, size)
    print(f"{mode}: hops {json.dumps(hops)}")
    print(f"{mode}: {json.dumps(run.summary())}")

    # every byte, in order, exactly once; through both Envoys
    assert done["written"] == size, done
    assert done["received"] == ("HTTP/1.1 200 OK" if http else ""), done
    assert got["bytes"] == size and got["sha256"] == done["sha256"], (got, done)
    for stats, cluster in ((cstats, PASSTHROUGH), (sstats, INBOUND_PASSTHROUGH)):
        moved = stats[f"{cluster}.upstream_cx_tx_bytes_total"]  # (HTTP: with head, frames)
        assert moved == size if not http else size < moved < size + MiB, (cluster, moved)
    return run


def assert_on_the_shortcut(run: Run, app_hops: bool) -> None:
    """The counters: the sidecar-to-sidecar hop on the shortcut, every byte of it
    redirected; the app hops on it too (app_hops) or both kept off it."""
    d = run.delta
    assert d["connect_captured"] == d["connect_sidecar_to_pod"] == 1, d
    assert d["connect_passthrough"] == d["inbound_captured"] == 1, d
    assert d["sock_insert_failed"] == d["msg_fallback_bytes"] == 0, d
    if app_hops:
        assert d["sock_inserted"] == 6 and d["sock_kept_off_app"] == 0, d
        assert d["msg_redirected_bytes"] == 3 * run.size, d
    else:
        assert d["sock_inserted"] == 2 and d["sock_kept_off_app"] == 4, d
        assert d["msg_redirected_bytes"] == run.size, d


def assert_like_plain_tcp(run: Run) -> None:
    """Plain TCP's backpressure, as measured: the client app stalls after a few MiB (each
    hop's send and receive buffers, Envoy's 1 MiB per connection); nothing on the node
    holds more than the sockets' buffers."""
    assert run.stall["stalled"], run.summary()
    assert 2 * MiB < run.stall["written"] < 64 * MiB, run.summary()
    assert run.total_queued() < 64 * MiB, run.summary()
    assert run.sockstat_delta < 64 * MiB, run.summary()
    assert run.total_queued() + sum(run.envoy_heap.values()) < 64 * MiB, run.summary()
    for hop in HOPS:  # each socket within its buffers
        s = run.hops[hop]
        assert s["r"] <= 2 * s["rb"] and s["w"] <= 2 * s["tb"], (hop, s)


def assert_unbounded(run: Run, where: str) -> None:
    """The known difference, as measured: the client app never stalls; nearly all of the
    upload is queued in one socket (where), charged to TCP memory node-wide."""
    assert not run.stall["stalled"] and run.stall["written"] == run.size, run.summary()
    assert run.queued(where) >= run.size - 32 * MiB, run.summary()
    assert run.queued(where) > 4 * run.hops[where]["rb"], run.summary()  # beyond its buffer
    assert run.total_queued() <= run.size + 32 * MiB, run.summary()
    assert run.sockstat_delta >= run.size - 32 * MiB, run.summary()
    assert sum(run.envoy_heap.values()) < 16 * MiB, run.summary()  # in the kernel, not Envoy


SIZES = [
    pytest.param(UPLOAD, id="256MiB"),
    pytest.param(1 << 30, id="1GiB", marks=pytest.mark.long),
]


@pytest.mark.parametrize("size", SIZES)
def test_upload_to_a_reader_that_stops(lab, pods, envoy_dir, base_ids, size):
    """Plain TCP (Istio's rules, no datapath), attach's defaults, the shortcut for apps
    too: how much the client app writes before it stalls, where the rest waits."""
    # plain TCP: Istio's iptables rules alone capture both pods' traffic
    install_istio_rules(lab, pods)
    plain = upload(lab, pods, "plain", envoy_dir, base_ids, size=size)
    assert ours_on(pods.cgroup) == [], "no datapath in the reference run"
    assert_like_plain_tcp(plain)
    for ns in (pods.client, pods.server):
        iptables_mode.remove(ns)

    # attach's defaults: the app hops stay loopback TCP, the sidecars' hop takes the
    # shortcut; the client Envoy's writes never block, the server Envoy stops reading
    lab.attach(pods.cgroup, pods=(pods.client, pods.server), app_shortcut=False)
    defaults = upload(lab, pods, "defaults", envoy_dir, base_ids, size=size)
    assert_on_the_shortcut(defaults, app_hops=False)
    assert_unbounded(defaults, "server envoy downstream")

    # the shortcut for apps too: the server Envoy's writes to the app never block either,
    # so it never stops reading: the upload waits in the server app's socket
    loader.attach(pods.cgroup, bpffs=pods.bpffs, app_shortcut=True)
    apps = upload(lab, pods, "app-shortcut", envoy_dir, base_ids, size=size)
    assert_on_the_shortcut(apps, app_hops=True)
    assert_unbounded(apps, "server app")


def test_what_keeps_a_pod_off_the_shortcut(lab, pods, envoy_dir, base_ids):
    """What keeps a pod's traffic off the shortcut. meshaccel.io/shortcut: "false" (both
    pods) keeps only their app sockets off: the sidecar-to-sidecar hop stays on it and the
    upload still waits in the server Envoy's socket, unbounded. The server's port in
    meshaccel.io/shortcut-exclude-ports (both pods), meshaccel.io/shortcut: "none" on the
    server pod alone (attach's defaults), and attach --no-shortcut (node-wide) keep that
    hop on TCP too: bounded as plain TCP is."""
    lab.attach(pods.cgroup, app_shortcut=True)  # the pods' setting must win over the node's

    def register(client: dict, server: dict, listed: set[str]) -> None:
        for ns, setting in ((pods.client, client), (pods.server, server)):
            lab.register(pods.bpffs, ns, annotations=setting)
        assert {p["shortcut"] for p in registry.list_pods(pods.bpffs)} == listed

    false = {"meshaccel.io/shortcut": "false"}
    register(false, false, {"off"})
    run = upload(lab, pods, "pod shortcut false", envoy_dir, base_ids)
    d = run.delta
    assert d["sock_kept_off_by_pod"] == 4 and d["sock_kept_off_app"] == 0, d
    assert d["sock_inserted"] == 2 and d["msg_redirected_bytes"] == UPLOAD, d
    assert_unbounded(run, "server envoy downstream")

    exclude = {"meshaccel.io/shortcut-exclude-ports": str(PORT)}
    register(exclude, exclude, {f"default except ports {PORT}"})
    run = upload(lab, pods, "pod exclude-ports", envoy_dir, base_ids)
    d = run.delta
    assert d["sock_kept_off_by_pod"] == 6 and d["sock_inserted"] == 0, d  # every hop
    assert d["connect_sidecar_to_pod"] == d["inbound_captured"] == 1, d  # capture kept
    assert_like_plain_tcp(run)

    loader.attach(pods.cgroup, bpffs=pods.bpffs)  # attach's defaults
    register({}, {"meshaccel.io/shortcut": "none"}, {"default", "none"})
    run = upload(lab, pods, "server pod shortcut none", envoy_dir, base_ids)
    d = run.delta
    assert d["sock_kept_off_app"] == 2 and d["sock_kept_off_by_pod"] == 4, d
    assert d["sock_inserted"] == 0 and d["connect_sidecar_to_pod"] == 1, d
    assert_like_plain_tcp(run)

    loader.attach(pods.cgroup, bpffs=pods.bpffs, shortcut=False)
    off = upload(lab, pods, "no-shortcut", envoy_dir, base_ids)
    d = off.delta
    assert d["connect_captured"] == d["inbound_captured"] == d["connect_passthrough"] == 1, d
    assert d["sock_inserted"] == d["msg_redirected"] == 0, d  # capture kept, every byte TCP
    assert_like_plain_tcp(off)


H2_WINDOW = 65535  # HTTP/2's smallest (and RFC default) window


def h2_between_sidecars(window: int | None) -> dict:
    """The HTTP sidecars, the client's PassthroughCluster speaking HTTP/2 to the server's
    inbound listener (codec AUTO), both Envoys' stream and connection windows `window`
    (None: Envoy's defaults)."""
    config = envoy.sidecar_config(http=True)
    h2 = {"initial_stream_window_size": window, "initial_connection_window_size": window}
    h2 = {k: v for k, v in h2.items() if v is not None}
    options = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": h2},
    }
    resources = config["static_resources"]
    for cluster in resources["clusters"]:
        if cluster["name"] == envoy.PASSTHROUGH:
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options
            }
    for listener in resources["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                f["typed_config"]["http2_protocol_options"] = h2
    return config


def assert_http2_on_the_shortcut(run: Run) -> None:
    """The sidecars' hop on the shortcut, as HTTP/2: every byte the client Envoy moved on
    it (the upload framed, and what the server Envoy sent back) redirected; app hops off."""
    d = run.delta
    assert d["connect_captured"] == d["connect_sidecar_to_pod"] == 1, d
    assert d["sock_inserted"] == 2 and d["sock_kept_off_app"] == 4, d
    assert d["msg_fallback_bytes"] == 0, d
    up = sum(run.cstats[f"{PASSTHROUGH}.upstream_cx_{x}_bytes_total"] for x in ("tx", "rx"))
    assert d["msg_redirected_bytes"] == up > UPLOAD, d
    assert run.cstats[f"{PASSTHROUGH}.upstream_rq_2xx"] == 1
    assert run.cstats[f"{PASSTHROUGH}.upstream_cx_http2_total"] == 1  # HTTP/2 upstream


def test_http2_between_sidecars_bounds_it(lab, pods, envoy_dir, base_ids):
    """An Envoy setting that bounds it: HTTP/2 between the sidecars (attach's defaults: that
    hop on the shortcut, its bytes HTTP/2 frames). The server Envoy keeps reading its
    socket (the kernel queue stays empty) and HTTP/2's flow control holds the upload in
    the Envoys: the client Envoy stops reading the client app, which stalls, as on plain
    TCP. Measured: with Envoy's default windows (256 MiB) the client writes about 38 MiB
    before it stalls, about 30 MiB of it in the two Envoys' heaps; with H2_WINDOW about
    11 MiB, the Envoys holding about 1 MiB."""
    lab.attach(pods.cgroup, pods=(pods.client, pods.server), app_shortcut=False)
    for window in (None, H2_WINDOW):
        config = h2_between_sidecars(window)
        run = upload(lab, pods, f"h2 window {window or 'default'}", envoy_dir, base_ids, config)
        assert_http2_on_the_shortcut(run)
        assert_like_plain_tcp(run)
        assert run.queued("server envoy downstream") < 1 * MiB, run.summary()
        if window:
            assert sum(run.envoy_heap.values()) < 8 * MiB, run.summary()
