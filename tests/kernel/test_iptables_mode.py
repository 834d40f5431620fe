"""iptables mode on real sockets: the seed's istio-iptables rules in a pod netns send each
connection where Istio would (and remove() puts everything back). No cgroup, no eBPF.

Pod A (rules installed) and pod B (none) sit on one node bridge. In A listen a sidecar
outbound listener (loopback:15001), an inbound listener (any:15006) and the app (any:PORT);
in B an app (any:9080). Each case makes one connection and notes which listener got it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from socket import AF_INET6

import pytest
from pyroute2 import NetNS

from meshaccel.datapath.capture import ALL, CaptureConfig
from meshaccel.datapath.iptables_mode import install, remove
from tests.kernel.lab import Lab

# istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020
SEED = CaptureConfig(
    proxy_port=15001,
    inbound_port=15006,
    proxy_uids=(1337,),
    proxy_gids=(1337,),
    include_outbound_cidrs=ALL,
    include_inbound_ports=ALL,
    exclude_inbound_ports=(15090, 15021, 15020),
)
APP, PROXY = 1000, 1337
IFA_F_TENTATIVE = 0x40


@dataclass(frozen=True)
class Family:
    a: str  # pod A's IP (rules installed)
    b: str  # pod B's IP
    lo: str
    any: str

    def dst(self, ip: str, port: int) -> str:  # as peer.py prints SO_ORIGINAL_DST
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


FAMILIES = {
    4: Family("10.244.1.5", "10.244.1.6", "127.0.0.1", "0.0.0.0"),
    6: Family("fd00:244::5", "fd00:244::6", "::1", "::"),
}


@pytest.fixture
def pods(lab: Lab) -> tuple[str, str]:
    node = lab.node()
    v4, v6 = FAMILIES[4], FAMILIES[6]
    pods = lab.pod("a", node, v4.a, v6.a), lab.pod("b", node, v4.b, v6.b)
    for ns in pods:
        wait_dad(ns)
    return pods


def wait_dad(netns: str, timeout: float = 10) -> None:
    """Wait until no IPv6 address in netns is tentative. (lab.pod's flags=0x80 is
    IFA_F_PERMANENT, not IFA_F_NODAD=0x02, so DAD runs for ~1.5 s; meanwhile source address
    selection skips eth0's address and, once install() has put ::6 on lo, picks ::6.)"""
    deadline = time.monotonic() + timeout
    with NetNS(netns) as ipr:
        while any(a["flags"] & IFA_F_TENTATIVE for a in ipr.get_addr(family=AF_INET6)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"IPv6 addresses in {netns} still tentative after {timeout}s")
            time.sleep(0.05)


def landed(lab: Lab, pods: tuple[str, str], f: Family, case: tuple) -> tuple[str, str | None]:
    """Make the case's connection; which listener accepted it, and the SO_ORIGINAL_DST it saw
    (only reported for the sidecar's listeners: a direct connection has none to speak of)."""
    source, uid, gid, dst, port = case
    a, b = pods
    listeners = {
        "outbound": lab.listener(f.lo, 15001, netns=a),
        "inbound": lab.listener(f.any, 15006, netns=a),
        "app": lab.listener(f.any, port, netns=a),
        "remote": lab.listener(f.any, 9080, netns=b),
    }
    client = lab.run_peer(
        "connect", dst, port, "--send-bytes", 100, "--timeout", 5,
        netns=a if source == "A" else b, uid=uid, gid=gid,
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and all(p.poll() is None for p in listeners.values()):
        time.sleep(0.01)
    where: list[tuple[str, dict]] = []
    for name, p in listeners.items():
        if p.poll() is None:
            p.kill()
        stdout, _ = p.communicate(timeout=10)
        where += [(name, json.loads(ln)) for ln in stdout.splitlines() if ln.strip()]
    print(f"{case}: client {client} -> {where}")
    if "error" in client or len(where) != 1:
        return f"client {client.get('error')}, listeners {where}", None
    assert client["peer"] == f"{dst}:{port}", client  # the app sees what it connected to
    name, rec = where[0]
    assert rec["bytes"] == 100 and rec["sha256"] == client["sent_sha256"], rec
    return name, rec["orig_dst"] if name in ("outbound", "inbound") else None


def iptables_save(lab: Lab, netns: str) -> str:
    out = []
    for tool in ("iptables-save", "ip6tables-save"):
        p = lab.spawn([tool], netns=netns)
        stdout, stderr = p.communicate(timeout=30)
        assert p.returncode == 0, f"{tool}: {stderr}"
        out.append(stdout)
    return "\n".join(out)


@pytest.mark.parametrize("family", [4, 6])
def test_seed_capture_and_remove(lab: Lab, pods: tuple[str, str], family: int):
    f = FAMILIES[family]
    a, _ = pods
    install(a, SEED)
    saved = iptables_save(lab, a)
    assert saved.count("-A PREROUTING -p tcp -j ISTIO_INBOUND") == 2, saved  # v4 and v6

    # (source pod, uid, gid, destination, port): expected listener, SO_ORIGINAL_DST
    cases = {
        "app -> other pod": (("A", APP, APP, f.b, 9080), ("outbound", f.dst(f.b, 9080))),
        "proxy uid -> other pod": (("A", PROXY, APP, f.b, 9080), ("remote", None)),
        "proxy gid -> other pod": (("A", APP, PROXY, f.b, 9080), ("remote", None)),
        "other pod -> pod": (("B", APP, APP, f.a, 9080), ("inbound", f.dst(f.a, 9080))),
        "other pod -> excluded port": (("B", APP, APP, f.a, 15020), ("app", None)),
        "app -> localhost": (("A", APP, APP, f.lo, 9080), ("app", None)),
        "app -> own pod IP": (("A", APP, APP, f.a, 9080), ("app", None)),
        "proxy -> localhost": (("A", PROXY, PROXY, f.lo, 9080), ("app", None)),
        "proxy -> own pod IP": (("A", PROXY, PROXY, f.a, 9080), ("inbound", f.dst(f.a, 9080))),
    }
    got = {name: landed(lab, pods, f, case) for name, (case, _) in cases.items()}
    assert got == {name: outcome for name, (_, outcome) in cases.items()}

    remove(a)
    remove(a)  # idempotent
    saved = iptables_save(lab, a)
    assert "ISTIO" not in saved, saved
    after = {
        "app -> other pod": (("A", APP, APP, f.b, 9080), ("remote", None)),
        "other pod -> pod": (("B", APP, APP, f.a, 9080), ("app", None)),
    }
    got = {name: landed(lab, pods, f, case) for name, (case, _) in after.items()}
    assert got == {name: outcome for name, (_, outcome) in after.items()}


def test_install_replaces_and_leaves_other_rules(lab: Lab, pods: tuple[str, str]):
    """A second install replaces the first (one set of rules, not two); remove() leaves
    rules that are not Istio's."""
    a, _ = pods
    other = "*nat\n:KEEP - [0:0]\n-A OUTPUT -p udp -j KEEP\n-A KEEP -p udp -j RETURN\nCOMMIT\n"
    p = lab.spawn(["iptables-restore", "--noflush"], netns=a, stdin=subprocess.PIPE)
    _, stderr = p.communicate(other, timeout=30)
    assert p.returncode == 0, stderr
    install(a, SEED)
    install(a, CaptureConfig(include_outbound_cidrs=ALL, include_inbound_ports=(9080,)))
    saved = iptables_save(lab, a)
    assert saved.count("-j ISTIO_INBOUND") == 2 and saved.count("-j ISTIO_OUTPUT") == 2, saved
    assert "--dport 15090" not in saved and "--dport 9080 -j ISTIO_IN_REDIRECT" in saved
    remove(a)
    saved = iptables_save(lab, a)
    assert "ISTIO" not in saved
    assert "-A OUTPUT -p udp -j KEEP" in saved and "-A KEEP -p udp -j RETURN" in saved


def test_cli_install_remove_and_errors(lab: Lab):
    meshaccel = os.path.join(os.path.dirname(sys.executable), "meshaccel")
    ns = lab.pod("app", lab.node(), "10.244.1.10")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([meshaccel, "iptables", *args], capture_output=True, text=True)

    r = cli(
        "install",
        "--netns",
        ns,
        "--annotation",
        "traffic.sidecar.istio.io/excludeOutboundPorts=5555",
    )
    assert r.returncode == 0, r.stderr
    saved = iptables_save(lab, ns)
    assert "-A ISTIO_OUTPUT -p tcp -m tcp --dport 5555 -j RETURN" in saved
    assert "REDIRECT --to-ports 15001" in saved
    assert cli("remove", "--netns", ns).returncode == 0
    assert "ISTIO" not in iptables_save(lab, ns)
    for args, message in [
        (("install", "--netns", "ma-nope"), "netns 'ma-nope' not found"),
        (("install", "--netns", ns, "--istio-iptables-args", "-b 99999"), "-b"),
        (("remove", "--netns", "/proc/1/ns/net"), "give a name under /var/run/netns"),
    ]:
        r = cli(*args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
