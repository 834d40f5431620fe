"""The datapath beside Istio's own nat rules (istio-init's REDIRECT), where the parity
matrix (test_parity.py) does not reach: a NAT that moves the destination address too."""

from __future__ import annotations

from pyroute2 import NetNS

from meshaccel.datapath import iptables_mode
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS, parse_istio_args
from meshaccel.datapath.pins import read_counters

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
