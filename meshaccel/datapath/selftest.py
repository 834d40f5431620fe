"""`meshaccel selftest`: which TCP semantics does the running kernel keep on the shortcut?

Once a socket is in the datapath's sockhash, its recvmsg, poll and ioctl are the kernel's
sockmap versions (tcp_bpf_*), and what an app sees can change with the kernel: a blocking
recv that returns EAGAIN, splice(2) that moves nothing, SO_RCVLOWAT ignored, FIONREAD
reading 0. The self-test measures this on the running kernel instead of assuming it.

It builds a throw-away pod of its own — a network namespace, a cgroup and a bpffs
directory named ma-selftest-<pid> — attaches the real datapath there and registers the
pod. Each probe runs one small socket pattern in a child process inside that cgroup and
netns: the app connects to a pod address (captured to a "sidecar" listener on
127.0.0.1:15001 in the same netns) and the two ends do what the probe is about, every
byte checksummed. Every probe runs twice, with the shortcut on for app sockets
(attach --app-shortcut, what a pod's opt-in gives) and with attach's defaults, which keep
app sockets off it (capture unchanged, the bytes on loopback TCP): the second run is the
proof that an app sees plain TCP by default. The datapath's counters show which path each
run took. Per semantic the report says: holds, differs (and what was seen), or could not be
measured. Everything is removed afterwards, also on failure or Ctrl-C, and leftovers of
an earlier self-test that was killed are removed before starting.

Run as `python -m meshaccel.datapath.selftest --child PROBE ...`, this module is one probe's child
(standard library only, so that it starts fast).
"""

from __future__ import annotations

import argparse
import array
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshaccel.datapath import netns as netns_mod

PREFIX = "ma-selftest"
POD_IP = "10.244.255.10"  # the throw-away pod's address (exists only in the maps)
CALLED = ("10.244.255.30", 9080)  # what the app connect()s to: captured to the sidecar
SIDECAR = ("127.0.0.1", 15001)  # the sidecar's outbound listener (attach's default -p)

HOLDS, DIFFERS, UNMEASURED = "holds", "differs", "could not be measured"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Semantic:
    name: str
    probe: str  # the probe (child) that measures it
    what: str  # what the app does and what plain TCP gives it


@dataclass(frozen=True)
class Probe:
    name: str
    budget: float  # seconds the child may take (it bounds its own waits well within)
    captured: bool = True  # its connections are captured (else: plain, joined by hand)
    conns: int = 1


SEMANTICS: tuple[Semantic, ...] = (
    Semantic(
        "so_rcvlowat", "rcvlowat",
        "SO_RCVLOWAT=16, blocking recv while the sidecar writes 1 byte every 5 ms: "
        "each recv returns >= 16 bytes",
    ),
    Semantic(
        "splice_read", "splice",
        "splice(2) from the socket into a pipe, 100,000 bytes sent: splice moves them all",
    ),
    Semantic(
        "recv_after_shutdown", "shutdown",
        "shutdown(SHUT_WR), then blocking recv of a 4 MiB reply to EOF, 10 connections: "
        "no recv fails with EAGAIN",
    ),
    Semantic(
        "fionread", "fionread",
        "FIONREAD with 20,000 bytes waiting, and after reading 5,000 of them: counts them",
    ),
    Semantic(
        "fionread_tcp_queue", "tcp_queue",
        "FIONREAD on a socket in the sockhash, bytes arriving over TCP (from a sender "
        "that fell back): counts them",
    ),
    Semantic(
        "fionread_tcp_early", "tcp_queue",
        "FIONREAD on a socket in the sockhash, for bytes that came over TCP before it "
        "joined (as before a sidecar accept()s a connection whose app fell back), none "
        "since: counts them",
    ),
    Semantic(
        "epoll_tcp_queue", "tcp_queue",
        "edge-triggered epoll on a socket in the sockhash, bytes arriving over TCP: wakes",
    ),
    Semantic(
        "msg_peek", "peek",
        "recv(MSG_PEEK): a blocking peek waits for data; peeking shows the bytes without "
        "consuming them",
    ),
    Semantic(
        "msg_waitall", "waitall",
        "recv(256 KiB, MSG_WAITALL) while the sidecar writes 4 KiB every ms: one call "
        "returns all of it",
    ),
    Semantic(
        "epoll_edge", "epoll",
        "edge-triggered epoll, 20 writes of 1,000 bytes, read fully or half: each write "
        "wakes the app",
    ),
    Semantic(
        "epoll_level", "epoll_level",
        "level-triggered epoll, 20 writes of 1,000 bytes, 300 read after each: each write "
        "wakes the app, and epoll reports the socket again while bytes remain",
    ),
    Semantic(
        "sendfile", "write_paths",
        "sendfile(2) of a 1 MiB file into the socket: every byte arrives",
    ),
    Semantic(
        "splice_write", "write_paths",
        "splice(2) from a pipe into the socket, 1 MiB: every byte arrives",
    ),
    Semantic(
        "rst_queued", "rst",
        "the sidecar resets (SO_LINGER 0) after 64 KiB, of which the app read 16 KiB: the "
        "app reads every byte, then ECONNRESET, then EOF",
    ),
    Semantic(
        "rst_blocked", "rst",
        "the sidecar resets while the app is blocked in recv: it wakes with ECONNRESET",
    ),
    Semantic(
        "backlog_bounded", "backlog",
        "the app stops reading while the sidecar writes 32 MiB (non-blocking): the "
        "sidecar's send fails with EAGAIN before 16 MiB are queued",
    ),
)  # fmt: skip

PROBES: tuple[Probe, ...] = (
    Probe("rcvlowat", 4),
    Probe("splice", 4),
    Probe("shutdown", 20, conns=10),
    Probe("fionread", 4),
    Probe("tcp_queue", 4, captured=False),
    Probe("peek", 4),
    Probe("waitall", 5),
    Probe("epoll", 6),
    Probe("epoll_level", 4),
    Probe("write_paths", 5),
    Probe("rst", 4, conns=2),
    Probe("backlog", 6),
)
PROBE_BY_NAME = {p.name: p for p in PROBES}


# ================================================================ the report (pure logic)


def path_problem(probe: Probe, shortcut: bool, delta: dict[str, int]) -> str | None:
    """Why a run did not take the path it was meant to (None: it did). delta: the
    datapath counters' change over the run (nothing else uses this datapath)."""
    inserted = delta.get("sock_inserted", 0)
    redirected = delta.get("msg_redirected_bytes", 0)
    fallback = delta.get("msg_fallback_bytes", 0)
    if not probe.captured:  # a plain connection; the probe joins its socket itself
        if inserted or redirected:
            return f"the plain connection was put on the shortcut ({inserted} sockets joined)"
        return None
    if delta.get("connect_captured", 0) < probe.conns:
        return f"{delta.get('connect_captured', 0)} of {probe.conns} connections were captured"
    if not shortcut:
        if inserted or redirected:
            return f"with attach's defaults, {inserted} sockets joined the sockhash"
        return None
    if inserted < 2 * probe.conns:
        return f"{inserted} of {2 * probe.conns} sockets joined the sockhash"
    if fallback or not redirected:
        return f"{redirected} bytes redirected, {fallback} took the TCP path"
    return None


def path_summary(probe: Probe, delta: dict[str, int]) -> str:
    return (
        f"{delta.get('sock_inserted', 0)} sockets joined, "
        f"{delta.get('msg_redirected_bytes', 0)} bytes redirected"
    )


def judge(sem: Semantic, on: dict, off: dict) -> dict:
    """One semantic's verdict from its probe's two runs (see run_probe for their shape):
    holds, differs or could not be measured, with what was seen either way."""
    out = {"name": sem.name, "what": sem.what, "shortcut": _seen(sem, on), "plain": _seen(sem, off)}

    def verdict(status: str, detail: str) -> dict:
        return {**out, "status": status, "detail": detail}

    # the plain TCP run is the reference: without it there is nothing to compare with
    if off.get("timed_out"):
        return verdict(UNMEASURED, f"plain TCP run gave no result within {off['budget']:g} s")
    if off.get("error"):
        return verdict(UNMEASURED, f"plain TCP run failed: {off['error']}")
    if off.get("path_problem"):
        return verdict(UNMEASURED, f"plain TCP run: {off['path_problem']}")
    off_check = off["result"].get("checks", {}).get(sem.name)
    if not off["result"].get("bytes_ok") or off_check is None:
        return verdict(UNMEASURED, f"plain TCP run: bytes not intact ({_bytes(off)})")
    if not off_check["holds"]:
        return verdict(UNMEASURED, f"plain TCP did not behave as expected: {off_check['seen']}")
    if on.get("timed_out"):
        return verdict(DIFFERS, f"no result within {on['budget']:g} s (the app hangs)")
    if on.get("error"):
        return verdict(UNMEASURED, f"shortcut run failed: {on['error']}")
    if on.get("path_problem"):
        return verdict(UNMEASURED, f"not on the shortcut: {on['path_problem']}")
    on_check = on["result"].get("checks", {}).get(sem.name)
    if on_check is None:
        return verdict(UNMEASURED, "the shortcut run did not report it")
    if not on["result"].get("bytes_ok"):
        return verdict(DIFFERS, f"bytes lost or corrupted: {_bytes(on)}; {on_check['seen']}")
    if on_check["holds"]:
        return verdict(HOLDS, on_check["seen"])
    return verdict(DIFFERS, on_check["seen"])


def _seen(sem: Semantic, run: dict) -> str:
    if run.get("timed_out"):
        return f"no result within {run['budget']:g} s"
    if run.get("error"):
        return f"error: {run['error']}"
    check = (run.get("result") or {}).get("checks", {}).get(sem.name)
    return check["seen"] if check else "-"


def _bytes(run: dict) -> str:
    r = run.get("result") or {}
    return r.get("bytes_seen", "no checksum reported")


def build_report(
    runs: dict[tuple[str, bool], dict], kernel: str, seconds: float, setup_seconds: float
) -> dict:
    """The JSON report from every probe's two runs, keyed (probe name, shortcut on)."""
    semantics = [
        judge(s, runs[(s.probe, True)], runs[(s.probe, False)])
        for s in SEMANTICS
        if (s.probe, True) in runs and (s.probe, False) in runs
    ]
    by = {st: [s["name"] for s in semantics if s["status"] == st] for st in (HOLDS, DIFFERS)}
    unmeasured = [s["name"] for s in semantics if s["status"] == UNMEASURED]
    probes = {
        name: {
            f"{mode}_{field}": value
            for mode, on in (("shortcut", True), ("plain", False))
            for field, value in _run_facts(runs[(name, on)]).items()
        }
        for name in PROBE_BY_NAME
        if (name, True) in runs and (name, False) in runs
    }
    return {
        "kernel": kernel,
        "seconds": round(seconds, 1),
        "setup_seconds": round(setup_seconds, 1),
        "holds": by[HOLDS],
        "differs": by[DIFFERS],
        "unmeasured": unmeasured,
        "semantics": semantics,
        "probes": probes,
    }


def _run_facts(run: dict) -> dict:
    """A probe run in the report: time, path taken, and whether every byte arrived."""
    result = run.get("result") or {}
    return {
        "seconds": run.get("seconds"),
        "path": run.get("path", ""),
        "bytes_ok": bool(result.get("bytes_ok")),
        "bytes": _bytes(run),
    }


ADVICE = (
    "an app whose socket takes the shortcut sees these differences on this kernel. App "
    "sockets are off it by default (sidecar<->sidecar bytes take it): give it only to apps "
    "that read as a sidecar does (non-blocking, epoll; no splice, SO_RCVLOWAT, MSG_WAITALL "
    'or FIONREAD), per pod with the annotation meshaccel.io/shortcut: "true" (ports kept '
    "off with meshaccel.io/shortcut-exclude-ports) or for the node with --app-shortcut"
)


def summary(report: dict) -> str:
    """One line: how many semantics hold, which differ, which could not be measured."""
    n = len(report["semantics"])
    text = (
        f"kernel {report['kernel']}: {len(report['holds'])} of {n} semantics hold on the shortcut"
    )
    if report["differs"]:
        text += f"; differ: {', '.join(report['differs'])}"
    if report["unmeasured"]:
        text += f"; could not be measured: {', '.join(report['unmeasured'])}"
    return text


def format_text(report: dict) -> str:
    width = max(len(s["name"]) for s in report["semantics"])
    lines = [summary(report) + f" ({report['seconds']:g} s)", ""]
    for s in report["semantics"]:
        status = {HOLDS: "HOLDS", DIFFERS: "DIFFERS", UNMEASURED: "UNKNOWN"}[s["status"]]
        lines.append(f"{status:<8} {s['name']:<{width}}  {s['what']}")
        pad = " " * (9 + width + 2)
        if s["status"] == HOLDS:
            lines.append(f"{pad}shortcut: {s['shortcut']}")
        else:
            lines.append(f"{pad}{s['detail']}")
            if s["status"] == DIFFERS:
                lines.append(f"{pad}plain TCP: {s['plain']}")
    if report["differs"]:
        lines += ["", ADVICE]
    return "\n".join(lines)


# ================================================================ running it (root)


def run(log: Log = lambda _m: None, prefix: str | None = None, only: tuple[str, ...] = ()) -> dict:
    """Run every probe (or only these) on this kernel in a throw-away pod; the report
    (build_report). Needs root, bcc and bpffs, as attach does."""
    from meshaccel.datapath import loader, pods

    loader.check_root()
    prefix = prefix or f"{PREFIX}-{os.getpid()}"
    sweep_stale(log)
    t0 = time.monotonic()
    sandbox = Sandbox(prefix)
    previous = _raise_on_sigterm()
    try:
        log(f"creating the throw-away pod {prefix} (netns, cgroup, bpffs)")
        sandbox.create()
        log("attaching the datapath there (compiling with bcc, about 10 s)")
        loader.attach(sandbox.cgroup, bpffs=sandbox.bpffs, app_shortcut=True)
        pods.add(sandbox.bpffs, f"{prefix}/app", [POD_IP], netns=sandbox.netns_path)
        setup = time.monotonic() - t0
        runs: dict[tuple[str, bool], dict] = {}
        for shortcut in (True, False):
            if not shortcut:  # attach's defaults: what every app gets unless it opts in
                loader.attach(sandbox.cgroup, bpffs=sandbox.bpffs)
            for probe in (p for p in PROBES if not only or p.name in only):
                r = sandbox.run_probe(probe, shortcut)
                runs[(probe.name, shortcut)] = r
                outcome = r.get("error") or ("timed out" if r.get("timed_out") else "done")
                log(
                    f"probe {probe.name:<9} shortcut {'on ' if shortcut else 'off'}: "
                    f"{outcome} in {r['seconds']:.2f} s ({r.get('path', '')})"
                )
    finally:
        _restore_sigterm(previous)
        log(f"removing {prefix}")
        sandbox.remove()
    return build_report(runs, os.uname().release, time.monotonic() - t0, setup)


class Sandbox:
    """The throw-away pod: netns, cgroup, bpffs directory and probe children, all named
    with the prefix; remove() undoes whatever create() got to, and is safe to repeat."""

    def __init__(self, prefix: str) -> None:
        from meshaccel.datapath import loader

        self.prefix = prefix
        self.netns = prefix
        self.netns_path = netns_mod.path_of(prefix)
        self.cgroup = os.path.join(loader.default_cgroup(), prefix)
        self.bpffs = os.path.join("/sys/fs/bpf", prefix)
        self.child: subprocess.Popen | None = None

    def create(self) -> None:
        from pyroute2 import NetNS, netns

        netns.create(self.netns)
        with NetNS(self.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        os.mkdir(self.cgroup)

    def run_probe(self, probe: Probe, shortcut: bool) -> dict:
        """One child run: {"result": its JSON record or None, "budget", "seconds",
        "path" (what the counters show), "path_problem" (path_problem()), and "error" or
        "timed_out" when it went wrong}."""
        from meshaccel.datapath import loader

        argv = [sys.executable, "-m", "meshaccel.datapath.selftest", "--child", probe.name]
        argv += ["--bpffs", self.bpffs, "--netns-cookie", str(self._cookie())]
        if shortcut:
            argv.append("--join")
        before = loader.read_counters(self.bpffs)
        fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        t0 = time.monotonic()
        out: dict = {"budget": probe.budget, "result": None}
        try:
            self.child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, preexec_fn=netns_mod.entering(fd, self.cgroup), cwd="/",
                env={**os.environ, "PYTHONPATH": _pythonpath()},
            )  # fmt: skip
        finally:
            os.close(fd)
        try:
            stdout, stderr = self.child.communicate(timeout=probe.budget + 10)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.communicate()
            out["timed_out"] = True
            stdout, stderr = "", ""
        out["seconds"] = round(time.monotonic() - t0, 3)
        rc, self.child = self.child.returncode, None
        if not out.get("timed_out"):
            lines = stdout.strip().splitlines()
            try:
                out["result"] = json.loads(lines[-1]) if lines else None
            except ValueError:
                out["result"] = None
            if out["result"] is None or rc != 0 or "error" in out["result"]:
                last = (stderr.strip().splitlines() or [""])[-1]  # e.g. a traceback's
                err = (out["result"] or {}).get("error") or last
                out["error"] = f"probe exited {rc}: {err}"[:300]
        after = loader.read_counters(self.bpffs)
        delta = {k: after[k] - before.get(k, 0) for k in after}
        out["path"] = path_summary(probe, delta)
        out["path_problem"] = path_problem(probe, shortcut, delta)
        return out

    def _cookie(self) -> int:
        from meshaccel.datapath import pods

        return pods.netns_cookie(self.netns_path)

    def remove(self) -> None:
        """Remove everything, best effort; raise one error naming what is left."""
        from meshaccel.datapath import loader

        errors = []
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.communicate()
        if os.path.isdir(self.bpffs):
            try:
                loader.detach(bpffs=self.bpffs)
            except Exception as e:  # noqa: BLE001 - keep removing the rest
                errors.append(f"detach {self.bpffs}: {e}")
            _rmdir(self.bpffs, errors)
        _remove_cgroup(self.cgroup, errors)
        if os.path.exists(self.netns_path):
            from pyroute2 import netns

            try:
                netns.remove(self.netns)
            except Exception as e:  # noqa: BLE001
                errors.append(f"netns {self.netns}: {e}")
        if errors:
            from meshaccel.errors import MeshaccelError

            raise MeshaccelError(f"self-test cleanup incomplete: {'; '.join(errors)}")


def leftovers() -> list[str]:
    """Everything named like a self-test's (netns, cgroup, bpffs), of any pid."""
    from meshaccel.datapath import loader

    found = []
    for d in (netns_mod.NETNS_DIR, loader.default_cgroup(), "/sys/fs/bpf"):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        found += [os.path.join(d, n) for n in names if n.startswith(PREFIX + "-")]
    return sorted(found)


def sweep_stale(log: Log = lambda _m: None) -> None:
    """Remove what self-tests whose process is gone left behind (killed with SIGKILL)."""
    stale = set()
    for path in leftovers():
        m = re.fullmatch(rf"{PREFIX}-(\d+)", os.path.basename(path))
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            stale.add(os.path.basename(path))
    for name in sorted(stale):
        log(f"removing {name}, left by a self-test that was killed")
        Sandbox(name).remove()


def _pythonpath() -> str:
    """The child imports this very meshaccel, wherever it was run from."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


def _rmdir(path: str, errors: list[str]) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        errors.append(f"{path}: {e.strerror}")


def _remove_cgroup(path: str, errors: list[str]) -> None:
    for _ in range(100):  # a killed child leaves the cgroup asynchronously
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                errors.append(f"{path}: {e.strerror}")
                return
            for pid in _cgroup_pids(path):  # only the self-test's own children live there
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
    errors.append(f"{path}: still busy")


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def _raise_on_sigterm() -> object:
    """SIGTERM unwinds like Ctrl-C, so that the cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    me = os.getpid()

    def stop(_sig: int, _frame: object) -> None:
        if os.getpid() != me:  # a forked helper (pyroute2's) being told to stop: just stop
            os._exit(128 + signal.SIGTERM)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def _restore_sigterm(previous: object) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


# ================================================================ the probes (child side)

SO_RCVLOWAT = socket.SO_RCVLOWAT
FIONREAD = 0x541B
SIOCOUTQ = 0x5411
SPLICE_F_NONBLOCK = 2


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class Ctx:
    """What a probe child has: how to open an app<->sidecar connection in this netns."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(SIDECAR)
        self.listener.listen(16)
        self.sent: list[bytes] = []  # every stream sent, with what was received of it
        self.received: list[bytes] = []

    def pair(self, captured: bool = True) -> tuple[socket.socket, socket.socket]:
        """(app, sidecar): the app connects to a pod address, which the datapath captures
        to the sidecar's listener (captured=False: straight to the listener, not captured).
        Both blocking, no timeout."""
        app = socket.socket()
        app.connect(CALLED if captured else SIDECAR)
        side, _ = self.listener.accept()
        side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return app, side

    def check(self, sent: bytes, received: bytes) -> None:
        self.sent.append(sent)
        self.received.append(received)

    def bytes_record(self) -> dict:
        ok = all(s == r for s, r in zip(self.sent, self.received, strict=True))
        total = sum(len(s) for s in self.sent)
        got = sum(len(r) for r in self.received)
        bad = [
            f"stream {i}: {len(r)} of {len(s)} bytes, sha256 {sha(r)} (sent {sha(s)})"
            for i, (s, r) in enumerate(zip(self.sent, self.received, strict=True))
            if s != r
        ]
        seen = (
            f"{got} of {total} bytes in {len(self.sent)} streams intact"
            if ok
            else "; ".join(bad[:3])
        )
        return {"bytes_ok": ok and bool(self.sent), "bytes": got, "bytes_seen": seen}


def set_rcvtimeo(s: socket.socket, seconds: float) -> None:
    """A kernel receive timeout: the socket stays blocking (Python's settimeout() would
    make it non-blocking and poll first, which is not what the probe is about)."""
    sec = int(seconds)
    tv = struct.pack("ll", sec, int((seconds - sec) * 1e6))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


def fionread(s: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), FIONREAD, buf)
    return buf[0]


def recv_exact(s: socket.socket, n: int, deadline: float) -> bytes:
    """n bytes (fewer at EOF or deadline) from a socket with a receive timeout set."""
    out = bytearray()
    while len(out) < n and time.monotonic() < deadline:
        try:
            data = s.recv(n - len(out))
        except BlockingIOError:  # EAGAIN: timeout (or a spurious wake-up): retry
            continue
        if not data:
            break
        out += data
    return bytes(out)


def wait_for(cond: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def probe_rcvlowat(ctx: Ctx) -> dict:
    lowat, n = 16, 64
    app, side = ctx.pair()
    app.setsockopt(socket.SOL_SOCKET, SO_RCVLOWAT, lowat)
    set_rcvtimeo(app, 2)
    data = payload(n, 1)

    def trickle() -> None:
        for i in range(n):
            side.send(data[i : i + 1])
            time.sleep(0.005)
        # TCP wakes a reader when SO_RCVLOWAT bytes wait, not fewer: without the FIN, a
        # last recv for fewer bytes would sleep until its timeout
        side.shutdown(socket.SHUT_WR)

    t = in_thread(trickle)
    sizes, got, short = [], bytearray(), 0
    t0 = time.monotonic()
    deadline = t0 + 3
    while len(got) < n and time.monotonic() < deadline:
        want = n - len(got)
        try:
            chunk = app.recv(want)
        except BlockingIOError:
            sizes.append(-1)
            continue
        if not chunk:
            break
        sizes.append(len(chunk))
        short += len(chunk) < min(lowat, want)
        got += chunk
    took = time.monotonic() - t0
    t.join(2)
    ctx.check(data, bytes(got))
    app.close()
    side.close()
    shown = sizes if len(sizes) <= 8 else sizes[:8] + ["..."]
    seen = f"{len(sizes)} recv calls returned {shown} in {took:.2f} s"
    return {"so_rcvlowat": {"holds": short == 0 and -1 not in sizes, "seen": seen}}


def probe_splice(ctx: Ctx) -> dict:
    n = 100_000
    app, side = ctx.pair()
    data = payload(n, 2)
    side.sendall(data)
    app.setblocking(False)
    r, w = os.pipe()
    os.set_blocking(r, False)
    got, zeros, eagains = bytearray(), 0, 0
    t0 = time.monotonic()
    deadline = t0 + 1.5
    while len(got) < n and time.monotonic() < deadline:
        try:
            moved = os.splice(app.fileno(), w, n - len(got), flags=SPLICE_F_NONBLOCK)
        except BlockingIOError:
            eagains += 1
            time.sleep(0.01)  # (poll may say readable while splice finds nothing)
            continue
        if moved == 0:  # "EOF", though the sidecar has not closed
            zeros += 1
            time.sleep(0.05)
            continue
        got += os.read(r, moved)
    spliced, took = len(got), time.monotonic() - t0
    rest_deadline = time.monotonic() + 1.5  # what splice left: read it, check every byte
    while len(got) < n and time.monotonic() < rest_deadline:
        try:
            chunk = app.recv(n - len(got))
        except BlockingIOError:
            select.select([app], [], [], 0.05)
            continue
        if not chunk:
            break
        got += chunk
    ctx.check(data, bytes(got))
    os.close(r)
    os.close(w)
    app.close()
    side.close()
    seen = f"splice moved {spliced} of {n} bytes in {took:.2f} s"
    if spliced < n:
        seen += f" (returned 0 {zeros} times, EAGAIN {eagains} times; recv read the rest)"
    return {"splice_read": {"holds": spliced == n, "seen": seen}}


def probe_shutdown(ctx: Ctx) -> dict:
    """The sidecar sends the reply and closes 50 ms later (as a server that logs the
    request first): the app is blocked in recv, its queue empty, when the FIN comes."""
    conns, request, reply = 10, payload(1000, 3), payload(4 << 20, 4)
    eagain, failed_conns, where = 0, 0, set()
    for _ in range(conns):
        app, side = ctx.pair()

        def sidecar(side: socket.socket = side) -> None:
            got = bytearray()
            while chunk := side.recv(65536):
                got += chunk
            ctx.check(request, bytes(got))
            side.sendall(reply)
            time.sleep(0.05)
            side.close()

        t = in_thread(sidecar)
        app.sendall(request)
        app.shutdown(socket.SHUT_WR)
        got, mine = bytearray(), 0
        while True:  # blocking, no timeout: as such apps read
            try:
                chunk = app.recv(65536)
            except BlockingIOError:
                mine += 1
                where.add("after the whole reply" if len(got) == len(reply) else "mid-reply")
                continue
            if not chunk:
                break
            got += chunk
        t.join(5)
        app.close()
        ctx.check(reply, bytes(got))
        eagain += mine
        failed_conns += mine > 0
    seen = f"{eagain} recv calls failed with EAGAIN, in {failed_conns} of {conns} connections"
    if where:
        seen += f" ({', '.join(sorted(where))})"
    return {"recv_after_shutdown": {"holds": eagain == 0, "seen": seen}}


def probe_fionread(ctx: Ctx) -> dict:
    n, first = 20_000, 5_000
    app, side = ctx.pair()
    set_rcvtimeo(app, 1)
    data = payload(n, 5)
    empty = fionread(app)
    side.sendall(data)
    wait_for(lambda: fionread(app) >= n, 1)
    full = fionread(app)
    got = recv_exact(app, first, time.monotonic() + 1)
    rest = fionread(app)
    got += recv_exact(app, n - len(got), time.monotonic() + 1)
    ctx.check(data, got)
    app.close()
    side.close()
    holds = (empty, full, rest) == (0, n, n - first)
    seen = f"FIONREAD {empty} before, {full} with {n} bytes waiting, {rest} after reading {first}"
    return {"fionread": {"holds": holds, "seen": seen}}


def join_sockhash(args: argparse.Namespace, s: socket.socket) -> None:
    """Put a socket into the datapath's sockhash as sockops would (its own 4-tuple and
    netns cookie as the key): the socket's recvmsg, poll and ioctl become the sockmap's."""
    from meshaccel.datapath import bpfsys, structs

    local, remote = s.getsockname(), s.getpeername()
    key = structs.SockKey(
        netns_cookie=args.netns_cookie, local_ip=structs.ip_words(local[0]),
        remote_ip=structs.ip_words(remote[0]), local_port=local[1], remote_port=remote[1],
    )  # fmt: skip
    fd = bpfsys.obj_get(os.path.join(args.bpffs, "sock_hash"))
    try:
        bpfsys.map_update(fd, key, ctypes.c_uint64(s.fileno()))
    finally:
        os.close(fd)


def probe_tcp_queue(ctx: Ctx) -> dict:
    """Bytes that take the TCP path to a socket in the sockhash: a plain connection whose
    app socket joins the sockhash (with --join) after some bytes arrived."""
    before, after = 3_000, 2_000
    app, side = ctx.pair(captured=False)
    app.setblocking(False)
    data = payload(before + after, 6)
    side.sendall(data[:before])
    wait_for(lambda: fionread(app) >= before, 1)
    if ctx.args.join:
        join_sockhash(ctx.args, app)
    queued = fionread(app)
    ep = select.epoll()
    ep.register(app.fileno(), select.EPOLLIN | select.EPOLLET)
    ep.poll(0)  # (data already waiting may report once: not what is asked)
    side.sendall(data[before:])
    woke = bool(ep.poll(1.0))
    wait_for(lambda: fionread(app) >= before + after, 0.5)
    both = fionread(app)
    got = bytearray()
    deadline = time.monotonic() + 1.5
    while len(got) < before + after and time.monotonic() < deadline:
        try:
            chunk = app.recv(65536)
        except BlockingIOError:
            select.select([app], [], [], 0.05)
            continue
        if not chunk:
            break
        got += chunk
    ctx.check(data, bytes(got))
    ep.close()
    app.close()
    side.close()
    where = "in the sockhash" if ctx.args.join else "plain"
    seen = (
        f"socket {where}: FIONREAD {queued} with {before} bytes that came before it joined, "
        f"{both} after {after} more came over TCP"
    )
    fion = {"holds": both == before + after, "seen": seen}
    early = {"holds": queued == before, "seen": seen}
    wake = {"holds": woke, "seen": f"socket {where}: {'woke' if woke else 'no wake-up in 1 s'}"}
    return {"fionread_tcp_queue": fion, "fionread_tcp_early": early, "epoll_tcp_queue": wake}


def probe_peek(ctx: Ctx) -> dict:
    n = 10_000
    app, side = ctx.pair()
    set_rcvtimeo(app, 1)
    data = payload(n, 7)

    def later() -> None:
        time.sleep(0.05)
        side.sendall(data)

    t = in_thread(later)
    t0 = time.monotonic()
    try:
        first = app.recv(n, socket.MSG_PEEK)  # blocking: waits for the bytes
        blocked = f"a blocking peek returned {len(first)} bytes after {time.monotonic() - t0:.2f} s"
    except BlockingIOError:
        first = b""
        blocked = f"a blocking peek failed with EAGAIN after {time.monotonic() - t0:.2f} s"
    t.join(2)
    peeked = b""
    end = time.monotonic() + 1
    while len(peeked) < n and time.monotonic() < end:
        try:
            peeked = app.recv(n, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        time.sleep(0.005)
    again = app.recv(100, socket.MSG_PEEK)
    got = recv_exact(app, n, time.monotonic() + 1)
    ctx.check(data, got)
    app.close()
    side.close()
    holds = bool(first) and first == data[: len(first)] and peeked == data and again == data[:100]
    seen = (
        f"{blocked}; peek showed {len(peeked)} of {n} bytes"
        f"{' (the same bytes recv then read)' if peeked == got else ' (NOT what recv read)'}"
    )
    return {"msg_peek": {"holds": holds, "seen": seen}}


def probe_waitall(ctx: Ctx) -> dict:
    n, chunk = 256 * 1024, 4096
    app, side = ctx.pair()
    set_rcvtimeo(app, 3)
    data = payload(n, 8)

    def writer() -> None:
        for i in range(0, n, chunk):
            side.sendall(data[i : i + chunk])
            time.sleep(0.001)

    t = in_thread(writer)
    calls = []
    got = bytearray()
    deadline = time.monotonic() + 4
    while len(got) < n and time.monotonic() < deadline:
        try:
            part = app.recv(n - len(got), socket.MSG_WAITALL)
        except BlockingIOError:
            calls.append(-1)
            continue
        if not part:
            break
        calls.append(len(part))
        got += part
    t.join(2)
    ctx.check(data, bytes(got))
    app.close()
    side.close()
    shown = calls if len(calls) <= 8 else calls[:8] + ["..."]
    seen = f"{len(calls)} recv(MSG_WAITALL) calls returned {shown}"
    return {"msg_waitall": {"holds": calls == [n], "seen": seen}}


def probe_epoll(ctx: Ctx) -> dict:
    rounds, size = 20, 1000
    app, side = ctx.pair()
    app.setblocking(False)
    data = payload(rounds * size, 9)
    ep = select.epoll()
    ep.register(app.fileno(), select.EPOLLIN | select.EPOLLET)
    got, missed = bytearray(), []
    for i in range(rounds):
        side.sendall(data[i * size : (i + 1) * size])
        if not ep.poll(1.0):
            missed.append(i)
        if i % 2:  # read only part: the next write must wake the app all the same
            try:
                got += app.recv(size // 2)
            except BlockingIOError:
                pass
            continue
        while True:
            try:
                chunk = app.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
    got += recv_exact(app, len(data) - len(got), time.monotonic() + 1)
    ctx.check(data, bytes(got))
    ep.close()
    app.close()
    side.close()
    seen = f"{rounds - len(missed)} of {rounds} writes woke the app"
    if missed:
        seen += f" (missed: writes {missed[:6]})"
    return {"epoll_edge": {"holds": not missed, "seen": seen}}


def probe_epoll_level(ctx: Ctx) -> dict:
    rounds, size, part = 20, 1000, 300
    app, side = ctx.pair()
    app.setblocking(False)
    data = payload(rounds * size, 10)
    ep = select.epoll()
    ep.register(app.fileno(), select.EPOLLIN)
    got, missed, again = bytearray(), [], 0
    for i in range(rounds):
        side.sendall(data[i * size : (i + 1) * size])
        if not ep.poll(1.0):
            missed.append(i)
        try:
            got += app.recv(part)
        except BlockingIOError:
            pass
        again += bool(ep.poll(0))  # bytes remain: level-triggered reports them again
    got += recv_exact(app, len(data) - len(got), time.monotonic() + 1)
    ctx.check(data, bytes(got))
    ep.close()
    app.close()
    side.close()
    seen = f"{rounds - len(missed)} of {rounds} writes woke the app, reported again {again} times"
    return {"epoll_level": {"holds": not missed and again == rounds, "seen": seen}}


def probe_write_paths(ctx: Ctx) -> dict:
    """The app writes with sendfile(2) (from a file) and splice(2) (from a pipe)."""
    import tempfile

    n, checks = 1 << 20, {}
    for name, seed in (("sendfile", 11), ("splice_write", 12)):
        app, side = ctx.pair()
        set_rcvtimeo(side, 2)
        data = payload(n, seed)
        result: list[bytes] = []
        t = in_thread(lambda s=side, out=result: out.append(recv_exact(s, n, time.monotonic() + 3)))
        moved, err = 0, ""
        try:
            if name == "sendfile":
                with tempfile.TemporaryFile() as f:
                    f.write(data)
                    f.flush()
                    while moved < n and (k := os.sendfile(app.fileno(), f.fileno(), moved, n)):
                        moved += k
            else:
                r, w = os.pipe()
                filler = in_thread(lambda w=w, d=data: (os.write(w, d), os.close(w)))
                while moved < n and (k := os.splice(r, app.fileno(), 65536)):
                    moved += k
                filler.join(2)
                os.close(r)
        except OSError as e:
            err = f" ({errno.errorcode.get(e.errno or 0, e)})"
        t.join(4)
        got = result[0] if result else b""
        ctx.check(data, got)
        app.close()
        side.close()
        seen = f"{name} moved {moved} of {n} bytes{err}, the sidecar read {len(got)}"
        checks[name] = {"holds": moved == n and got == data, "seen": seen}
    return checks


def probe_rst(ctx: Ctx) -> dict:
    """The sidecar closes with SO_LINGER 0: once while bytes wait for the app, once while
    the app is blocked in recv."""
    n, checks = 64 << 10, {}
    for name, first in (("rst_queued", 16 << 10), ("rst_blocked", 64 << 10)):
        app, side = ctx.pair()
        set_rcvtimeo(app, 2)
        data = payload(n, 13)
        side.sendall(data)
        got = recv_exact(app, first, time.monotonic() + 1)
        end = time.monotonic() + 1
        while send_queue(side) and time.monotonic() < end:  # all delivered
            time.sleep(0.005)

        def reset(side: socket.socket = side) -> None:
            time.sleep(0.3)  # the app is blocked in recv by then, even in a slow VM
            side.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            side.close()

        if name == "rst_queued":
            reset()
        else:
            t = in_thread(reset)
        ends, t0 = [], time.monotonic()
        while len(ends) < 2 and time.monotonic() < t0 + 2:
            try:
                chunk = app.recv(65536)
            except BlockingIOError:
                ends.append("EAGAIN")
                continue
            except OSError as e:
                ends.append(errno.errorcode.get(e.errno or 0, str(e)))
                continue
            if not chunk:
                ends.append("EOF")
                continue
            got += chunk
        if name == "rst_blocked":
            t.join(2)
        ctx.check(data, got)
        app.close()
        seen = f"read {len(got)} of {n} bytes, then {', '.join(ends) or 'nothing'}"
        seen += f" after {time.monotonic() - t0:.2f} s"
        checks[name] = {"holds": got == data and ends == ["ECONNRESET", "EOF"], "seen": seen}
    return checks


def send_queue(s: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(s.fileno(), SIOCOUTQ, buf)
    return buf[0]


def probe_backlog(ctx: Ctx) -> dict:
    n, bound = 32 << 20, 16 << 20
    app, side = ctx.pair()
    data = payload(1 << 20, 14) * 32
    side.setblocking(False)
    view, sent = memoryview(data), 0
    while sent < n:  # the app reads nothing yet
        try:
            sent += side.send(view[sent : sent + 65536])
        except BlockingIOError:
            break
    queued = sent

    def rest() -> None:
        nonlocal sent
        while sent < n:
            try:
                sent += side.send(view[sent : sent + 65536])
            except BlockingIOError:
                select.select([], [side], [], 0.1)
        side.shutdown(socket.SHUT_WR)

    t = in_thread(rest)
    set_rcvtimeo(app, 2)
    got = recv_exact(app, n, time.monotonic() + 4)
    t.join(4)
    ctx.check(data, got)
    app.close()
    side.close()
    stalled = queued < n
    seen = (
        f"the sidecar's send failed with EAGAIN after {queued} bytes"
        if stalled
        else f"all {n} bytes queued for the app, no EAGAIN"
    )
    return {"backlog_bounded": {"holds": stalled and queued < bound, "seen": seen}}


CHILD_PROBES: dict[str, Callable[[Ctx], dict]] = {
    "rcvlowat": probe_rcvlowat,
    "splice": probe_splice,
    "shutdown": probe_shutdown,
    "fionread": probe_fionread,
    "tcp_queue": probe_tcp_queue,
    "peek": probe_peek,
    "waitall": probe_waitall,
    "epoll": probe_epoll,
    "epoll_level": probe_epoll_level,
    "write_paths": probe_write_paths,
    "rst": probe_rst,
    "backlog": probe_backlog,
}


def child_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshaccel.datapath.selftest")
    p.add_argument("--child", required=True, choices=sorted(CHILD_PROBES))
    p.add_argument("--bpffs", required=True)
    p.add_argument("--netns-cookie", type=int, required=True)
    p.add_argument("--join", action="store_true", help="the shortcut is on")
    args = p.parse_args(argv)
    signal.alarm(int(PROBE_BY_NAME[args.child].budget) + 5)  # a backstop: never linger
    t0 = time.monotonic()
    try:
        ctx = Ctx(args)
        checks = CHILD_PROBES[args.child](ctx)
        rec = {"checks": checks, **ctx.bytes_record()}
    except OSError as e:
        rec = {"error": f"{type(e).__name__}: {e}"}
    rec["seconds"] = round(time.monotonic() - t0, 3)
    print(json.dumps(rec), flush=True)
    return 1 if "error" in rec else 0


if __name__ == "__main__":
    sys.exit(child_main())
