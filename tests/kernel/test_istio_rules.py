"""The datapath beside Istio's own nat rules (istio-init's REDIRECT), where the parity
matrix (test_parity.py) does not reach: a NAT that moves the destination address too, and
two calls whose tuples clash after NAT."""

from __future__ import annotations

import sys

from pyroute2 import NetNS

from meshaccel.datapath import iptables_mode, loader
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS, parse_istio_args
from meshaccel.datapath.pins import read_counters
from tests.kernel.lab import ORIG_DST

NODAD = 0x02


def test_redirect_to_another_address_of_the_pod_keeps_the_original_destination(lab):
    """A sidecar calls a same-node pod on its second eth0 address; the pod's REDIRECT
    moves it to eth0's first address, port 15006. SO_ORIGINAL_DST is what the sidecar
    asked for (conntrack's answer: the datapath does not pair these two ends, so it has
    no entry to override it with), and every byte arrives."""
    node = lab.node()
    server = lab.pod("srv", node, "10.244.1.20")
    client = lab.pod("cli", node, "10.244.1.10")
    with NetNS(server) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address="10.244.1.50", prefixlen=24)
    iptables_mode.install(server, parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS))
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(client, server))
    inbound = lab.listener("0.0.0.0", 15006, netns=server, cgroup=cg, uid=1337)
    before = read_counters(bpffs)

    sidecar = lab.run_peer(
        "connect", "10.244.1.50", 9080, "--send-bytes", 1000, netns=client, cgroup=cg, uid=1337
    )
    [rec] = lab.records(inbound)
    after = read_counters(bpffs)

    assert rec["orig_dst"] == "10.244.1.50:9080", rec
    assert rec["bytes"] == 1000 and rec["sha256"] == sidecar["sent_sha256"]
    assert sidecar["peer"] == "10.244.1.50:9080", sidecar  # getpeername: what it asked for
    assert after["connect_sidecar_to_pod"] - before["connect_sidecar_to_pod"] == 1
    assert after["orig_dst_by_conntrack"] - before["orig_dst_by_conntrack"] == 1


# Bytes each way per call, seeded by the port called.
SENT = 100000

# The callee pod's sidecar inbound listener (0.0.0.0:15006), one connection at a time: reads
# to EOF, answers "<SO_ORIGINAL_DST> <peer> <bytes> <sha256>\n" and then SENT bytes seeded
# by the original port. Runs until killed.
CLASH_CALLEE = (
    r"""
import hashlib, random, socket, struct, sys
sent = int(sys.argv[1])
"""
    + ORIG_DST
    + r"""s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 15006))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    with c:
        c.settimeout(60)  # Python then retries a read woken without data (sockmap may)
        orig_dst = orig(c)
        h, n = hashlib.sha256(), 0
        while data := c.recv(65536):
            h.update(data)
            n += len(data)
        head = f"{orig_dst} {peer[0]}:{peer[1]} {n} {h.hexdigest()}\n"
        port = orig_dst.rsplit(":", 1)[1]
        c.sendall(head.encode() + random.Random(f"reply{port}").randbytes(sent))
"""
)

# The caller pod's sidecar (uid 1337): one connection to DST per port, every one bound to
# the first one's source port (SO_REUSEADDR) and all held open; a connect() that fails
# within TIMEOUT s is recorded as such. Then, one connection after the other, sends SENT
# bytes seeded by the port, half-closes and reads the answer to EOF. Prints one JSON line
# per port.
CLASH_CALLER = r"""
import hashlib, json, random, socket, sys
dst, ports, timeout = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3])
size = int(sys.argv[4])
src, held, out = 0, [], {}
for port in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", src))
    src = s.getsockname()[1]
    s.settimeout(timeout)
    try:
        s.connect((dst, port))
        s.settimeout(60)
        held.append((port, s))
    except OSError as e:
        out[port] = {"connect": type(e).__name__}
        s.close()
for port, s in held:
    sent = random.Random(f"send{port}").randbytes(size)
    s.sendall(sent)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    head, _, reply = got.partition(b"\n")
    orig_dst, peer, n, sha = head.decode().split()
    out[port] = {
        "connect": "ok", "orig_dst": orig_dst, "moved": peer != f"{s.getsockname()[0]}:{src}",
        "sent_intact": (int(n), sha) == (len(sent), hashlib.sha256(sent).hexdigest()),
        "reply_intact": reply == random.Random(f"reply{port}").randbytes(size),
        "received": len(got),
    }
    s.close()
for port in ports:
    print(json.dumps({"port": port, **out[port]}), flush=True)
"""


def test_two_calls_from_one_source_port_clash_in_istios_nat_as_without_the_datapath(lab):
    """A sidecar calls two ports of a same-node pod from one source port (connect() may do
    this: the destinations differ); the pod's REDIRECT sends both to 15006, so their tuples
    after NAT clash. What the kernel's NAT does then differs by kernel (6.18 moves the
    second one's source port, Debian 12's 6.1.0-47 drops its SYN until connect() times
    out); whatever it does, it does the same with the datapath attached: the same
    connections connect, each with every byte both ways and SO_ORIGINAL_DST the port
    called, the same ones are moved; and nothing of theirs stays in the datapath's maps
    but what the LRU ages out (a moved call's original destination)."""
    node = lab.node()
    caller, callee = lab.pod("cli", node, "10.244.1.10"), lab.pod("srv", node, "10.244.1.11")
    iptables_mode.install(callee, parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS))
    cg = lab.cgroup()
    spawn = {"cgroup": cg, "uid": 1337}
    srv = lab.spawn([sys.executable, "-c", CLASH_CALLEE, str(SENT)], netns=callee, **spawn)
    assert srv.stdout.readline().strip() == "ready", srv.stderr.read()

    def call() -> list[dict]:
        ports, timeout = "9080,9081,9082", "3"
        argv = [sys.executable, "-c", CLASH_CALLER, "10.244.1.11", ports, timeout, str(SENT)]
        return lab.records(lab.spawn(argv, netns=caller, **spawn), timeout=60)

    plain = call()  # Istio's rules alone
    print("Istio's rules alone:", plain)
    connected = [r for r in plain if r["connect"] == "ok"]
    assert connected and connected[0]["port"] == 9080 and not connected[0]["moved"], plain
    for r in connected:
        assert r["orig_dst"] == f"10.244.1.11:{r['port']}", r
        assert r["sent_intact"] and r["reply_intact"], r

    bpffs = lab.attach(cg, pods=(caller, callee))
    before = read_counters(bpffs)
    accelerated = call()
    after = read_counters(bpffs)
    print("with the datapath:", accelerated)
    assert [strip(r) for r in accelerated] == [strip(r) for r in plain], accelerated

    # the path: an unmoved call's ends pair up and take the shortcut both ways; a moved
    # one's callee end finds no original destination (conntrack answers) and no peer, so
    # the caller's bytes go TCP, counted; only the moved calls' entries stay (LRU)
    d = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    maps = {name: m["entries"] for name, m in loader.status(bpffs)["maps"].items()}
    print(d, maps)
    paired = [r for r in accelerated if r["connect"] == "ok" and not r["moved"]]
    moved = [r for r in accelerated if r.get("moved")]
    assert d["connect_sidecar_to_pod"] == len(plain), d
    assert d["orig_dst_answered"] == len(paired), d
    assert d.get("orig_dst_by_conntrack", 0) == len(moved), d
    assert d["msg_redirected_bytes"] == sum(SENT + r["received"] for r in paired), d
    assert d.get("msg_fallback_bytes", 0) == SENT * len(moved), d
    assert maps["sock_hash"] == maps["nat_peer"] == maps["orig_dst_by_cookie"] == 0, maps
    assert maps["orig_dst_by_sock"] == len(moved), maps


def strip(record: dict) -> dict:
    """A call's outcome without its byte count (the answer names the caller's port, whose
    length in digits may differ between runs)."""
    return {k: v for k, v in record.items() if k != "received"}
