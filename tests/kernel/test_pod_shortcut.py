"""`meshaccel pod list` counts each pod's sockets on the shortcut: the app's and the
sidecar's ends of a captured connection in the pod, its sidecar's end of a connection to
another pod's sidecar; none once the connections are closed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from meshaccel.agent.metrics import Metrics, pod_shortcut_sockets
from meshaccel.datapath import pods
from meshaccel.datapath.loader import status
from meshaccel.datapath.pins import read_counters
from tests.kernel.peer import payload_sha

MESHACCEL = os.path.join(os.path.dirname(sys.executable), "meshaccel")
A_IP, B_IP, REMOTE = "10.244.1.10", "10.244.1.20", "10.244.1.99"


def pod_list(bpffs: str) -> dict[str, dict]:
    """`meshaccel pod list --json`, by pod name."""
    out = subprocess.run(
        [MESHACCEL, "pod", "list", "--json", "--bpffs", bpffs],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return {p["name"]: p for p in json.loads(out.stdout)}


def pod_list_text(bpffs: str) -> dict[str, str]:
    """`meshaccel pod list`: the SHORTCUT column, by pod name (the field just before the
    pod's capture arguments, which end each line)."""
    args = {name: p["istio_iptables_args"] for name, p in pod_list(bpffs).items()}
    out = subprocess.run(
        [MESHACCEL, "pod", "list", "--bpffs", bpffs],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    head, *rows = out.stdout.splitlines()
    assert head.split()[:3] == ["POD", "ADDRESSES", "SHORTCUT"], out.stdout
    found = {}
    for row in rows:
        name = row.split()[0]
        assert row.endswith(args[name]), (row, args[name])
        found[name] = row.removesuffix(args[name]).split()[-1]
    return found


def wait_for(fn, expected, timeout: float = 5.0):
    """fn() once it returns expected (a closed socket leaves sock_hash as the kernel
    tears it down), or its last value."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def go(app: subprocess.Popen) -> None:
    app.stdin.write("go\n")
    app.stdin.flush()


def test_pod_list_counts_a_pods_shortcut_sockets(lab):
    node = lab.node()
    a = lab.pod("a", node, A_IP)
    b = lab.pod("b", node, B_IP)
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(a, b))
    sidecar = lab.listener("127.0.0.1", 15001, netns=a, cgroup=cg)
    before = read_counters(bpffs)
    assert {n: p["shortcut_sockets"] for n, p in pod_list(bpffs).items()} == {a: 0, b: 0}

    app = lab.peer(
        "connect", REMOTE, 9080, "--hold", "--send-bytes", 1000,
        netns=a, cgroup=cg, stdin=subprocess.PIPE,
    )  # fmt: skip
    held = json.loads(app.stdout.readline())  # connected, and holding the connection open
    assert held["local"].startswith("127.0.0.1:"), held
    # (the sidecar's end joins when the kernel has processed the handshake's last ACK)
    wait_for(lambda: pods.shortcut_sockets(bpffs)[a], 2)
    listed = pod_list(bpffs)
    assert listed[a]["shortcut_sockets"] >= 2, listed  # the app's end and the sidecar's
    assert listed[b]["shortcut_sockets"] == 0, listed
    text = pod_list_text(bpffs)
    assert int(text[a]) >= 2 and text[b] == "0", text
    # the node agent's gauge reads the same
    samples = Metrics(lambda: status(bpffs)).exposition().decode()  # as the agent wires it
    assert f'meshaccel_pod_shortcut_sockets{{pod="{a}"}} 2.0' in samples, samples
    assert f'meshaccel_pod_shortcut_sockets{{pod="{b}"}} 0.0' in samples, samples

    go(app)
    [rec] = lab.records(sidecar)
    [done] = lab.records(app)
    assert rec["orig_dst"] == f"{REMOTE}:9080" and rec["bytes"] == 1000, rec
    assert rec["sha256"] == done["sent_sha256"]
    after = read_counters(bpffs)
    assert after["sock_inserted"] - before["sock_inserted"] == 2
    assert after["msg_redirected_bytes"] - before["msg_redirected_bytes"] == 1000
    gone = wait_for(
        lambda: {n: p["shortcut_sockets"] for n, p in pod_list(bpffs).items()}, {a: 0, b: 0}
    )
    assert gone == {a: 0, b: 0}


def test_sidecar_to_sidecar_ends_count_for_each_pod(lab):
    """Pod A's sidecar calling pod B on this node: the connection goes to B's inbound
    listener directly; its two ends (keys without a netns cookie) are one socket of A and
    one of B."""
    node = lab.node()
    a = lab.pod("a", node, A_IP)
    b = lab.pod("b", node, B_IP)
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(a, b))
    inbound = lab.listener("0.0.0.0", 15006, netns=b, cgroup=cg)  # B's sidecar
    before = read_counters(bpffs)

    call = lab.peer(
        "connect", B_IP, 9080, "--hold", "--send-bytes", 100,
        netns=a, cgroup=cg, uid=1337, gid=1337, stdin=subprocess.PIPE,
    )  # fmt: skip
    held = json.loads(call.stdout.readline())
    assert held["local"].startswith(f"{A_IP}:"), held
    assert read_counters(bpffs)["connect_sidecar_to_pod"] - before["connect_sidecar_to_pod"] == 1
    wait_for(lambda: pods.shortcut_sockets(bpffs), {a: 1, b: 1})
    assert {n: p["shortcut_sockets"] for n, p in pod_list(bpffs).items()} == {a: 1, b: 1}
    assert pod_shortcut_sockets({"bpffs": bpffs, "programs": [{}]}) == {a: 1, b: 1}

    go(call)
    [rec] = lab.records(inbound)
    lab.records(call)
    assert rec["orig_dst"] == f"{B_IP}:9080" and rec["sha256"] == payload_sha(100, 1), rec
    gone = wait_for(lambda: pods.shortcut_sockets(bpffs), {a: 0, b: 0})
    assert gone == {a: 0, b: 0}
