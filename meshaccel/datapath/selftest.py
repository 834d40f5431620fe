"""`meshaccel selftest`: which TCP semantics does the running kernel keep on the shortcut?

Once a socket is in the datapath's sockhash, its recvmsg, poll and ioctl are the kernel's
sockmap versions (tcp_bpf_*), and what an app sees can change with the kernel: a blocking
recv that returns EAGAIN, splice(2) that moves nothing, SO_RCVLOWAT ignored, FIONREAD
reading 0. The self-test measures this on the running kernel instead of assuming it.

It builds a throw-away pod of its own (selftest_sandbox: a network namespace, a cgroup and
a bpffs directory named ma-selftest-<pid>), attaches the real datapath there and registers
the pod. Each probe (selftest_probes) runs one small socket pattern in a child process
inside that cgroup and netns: the app connects to a pod address (captured to a "sidecar"
listener on 127.0.0.1:15001 in the same netns) and the two ends do what the probe is about,
every byte checksummed. Every probe runs twice, with the shortcut on for app sockets
(attach --app-shortcut, what a pod's opt-in gives) and with attach's defaults, which keep
app sockets off it (capture unchanged, the bytes on loopback TCP): the second run is the
proof that an app sees plain TCP by default. The datapath's counters show which path each
run took. Per semantic the report (this module) says: holds, differs (and what was seen),
or could not be measured. Everything is removed afterwards, also on failure or Ctrl-C, and
leftovers of an earlier self-test that was killed are removed before starting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshaccel.datapath.host import check_root
from meshaccel.datapath.selftest_sandbox import (
    PREFIX,
    Sandbox,
    raise_on_sigterm,
    restore_sigterm,
    sweep_stale,
)
from meshaccel.datapath.selftest_sandbox import leftovers as leftovers  # (the CLI's tests)

POD_IP = "10.244.255.10"  # the throw-away pod's address (exists only in the maps)

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


@dataclass(frozen=True)
class Mitigation:
    name: str
    what: str
    keeps: tuple[str, ...]  # the semantics it keeps plain TCP's ("*": every one)


# What the datapath does, as attach sets it up, so that apps keep plain TCP's semantics.
# The self-test's datapath is set up the same way; its runs prove that each is on.
MITIGATIONS: tuple[Mitigation, ...] = (
    Mitigation(
        "app_sockets_off",
        "app sockets stay off the shortcut (only sidecar<->sidecar connections take it) "
        'unless their pod (meshaccel.io/shortcut: "true") or the node (--app-shortcut) '
        "opts in",
        ("*",),
    ),
    Mitigation(
        "tcp_bytes_verdict",
        "a no-op SK_SKB verdict program (bpf/verdict.c) queues bytes that reach a sockhash "
        "socket over TCP where the sockmap FIONREAD and poll look",
        ("fionread_tcp_queue", "epoll_tcp_queue"),
    ),
)


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
        "mitigations": mitigations(runs, semantics),
        "probes": probes,
    }


def mitigations(runs: dict[tuple[str, bool], dict], semantics: list[dict]) -> list[dict]:
    """Each mitigation, whether this run proved it on, and by what. app_sockets_off: the
    run with attach's defaults kept every captured connection's app end off and plain TCP
    behaved as expected in it; tcp_bytes_verdict: the semantics it keeps hold."""
    out = []
    for m in MITIGATIONS:
        if m.keeps == ("*",):
            off = [runs[(p.name, False)] for p in PROBES if p.captured and (p.name, False) in runs]
            ok = sum(
                1
                for r in off
                if not r.get("path_problem")
                and (r.get("result") or {}).get("bytes_ok")
                and all(c["holds"] for c in r["result"].get("checks", {}).values())
            )
            on = bool(off) and ok == len(off)
            proof = (
                f"with attach's defaults {ok} of {len(off)} probes kept the app off the "
                "shortcut and saw plain TCP"
            )
        else:
            status = {s["name"]: s["status"] for s in semantics if s["name"] in m.keeps}
            on = bool(status) and all(st == HOLDS for st in status.values())
            proof = ", ".join(f"{name} {st}" for name, st in status.items()) or "not measured"
        out.append({"name": m.name, "what": m.what, "on": on, "proof": proof})
    return out


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
    on = [m["name"] for m in report.get("mitigations", []) if m["on"]]
    off = [m["name"] for m in report.get("mitigations", []) if not m["on"]]
    if on:
        text += f"; mitigations on: {', '.join(on)}"
    if off:
        text += f"; not proven on: {', '.join(off)}"
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
    if report.get("mitigations"):
        lines += ["", "mitigations (as attach sets them up; this run's proof):"]
        mwidth = max(len(m["name"]) for m in report["mitigations"])
        for m in report["mitigations"]:
            state = "ON" if m["on"] else "NOT PROVEN"
            lines.append(f"{state:<10} {m['name']:<{mwidth}}  {m['what']}")
            lines.append(f"{' ' * (11 + mwidth + 2)}{m['proof']}")
    if report["differs"]:
        lines += ["", ADVICE]
    return "\n".join(lines)


# ================================================================ running it (root)


def run(log: Log = lambda _m: None, prefix: str | None = None, only: tuple[str, ...] = ()) -> dict:
    """Run every probe (or only these) on this kernel in a throw-away pod; the report
    (build_report). Needs root, bcc and bpffs, as attach does."""
    from meshaccel.datapath import loader, pods

    check_root()
    prefix = prefix or f"{PREFIX}-{os.getpid()}"
    sweep_stale(log)
    t0 = time.monotonic()
    sandbox = Sandbox(prefix)
    previous = raise_on_sigterm()
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
                delta = r.pop("counters")
                r["path"] = path_summary(probe, delta)
                r["path_problem"] = path_problem(probe, shortcut, delta)
                runs[(probe.name, shortcut)] = r
                outcome = r.get("error") or ("timed out" if r.get("timed_out") else "done")
                log(
                    f"probe {probe.name:<9} shortcut {'on ' if shortcut else 'off'}: "
                    f"{outcome} in {r['seconds']:.2f} s ({r.get('path', '')})"
                )
    finally:
        restore_sigterm(previous)
        log(f"removing {prefix}")
        sandbox.remove()
    return build_report(runs, os.uname().release, time.monotonic() - t0, setup)
