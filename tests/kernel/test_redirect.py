"""The app<->sidecar hop takes the sk_msg path: counters equal the bytes moved, and
pods that use identical 127.0.0.1 4-tuples don't get each other's data."""

from __future__ import annotations

import json
import subprocess

import pytest

from meshaccel.datapath import doctor, pods
from meshaccel.datapath.loader import status
from meshaccel.datapath.pins import read_counters
from tests.kernel.peer import payload_sha

PROXY = 15001


@pytest.mark.parametrize(
    "sidecar_addr,dst",
    [("127.0.0.1", "10.244.1.30"), ("::1", "fd00:244::30"), ("127.0.0.1", "::ffff:10.244.1.30")],
)
def test_redirected_bytes_equal_bytes_sent(lab, sidecar_addr, dst):
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10", "fd00:244::10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(ns,))
    sent, reply = 3 * 1024 * 1024 + 7, 1024 * 1024 + 3
    sidecar = lab.listener(sidecar_addr, PROXY, "--reply-bytes", reply, netns=ns, cgroup=cg)
    before = read_counters(bpffs)

    app = lab.run_peer("connect", dst, 9080, "--send-bytes", sent, netns=ns, cgroup=cg)
    [rec] = lab.records(sidecar)
    after = read_counters(bpffs)

    assert rec["bytes"] == sent and rec["sha256"] == app["sent_sha256"]
    assert app["received"] == reply and app["received_sha256"] == payload_sha(reply, 2)
    assert after["sock_inserted"] - before["sock_inserted"] == 2  # app's and sidecar's
    assert after["msg_redirected_bytes"] - before["msg_redirected_bytes"] == sent + reply
    assert after["msg_fallback_bytes"] == before["msg_fallback_bytes"]


def test_pods_with_identical_loopback_tuples_stay_apart(lab):
    """Two pods, each app bound to 127.0.0.1:40000 talking to its own 127.0.0.1:15001 at
    the same time: the same 4-tuple twice; the netns cookie in the key keeps them apart."""
    node = lab.node()
    cg = lab.cgroup()
    pods = [lab.pod(f"p{i}", node, f"10.244.1.{11 + i}") for i in range(2)]
    bpffs = lab.attach(cg, pods=tuple(pods))
    sidecars = [lab.listener("127.0.0.1", PROXY, netns=ns, cgroup=cg) for ns in pods]
    sizes = [2 * 1024 * 1024, 2 * 1024 * 1024 + 1]
    before = read_counters(bpffs)

    apps = [
        lab.peer(
            "connect",
            "10.244.1.99",
            9080,
            "--bind",
            "127.0.0.1:40000",
            "--hold",
            "--send-bytes",
            size,
            "--seed",
            10 + i,
            netns=ns,
            cgroup=cg,
            stdin=subprocess.PIPE,
        )
        for i, (ns, size) in enumerate(zip(pods, sizes, strict=True))
    ]
    for app in apps:  # both connections established at once, with the same 4-tuple
        assert json.loads(app.stdout.readline())["local"] == "127.0.0.1:40000"
    assert status(bpffs)["maps"]["sock_hash"]["entries"] == 4
    for app in apps:
        app.stdin.write("go\n")
        app.stdin.flush()
    results = [lab.records(a)[-1] for a in apps]
    records = [lab.records(s)[0] for s in sidecars]
    after = read_counters(bpffs)

    for i in range(2):
        assert results[i]["local"] == "127.0.0.1:40000"
        assert records[i]["bytes"] == sizes[i]
        assert records[i]["sha256"] == payload_sha(sizes[i], 10 + i)
    assert after["msg_redirected_bytes"] - before["msg_redirected_bytes"] == sum(sizes)


@pytest.mark.parametrize("shortcut", [True, False])
def test_blocking_apps_get_every_byte(lab, shortcut):
    """Apps reading plain blocking sockets, many short connections with 1 MiB replies.
    Every byte arrives either way. Without the shortcut no recv() fails with EAGAIN and no
    socket enters the sockhash, while capture and SO_ORIGINAL_DST work as before. (With
    it, the kernel's sockmap recvmsg may return EAGAIN on a spurious wake-up: counted,
    retried, and documented in the README.)"""
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(ns,), shortcut=shortcut)
    conns, reply = 50, 1 << 20
    sidecar = lab.listener(
        "127.0.0.1", PROXY, "--conns", conns, "--reply-bytes", reply, netns=ns, cgroup=cg
    )
    before = read_counters(bpffs)
    app = lab.run_peer(
        "blocking", "10.244.1.30", 9080, "--conns", conns, "--send-bytes", 1000,
        "--expect-bytes", reply,
        netns=ns, cgroup=cg, timeout=120,
    )  # fmt: skip
    records = lab.records(sidecar)
    after = read_counters(bpffs)
    delta = {k: after[k] - before[k] for k in after}

    assert app.get("replies") == [[reply, payload_sha(reply, 2)]], app
    assert [r["orig_dst"] for r in records] == ["10.244.1.30:9080"] * conns
    assert delta["connect_captured"] == delta["orig_dst_answered"] == conns
    if shortcut:
        assert delta["sock_inserted"] == 2 * conns
        assert delta["msg_redirected_bytes"] == conns * (1000 + reply)
    else:
        assert delta["sock_inserted"] == 0 and delta["msg_redirected"] == 0
        assert app["eagain"] == 0
    print(f"shortcut={shortcut}: {app['eagain']} EAGAIN ({app['where']}) in {conns} conns")
    maps = status(bpffs)["maps"]
    assert maps["orig_dst_by_sock"]["entries"] == 0 and maps["sock_hash"]["entries"] == 0


@pytest.mark.parametrize(
    "annotation,kept_off",
    [
        ("meshaccel.io/shortcut=false", (9080, 9081)),
        ("meshaccel.io/shortcut-exclude-ports=9080", (9080,)),
    ],
)
def test_a_pod_keeps_its_app_sockets_off_the_shortcut(lab, annotation, kept_off):
    """A pod's own setting: its app's connections to the ports kept off (every port, or
    the listed ones) are captured as before but stay loopback TCP, and a blocking reader
    never sees EAGAIN there; other ports take the shortcut."""
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10")
    cg = lab.cgroup()
    bpffs = lab.attach(cg)
    key, value = annotation.split("=")
    lab.register(bpffs, ns, annotations={key: value})
    [listed] = pods.list_pods(bpffs)
    assert listed["shortcut"] == ("off" if value == "false" else "default except ports 9080")
    conns, reply = 20, 1 << 20
    for port in (9080, 9081):
        sidecar = lab.listener(
            "127.0.0.1", PROXY, "--conns", conns, "--reply-bytes", reply, netns=ns, cgroup=cg
        )
        before = read_counters(bpffs)
        app = lab.run_peer(
            "blocking", "10.244.1.30", port, "--conns", conns, "--send-bytes", 1000,
            "--expect-bytes", reply, netns=ns, cgroup=cg, timeout=120,
        )  # fmt: skip
        records = lab.records(sidecar)
        after = read_counters(bpffs)
        delta = {k: after[k] - before[k] for k in after}

        assert app.get("replies") == [[reply, payload_sha(reply, 2)]], app
        assert [r["orig_dst"] for r in records] == [f"10.244.1.30:{port}"] * conns
        assert delta["connect_captured"] == conns
        if port in kept_off:
            assert delta["sock_inserted"] == delta["msg_redirected"] == 0, delta
            assert delta["sock_kept_off_by_pod"] == 2 * conns, delta
            assert app["eagain"] == 0, app
        else:
            assert delta["sock_inserted"] == 2 * conns, delta
            assert delta["msg_redirected_bytes"] == conns * (1000 + reply), delta
    assert "shortcut" not in str(pods.remove(bpffs, "10.244.1.10"))
    assert status(bpffs)["maps"]["pod_shortcut"]["entries"] == 0


@pytest.mark.parametrize(
    "annotated,annotation,kept_off",
    [
        ("server", "meshaccel.io/shortcut=none", (9080, 9081)),
        ("caller", "meshaccel.io/shortcut=none", (9080, 9081)),
        ("server", "meshaccel.io/shortcut-exclude-ports=9080", (9080,)),
        ("server", "meshaccel.io/shortcut=false", ()),  # apps only: the sidecar hop stays
    ],
)
def test_a_pod_keeps_its_sidecar_hops_off_the_shortcut(lab, annotated, annotation, kept_off):
    """A sidecar calling a pod on this node: by default both ends take the shortcut, and
    then nothing slows the caller down when the server's app stops reading (the bytes
    queue in the server sidecar's socket). A pod at either end that says "none", or the
    port excluded, keeps that hop on loopback TCP (with its backpressure); "false" keeps
    only the pod's app hops off. Every byte either way, the destination unchanged."""
    node = lab.node()
    caller, server = lab.pod("a", node, "10.244.1.10"), lab.pod("b", node, "10.244.1.20")
    cg = lab.cgroup()
    bpffs = lab.attach(cg)
    marked = {"caller": caller, "server": server}[annotated]
    key, value = annotation.split("=")
    for ns in (caller, server):
        lab.register(bpffs, ns, annotations={key: value} if ns == marked else {})
    shown = {p["name"]: p["shortcut"] for p in pods.list_pods(bpffs)}
    want = {"none": "none", "false": "off"}.get(value, "default except ports 9080")
    assert shown == {caller: "default", server: "default", marked: want}, shown
    reply = 300_000
    for port in (9080, 9081):
        inbound = lab.listener("0.0.0.0", 15006, "--reply-bytes", reply,
                               netns=server, cgroup=cg, uid=1337)  # fmt: skip
        before = read_counters(bpffs)
        rec = lab.run_peer("connect", "10.244.1.20", port, "--send-bytes", 1 << 20,
                           netns=caller, cgroup=cg, uid=1337)  # fmt: skip
        [got] = lab.records(inbound)
        after = read_counters(bpffs)
        delta = {k: after[k] - before[k] for k in after}
        assert got["orig_dst"] == f"10.244.1.20:{port}", got
        assert got["sha256"] == rec["sent_sha256"] and got["bytes"] == 1 << 20, (got, rec)
        assert rec["received_sha256"] == payload_sha(reply, 2), rec
        assert delta["connect_sidecar_to_pod"] == 1, delta
        if port in kept_off:
            assert delta["sock_inserted"] == delta["msg_redirected"] == 0, delta
            assert delta["sock_kept_off_by_pod"] == 2, delta
        else:
            assert delta["sock_inserted"] == 2 and delta["sock_kept_off_by_pod"] == 0, delta
            assert delta["msg_redirected_bytes"] == (1 << 20) + reply, delta


def test_by_default_only_sidecar_to_sidecar_sockets_take_the_shortcut(lab):
    """attach's defaults: an app's connection is captured as before (original destination
    and every byte intact) but its sockets stay off the shortcut, so the app sees plain
    TCP; a sidecar's call to a pod on this node takes it; a pod whose annotation opts its
    app in gets the shortcut for its app's connections."""
    node = lab.node()
    app, server = lab.pod("app", node, "10.244.1.10"), lab.pod("srv", node, "10.244.1.20")
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(app, server), app_shortcut=False)
    config = status(bpffs)["config"]
    assert config["shortcut"] and not config["app_shortcut"], config
    assert {p["shortcut"] for p in pods.list_pods(bpffs)} == {"default"}
    assert doctor.check_shortcut(bpffs).detail.endswith("apps keep plain TCP")

    def call(netns: str, dst: str, uid: int | None = None) -> dict[str, int]:
        """One connection, 1 MiB out and 300 kB back through a sidecar listener; the
        counters' change."""
        where = (server, 15006) if uid else (app, PROXY)
        sidecar = lab.listener("0.0.0.0", where[1], "--reply-bytes", 300_000,
                               netns=where[0], cgroup=cg, uid=1337)  # fmt: skip
        before = read_counters(bpffs)
        rec = lab.run_peer("connect", dst, 9080, "--send-bytes", 1 << 20,
                           netns=netns, cgroup=cg, uid=uid)  # fmt: skip
        [got] = lab.records(sidecar)
        after = read_counters(bpffs)
        assert got["orig_dst"] == f"{dst}:9080", got
        assert got["sha256"] == rec["sent_sha256"] and got["bytes"] == 1 << 20, (got, rec)
        assert rec["received_sha256"] == payload_sha(300_000, 2), rec
        return {k: after[k] - before[k] for k in after}

    delta = call(app, "10.244.1.30")  # the app's outbound call, to its sidecar
    assert delta["connect_captured"] == 1, delta
    assert delta["sock_inserted"] == delta["msg_redirected"] == 0, delta
    assert delta["sock_kept_off_app"] == 2 and delta["sock_kept_off_by_pod"] == 0, delta

    delta = call(app, "10.244.1.20", uid=1337)  # the sidecar calls the server pod's
    assert delta["connect_sidecar_to_pod"] == 1 and delta["sock_inserted"] == 2, delta
    assert delta["msg_redirected_bytes"] == (1 << 20) + 300_000, delta

    lab.register(bpffs, app, annotations={"meshaccel.io/shortcut": "true"})
    assert {p["name"]: p["shortcut"] for p in pods.list_pods(bpffs)}[app] == "apps"
    assert doctor.check_shortcut(bpffs).detail.endswith(f"but for 1 pod(s) that opt in: {app}")
    delta = call(app, "10.244.1.30")
    assert delta["sock_inserted"] == 2 and delta["sock_kept_off_app"] == 0, delta
    assert delta["msg_redirected_bytes"] == (1 << 20) + 300_000, delta
