"""Outbound capture (connect4/6) and SO_ORIGINAL_DST (getsockopt) on real sockets."""

from __future__ import annotations

import pytest

PROXY = 15001


@pytest.fixture
def pod(lab):
    """One pod netns on a node bridge, a cgroup with the datapath attached."""
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10", "fd00:244::10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg)
    return ns, cg, bpffs


@pytest.mark.parametrize(
    "listen_addr,dst,expected",
    [
        ("127.0.0.1", "10.244.1.20", "10.244.1.20:9080"),
        ("::1", "fd00:244::20", "[fd00:244::20]:9080"),
    ],
)
def test_connect_lands_on_sidecar_with_original_dst(lab, pod, listen_addr, dst, expected):
    ns, cg, bpffs = pod
    sidecar = lab.listener(listen_addr, PROXY, netns=ns, cgroup=cg)
    app = lab.run_peer("connect", dst, 9080, "--send-bytes", 1000, netns=ns, cgroup=cg)
    assert "error" not in app, app
    [rec] = lab.records(sidecar)
    assert rec["orig_dst"] == expected
    assert rec["bytes"] == 1000 and rec["sha256"] == app["sent_sha256"]
