"""The agent (`meshaccel run --source file`) as a process, with two lab pods and real
traffic: ready only after the first sync, metrics as Prometheus parses them, kill -9 and
restart under load without a failed request, pods file edits, pods deleted while it was
down, and a clean stop that detaches when asked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from pyroute2 import NetNS

from meshaccel.datapath import loader, pods
from meshaccel.datapath.pins import Pins, read_counters
from meshaccel.datapath.structs import COUNTERS
from meshaccel.lab.http_probe import free_port, get
from tests.kernel.agent import MESHACCEL, Agent
from tests.kernel.lab import ours_on
from tests.wait import wait_for

A_IP, B_IP = "10.244.1.10", "10.244.1.11"
SECOND_IP = "10.244.1.30"  # put on pod a while the agent runs

# The "sidecar" in pod A: answers each connection with its SO_ORIGINAL_DST and the number
# of bytes it got. (A socket timeout: sockmap sockets may wake up without data, see the
# README's known limitations; Python retries those reads itself when a timeout is set.)
SIDECAR = r"""
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 15001))
s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.settimeout(10)
        try:
            port, ip = struct.unpack_from("!2xH4s", c.getsockopt(socket.SOL_IP, 80, 16))
            n = 0
            while data := c.recv(65536):
                n += len(data)
            c.sendall(f"{socket.inet_ntoa(ip)}:{port} {n}".encode())
        except OSError as e:
            print(f"sidecar: {e}", file=sys.stderr, flush=True)
"""

# The app in pod A: short connections to pod B, one after another, until SIGTERM or the
# deadline; every reply is checked. Prints {"ok": N, "failed": N, "errors": {...}}.
CLIENT = r"""
import json, signal, socket, sys, time
dst, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
ok, failed, errors, payload = 0, 0, {}, b"x" * 1000
while not stop and time.monotonic() < deadline:
    try:
        with socket.create_connection((dst, port), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        if reply.decode() != f"{dst}:{port} {len(payload)}":
            raise ValueError(f"reply {reply!r}")
        ok += 1
    except Exception as e:
        failed += 1
        key = f"{type(e).__name__}: {e}"
        errors[key] = errors.get(key, 0) + 1
print(json.dumps({"ok": ok, "failed": failed, "errors": errors}), flush=True)
"""


def registered(bpffs: str) -> set[str]:
    return {p["name"] for p in pods.list_pods(bpffs)}


def pod_list_cli(bpffs: str) -> set[str]:
    r = subprocess.run(
        [MESHACCEL, "pod", "list", "--json", "--bpffs", bpffs],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return {p["name"] for p in json.loads(r.stdout)}


def captured(bpffs: str) -> int:
    return read_counters(bpffs)["connect_captured"]


def test_agent_restarts_under_load_without_failed_requests(lab, tmp_path):
    node = lab.node()
    a, b = lab.pod("a", node, A_IP), lab.pod("b", node, B_IP)
    cg = lab.cgroup()
    agent = Agent(lab, tmp_path, cg)
    pa, pb = f"default/{a}", f"default/{b}"

    # no pods file yet: attached and healthy, but not ready until the first sync
    agent.start()
    # (a deadline: compiling and attaching took over 60 s under emulation, in a VM)
    waiting = "waiting for the first pod list"
    assert wait_for(lambda: waiting in get(f"{agent.url}/readyz")[1], 300)
    assert get(f"{agent.url}/readyz")[0] == 503
    assert get(f"{agent.url}/healthz") == (200, "ok\n")
    agent.write_pods(a, b)
    agent.ready(10)
    assert registered(agent.bpffs) == {pa, pb}

    m = agent.metrics()
    assert m[("meshaccel_pods_tracked", ())] == 2
    assert m[("meshaccel_datapath_attached", ())] == 1
    assert all((f"meshaccel_datapath_{name}_total", ()) in m for name in COUNTERS)
    assert m[("meshaccel_map_entries", (("map", "pod_by_netns"),))] == 2
    assert m[("meshaccel_map_capacity", (("map", "sock_hash"),))] == 65536
    assert m[("meshaccel_reconcile_pods_total", (("result", "added"),))] == 2
    assert m[("meshaccel_reconcile_duration_seconds_count", ())] >= 1

    # load: pod A's app calls pod B, captured to A's sidecar, short connections
    sidecar = lab.spawn([sys.executable, "-c", SIDECAR], netns=a, cgroup=cg)
    assert sidecar.stdout.readline().strip() == "ready", sidecar.stderr.read()
    client = lab.spawn([sys.executable, "-c", CLIENT, B_IP, "9080", "600"], netns=a, cgroup=cg)
    assert wait_for(lambda: captured(agent.bpffs) >= 200, 20), "no traffic captured"

    # kill -9 under load: the datapath keeps working without its agent
    agent.kill9()
    before = read_counters(agent.bpffs)
    links = Pins(agent.bpffs).links()
    assert wait_for(lambda: captured(agent.bpffs) >= before["connect_captured"] + 200, 20)

    # restart: adopts the pinned datapath; same pods, counters not reset
    agent.start()
    agent.ready(60)
    assert "already attached to" in agent.log.read_text()  # adopted, not reloaded
    assert registered(agent.bpffs) == {pa, pb}
    assert Pins(agent.bpffs).links() == links  # the pods' sk_lookup links untouched
    after = read_counters(agent.bpffs)
    assert all(after[k] >= before[k] for k in COUNTERS)
    assert after["connect_captured"] > before["connect_captured"]
    m = agent.metrics()
    assert m[("meshaccel_datapath_connect_captured_total", ())] >= after["connect_captured"]
    assert m[("meshaccel_pods_tracked", ())] == 2

    # pods file edits, applied while traffic flows
    agent.write_pods(a)
    assert wait_for(lambda: registered(agent.bpffs) == {pa}, 10), agent.log.read_text()
    assert pod_list_cli(agent.bpffs) == {pa}
    agent.write_pods(a, b)
    assert wait_for(lambda: registered(agent.bpffs) == {pa, pb}, 10), agent.log.read_text()
    assert pod_list_cli(agent.bpffs) == {pa, pb}

    # a clean stop leaves the datapath attached; a pod deleted meanwhile goes on restart
    assert agent.term() == 0, agent.log.read_text()
    assert "the datapath stays attached" in agent.log.read_text()
    assert loader.status(agent.bpffs)["attached"] and registered(agent.bpffs) == {pa, pb}
    agent.write_pods(a)
    mark = captured(agent.bpffs)
    assert wait_for(lambda: captured(agent.bpffs) >= mark + 100, 20)
    agent.start()
    agent.ready(60)
    assert registered(agent.bpffs) == {pa}
    assert agent.metrics()[("meshaccel_pods_tracked", ())] == 1

    mark = captured(agent.bpffs)
    assert wait_for(lambda: captured(agent.bpffs) >= mark + 100, 20)
    client.send_signal(signal.SIGTERM)
    [result] = lab.records(client, timeout=30)
    print(f"requests: {result}")
    assert result["failed"] == 0, result
    assert result["ok"] >= 800, result
    assert sidecar.poll() is None, sidecar.stderr.read()


def test_clean_stop_can_detach_and_bad_pods_do_not_block_readiness(lab, tmp_path):
    node = lab.node()
    a = lab.pod("a", node, A_IP)
    cg = lab.cgroup()
    agent = Agent(lab, tmp_path, cg, "--detach-on-exit")
    ghost = {"name": "ghost", "ips": ["10.244.1.99"], "netns": "/nonexistent/netns"}
    agent.write_pods(a, extra=(ghost,))  # a pod whose netns does not exist fails alone
    agent.start()
    agent.ready(60)
    assert registered(agent.bpffs) == {f"default/{a}"}
    m = agent.metrics()
    assert m[("meshaccel_pods_tracked", ())] == 1
    assert m[("meshaccel_errors_total", (("kind", "pod_register"),))] >= 1
    assert m[("meshaccel_reconcile_pods_total", (("result", "failed"),))] >= 1
    assert "default/ghost" in agent.log.read_text()

    assert agent.term() == 0, agent.log.read_text()
    assert not os.path.exists(agent.bpffs)
    assert ours_on(cg) == []
    assert "detached from" in agent.log.read_text()


def test_start_errors_are_one_line_and_attach_nothing(lab, tmp_path):
    cg = lab.cgroup()
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)
    base = [MESHACCEL, "run", "--source", "file", "--pods-file", str(tmp_path / "p.yaml")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            ("/tmp", free_port(), "--cgroup /tmp: not a cgroup v2 directory"),
            (cg, port, f"--metrics-address 127.0.0.1:{port}: cannot listen"),
        ]
        for cgroup, metrics_port, message in cases:
            r = subprocess.run(
                [*base, "--bpffs", bpffs, "--cgroup", cgroup],
                env={**os.environ, "MESHACCEL_RUN_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            last = r.stderr.strip().splitlines()[-1]
            assert r.returncode == 1 and last.startswith(f"meshaccel: error: {message}"), r.stderr
            assert "Traceback" not in r.stderr
            assert not os.path.exists(bpffs) and ours_on(cg) == []


def test_an_address_put_on_a_pod_is_registered_at_once(lab, tmp_path):
    """The agent reads a pod's netns again as soon as an address or a local route is put
    on it or taken off (not on a timer: ADDRESS_CHECK_SECONDS is minutes), and registers
    it, so the app's call to it goes where Istio's rules send it."""
    node = lab.node()
    a = lab.pod("a", node, A_IP)
    agent = Agent(lab, tmp_path, lab.cgroup())
    agent.write_pods(a)
    agent.start()
    agent.ready(60)

    def addresses() -> set[str]:
        return {x for p in pods.registrations(agent.bpffs) for x in p.addresses}

    assert A_IP in addresses() and SECOND_IP not in addresses()
    with NetNS(a) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=SECOND_IP, prefixlen=24)
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route("add", dst="10.77.0.0/24", type="local", table=255, oif=lo, scope="host")
    start = time.monotonic()
    assert wait_for(lambda: {SECOND_IP, "10.77.0.0/24"} <= addresses(), 10), addresses()
    print(f"registered after {time.monotonic() - start:.2f} s")
    with NetNS(a) as ipr:
        ipr.addr("del", index=eth0, address=SECOND_IP, prefixlen=24)
    assert wait_for(lambda: SECOND_IP not in addresses(), 10), addresses()
    assert "addresses changed" in agent.log.read_text()
