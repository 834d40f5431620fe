"""The app-pattern matrix: what an app sees on the shortcut, against plain loopback TCP.

Each pattern (tests/kernel/app_patterns_child.py) runs with real sockets in one registered
pod, the app as client (its connect() captured to the sidecar's 15001) and as server (the
sidecar's inbound passthrough from 127.0.0.6 calling the app, as Envoy does), twice: with
the shortcut on for app sockets (attach --app-shortcut) and with attach's defaults, which
keep app sockets off it (capture unchanged, bytes on loopback TCP). Every byte is
checksummed both ways. The counters prove the path each run took: the shortcut run put
both ends of every connection in the sockhash and redirected its bytes; the default run
kept both ends of each off it: so the default run is also the proof that an app sees
plain TCP by default. Then the outcomes (bytes, order, errors, EOF, wake-ups, what
recv's flags, SO_RCVLOWAT, FIONREAD and splice give the app) are compared: equal, or the
difference measured on this kernel, asserted exactly, so that a change either way fails.

The default run uses 64 MiB streams and 1,000 connections; the cases marked `long`
(`pytest -m long`) run 1 GiB and 10,000 (RELIABILITY.md has both commands and the long
run's numbers).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.datapath import loader
from meshaccel.datapath.pins import read_counters
from tests.kernel.lab import Lab, sandbox_prefix

CHILD = str(Path(__file__).with_name("app_patterns_child.py"))
POD_IP = "10.244.1.10"
# bytes each way of the stream patterns, and what the writer has for a reader that stops
SIZES_BIG = [
    pytest.param(64 << 20, id="64MiB"),
    pytest.param(1 << 30, id="1GiB", marks=pytest.mark.long),
]
# connections held open at once through one sidecar
MANY = [pytest.param(1_000, id="1000"), pytest.param(10_000, id="10000", marks=pytest.mark.long)]
ROLES = ("client", "server")


@dataclass
class Pod:
    lab: Lab
    ns: str
    cgroup: str
    bpffs: str
    shortcut: bool = True

    def run(
        self,
        pattern: str,
        role: str,
        shortcut: bool,
        size: int = 1 << 20,
        conns: int = 1,
        budget: int = 120,
    ) -> tuple[dict, dict[str, int]]:
        """The pattern's child record and the datapath's counters over its run."""
        if shortcut != self.shortcut:  # same build: only the setting is written
            loader.attach(self.cgroup, bpffs=self.bpffs, app_shortcut=shortcut)
            self.shortcut = shortcut
        before = read_counters(self.bpffs)
        argv = [
            sys.executable, CHILD, pattern, "--role", role, "--pod-ip", POD_IP,
            "--size", str(size), "--conns", str(conns), "--budget", str(budget),
        ]  # fmt: skip
        p = self.lab.spawn(argv, netns=self.ns, cgroup=self.cgroup)
        try:
            stdout, stderr = p.communicate(timeout=budget + 30)
        except Exception:
            p.kill()
            p.communicate(timeout=10)
            raise
        after = read_counters(self.bpffs)
        lines = stdout.strip().splitlines()
        assert p.returncode == 0 and lines, f"{pattern} exited {p.returncode}: {stderr}"
        rec = json.loads(lines[-1])
        assert "error" not in rec, (pattern, role, shortcut, rec, stderr[-2000:])
        return rec, {k: after[k] - before.get(k, 0) for k in after}


@pytest.fixture(scope="module")
def pod():
    """One registered pod for the whole module (attached once; the shortcut setting is
    switched between runs), removed at the end, also on failure."""
    lab = Lab(sandbox_prefix("tap"))
    try:
        node = lab.node()
        ns = lab.pod("app", node, POD_IP)
        cg = lab.cgroup()
        bpffs = lab.attach(cg, pods=(ns,))
        yield Pod(lab, ns, cg, bpffs)
    finally:
        lab.cleanup()


def assert_path(
    delta: dict[str, int], role: str, shortcut: bool, conns: int, fallback: int = 0
) -> None:
    """Every connection was the hop asked for; on the shortcut, both ends of each joined
    the sockhash and the bytes were redirected; by default, the app's connections kept
    both ends off it."""
    hop = "connect_captured" if role == "client" else "connect_passthrough"
    assert delta[hop] == conns, delta
    assert delta["sock_insert_failed"] == 0, delta
    if shortcut:
        assert delta["sock_inserted"] == 2 * conns, delta
        assert delta["msg_redirected_bytes"] > 0, delta
        assert delta["msg_fallback_bytes"] <= fallback, delta
    else:
        assert delta["sock_inserted"] == 0 and delta["msg_redirected"] == 0, delta
        assert delta["sock_kept_off_app"] == 2 * conns, delta


def both(
    pod: Pod, pattern: str, role: str, conns: int = 1, fallback: int = 0, **kw
) -> tuple[dict, dict]:
    """The pattern with the shortcut on and off, each run's path proven (fallback: bytes
    that may take the TCP path, sent after the peer socket was gone)."""
    recs = {}
    for shortcut in (True, False):
        rec, delta = pod.run(pattern, role, shortcut, conns=conns, **kw)
        print(pattern, role, shortcut, {k: v for k, v in delta.items() if v})
        assert_path(delta, role, shortcut, conns, fallback)
        recs[shortcut] = rec
        print(f"{pattern} app-as-{role} shortcut {'on ' if shortcut else 'off'}:",
              json.dumps(rec), f"redirected {delta['msg_redirected_bytes']} B")  # fmt: skip
    return recs[True], recs[False]


# What plain loopback TCP gives each pattern (the reference; the app as client and as
# server alike), and what the shortcut gives where it differs on this kernel.
PLAIN = {
    "blocking": {"conns": [[True, True, ""]] * 5},
    "nonblocking": {"app_got": [True, "EOF"], "side_got": [True, "EOF"]},
    "halfclose_app": {"conns": [[True, "EOF", True, "EOF"]] * 10, "blocking_recv_eagain": "none"},
    "halfclose_side": {"conns": [[True, "EOF", True, "EOF"]] * 10, "blocking_recv_eagain": "none"},
    "sendfile": {"sent": 8 << 20, "error": "", "side_got": [True, "EOF"]},
    "splice_write": {"moved": 8 << 20, "error": "", "side_got": [True, "EOF"]},
    "epoll_edge": {"woke": "20 of 20", "bytes_ok": True},
    "epoll_level": {
        "woke": "20 of 20", "bytes_ok": True, "reported_again_with_bytes_left": "20 of 20",
    },
}  # fmt: skip
SIZES = {"sendfile": 8 << 20, "splice_write": 8 << 20}
CONNS = {"blocking": 5, "halfclose_app": 10, "halfclose_side": 10}
# (pattern, role) -> the shortcut's outcome where it differs, as measured on 6.18.44: a
# blocking recv after a half-close can fail with EAGAIN (tcp_bpf_recvmsg gives up after
# one wake-up without data); every byte still arrives and EOF is seen.
DIFFERS: dict[tuple[str, str], dict] = {
    (pattern, role): {**PLAIN[pattern], "blocking_recv_eagain": "in some connections"}
    for pattern in ("halfclose_app", "halfclose_side")
    for role in ROLES
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("pattern", sorted(PLAIN))
def test_pattern_matches_plain_tcp(pod, pattern, role):
    """Blocking and non-blocking, half-close each way, sendfile and splice writes, epoll
    edge- and level-triggered: every byte both ways, the same outcome as plain TCP."""
    size = SIZES.get(pattern, 1 << 20)
    on, off = both(pod, pattern, role, conns=CONNS.get(pattern, 1), size=size)
    assert off["outcome"] == PLAIN[pattern], off
    assert on["outcome"] == DIFFERS.get((pattern, role), off["outcome"]), on


# The read-side patterns: the app reads what the sidecar writes, the app as client or as
# server alike; fionread_early's bytes reach whichever end accept()s (the app as server,
# the sidecar as client), its caller's writes taking TCP on the shortcut (they are sent
# before the other end exists: bounded by READ_FALLBACK).
READ_PLAIN = {
    "peek": {
        "blocking_peek": "woke with the first bytes", "peek_showed": "10000 of 10000",
        "peeked_bytes_ok": True, "peek_again_same": True, "then_recv": [True, "complete"],
    },
    "waitall": {
        "one_call_returned_all": True, "blocking_recv_eagain": False,
        "bytes": [True, "complete"],
    },
    "rcvlowat": {
        "select_readable_below_lowat": False, "first_recv": "5 bytes after the receive timeout",
        "reads_below_lowat": "none", "blocking_recv_eagain": False, "bytes": [True, "EOF"],
    },
    "splice_read": {
        "spliced": "100000 of 100000", "splice_stopped_with": "", "bytes": [True, "complete"],
    },
    "fionread": {"fionread": [0, 20000, 15000], "bytes": [True, "complete"]},
    "fionread_early": {
        "callee_fionread": [3000, 5000], "callee_readable": True,
        "callee_woken_by_more": True, "caller_fionread_reply": 20000, "bytes": [True, True],
    },
}  # fmt: skip
READ_FALLBACK = {"fionread_early": 5000}  # the caller's 3,000 + 2,000 bytes
# (pattern, role) -> the shortcut's outcome where it differs, as measured on 6.18.44, the
# same in both roles. The sockmap recvmsg returns what its queue holds: SO_RCVLOWAT and
# MSG_WAITALL are ignored (and poll reports a socket readable below SO_RCVLOWAT); splice
# reads the TCP receive queue, which redirected bytes never reach, so a blocking splice
# waits out its receive timeout (EAGAIN; without one it hangs); FIONREAD counts only the
# psock queue, where bytes that came over TCP before the socket had been accept()ed go
# only when more arrive (poll still reports them). MSG_PEEK and FIONREAD on redirected
# bytes hold.
# FIONREAD on a sockhash socket depends on the kernel: 6.1 has no sockmap ioctl, so it
# counts the TCP receive queue only: redirected bytes read 0, bytes that came over TCP
# count as on plain TCP (measured on 6.1.0-47); 6.12 and 6.18 count the psock queue.
TCP_QUEUE_FIONREAD = os.uname().release.startswith("6.1.")
FIONREAD_DIFFERS = (
    {"fionread": {"fionread": [0, 0, 0]}, "fionread_early": {"caller_fionread_reply": 0}}
    if TCP_QUEUE_FIONREAD
    else {"fionread_early": {"callee_fionread": [0, 5000]}}
)
READ_DIFFERS: dict[tuple[str, str], dict] = {
    (pattern, role): {**READ_PLAIN[pattern], **diff}
    for pattern, diff in {
        "waitall": {"one_call_returned_all": False},
        "rcvlowat": {
            "select_readable_below_lowat": True, "first_recv": "5 bytes at once",
            "reads_below_lowat": "some",
        },
        "splice_read": {"spliced": "0 of 100000", "splice_stopped_with": "EAGAIN"},
        **FIONREAD_DIFFERS,
    }.items()
    for role in ROLES
}  # fmt: skip


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("pattern", sorted(READ_PLAIN))
def test_read_side(pod, pattern, role):
    """MSG_PEEK, MSG_WAITALL, SO_RCVLOWAT, FIONREAD (on redirected bytes, and on bytes
    that came by TCP before the receiving end was accept()ed, with the edge-triggered
    epoll wake-up when more come the same way) and splice(2) into a pipe, on the app's
    socket, every byte checked: by default the same as plain TCP; on the shortcut peek,
    FIONREAD on redirected bytes (but on 6.1: TCP_QUEUE_FIONREAD) and the wake-up hold,
    the others differ as measured (READ_DIFFERS). In fionread_early the end that reads 0
    is the one that accept()s: the app as server, the sidecar when the app is the client
    (whose own end joins before any byte can reach it: its FIONREAD on the reply holds)."""
    on, off = both(pod, pattern, role, fallback=READ_FALLBACK.get(pattern, 0), budget=30)
    assert off["outcome"] == READ_PLAIN[pattern], off
    assert on["outcome"] == READ_DIFFERS.get((pattern, role), READ_PLAIN[pattern]), on
    if pattern == "waitall":  # one call per write or two the app found (measured: 62-64)
        assert on["info"]["recv_calls"] > 1 and off["info"]["recv_calls"] == 1, on


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("pattern", ["rst_app", "rst_side"])
def test_reset_mid_stream(pod, pattern, role):
    """One end (the app: rst_app; the sidecar: rst_side) writes 64 KiB and closes with
    SO_LINGER 0 (RST), once while the other end still has bytes queued, once while it is
    blocked in recv: it reads every byte written, then ECONNRESET, then EOF; a send then
    fails with EPIPE; nothing hangs. The known difference, measured on 6.18.44: on the
    shortcut the blocked reader's recv first fails with EAGAIN (the sockmap recvmsg,
    woken by the state change without data, gives up), the next one gives ECONNRESET.
    (The reader's send after the RST takes the TCP path, its peer socket being gone.)"""
    on, off = both(pod, pattern, role, conns=2, size=64 << 10, fallback=4)
    reset = {
        "writer_error": "", "reader_bytes": "65536 of 65536", "reader_prefix_ok": True,
        "reader_end": "ECONNRESET", "blocking_recv_eagain": False, "then_recv": "EOF",
        "then_send": "EPIPE",
    }  # fmt: skip
    assert off["outcome"] == {"queued": reset, "blocked": reset}, off
    blocked = {**reset, "blocking_recv_eagain": True}
    assert on["outcome"] == {"queued": reset, "blocked": blocked}, on
    assert on["info"]["blocked_reader_woke_after_s"] < 2, on  # woken by the RST


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("writer", ["app", "sidecar"])
@pytest.mark.parametrize("backlog", SIZES_BIG)
def test_reader_that_stops(pod, writer, role, backlog):
    """The reader stops while the writer (non-blocking) has `backlog` bytes for it; then it
    reads them all. Plain TCP: the writer stalls with EAGAIN once about 4 MiB are queued
    (send buffer + receive buffer), memory bounded by the buffers. The shortcut: the
    writer never stalls, every byte is queued in the reader's socket (its psock ingress
    queue, charged to TCP memory, bounded by no buffer): a known difference of the
    kernel's sockmap (redirect to ingress checks only the system-wide TCP memory limits),
    asserted as measured. Either way every byte arrives, checksummed."""
    pattern = f"backpressure_{'app' if writer == 'app' else 'sidecar'}_writes"
    on, off = both(pod, pattern, role, size=backlog, budget=300)
    queued = off["info"]["writer_outq"] + off["info"]["reader_inq"]
    print(f"plain: {queued} B queued; shortcut: {on['info']['reader_inq']} B in the reader")
    full = {"writer_error": "", "reader_got": [True, "EOF"]}
    assert off["outcome"] == {**full, "writer_stalled": True, "writer_saw_eagain": True}, off
    assert queued < 16 << 20, off  # bounded by the sockets' buffers (measured: 4.2 MiB)
    assert off["info"]["written_before_stall"] < 16 << 20, off
    # the known difference, as measured on 6.18.44: nothing stops the writer
    assert on["outcome"] == {**full, "writer_stalled": False, "writer_saw_eagain": False}, on
    assert on["info"]["written_before_stall"] == backlog, on
    # FIONREAD counts redirected bytes on 6.12 and 6.18; 6.1 reads 0 (the self-test's
    # fionread semantic): the receive memory above is what proves where they are
    assert on["info"]["reader_inq"] in (backlog, 0), on
    assert on["info"]["reader_mem"]["rmem_alloc"] >= backlog, on


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("size", SIZES_BIG)
def test_stream_each_way(pod, role, size):
    """`size` bytes each way at once (64 MiB; long: 1 GiB), checksummed."""
    on, off = both(pod, "stream", role, size=size, budget=900)
    done = {"up": [True, "EOF"], "down": [True, "EOF"], "errors": {"app": "", "side": ""}}
    assert off["outcome"] == done, off
    assert on["outcome"] == done, on


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("conns", MANY)
def test_many_connections(pod, role, conns):
    """`conns` connections (1,000; long: 10,000) open at once through one
    sidecar, each with 1,000 bytes of its own each way, every connection checked; the
    sockhash (MA_MAX_CONNS = 65,536 entries) holds both ends of each: none fell back."""
    on, off = both(pod, "many", role, conns=conns, budget=900)
    done = {"conns": conns, "bad_from_caller": [], "bad_from_accepter": []}
    assert off["outcome"] == done, off
    assert on["outcome"] == done, on
