"""attach over a datapath built from another source replaces every program in place:
cgroup programs in their slots, the pod's sk_lookup link, sk_msg on sock_hash; a
connection on the shortcut across the replace keeps flowing; new connections are captured
and shortcut by the new programs. A build this release cannot serve is refused, unchanged.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import NetNS

from meshaccel.datapath import bpfsys, loader, pods
from meshaccel.datapath.pins import Pins, pinned_tags, read_counters, read_record
from meshaccel.datapath.programs import PROGRAMS
from meshaccel.errors import MeshaccelError
from tests.kernel.lab import fresh_tags, ours_on, prog_ids
from tests.kernel.peer import payload_sha
from tests.wait import wait_for

APP_IP, DST = "10.244.1.10", "10.244.1.20"
SECOND_IP = "10.244.1.30"  # an address of the app pod's besides its pod IP
CGROUP_HOOKS = sorted(p.func for p in PROGRAMS if p.hook == "cgroup")


def changed_copy(dest: Path) -> Path:
    """bpf/ with a harmless change in every program (an unused helper call first thing):
    another source, other tags, the same maps."""
    shutil.copytree(loader.BPF_DIR, dest)
    for c in dest.glob("*.c"):
        text, n = re.subn(
            r"^(int ma_\w+\([^)]*\)\n\{\n)",
            r"\1\tbpf_ktime_get_ns(); /* another build */\n",
            c.read_text(),
            flags=re.M,
        )
        assert n, c
        c.write_text(text)
    return dest


def edit(path: Path, old: str, new: str) -> None:
    """Replace the one occurrence of old in the file at path (a build made to differ)."""
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


def link_prog_id(link_pin: str) -> int:
    """The program a pinned BPF link runs (struct bpf_link_info: type, id, prog_id)."""
    info = (ctypes.c_uint32 * 3)()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    fd = bpfsys.obj_get(link_pin)
    try:
        ret = bpfsys.lib().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size))
        assert ret == 0, ret
    finally:
        os.close(fd)
    return info[2]


def map_id(pin: str) -> int:
    fd = bpfsys.obj_get(pin)
    try:
        return bpfsys.map_info(fd).id
    finally:
        os.close(fd)


def wait_gone(map_id: int, timeout: float = 10) -> bool:
    """Whether the kernel freed map map_id within timeout (it frees maps asynchronously)."""
    get = bpfsys.lib().bpf_map_get_fd_by_id
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fd = get(map_id)
        if fd < 0:
            return True
        os.close(fd)
        time.sleep(0.1)
    return False


def held_connection(lab, ns: str, cg: str, size: int, seed: int = 7):
    """A captured connection from the pod's app to its sidecar (a listener on 15001),
    established (both ends on the shortcut) and held until go() sends size bytes."""
    sidecar = lab.listener("127.0.0.1", 15001, netns=ns, cgroup=cg)
    app = lab.peer(
        "connect", DST, 9080, "--hold", "--send-bytes", size, "--seed", seed,
        netns=ns, cgroup=cg, stdin=subprocess.PIPE,
    )  # fmt: skip
    assert json.loads(app.stdout.readline())["connected"] is True

    def go() -> tuple[dict, dict]:
        app.stdin.write("go\n")
        app.stdin.flush()
        [rec] = lab.records(sidecar, timeout=120)
        [res] = lab.records(app, timeout=120)
        return rec, res

    return go


def assert_new_connections_on_the_shortcut(
    lab, bpffs: str, ns: str, cg: str, shortcut: bool = True
) -> None:
    """A new connection from the pod's app to its sidecar is captured, carries every
    byte, and takes the shortcut (shortcut=False: does not, both ends kept off it)."""
    size = 1 << 20
    sidecar = lab.listener("127.0.0.1", 15001, netns=ns, cgroup=cg)
    before = read_counters(bpffs)
    res = lab.run_peer("connect", DST, 9080, "--send-bytes", size, netns=ns, cgroup=cg)
    [rec] = lab.records(sidecar)
    after = read_counters(bpffs)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert rec["orig_dst"] == f"{DST}:9080" and res["peer"] == f"{DST}:9080", (rec, res)
    assert rec["bytes"] == size and rec["sha256"] == payload_sha(size, 1)
    assert delta["connect_captured"] == 1 and delta["orig_dst_answered"] == 1, delta
    if shortcut:
        assert delta["sock_inserted"] == 2 and delta["sock_insert_failed"] == 0, delta
        assert delta["msg_redirected_bytes"] == size and delta["msg_fallback_bytes"] == 0, delta
    else:
        assert delta["sock_inserted"] == 0 and delta["msg_redirected_bytes"] == 0, delta


@pytest.fixture
def pod(lab):
    node = lab.node()
    ns = lab.pod("app", node, APP_IP)
    lab.pod("dst", node, DST)
    return ns, lab.cgroup()


@pytest.mark.parametrize(
    "cflags", [[], ["-DMA_MAX_CONNS=4096"]], ids=["same-maps", "per-connection-maps-resized"]
)
def test_attach_replaces_every_program_in_place(lab, pod, tmp_path, cflags):
    ns, cg = pod
    old_dir = changed_copy(tmp_path / "bpf")
    bpffs = lab.attach(cg, pods=(ns,), bpf_dir=old_dir, cflags=cflags)
    [link] = Pins(bpffs).links()
    size = 8 << 20
    go = held_connection(lab, ns, cg, size)
    old_ids, old_tags = prog_ids(bpffs), pinned_tags(Pins(bpffs))
    assert loader.status(bpffs)["maps"]["sock_hash"]["entries"] == 2
    assert loader.status(bpffs)["datapath"]["matches"] is False

    old_sock_hash = map_id(Pins(bpffs).map("sock_hash"))
    summary = loader.attach(cg, bpffs=bpffs, app_shortcut=True)

    assert summary.startswith("replaced datapath 0."), summary
    new_ids, new_tags = prog_ids(bpffs), pinned_tags(Pins(bpffs))
    assert new_tags == fresh_tags(), "not what a fresh attach of this source runs"
    for name in old_ids:
        assert new_ids[name] != old_ids[name] and new_tags[name] != old_tags[name], name
    # one program per hook, no duplicate, in the same place; the pod's link runs the new one
    assert ours_on(cg) == CGROUP_HOOKS
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog in (p for p in PROGRAMS if p.hook == "cgroup"):
            assert bpfsys.prog_query(fd, prog.attach_type) == [new_ids[prog.name]], prog
    finally:
        os.close(fd)
    assert link_prog_id(link) == new_ids["sk_lookup"]
    st = loader.status(bpffs)
    assert st["attached"] and st["datapath"]["matches"], st["datapath"]
    assert [p["name"] for p in pods.list_pods(bpffs)] == [ns]  # the pod carried over

    # the connection held across the replace: every byte, in order
    rec, res = go()
    assert "error" not in res, res
    assert rec["bytes"] == size and rec["sha256"] == res["sent_sha256"] == payload_sha(size, 7)
    assert rec["orig_dst"] == f"{DST}:9080", rec
    if cflags:
        # the old sock_hash lived on (unpinned) for the held connection's sockets, and
        # goes once they closed and with them its sk_msg program, which held it
        assert map_id(Pins(bpffs).map("sock_hash")) != old_sock_hash
        assert wait_gone(old_sock_hash), f"map {old_sock_hash} outlived its last socket"
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg)

    if not cflags:  # and back (a downgrade is the same operation)
        summary = loader.attach(cg, bpffs=bpffs, app_shortcut=True, bpf_dir=old_dir)
        assert summary.startswith("replaced datapath"), summary
        assert pinned_tags(Pins(bpffs)) == old_tags
        assert link_prog_id(link) == prog_ids(bpffs)["sk_lookup"]
        assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg)


def test_a_build_this_release_cannot_serve_is_refused_unchanged(lab, pod, tmp_path):
    """A source whose maps this release's userspace would misread (here a bigger struct
    ma_config) is refused in one line; the running datapath stays as it was."""
    ns, cg = pod
    bpffs = lab.attach(cg, pods=(ns,))
    bad = tmp_path / "bpf"
    shutil.copytree(loader.BPF_DIR, bad)
    edit(bad / "include" / "types.h", "__u32 shortcut;", "__u32 shortcut; __u32 extra;")
    ids, record = prog_ids(bpffs), read_record(Pins(bpffs))

    with pytest.raises(MeshaccelError) as err:
        loader.attach(cg, bpffs=bpffs, app_shortcut=True, bpf_dir=bad)

    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("refusing, nothing changed"), msg
    assert "config_map: 4->8 bytes, this release uses 4->4" in msg, msg
    assert prog_ids(bpffs) == ids and read_record(Pins(bpffs)) == record
    assert loader.status(bpffs)["datapath"]["matches"] is True
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg)


def test_a_swap_failing_half_way_puts_back_what_it_swapped(lab, pod, tmp_path, monkeypatch):
    """The kernel refuses the third cgroup swap: the two swapped before are swapped back,
    the pins, the record and the running programs are as before, and it says so in one
    line."""
    ns, cg = pod
    old_dir = changed_copy(tmp_path / "bpf")
    bpffs = lab.attach(cg, pods=(ns,), bpf_dir=old_dir)
    [link] = Pins(bpffs).links()
    ids, record = prog_ids(bpffs), read_record(Pins(bpffs))
    real, calls = bpfsys.prog_replace, []

    def flaky(new_fd: int, target_fd: int, attach_type: int, old_fd: int) -> None:
        calls.append(attach_type)
        if len(calls) == 3:
            raise OSError(16, "replace attached program: Device or resource busy")
        real(new_fd, target_fd, attach_type, old_fd)

    monkeypatch.setattr(bpfsys, "prog_replace", flaky)
    with pytest.raises(MeshaccelError) as err:
        loader.attach(cg, bpffs=bpffs, app_shortcut=True)
    monkeypatch.undo()

    msg = str(err.value)
    assert "\n" not in msg and "is unchanged" in msg and "put back" in msg, msg
    assert len(calls) == 3 + 2, calls  # the third failed; the first two swapped back
    assert prog_ids(bpffs) == ids and read_record(Pins(bpffs)) == record
    assert ours_on(cg) == CGROUP_HOOKS and link_prog_id(link) == ids["sk_lookup"]
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog in (p for p in PROGRAMS if p.hook == "cgroup"):
            assert bpfsys.prog_query(fd, prog.attach_type) == [ids[prog.name]], prog
    finally:
        os.close(fd)
    assert sorted(os.listdir(bpffs)) == sorted(os.path.basename(p) for p in Pins(bpffs).present())
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg)
    # and a later attach does it
    assert loader.attach(cg, bpffs=bpffs, app_shortcut=True).startswith("replaced datapath")
    assert pinned_tags(Pins(bpffs)) == fresh_tags()


def test_pods_carried_into_a_new_pod_map_keep_every_address(lab, pod, tmp_path):
    """A build whose pod_config differs (here its capacity) gets a new pod_config; the
    pods are registered into it again as they were: the same settings, under every
    address, the second interface's too (else an app's call to that address of its own
    would go to its sidecar instead of straight to the app, as before the replace)."""
    ns, cg = pod
    with NetNS(ns) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=SECOND_IP, prefixlen=24)
    old_dir = changed_copy(tmp_path / "bpf")
    line = "BPF_HASH(pod_config, struct ip_key, struct pod_config, MA_MAX_PODS);"
    edit(old_dir / "include" / "maps.h", line, line.replace("MA_MAX_PODS", "1000"))
    bpffs = lab.attach(cg, pods=(ns,), bpf_dir=old_dir)
    before = pods.registrations(bpffs)
    [reg] = before  # (and eth0's IPv6 link-local address)
    assert {APP_IP, SECOND_IP} < reg.addresses, reg

    summary = loader.attach(cg, bpffs=bpffs, app_shortcut=True)

    assert "pod_config" in summary, summary
    assert loader.status(bpffs)["maps"]["pod_config"]["capacity"] == 1024
    assert pods.registrations(bpffs) == before
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg)


def test_pods_own_settings_are_copied_into_new_maps(lab, pod, tmp_path):
    """A build whose pod_shortcut and pod_local_routes differ (here their capacity) gets
    new ones, each entry copied: a pod that keeps its sockets off the shortcut stays off
    it (else its app, which may stop reading, would be on it after the upgrade), and a
    prefix routed into a pod stays its own."""
    ns, cg = pod
    route = lab.spawn(["ip", "route", "add", "local", "10.77.0.0/24", "dev", "lo"], netns=ns)
    assert route.wait(10) == 0, route.stderr.read()
    old_dir = changed_copy(tmp_path / "bpf")
    for line in (
        "BPF_HASH(pod_shortcut, __u64, struct shortcut_policy, MA_MAX_PODS);",
        "BPF_LPM_TRIE(pod_local_routes, struct local_route_key, __u8, MA_MAX_PODS);",
    ):
        edit(old_dir / "include" / "maps.h", line, line.replace("MA_MAX_PODS", "1000"))
    bpffs = lab.attach(cg, bpf_dir=old_dir)
    lab.register(bpffs, ns, annotations={"meshaccel.io/shortcut": "none"})
    before = pods.registrations(bpffs)
    assert "10.77.0.0/24" in before[0].addresses
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg, shortcut=False)

    summary = loader.attach(cg, bpffs=bpffs, app_shortcut=True)

    maps = loader.status(bpffs)["maps"]
    for name in ("pod_shortcut", "pod_local_routes"):
        assert name in summary and maps[name]["capacity"] == 1024, (name, summary)
    assert pods.registrations(bpffs) == before
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg, shortcut=False)


def test_a_datapath_from_before_local_routes_learns_each_pods_prefixes(lab, pod, tmp_path):
    """Replacing a datapath from before pod_local_routes (whose connect4/6 counted no
    prefix routed into a pod as the pod's own) fills the new map from each registered
    pod's netns, as pod add would have: no pod add needed after the upgrade."""
    ns, cg = pod
    route = lab.spawn(["ip", "route", "add", "local", "10.77.0.0/24", "dev", "lo"], netns=ns)
    assert route.wait(10) == 0, route.stderr.read()
    old_dir = changed_copy(tmp_path / "bpf")
    edit(old_dir / "include" / "maps.h", "BPF_LPM_TRIE(pod_local_routes", "// (")
    edit(old_dir / "include" / "helpers.h", "pod_local_routes.lookup(&route) != 0", "0")
    bpffs = lab.attach(cg, pods=(ns,), bpf_dir=old_dir)
    assert not os.path.exists(Pins(bpffs).map("pod_local_routes"))
    [reg] = pods.registrations(bpffs)
    assert "10.77.0.0/24" not in reg.addresses

    summary = loader.attach(cg, bpffs=bpffs, app_shortcut=True)

    assert "pod_local_routes" in summary, summary
    [after] = pods.registrations(bpffs)
    assert after.addresses == reg.addresses | {"10.77.0.0/24"}, after
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg)


def test_a_new_listener_map_with_pods_registered_is_refused_unchanged(lab, pod):
    """A build with another pod capacity (MA_MAX_PODS) has a new inbound_listener map;
    sidecars' listening sockets cannot be moved into it (only sockops sees a listen()), so
    inbound capture would stop: refused, nothing changed."""
    ns, cg = pod
    bpffs = lab.attach(cg, pods=(ns,), cflags=["-DMA_MAX_PODS=512"])
    ids, record = prog_ids(bpffs), read_record(Pins(bpffs))

    with pytest.raises(MeshaccelError) as err:
        loader.attach(cg, bpffs=bpffs, app_shortcut=True)

    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("inbound_listener changes layout"), msg
    assert "refusing, nothing changed" in msg, msg
    assert prog_ids(bpffs) == ids and read_record(Pins(bpffs)) == record
    assert loader.status(bpffs)["maps"]["pod_config"]["capacity"] == 512
    assert_new_connections_on_the_shortcut(lab, bpffs, ns, cg)


def test_the_agent_replaces_an_older_datapath_on_start_under_load(lab, tmp_path):
    """`meshaccel run` started over a datapath of another build (a rolling upgrade)
    replaces it in place (compiled in its attach child) while pod A's app keeps calling:
    no failed connection, the new tags, the info metric says it matches."""
    from tests.kernel.test_daemon import CLIENT, SIDECAR, Agent, captured

    node = lab.node()
    a, b = lab.pod("a", node, APP_IP), lab.pod("b", node, DST)
    cg = lab.cgroup()
    agent = Agent(lab, tmp_path, cg)
    loader.attach(cg, bpffs=agent.bpffs, bpf_dir=changed_copy(tmp_path / "bpf"))
    for ns in (a, b):  # as the agent names them, so that its first sync changes nothing
        pods.add(agent.bpffs, f"default/{ns}", lab.pod_ips[ns], netns=f"/var/run/netns/{ns}")
    agent.write_pods(a, b)
    old_ids = prog_ids(agent.bpffs)
    sidecar = lab.spawn([sys.executable, "-c", SIDECAR], netns=a, cgroup=cg)
    assert sidecar.stdout.readline().strip() == "ready", sidecar.stderr.read()
    client = lab.spawn([sys.executable, "-c", CLIENT, DST, "9080", "600"], netns=a, cgroup=cg)
    assert wait_for(lambda: captured(agent.bpffs) >= 200, 20), "no traffic captured"

    agent.start()
    # (compiling under load: seconds here, past 2 minutes in a 1-vCPU emulated VM on 6.1)
    agent.ready(300)
    done = captured(agent.bpffs)
    assert wait_for(lambda: captured(agent.bpffs) >= done + 200, 20), "capture stopped"
    client.send_signal(signal.SIGTERM)
    out, err = client.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])

    log = agent.log.read_text()
    assert "replaced datapath 0." in log, log
    assert result["ok"] > 400 and result["failed"] == 0, result
    new_ids = prog_ids(agent.bpffs)
    assert all(new_ids[n] != old_ids[n] for n in old_ids), (old_ids, new_ids)
    assert pinned_tags(Pins(agent.bpffs)) == fresh_tags()
    info = [k for k in agent.metrics() if k[0] == "meshaccel_datapath_info"]
    assert len(info) == 1 and ("running_matches_cli", "true") in info[0][1], info
    assert agent.term() == 0
