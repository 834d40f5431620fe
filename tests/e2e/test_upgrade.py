"""A rolling upgrade on one node, with real Envoy sidecars on two pods under load: the
previous release (commit 998e13c, checked out in a temporary git worktree, run as its own
CLI) attaches and registers both pods; requests run through both sidecars; the current
release attaches over it (as its agent does on start) while they run.

998e13c predates version records (its datapath is of unknown version) and has one counter
less (orig_dst_by_conntrack), so the upgrade replaces every program and migrates to a new
counters map while the pods, settings and per-connection maps carry over as they are.
Then the downgrade: 998e13c's own attach cannot tell releases apart, so it adopts the
running datapath, which is safe because every map it writes has the same layout in both
releases; the kernel side goes back to 998e13c's programs the way any release with
version records does it, by the same replace (and up again), all under load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshaccel.datapath import loader, structs
from meshaccel.datapath.pins import Pins, pinned_tags, read_counters
from meshaccel.datapath.programs import ADDED_PROGRAMS
from tests.e2e import envoy
from tests.e2e.test_envoy import ROOT, sidecar_binary  # noqa: F401 - a fixture
from tests.e2e.test_envoy_mesh import (
    CLIENT_IP,
    PORT,
    SERVER_IP,
    Pods,
    assert_sidecar_to_sidecar,
    counters_delta,
    run_requests,
    start_http_server,
    start_sidecars,
)
from tests.kernel.lab import Lab, fresh_tags, prog_ids
from tests.kernel.peer import payload_sha

PREVIOUS = "998e13c"  # the release before orig_dst_by_conntrack and version records
PREVIOUS_COUNTERS = 21  # its enum counter
HELD_BYTES = 1 << 20

pytestmark = pytest.mark.usefixtures("sidecar_binary")

# One keep-alive connection through both sidecars, opened and used before the upgrade,
# then (after a stdin line) used again: GET and POST, bodies checked.
_HELD = """
import hashlib, http.client, json, sys
from tests.kernel.peer import payload
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection(host, port, timeout=30)
def get():
    c.request("GET", f"/bytes/{n}")
    r = c.getresponse()
    body = r.read()
    return {"status": r.status, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
def post():
    data = b"".join(payload(n, 5))
    c.request("POST", "/sha256", body=data)
    r = c.getresponse()
    return {"status": r.status, "sent_sha256": hashlib.sha256(data).hexdigest(),
            "server": json.loads(r.read() or b"{}")}
first = get()
sock = c.sock
print(json.dumps({"ready": True, "first": first}), flush=True)
sys.stdin.readline()
print(json.dumps({"first": first, "get": get(), "post": post(), "same_socket": c.sock is sock}))
"""

# Requests until a stdin line (or the deadline): one worker opens a connection per
# request, one keeps one alive (a new one only after an error); every body is checked.
_LOAD = """
import hashlib, http.client, json, sys, threading, time
from tests.kernel.peer import payload
host, port, n, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
want = hashlib.sha256(b"".join(payload(n, 2))).hexdigest()
stop = threading.Event()
end = time.monotonic() + deadline
counts = {"ok": 0, "failed": 0, "corrupted": 0, "connects": 0}
errors, lock = [], threading.Lock()
def note(key, err=None):
    with lock:
        counts[key] += 1
        if err and len(errors) < 10:
            errors.append(err)
def worker(keepalive):
    c = None
    while not stop.is_set() and time.monotonic() < end:
        try:
            if c is None:
                c = http.client.HTTPConnection(host, port, timeout=10)
                note("connects")
            c.request("GET", f"/bytes/{n}")
            r = c.getresponse()
            body = r.read()
            ok = r.status == 200 and hashlib.sha256(body).hexdigest() == want
            note("ok" if ok else "corrupted", None if ok else f"{r.status} {len(body)}")
        except Exception as e:
            note("failed", repr(e))
            c.close() if c else None
            c = None
        if not keepalive and c is not None:
            c.close()
            c = None
threads = [threading.Thread(target=worker, args=(k,)) for k in (False, True)]
for t in threads:
    t.start()
sys.stdin.readline()
stop.set()
for t in threads:
    t.join()
print(json.dumps({**counts, "errors": errors}))
"""


@pytest.fixture
def previous_release() -> Iterator[Path]:
    """The previous release's tree in a temporary git worktree, removed after the test
    (also on failure)."""
    base = Path(tempfile.mkdtemp(prefix="ma-e2e-prev-"))
    tree = base / "tree"
    git = ["git", "-C", str(ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(tree), PREVIOUS], check=True)
    try:
        yield tree
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
        subprocess.run([*git, "worktree", "prune"], check=False)
        shutil.rmtree(base, ignore_errors=True)  # (and a test's copies beside the tree)


def previous_cli(tree: Path, *args: str) -> subprocess.CompletedProcess:
    """`meshaccel ARGS` of the previous release: its package and its bpf/."""
    env = {**os.environ, "PYTHONPATH": str(tree), "MESHACCEL_BPF_DIR": str(tree / "bpf")}
    argv = [sys.executable, "-c", "from meshaccel.cli import main; main()", *args]
    p = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    print(f"previous release: meshaccel {' '.join(args)} -> {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def current_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", "from meshaccel.cli import main; main()", *args]
    p = subprocess.run(
        argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    print(f"this release: meshaccel {' '.join(args)} -> {p.returncode}\n{p.stdout}{p.stderr}")
    return p


def in_pod(lab: Lab, pods: Pods, script: str, *args: object) -> subprocess.Popen:
    """A python app of the client pod (its netns and cgroup), run from the repository."""
    argv = [sys.executable, "-c", script, SERVER_IP, str(PORT), *map(str, args)]
    return lab.spawn(argv, netns=pods.client, cgroup=pods.cgroup, cwd=ROOT, stdin=subprocess.PIPE)


def finish(p: subprocess.Popen, timeout: float = 120) -> dict:
    stdout, stderr = p.communicate("go\n", timeout=timeout)
    assert p.returncode == 0 and stdout.strip(), f"rc {p.returncode}: {stdout} {stderr}"
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def old_pods(lab: Lab, previous_release: Path) -> Pods:
    """Two pods on one node, attached and registered by the previous release's CLI."""
    node = lab.node()
    client = lab.pod("cli", node, CLIENT_IP)
    server = lab.pod("srv", node, SERVER_IP)
    cg = lab.cgroup()
    bpffs = f"/sys/fs/bpf/{lab.prefix}"
    lab.bpffs.append(bpffs)  # detached at teardown by this release
    assert (
        previous_cli(previous_release, "attach", "--cgroup", cg, "--bpffs", bpffs).returncode == 0
    )
    for ns in (client, server):
        ip = lab.pod_ips[ns][0]
        add = ["pod", "add", "--bpffs", bpffs, "--name", ns, "--ip", ip]
        assert (
            previous_cli(previous_release, *add, "--netns", f"/var/run/netns/{ns}").returncode == 0
        )
    return Pods(client, server, cg, bpffs)


def test_rolling_upgrade_and_back_under_load(lab, old_pods, previous_release, envoy_dir, base_ids):
    pods = old_pods
    before_upgrade = loader.status(pods.bpffs)
    # every program of its own runs; maps and programs this release added since are
    # missing until the upgrade
    progs = before_upgrade["programs"]
    assert all(p["attached"] for p in progs if p["name"] not in ADDED_PROGRAMS), progs
    added = {f"prog_{name}" for name in ADDED_PROGRAMS}
    assert set(before_upgrade["missing"]) <= set(structs.MAPS) | added, before_upgrade
    assert before_upgrade["datapath"]["running"]["version"] == "unknown version"
    assert before_upgrade["datapath"]["matches"] is False
    assert before_upgrade["maps"]["counters"]["capacity"] == PREVIOUS_COUNTERS
    old_ids = prog_ids(pods.bpffs)
    old_tags = pinned_tags(Pins(pods.bpffs))
    want_tags = fresh_tags()
    # (programs whose C did not change have equal tags: a tag ignores which maps they use)
    assert any(old_tags[n] != want_tags[n] for n in want_tags), "998e13c's code is ours?"

    start_http_server(lab, pods)
    config = envoy.sidecar_config(http=True)
    sidecars = start_sidecars(lab, pods, config, envoy_dir, base_ids)
    held = in_pod(lab, pods, _HELD, HELD_BYTES)
    ready = json.loads(held.stdout.readline() or "{}")
    assert ready.get("ready") and ready["first"]["status"] == 200, ready
    assert ready["first"]["sha256"] == payload_sha(HELD_BYTES, 2), ready
    load = in_pod(lab, pods, _LOAD, 4096, 120)
    time.sleep(2)  # requests flow through the previous release's datapath

    # -- the upgrade, under load (what the agent's start does: loader.attach), keeping the
    # app sockets on the shortcut as the previous release had them
    summary = loader.attach(pods.cgroup, bpffs=pods.bpffs, log=print, app_shortcut=True)
    print(summary)
    time.sleep(2)  # and on through the new one
    after_upgrade = loader.status(pods.bpffs)

    held_rec = finish(held)
    load_rec = finish(load)
    print("held connection:", json.dumps(held_rec), "load:", json.dumps(load_rec))

    assert summary.startswith("replaced datapath unknown version with"), summary
    n = len(structs.COUNTERS)
    assert f"counters: percpu_array 4->8 x21 -> percpu_array 4->8 x{n}" in summary, summary
    new_ids = prog_ids(pods.bpffs)
    assert all(new_ids[n] != old_ids[n] for n in old_ids), (old_ids, new_ids)
    assert pinned_tags(Pins(pods.bpffs)) == want_tags
    assert after_upgrade["attached"] and after_upgrade["datapath"]["matches"] is True
    assert after_upgrade["maps"]["counters"]["capacity"] == len(structs.COUNTERS)
    assert after_upgrade["maps"]["pod_config"]["entries"] == 2  # both pods carried over
    # zero failed requests, zero corrupted bytes, across the upgrade
    assert load_rec["ok"] > 0 and load_rec["failed"] == 0 and load_rec["corrupted"] == 0, load_rec
    # the keep-alive connection opened before the upgrade still carries every byte
    assert held_rec["same_socket"] is True, held_rec
    assert held_rec["get"] == {
        "status": 200,
        "bytes": HELD_BYTES,
        "sha256": payload_sha(HELD_BYTES, 2),
    }, held_rec
    post = held_rec["post"]
    assert post["status"] == 200, held_rec
    assert post["server"] == {"bytes": HELD_BYTES, "sha256": post["sent_sha256"]}, held_rec

    # -- new connections on every hop go through the new programs: fresh sidecars (no
    # pooled upstream from before), the server's new listener seen by the new sockops
    for sidecar in sidecars:
        sidecar.proc.terminate()
        sidecar.proc.wait(timeout=30)
    start_sidecars(lab, pods, config, envoy_dir, base_ids)
    before = read_counters(pods.bpffs)
    got = run_requests(lab, pods, ["/bytes/4096", "/bytes/0", "/bytes/1024"])
    delta = counters_delta(pods.bpffs, before)
    assert [r.get("status") for r in got] == [200, 200, 200], got
    assert got[0]["sha256"] == payload_sha(4096, 2), got
    assert_sidecar_to_sidecar(delta)
    assert delta["connect_captured"] == 3, delta
    assert delta["msg_redirected_bytes"] > 4096, delta

    # -- the downgrade, as 998e13c's own agent does it: it cannot tell releases apart and
    # adopts the running datapath; nothing it writes has another layout in this datapath
    load = in_pod(lab, pods, _LOAD, 1024, 120)
    p = previous_cli(previous_release, "attach", "--cgroup", pods.cgroup, "--bpffs", pods.bpffs)
    assert p.returncode == 0 and p.stdout.startswith("already attached"), p
    assert prog_ids(pods.bpffs) == new_ids
    assert loader.status(pods.bpffs)["datapath"]["matches"] is True
    # its userspace still registers pods the new programs capture
    add = ["pod", "add", "--bpffs", pods.bpffs, "--name", pods.client, "--ip", CLIENT_IP]
    p = previous_cli(previous_release, *add, "--netns", f"/var/run/netns/{pods.client}")
    assert p.returncode == 0, p

    # -- the downgrade of the kernel side, as a release with version records does it: the
    # same replace, to 998e13c's programs (and back to its 21 counters). This userspace
    # also attaches the programs it added since (verdict): they come from its own tree.
    old_dir = previous_release.parent / "bpf-downgrade"
    shutil.copytree(previous_release / "bpf", old_dir)
    for name in ADDED_PROGRAMS:
        shutil.copy(loader.BPF_DIR / f"{name}.c", old_dir)
    p = current_cli(
        "attach", "--cgroup", pods.cgroup, "--bpffs", pods.bpffs, MESHACCEL_BPF_DIR=str(old_dir)
    )
    assert p.returncode == 0 and p.stdout.startswith("replaced datapath 0."), p
    assert pinned_tags(Pins(pods.bpffs)) == fresh_tags(old_dir)
    down = loader.status(pods.bpffs)
    assert down["maps"]["counters"]["capacity"] == PREVIOUS_COUNTERS
    assert down["maps"]["pod_config"]["entries"] == 2
    time.sleep(1)
    # ... and up again
    assert loader.attach(pods.cgroup, bpffs=pods.bpffs, app_shortcut=True).startswith(
        "replaced datapath"
    )
    assert pinned_tags(Pins(pods.bpffs)) == want_tags
    time.sleep(1)
    load_rec = finish(load)
    print("load across the downgrades and the upgrade:", json.dumps(load_rec))
    assert load_rec["ok"] > 0 and load_rec["failed"] == 0 and load_rec["corrupted"] == 0, load_rec
