"""attach/detach: idempotent, all-or-nothing, and detach works from any later process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from meshaccel.datapath import bpfsys, loader
from meshaccel.datapath.pins import Pins, read_counters
from meshaccel.datapath.programs import PROGRAMS
from meshaccel.errors import MeshaccelError
from tests.kernel.lab import ours_on

ALL = sorted(p.func for p in PROGRAMS if p.hook == "cgroup")


@pytest.fixture
def pod(lab):
    node = lab.node()
    ns = lab.pod("app", node, "10.244.1.10")
    server_ns = lab.pod("srv", node, "10.244.1.20")
    return ns, server_ns, lab.cgroup()


def test_detach_restores_plain_behaviour(lab, pod):
    ns, server_ns, cg = pod
    bpffs = lab.attach(cg, pods=(ns,))
    sidecar = lab.listener("127.0.0.1", 15001, netns=ns, cgroup=cg)
    lab.run_peer("connect", "10.244.1.20", 9080, "--send-bytes", 10, netns=ns, cgroup=cg)
    assert lab.records(sidecar)[0]["orig_dst"] == "10.244.1.20:9080"

    loader.detach(bpffs=bpffs)
    assert ours_on(cg) == [] and not os.path.exists(bpffs)
    server = lab.listener("0.0.0.0", 9080, netns=server_ns)
    app = lab.run_peer("connect", "10.244.1.20", 9080, "--send-bytes", 10, netns=ns, cgroup=cg)
    assert app["peer"] == "10.244.1.20:9080"
    assert lab.records(server)[0]["bytes"] == 10


def test_detach_with_bytes_in_flight_on_the_shortcut_loses_nothing(lab, pod):
    """Detach while an app streams to a slow sidecar over the shortcut: the bytes queued
    socket to socket and every byte sent after (now over loopback TCP) arrive, in order."""
    ns, _, cg = pod
    bpffs = lab.attach(cg, pods=(ns,))
    sidecar = lab.listener("127.0.0.1", 15001, "--slow-for", 3, netns=ns, cgroup=cg)
    size = 256 << 20
    app = lab.peer("connect", "10.244.1.20", 9080, "--send-bytes", size, netns=ns, cgroup=cg)
    # detach once more has been redirected than the slow reader can have taken (64 KiB
    # per 50 ms): the rest waits in its queue. Polled, not slept: under emulation the app
    # takes seconds to start, and a detach before its connect tests nothing.
    deadline = time.monotonic() + 60
    while (redirected := read_counters(bpffs)["msg_redirected_bytes"]) <= 4 << 20:
        assert time.monotonic() < deadline and app.poll() is None, (redirected, app.poll())
        time.sleep(0.05)
    loader.detach(bpffs=bpffs)
    [rec] = lab.records(sidecar, timeout=120)
    [result] = lab.records(app, timeout=120)

    assert rec["bytes"] == size and rec["sha256"] == result["sent_sha256"], (rec, result)
    assert rec["orig_dst"] == "10.244.1.20:9080"


def test_attach_detach_attach_is_idempotent(lab, pod):
    _, _, cg = pod
    bpffs = lab.attach(cg)
    assert "already attached" in loader.attach(cg, bpffs=bpffs, proxy_port=15002)
    assert ours_on(cg) == ALL
    assert "-p 15002 " in loader.status(bpffs)["config"]["default_istio_iptables_args"]

    assert "detached" in loader.detach(bpffs=bpffs)
    assert "nothing attached" in loader.detach(bpffs=bpffs)
    assert ours_on(cg) == []

    loader.attach(cg, bpffs=bpffs)
    assert ours_on(cg) == ALL and loader.status(bpffs)["attached"]


def test_attach_to_a_second_cgroup_is_refused(lab, pod):
    _, _, cg = pod
    bpffs = lab.attach(cg)
    other = lab.cgroup("other")
    with pytest.raises(MeshaccelError, match="already attached to"):
        loader.attach(other, bpffs=bpffs)
    assert ours_on(other) == [] and ours_on(cg) == ALL


@pytest.mark.parametrize("fail_at", [1, 3, len([p for p in PROGRAMS if p.hook != "netns"])])
def test_attach_failing_half_way_leaves_nothing(lab, pod, monkeypatch, fail_at):
    """A real attach whose fail_at-th kernel attach call fails: everything is undone."""
    _, _, cg = pod
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)  # in case the undo itself fails, teardown still detaches
    real = bpfsys.prog_attach
    calls = []

    def flaky(*args):
        calls.append(args)
        if len(calls) == fail_at:
            raise OSError(28, "injected failure")
        real(*args)

    monkeypatch.setattr(bpfsys, "prog_attach", flaky)
    with pytest.raises(MeshaccelError, match="injected failure"):
        loader.attach(cg, bpffs=bpffs)
    assert len(calls) == fail_at
    assert ours_on(cg) == []
    assert not os.path.exists(bpffs)


def test_detach_from_new_process_after_attacher_was_killed(lab, pod):
    ns, _, cg = pod
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)
    code = (
        "import sys, time; from meshaccel.datapath import loader; "
        f"loader.attach({cg!r}, bpffs={bpffs!r}); print('attached', flush=True); time.sleep(60)"
    )
    attacher = lab.spawn([sys.executable, "-c", code])
    assert attacher.stdout.readline().strip() == "attached", attacher.stderr.read()
    attacher.kill()
    attacher.wait(10)
    lab.register(bpffs, ns)  # (from this process, as `meshaccel pod add` would)

    # still capturing without the process that attached
    sidecar = lab.listener("127.0.0.1", 15001, netns=ns, cgroup=cg)
    lab.run_peer("connect", "10.244.1.20", 9080, netns=ns, cgroup=cg)
    assert lab.records(sidecar)[0]["orig_dst"] == "10.244.1.20:9080"

    meshaccel = os.path.join(os.path.dirname(sys.executable), "meshaccel")
    out = subprocess.run(
        [meshaccel, "detach", "--bpffs", bpffs], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert ours_on(cg) == [] and not os.path.exists(bpffs)


def test_detach_by_name_when_pins_are_gone(lab, pod):
    """Pins removed by hand (or bpffs remounted): --cgroup finds the programs by name."""
    _, _, cg = pod
    bpffs = lab.attach(cg)
    for path in Pins(bpffs).present():
        os.unlink(path)
    os.rmdir(bpffs)
    assert ours_on(cg) == ALL
    msg = loader.detach(cgroup=cg, bpffs=bpffs)
    assert f"detached {len(ALL)} meshaccel program(s)" in msg
    assert ours_on(cg) == []
