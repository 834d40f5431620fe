"""Outbound capture (connect4/6) and SO_ORIGINAL_DST (getsockopt) on real sockets."""

from __future__ import annotations

import sys

import pytest

PROXY = 15001


@pytest.fixture
def pod(lab):
    """One pod netns on a node bridge, a cgroup with the datapath attached."""
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10", "fd00:244::10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(ns,))
    return ns, cg, bpffs


@pytest.mark.parametrize(
    "listen_addr,dst,expected",
    [
        ("127.0.0.1", "10.244.1.20", "10.244.1.20:9080"),
        ("::1", "fd00:244::20", "[fd00:244::20]:9080"),
        # an AF_INET6 socket to a v4-mapped address is IPv4 on the wire: v4 sidecar
        ("127.0.0.1", "::ffff:10.244.1.20", "10.244.1.20:9080"),
    ],
)
def test_connect_lands_on_sidecar_with_original_dst(lab, pod, listen_addr, dst, expected):
    ns, cg, bpffs = pod
    sidecar = lab.listener(listen_addr, PROXY, netns=ns, cgroup=cg)
    app = lab.run_peer("connect", dst, 9080, "--send-bytes", 1000, netns=ns, cgroup=cg)
    assert "error" not in app, app
    [rec] = lab.records(sidecar)
    assert rec["orig_dst"] == expected
    # the app sees the peer it connected to (getpeername), as after a NAT REDIRECT
    assert app["peer"] == f"{dst}:9080" and listen_addr in app["local"]
    assert rec["bytes"] == 1000 and rec["sha256"] == app["sent_sha256"]


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.mark.parametrize(
    "case",
    ["proxy_uid", "loopback", "outside_cgroup", "udp"],
)
def test_not_captured(lab, pod, case):
    """These connections go where they were sent, and the counters say why."""
    from meshaccel.datapath.pins import read_counters

    ns, cg, bpffs = pod
    # a real destination in a second pod, and a decoy sidecar that must see nothing
    server_ns = lab.pod("srv", lab.netns[0], "10.244.1.20")
    server = lab.listener("0.0.0.0", 9080, netns=server_ns)
    sidecar = lab.listener("127.0.0.1", PROXY, netns=ns, cgroup=cg)
    before = read_counters(bpffs)

    where = {"netns": ns, "cgroup": cg}
    dst = "10.244.1.20"
    if case == "proxy_uid":
        where["uid"] = 1337
    elif case == "outside_cgroup":
        where["cgroup"] = None
    elif case == "loopback":
        dst = "127.0.0.1"
        local = lab.listener("127.0.0.1", 9080, netns=ns, cgroup=cg)
    args = ["connect", dst, 9080, "--send-bytes", 100] + (["--udp"] if case == "udp" else [])
    app = lab.run_peer(*args, **where)
    assert "error" not in app, app
    assert app["peer"] == f"{dst}:9080"

    after = read_counters(bpffs)
    expected = {
        "proxy_uid": "connect_skipped_proxy_uid",
        "loopback": "connect_skipped_local",
        "udp": "connect_skipped_not_tcp",
        "outside_cgroup": None,
    }[case]
    delta = _delta(before, after)
    assert "connect_captured" not in delta
    if expected:
        assert delta[expected] == 1, delta
    else:
        assert not delta, delta  # the programs never ran for this process

    if case in ("proxy_uid", "outside_cgroup"):
        [rec] = lab.records(server)
        assert rec["bytes"] == 100 and rec["orig_dst"].startswith("error:")
    if case == "loopback":
        [rec] = lab.records(local)
        assert rec["bytes"] == 100
    sidecar.kill()
    assert sidecar.stdout.read() == "", "the sidecar must not have seen a connection"


def test_sockopts_we_do_not_handle_are_untouched(lab, pod):
    """getsockopt of other options, and SO_ORIGINAL_DST on a connection that was not
    captured, answer as the kernel does without meshaccel."""
    from meshaccel.datapath.pins import read_counters

    ns, cg, bpffs = pod
    sidecar = lab.listener("127.0.0.1", PROXY, netns=ns, cgroup=cg)
    before = read_counters(bpffs)
    lab.run_peer("connect", "127.0.0.1", PROXY, netns=ns, cgroup=cg)  # direct: not captured
    [rec] = lab.records(sidecar)
    assert rec["orig_dst"] == "error:2"  # ENOENT, as without conntrack state
    assert read_counters(bpffs)["orig_dst_not_found"] - before["orig_dst_not_found"] == 1

    # (Python's getsockopt caps buflen at 1024: ask libc for a buffer over one page)
    code = (
        "import ctypes, socket; s = socket.socket(); libc = ctypes.CDLL(None); "
        "buf = ctypes.create_string_buffer(3 * 4096); n = ctypes.c_uint32(len(buf)); "
        "rc = libc.getsockopt(s.fileno(), socket.SOL_SOCKET, socket.SO_RCVBUF, buf, "
        "ctypes.byref(n)); "
        "print(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), rc, n.value, "
        "len(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)))"
    )
    outside = lab.spawn([sys.executable, "-c", code], netns=ns).communicate(timeout=30)[0]
    inside = lab.spawn([sys.executable, "-c", code], netns=ns, cgroup=cg).communicate(timeout=30)
    assert inside[0] == outside and outside.split()[1:3] == ["0", "4"], (inside, outside)


def test_original_dst_outlives_an_app_that_already_closed(lab, pod):
    """connect, send, close before the sidecar accepted: the sidecar still learns where
    the app wanted to go; the entry goes once the sidecar's end closes."""
    from meshaccel.datapath.loader import status

    ns, cg, bpffs = pod
    sidecar = lab.listener("127.0.0.1", PROXY, "--accept-delay", 1, netns=ns, cgroup=cg)
    app = lab.run_peer("connect", "10.244.1.20", 9080, "--send-bytes", 500, netns=ns, cgroup=cg)
    assert "error" not in app
    [rec] = lab.records(sidecar)  # accepted after the app process had exited
    assert rec["orig_dst"] == "10.244.1.20:9080" and rec["bytes"] == 500
    maps = status(bpffs)["maps"]
    assert maps["orig_dst_by_sock"]["entries"] == 0
    assert maps["orig_dst_by_cookie"]["entries"] == 0
