#!/usr/bin/env python3
"""Benchmark the app<->sidecar hop: plain loopback TCP vs the meshaccel sk_msg shortcut.

What is measured
  One pod netns with a cgroup that has the meshaccel datapath attached (proxy port 15001).
  In it, a C "sidecar" listens on 127.0.0.1:15001 and a C "app" client talks to it:

  loopback  the app connects to 127.0.0.1:15001 itself. A loopback destination is not
            captured, its sockets never enter the sockhash: ordinary loopback TCP.
  shortcut  the app connects to 10.244.1.99:9080. connect4 rewrites that to
            127.0.0.1:15001, sockops puts both ends in the sockhash and sk_msg hands
            every sendmsg() straight to the peer socket.

  ping-pong  64-byte request, 64-byte echo, TCP_NODELAY, one connection; per round
             --count timed round trips after a warm-up; p50 and p99 of the round-trip time.
  stream     64 KiB writes for --duration seconds, then shutdown; the sink reads with a
             64 KiB buffer and answers with the byte count it got, so the rate counts bytes
             delivered to the reader. Bytes per second.

  CPU placement decides the round-trip time more than the hop itself does: when app and
  sidecar sit on different CPUs, every message wakes a sleeping CPU (on a VM: a halt and
  an IPI, tens of microseconds). Left to the scheduler, placement changes between and
  even within runs, so each placement in --pin is measured on its own: "same" (both on
  one CPU), "split" (one CPU each), "none" (scheduler decides; not reproducible). The
  "idle sleeps/rt" column (cpuidle entries on all CPUs per round trip) shows it.

  Rounds are interleaved (loopback, shortcut, loopback, shortcut, ...) after one discarded
  warm-up pair, so drift on the machine hits both modes alike. Reported per placement: the
  median over rounds of each metric per mode and the ratio shortcut/loopback, against the
  targets (RTT p50 <= 0.6x loopback, throughput >= 1.5x loopback). After every round the
  datapath's counters and the sidecar's byte count are checked: a shortcut round must have
  redirected exactly its bytes and a loopback round none, or the run fails (the numbers
  would be meaningless). A blocking read() that fails with EAGAIN (seen on sockhash
  sockets) is retried and reported as a WARNING.

Needs root, bcc, bpffs at /sys/fs/bpf and a C compiler. Everything it creates (netns,
cgroup, BPF pins and attachments, processes) is removed at exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meshaccel.datapath.pins import read_counters  # noqa: E402
from meshaccel.errors import MeshaccelError  # noqa: E402
from meshaccel.lab.sandbox import Sandbox  # noqa: E402

PROXY_PORT = 15001
POD_IP = "10.244.1.10"
CAPTURED_DST = ("10.244.1.99", 9080)  # any non-loopback destination is captured
LOOPBACK_DST = ("127.0.0.1", PROXY_PORT)  # loopback: not captured
MODES = ("loopback", "shortcut")
MSG_BYTES = 64
PINGPONG_WARMUP = 1000
TASKSET = "taskset"  # util-linux
TARGET_RTT_P50 = 0.6  # shortcut/loopback, at most
TARGET_THROUGHPUT = 1.5  # shortcut/loopback, at least


@dataclass
class Round:
    placement: str
    mode: str
    index: int  # 0 is the discarded warm-up round
    pingpong: dict = field(default_factory=dict)
    stream: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "hopbench")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("bench_hop: no C compiler (apt-get install gcc)")
    src = str(REPO / "scripts" / "hopbench.c")
    subprocess.run([cc, "-O2", "-Wall", "-o", exe, src], check=True)
    return exe


def idle_entries() -> int:
    """How often any CPU entered a sleeping idle state (cpuidle; polling excluded).

    On a VM each entry is a halt, i.e. an exit to the hypervisor, and the wake-up that
    ends it costs an IPI: per round trip this says whether the hop's wake-ups sleep.
    """
    total = 0
    for state in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpuidle/state[0-9]*"):
        if (state / "name").read_text().strip() != "POLL":
            total += int((state / "usage").read_text())
    return total


def check_host() -> None:
    if os.geteuid() != 0:
        sys.exit("bench_hop: must run as root (netns, cgroups, eBPF)")
    if not os.path.ismount("/sys/fs/bpf"):
        sys.exit("bench_hop: bpffs is not mounted: mount -t bpf bpf /sys/fs/bpf")


def cpus_for(placement: str) -> tuple[int | None, int | None]:
    """(sidecar CPU, app CPU) for a placement; None: wherever the scheduler puts it."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "same":
        return cpus[0], cpus[0]
    if placement == "split":
        return cpus[0], cpus[1]
    return None, None


def describe(placement: str) -> str:
    server_cpu, client_cpu = cpus_for(placement)
    if server_cpu is None:
        return "CPUs chosen by the scheduler"
    return f"sidecar on CPU {server_cpu}, app on CPU {client_cpu}"


class Bench:
    def __init__(self, lab: Sandbox, exe: str, ns: str, cg: str, bpffs: str) -> None:
        self.lab, self.exe, self.ns, self.cg, self.bpffs = lab, exe, ns, cg, bpffs
        self.placement = "none"

    def argv(self, role: str, args: list[str]) -> list[str]:
        """argv for the sidecar or app, under taskset when the placement pins it."""
        server_cpu, client_cpu = cpus_for(self.placement)
        cpu = server_cpu if role == "server" else client_cpu
        return ([TASKSET, "-c", str(cpu)] if cpu is not None else []) + [self.exe, *args]

    def server(self, kind: str, max_seconds: int) -> subprocess.Popen:
        argv = self.argv("server", [kind, str(PROXY_PORT), str(max_seconds)])
        p = self.lab.spawn(argv, netns=self.ns, cgroup=self.cg)
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "ready":
            err = p.stderr.read() if p.stderr else ""
            raise RuntimeError(f"{kind} did not start: {line!r} {err}")
        return p

    def stop(self, p: subprocess.Popen) -> None:
        p.kill()  # this very process, by its PID
        p.communicate(timeout=10)

    def client(
        self, mode: str, phase: str, args: list[str], server: subprocess.Popen, timeout: float
    ) -> dict:
        """Run one client to completion and check what the datapath did; its record."""
        host, port = LOOPBACK_DST if mode == "loopback" else CAPTURED_DST
        before = read_counters(self.bpffs)
        idle_before = idle_entries()
        argv = self.argv("client", [phase, host, str(port), *args])
        p = self.lab.spawn(argv, netns=self.ns, cgroup=self.cg)
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{mode} {phase} failed (rc {p.returncode}): {err.strip()}")
        rec = json.loads(out.strip().splitlines()[-1])
        conn = self.server_record(server)  # printed when the server saw EOF: all bytes moved
        rec["cpu_idle_entries"] = idle_entries() - idle_before
        if phase == "pingpong":
            rec["idle_sleeps_per_rt"] = rec["cpu_idle_entries"] / (
                rec["round_trips"] + rec["warmup"]
            )
        after = read_counters(self.bpffs)
        delta = {k: after[k] - before[k] for k in after}
        rec["redirected_bytes"] = delta["msg_redirected_bytes"]
        rec["server_eagain"] = conn["eagain"]
        app_bytes = (
            MSG_BYTES * (rec["round_trips"] + rec["warmup"])
            if phase == "pingpong"
            else rec["bytes"]
        )
        if conn["bytes"] != app_bytes:
            raise RuntimeError(
                f"{mode} {phase}: app sent {app_bytes} B, sidecar read {conn['bytes']}"
            )
        verify(mode, phase, delta, expected_redirect(phase, app_bytes))
        return rec

    @staticmethod
    def server_record(server: subprocess.Popen) -> dict:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 10)
        line = server.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"sidecar reported nothing for the connection (rc {server.poll()})")
        return json.loads(line)


def expected_redirect(phase: str, app_bytes: int) -> int:
    """Bytes a shortcut round must redirect: the app's data (echoed back in ping-pong), the
    sidecar's 1-byte hello and, in stream, its 8-byte count."""
    return 1 + (2 * app_bytes if phase == "pingpong" else app_bytes + 8)


def verify(mode: str, phase: str, delta: dict[str, int], expected: int) -> None:
    """Fail unless the round took the path its mode names: the numbers would mean nothing."""
    redirected = delta["msg_redirected_bytes"]
    if mode == "loopback" and (redirected or delta["msg_redirected"] or delta["connect_captured"]):
        raise RuntimeError(
            f"loopback {phase} round was captured or redirected: not plain TCP (counters {delta})"
        )
    if mode == "shortcut" and (
        delta["connect_captured"] != 1 or delta["msg_fallback_bytes"] or redirected != expected
    ):
        raise RuntimeError(
            f"shortcut {phase} round did not move all bytes through sk_msg: redirected "
            f"{redirected} of {expected} (counters {delta})"
        )


def run(args: argparse.Namespace, exe: str, lab: Sandbox) -> dict[str, list[Round]]:
    """Every placement in turn, each with its interleaved rounds; rounds by placement."""
    node = lab.node()
    ns = lab.pod("app", node, POD_IP)
    cg = lab.cgroup()
    bpffs = lab.attach(cg, pods=(ns,), proxy_port=PROXY_PORT)
    bench = Bench(lab, exe, ns, cg, bpffs)
    phases: list[tuple[str, str, list[str], float]] = [
        ("pingpong", "server-echo", [str(args.count), str(PINGPONG_WARMUP)], 70),
        ("stream", "server-sink", [str(args.duration)], args.duration + 40),
    ]
    out: dict[str, list[Round]] = {}
    for placement in args.pin:
        bench.placement = placement
        log(f"placement {placement}: {describe(placement)}")
        rounds = [Round(placement, mode, i) for i in range(args.rounds + 1) for mode in MODES]
        budget = int(60 + len(rounds) * (args.duration + 30))  # servers exit by themselves after
        for phase, server_kind, client_args, timeout in phases:
            server = bench.server(server_kind, budget)
            try:
                for r in rounds:
                    rec = bench.client(r.mode, phase, client_args, server, timeout)
                    setattr(r, phase, rec)
                    log(progress(phase, r, rec))
            finally:
                bench.stop(server)
        out[placement] = rounds
    return out


def progress(phase: str, r: Round, rec: dict) -> str:
    tag = "warm-up" if r.index == 0 else f"round {r.index}"
    if phase == "pingpong":
        what = (
            f"p50 {rec['p50_ns'] / 1000:7.1f} us  p99 {rec['p99_ns'] / 1000:7.1f} us  "
            f"{rec['idle_sleeps_per_rt']:4.2f} idle sleeps/rt"
        )
    else:
        what = f"{rec['bytes_per_s'] / 2**30:6.2f} GiB/s"
    line = f"  {r.placement:5} {phase:8} {tag:9} {r.mode:8} {what}"
    line += f"  (redirected {rec['redirected_bytes']} B)"
    if rec["eagain"] or rec["server_eagain"]:
        line += f"  WARNING: blocking read() failed with EAGAIN {rec['eagain']}x in the app"
        line += f" ({rec['eagain_in']})" if rec["eagain"] else ""
        line += f", {rec['server_eagain']}x in the sidecar"
    return line


def summarize(rounds: list[Round]) -> dict:
    measured = [r for r in rounds if r.index > 0]

    def med(mode: str, phase: str, key: str) -> float:
        return statistics.median(getattr(r, phase)[key] for r in measured if r.mode == mode)

    metrics = {
        "rtt_p50_us": ("pingpong", "p50_ns", 1e-3, TARGET_RTT_P50, "<="),
        "rtt_p99_us": ("pingpong", "p99_ns", 1e-3, None, ""),
        "throughput_gib_s": ("stream", "bytes_per_s", 1 / 2**30, TARGET_THROUGHPUT, ">="),
        "idle_sleeps_per_rt": ("pingpong", "idle_sleeps_per_rt", 1, None, ""),
    }
    out = {}
    for name, (phase, key, scale, target, op) in metrics.items():
        lo = med("loopback", phase, key) * scale
        sc = med("shortcut", phase, key) * scale
        ratio = sc / lo if lo else None
        met = None
        if target is not None and ratio is not None:
            met = ratio <= target if op == "<=" else ratio >= target
        out[name] = {
            "loopback": lo,
            "shortcut": sc,
            "ratio": ratio,
            "target": None if target is None else f"{op} {target}x",
            "met": met,
        }
    return out


def eagain_totals(rounds: list[Round]) -> dict[str, dict[str, int]]:
    """EAGAINs from blocking read()s, per mode and side, over all rounds (warm-up too)."""
    out = {mode: {"app": 0, "sidecar": 0} for mode in MODES}
    for r in rounds:
        for rec in (r.pingpong, r.stream):
            out[r.mode]["app"] += rec.get("eagain", 0)
            out[r.mode]["sidecar"] += rec.get("server_eagain", 0)
    return out


def table(
    placement: str, summary: dict, eagain: dict[str, dict[str, int]], args: argparse.Namespace
) -> str:
    lines = [
        f"placement {placement} ({describe(placement)}): median of "
        f"{args.rounds} interleaved rounds; ping-pong {args.count} x {MSG_BYTES} B round "
        f"trips, stream {args.duration} s of 64 KiB writes per round",
        f"{'metric':18} {'loopback':>10} {'shortcut':>10} {'ratio':>7} {'target':>8}  met?",
    ]
    for name, m in summary.items():
        met = "-" if m["met"] is None else ("yes" if m["met"] else "NO")
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.2f}x"
        lines.append(
            f"{name:18} {m['loopback']:10.2f} {m['shortcut']:10.2f} {ratio:>7} "
            f"{m['target'] or '-':>8}  {met}"
        )
    for mode, n in eagain.items():
        if n["app"] or n["sidecar"]:
            lines.append(
                f"WARNING: {mode}: blocking read() failed with EAGAIN {n['app']}x in the app and "
                f"{n['sidecar']}x in the sidecar (retried after poll(); see hopbench.c)"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rounds", type=int, default=7, help="measured rounds per mode (default 7)")
    ap.add_argument(
        "--duration", type=float, default=1.0, help="stream seconds per round (default 1.0)"
    )
    ap.add_argument(
        "--count", type=int, default=20000, help="timed round trips per round (default 20000)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="3 rounds, 5000 round trips, 0.3 s streams"
    )
    ap.add_argument(
        "--pin",
        default="same,split",
        help="CPU placements to measure, comma-separated: same (sidecar and app on one "
        "CPU), split (one CPU each), none (scheduler decides). Default: same,split",
    )
    ap.add_argument("--json", metavar="PATH", help="also write rounds and summary as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.count, args.duration = 3, 5000, 0.3
    if args.rounds < 1 or not 100 <= args.count <= 200_000 or not 0 < args.duration <= 10:
        # (hopbench bounds a ping-pong client to 60 s: 200k round trips fit even at 200 us)
        ap.error("need --rounds >= 1, 100 <= --count <= 200000 and 0 < --duration <= 10")
    args.pin = list(dict.fromkeys(args.pin.split(",")))
    if not args.pin or not set(args.pin) <= {"same", "split", "none"}:
        ap.error(f"--pin {','.join(args.pin)}: placements are same, split and none")
    if "split" in args.pin and len(os.sched_getaffinity(0)) < 2:
        ap.error("--pin split needs two CPUs")
    return args


MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the finally clauses clean up. Helper processes that
    pyroute2 forks inherit this handler and get SIGTERM from it: they die as by default."""
    if os.getpid() != MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_host()
    signal.signal(signal.SIGTERM, _interrupt)
    lab = Sandbox(f"ma-bench-{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="ma-bench-") as tmp:
        exe = build(tmp)
        log(f"bench_hop: {args.rounds} rounds (+1 warm-up) per mode, lab {lab.prefix}")
        started = time.monotonic()
        try:
            by_placement = run(args, exe, lab)
        except (RuntimeError, MeshaccelError) as e:
            log(f"bench_hop: FAILED: {e}")
            return 1
        except KeyboardInterrupt:
            log("bench_hop: interrupted; cleaning up")
            return 130
        finally:
            lab.cleanup()
    results = {}
    for placement, rounds in by_placement.items():
        summary, eagain = summarize(rounds), eagain_totals(rounds)
        print(table(placement, summary, eagain, args) + "\n")
        results[placement] = {
            "cpus": dict(zip(("sidecar", "app"), cpus_for(placement), strict=True)),
            "summary": summary,
            "eagain": eagain,
            "rounds": [asdict(r) for r in rounds],
        }
    log(f"bench_hop: done in {time.monotonic() - started:.0f} s")
    if args.json:
        doc = {
            "command": " ".join(
                ["scripts/bench_hop.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "settings": {"rounds": args.rounds, "count": args.count, "duration": args.duration},
            "placements": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
