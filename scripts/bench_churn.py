#!/usr/bin/env python3
"""Benchmark pod churn through the node agent: event->map latency, events/s, RSS, start time.

What is measured
  A lab node: one cgroup with the datapath attached (pins in /sys/fs/bpf/ma-churn-<pid>)
  and --pods real network namespaces (ma-churn-<pid>-<i>, pod IPs 10.244.x.y), plus one
  "sentinel" pod. Each pod also has a process in a kubelet-style cgroup (pod<uid>) in its
  netns, so the agent's own Kubernetes netns lookup (/proc scan by pod UID) finds it.

  Events cycle over the pods round robin: add -> update (a new
  traffic.sidecar.istio.io/excludeInboundPorts value) -> delete -> add ..., so every
  event is a real registry change; about 2/3 of the pods are registered at any time.
  Every present state carries a unique annotation value, hence unique capture args.

  Sources
    file        the pods file (YAML) rewritten per event, atomically (rename);
    kubernetes  meshaccel/lab/fake_apiserver.FakeApiServer: create / annotate / delete per event.
  Modes
    agent       `meshaccel run` as a subprocess, as users run it (the kubernetes source
                reaches the double through a kubeconfig in KUBECONFIG);
    inprocess   FileSource/KubernetesSource + Reconciler in a thread of this process,
                with timers around the reconcile and the datapath's pod API it calls
                (where the time goes).

  Per source and mode, three runs:
    single   --single events, one at a time (the next once the last is applied, after a
             random 0-200 ms idle gap): the latency of one event on an idle agent;
    paced    --events events offered at --rate events/s (open loop): event->map latency
             p50/p99 at that rate, and the rate achieved;
    unpaced  --events events written as fast as this script can: sustained events/s =
             events / (time from the first write until the map showed the last one). The
             file source reads only the latest file, so it may coalesce many events into
             one sync (the "syncs" column says how many it did).
  Event->map latency: from just before the write (file rename / API call) until the
  pinned pod_config map shows the event's state for that pod (one lookup per pod with
  pending events every ~0.5 ms; a delete counts when the entry is gone). When the agent
  coalesces several events of one pod so that a state is never visible (a delete whose
  add was never seen), the event counts as applied when the sentinel's update, written
  after the last event, shows up (reported as "by sentinel"; such latencies are upper
  bounds).

  Agent: start-to-ready (process start until /readyz answers 200), per source fresh (no
  datapath: `meshaccel attach` compiles with bcc in a child; the datapath is detached
  before the kubernetes agent's fresh start) and adopting the attached datapath with the
  pods registered; RSS after the churn (steady) and its peak (VmHWM). With py-spy
  (--py-spy, or on PATH) the agent is profiled during the churn.

  Targets: p99 event->map <= 50 ms, >= 500 events/s, agent RSS <= 150 MiB,
  start-to-ready <= 5 s including bcc compilation.

Needs root, bcc and bpffs at /sys/fs/bpf. Everything it creates (netns, cgroups, BPF pins
and attachments, processes, temp files) is removed at exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes import client  # noqa: E402

from meshaccel.agent import file_source, kubernetes_source, reconciler  # noqa: E402
from meshaccel.agent.file_source import FileSource  # noqa: E402
from meshaccel.agent.reconciler import Reconciler  # noqa: E402
from meshaccel.datapath import loader, pods, structs  # noqa: E402
from meshaccel.datapath import netns as netns_mod  # noqa: E402
from meshaccel.errors import MeshaccelError  # noqa: E402
from meshaccel.lab.agent_process import AgentProcess, metrics_delta  # noqa: E402
from meshaccel.lab.churn import (  # noqa: E402
    NODE,
    ApiDriver,
    Churn,
    Driver,
    FileDriver,
    InProcess,
    RunResult,
    Slot,
    Tracker,
    run_events,
    settle,
    summarize,
)
from meshaccel.lab.fake_apiserver import FakeApiServer  # noqa: E402
from meshaccel.lab.profiling import CallTimer, PySpy  # noqa: E402
from meshaccel.lab.sandbox import Sandbox  # noqa: E402

# The in-process breakdown: the reconciler, the pod sources' parsing and the datapath's
# public pod API it calls (in_netns: work inside a pod's netns, in a thread of its own)
TIMED_CALLS: tuple[tuple[Any, str], ...] = (
    (Reconciler, "sync"),
    (file_source, "read_pods_file"),
    (kubernetes_source, "pod_spec"),
    (pods, "registrations"),
    (pods, "add"),
    (pods, "remove"),
    (reconciler, "netns_cookie"),
    (netns_mod, "in_netns"),
    (pods, "capture_args"),
    (pods, "capture_config"),
    (pods, "adopt_inbound_listener"),
)
TARGET_P99_MS = 50.0
TARGET_RATE = 500.0
TARGET_RSS_MIB = 150.0
TARGET_READY_S = 5.0
MESHACCEL = os.path.join(os.path.dirname(sys.executable), "meshaccel")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the bench


@dataclass
class Settings:
    events: int
    pods: int
    rate: float
    timeout: float
    sources: list[str]
    modes: list[str]
    py_spy: str | None
    single: int


class Bench:
    def __init__(self, s: Settings, lab: Sandbox, tmp: Path) -> None:
        self.s = s
        self.lab = lab
        self.tmp = tmp
        self.prefix = lab.prefix
        self.bpffs = f"/sys/fs/bpf/{self.prefix}"
        self.seq = 10**9  # settle events (not measured)
        self.results: list[RunResult] = []
        self.ready: dict[str, float] = {}
        self.rss: dict[str, dict[str, float]] = {}
        self.attach_child: dict[str, dict[str, float]] = {}  # by start
        self.breakdown: dict[str, dict[str, list[float]]] = {}
        self.profiles: dict[str, dict[str, Any]] = {}
        self.agent: AgentProcess | None = None
        self.inproc: InProcess | None = None
        self.server: FakeApiServer | None = None
        self.cgroup = ""
        self.churn: Churn | None = None
        self.drivers: dict[str, Driver] = {}
        self.agent_source: str | None = None
        self.timer = CallTimer(TIMED_CALLS, runs_in_thread=("in_netns",))

    # -- lab
    def setup(self) -> Churn:
        self.cgroup = self.lab.cgroup("cg")
        slots = []
        for i in range(self.s.pods + 1):  # the last one is the sentinel
            name = self.lab.new_netns(str(i), loopback_up=False)
            uid = str(uuid.uuid4())
            pod_cg = self.lab.cgroup(f"pod{uid}", parent=self.cgroup)
            # the pod's "pause" process: the agent's kubernetes source finds the netns by it
            self.lab.spawn(
                ["sleep", "1800"], netns=name, cgroup=pod_cg,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            ip = f"10.244.{1 + i // 250}.{1 + i % 250}"
            pod = "churn-sentinel" if i == self.s.pods else f"churn-{i}"
            key = structs.IpKey(structs.ip_words(ip))
            slots.append(Slot(i, pod, ip, f"/var/run/netns/{name}", uid, key))
        self.lab.bpffs.append(self.bpffs)  # detached at cleanup, whatever happens
        return Churn(slots[:-1], slots[-1])

    def agent_argv(self, source: str) -> list[str]:
        exe = [MESHACCEL] if os.path.exists(MESHACCEL) else [
            sys.executable, "-c", "from meshaccel.cli import main; main()"
        ]  # fmt: skip
        argv = [*exe, "run", "--source", source, "--bpffs", self.bpffs, "--cgroup", self.cgroup]
        if source == "file":
            return [*argv, "--pods-file", str(self.tmp / "pods.yaml")]
        return [*argv, "--node-name", NODE]

    def agent_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MESHACCEL_", "KUBERNETES_SERVICE_")) and k != "NODE_NAME"
        }
        if self.server is not None:
            env["KUBECONFIG"] = str(self.tmp / "kubeconfig")
        return env

    def start_agent(self, source: str, what: str) -> AgentProcess:
        agent = self.agent = AgentProcess(
            self.agent_argv(source), self.agent_env(), self.tmp / f"agent-{source}.log"
        )
        self.agent_source = source
        seconds = agent.start(timeout=120)
        self.ready[what] = seconds
        log(f"  agent ready in {seconds:.2f} s ({what})")
        if agent.attach_child:
            self.attach_child[what] = agent.attach_child
            log(
                f"    of which `meshaccel attach` child (bcc compile, load, attach): "
                f"{agent.attach_child['seconds']:.2f} s, peak RSS "
                f"{agent.attach_child['peak_rss_mib']:.0f} MiB"
            )
        return agent

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = self.agent_source = None

    def api_server(self) -> FakeApiServer:
        if self.server is None:
            self.server = FakeApiServer().start()
            (self.tmp / "kubeconfig").write_text(
                json.dumps(
                    {
                        "apiVersion": "v1",
                        "kind": "Config",
                        "clusters": [{"name": "double", "cluster": {"server": self.server.url}}],
                        "users": [{"name": "bench", "user": {}}],
                        "contexts": [
                            {"name": "double", "context": {"cluster": "double", "user": "bench"}}
                        ],
                        "current-context": "double",
                    }
                )
            )
        return self.server

    def driver(self, source: str) -> Driver:
        """One driver per source for the whole run (the file driver numbers its versions)."""
        assert self.churn is not None
        if source not in self.drivers:
            if source == "file":
                self.drivers[source] = FileDriver(self.tmp / "pods.yaml", self.churn)
            else:
                self.drivers[source] = ApiDriver(self.api_server(), self.churn)
        return self.drivers[source]

    def settle(self, driver: Driver, tracker: Tracker) -> None:
        assert self.churn is not None
        self.seq += 1
        settle(driver, tracker, self.churn, self.seq, 60)

    # -- phases
    def run(self) -> None:
        self.churn = churn = self.setup()
        log(f"lab {self.prefix}: {self.s.pods} pod netns + sentinel, cgroup {self.cgroup}")
        self.driver("file").seed()  # the pods file exists before the agent starts
        if "agent" in self.s.modes:
            log("agent, fresh start (no datapath: compiles with bcc) with the pods file")
            self.start_agent("file", "fresh, file source")
            churn.bpffs = self.bpffs
            tracker = Tracker(self.bpffs, churn)
            self.settle(self.driver("file"), tracker)
            self.stop_agent()
            log("agent restart: adopts the attached datapath, pods already registered")
            self.start_agent("file", "adopt, file source")
        else:
            loader.attach(self.cgroup, bpffs=self.bpffs)
            churn.bpffs = self.bpffs
            tracker = Tracker(self.bpffs, churn)
        for source in self.s.sources:
            for mode in self.s.modes:
                with contextlib.ExitStack() as stack:
                    if mode == "agent":
                        self.use_agent(source, tracker)
                    else:
                        self.use_inprocess(source, tracker, stack)
                    self.source_runs(source, mode, tracker, stack)
        self.stop_agent()

    def use_agent(self, source: str, tracker: Tracker) -> None:
        if self.agent_source != source:
            self.stop_agent()
            self.driver(source).seed()  # the source holds the current pods before it starts
            if source != "file":  # a fresh start with this source too (the DaemonSet's)
                loader.detach(bpffs=self.bpffs)
                log(f"agent with the {source} source, fresh start (datapath detached first)")
                self.start_agent(source, f"fresh, {source} source")
                tracker.reopen()
                self.settle(self.driver(source), tracker)
                self.stop_agent()
            log(f"agent with the {source} source: adopts the datapath")
            self.start_agent(source, f"adopt, {source} source")
        self.settle(self.driver(source), tracker)

    def use_inprocess(self, source: str, tracker: Tracker, stack: contextlib.ExitStack) -> None:
        assert self.churn is not None
        self.stop_agent()
        stack.enter_context(self.timer.installed())
        self.driver(source).seed()
        src: reconciler.PodSource
        if source == "file":
            src = FileSource(str(self.tmp / "pods.yaml"))
        else:
            api = client.CoreV1Api(
                client.ApiClient(client.Configuration(host=self.api_server().url))
            )
            netns_by_name = {s.name: s.netns for s in [*self.churn.slots, self.churn.sentinel]}
            src = kubernetes_source.KubernetesSource(
                NODE, api=api, netns_of=lambda p: netns_by_name.get(p["metadata"]["name"])
            )
        log(f"in-process {source} source + Reconciler")
        self.inproc = InProcess(src, self.bpffs)
        stack.callback(self.stop_inproc)
        self.settle(self.driver(source), tracker)

    def source_runs(
        self, source: str, mode: str, tracker: Tracker, stack: contextlib.ExitStack
    ) -> None:
        assert self.churn is not None
        driver = self.driver(source)
        label = f"{source}/{mode}"
        spy = None
        if self.agent is not None and self.agent.proc is not None and self.s.py_spy:
            spy = PySpy(self.s.py_spy, self.agent.proc.pid, self.tmp / f"{source}.spy")
            stack.callback(spy.kill)
        self.timer.reset()
        runs = [("paced", self.s.rate, self.s.events), ("unpaced", 0.0, self.s.events)]
        if self.s.single:
            runs.insert(0, ("single", -1.0, self.s.single))
        for run, rate, n in runs:
            before = self.agent.metrics() if self.agent else {}
            what = f"{label} {run}" + (f" at {rate:.0f}/s" if rate > 0 else "")
            log(f"  {what}: {n} events")
            events, start, last = run_events(
                what, driver, tracker, self.churn, n, rate, self.s.timeout, log
            )
            r = summarize(source, mode, run, events, start, last, tracker.vanished)
            if self.agent:
                time.sleep(0.1)  # (the sync that applied the sentinel records its metrics)
                r.agent = metrics_delta(before, self.agent.metrics())
            elif self.inproc:
                steps = self.breakdown[f"{label} {run}"] = self.timer.reset()
                calls, seconds = steps.get("sync", [0, 0.0])
                r.agent = {
                    "syncs": calls,
                    "sync_ms_mean": seconds / calls * 1000 if calls else math.nan,
                    "sync_seconds": seconds,
                    "failed": self.inproc.take_failed(),
                }
            self.results.append(r)
            log(
                f"    -> {r.applied_per_s:.0f} events/s applied (offered "
                f"{r.offered_per_s:.0f}/s), p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
                f"max {r.max_ms:.1f} ms; {r.by_sentinel} by sentinel, {r.lost} lost, "
                f"{r.agent.get('syncs', 0):.0f} syncs, {r.agent.get('failed', 0):.0f} failed"
            )
            self.settle(driver, tracker)
        if self.agent is not None:
            if spy is not None:
                self.profiles[label] = spy.stop()
            time.sleep(1)
            now, peak = self.agent.rss()
            self.rss[source] = {"steady_mib": now, "peak_mib": peak}
            log(f"  agent RSS after the churn: {now:.1f} MiB, peak {peak:.1f} MiB")

    def stop_inproc(self) -> None:
        if self.inproc is not None:
            self.inproc.stop()
            self.inproc = None

    def cleanup(self) -> None:
        self.stop_inproc()
        self.stop_agent()
        if self.server is not None:
            self.server.stop()
            self.server = None


# ------------------------------------------------------------------ report


def met(ok: bool, margin: str) -> str:
    return f"{'yes' if ok else 'NO'} ({margin})"


def report(b: Bench) -> str:
    s = b.s
    lines = [
        f"pod churn over {s.pods} pods: {s.single} events one at a time (single), "
        f"{s.events} paced at {s.rate:.0f}/s, {s.events} unpaced",
        "latency: from the write until the pod_config map shows it; 'sentinel': events whose",
        "state was never visible (coalesced), counted as applied when the sentinel was;",
        "'p99 seen': p99 without those; syncs, ms/sync: the reconciles during the run",
        f"{'source':10} {'mode':9} {'run':8} {'events/s':>9} {'offered':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'p99 seen':>8} {'sentinel':>8} {'lost':>4} {'syncs':>6} "
        f"{'ms/sync':>7}",
    ]
    for r in b.results:
        syncs = r.agent.get("syncs")
        lines.append(
            f"{r.source:10} {r.mode:9} {r.run:8} {r.applied_per_s:9.0f} {r.offered_per_s:8.0f} "
            f"{r.p50_ms:8.1f} {r.p99_ms:8.1f} {r.max_ms:8.1f} {r.p99_seen_ms:8.1f} "
            f"{r.by_sentinel:8d} {r.lost:4d} "
            + (f"{syncs:6.0f} {r.agent['sync_ms_mean']:7.2f}" if syncs is not None else "")
        )
    lines += ["", "targets (agent; p99 from the paced run, events/s from the unpaced run):"]
    for r in b.results:
        if r.mode == "agent" and r.run == "single":
            lines.append(
                f"  {r.source:10} (p99 event->map one event at a time, unloaded: "
                f"{r.p99_ms:.1f} ms; p50 {r.p50_ms:.1f} ms)"
            )
        elif r.mode == "agent" and r.run == "paced":
            margin = f"{r.p99_ms:.1f} ms, margin {TARGET_P99_MS - r.p99_ms:+.1f} ms"
            lines.append(
                f"  {r.source:10} p99 event->map at {r.offered_per_s:.0f}/s offered <= "
                f"{TARGET_P99_MS:.0f} ms: {met(r.p99_ms <= TARGET_P99_MS, margin)}"
            )
        elif r.mode == "agent":
            margin = f"{r.applied_per_s:.0f}/s, margin {r.applied_per_s - TARGET_RATE:+.0f}/s"
            lines.append(
                f"  {r.source:10} sustained >= {TARGET_RATE:.0f} events/s: "
                f"{met(r.applied_per_s >= TARGET_RATE, margin)}"
            )
    for source, m in b.rss.items():
        lines.append(
            f"  {source:10} agent RSS <= {TARGET_RSS_MIB:.0f} MiB: "
            + met(
                m["peak_mib"] <= TARGET_RSS_MIB,
                f"steady {m['steady_mib']:.1f}, peak {m['peak_mib']:.1f} MiB, margin "
                f"{TARGET_RSS_MIB - m['peak_mib']:+.1f} MiB",
            )
        )
    for what, sec in b.ready.items():
        lines.append(
            f"  start-to-ready, {what}: "
            + met(sec <= TARGET_READY_S, f"{sec:.2f} s, margin {TARGET_READY_S - sec:+.2f} s")
        )
    for what, child in b.attach_child.items():
        lines.append(
            f"    {what}: the `meshaccel attach` child ran {child['seconds']:.2f} s, peak RSS "
            f"{child['peak_rss_mib']:.0f} MiB (a process of its own, next to the agent)"
        )
    for r in b.results:
        if r.vanished:
            lines.append(f"  WARNING: {r.source}/{r.mode} {r.run}: {r.vanished} entries vanished")
    for label, steps in b.breakdown.items():
        r = next(r for r in b.results if f"{r.source}/{r.mode} {r.run}" == label)
        if r.run != "paced":
            continue  # (all runs are in --json)
        lines += ["", f"in-process {label}: time per step (inclusive), {r.events} events"]
        lines.append(f"  {'step':44} {'calls':>7} {'total ms':>9} {'ms/call':>8} {'ms/event':>8}")
        for path, (calls, total) in sorted(steps.items()):
            depth = path.count("/")
            name = "  " * depth + path.rsplit("/", 1)[-1]
            lines.append(
                f"  {name:44} {calls:7.0f} {total * 1000:9.1f} {total * 1000 / calls:8.3f} "
                f"{total * 1000 / r.events:8.3f}"
            )
    for label, prof in b.profiles.items():
        if not prof:
            continue
        lines += ["", f"py-spy, agent during {label} ({prof['samples']} active samples):"]
        lines += [f"  {pct:5.1f}%  {fn}" for fn, pct in prof["inclusive_pct"].items()]
        lines.append("  self time:")
        lines += [f"  {pct:5.1f}%  {fn}" for fn, pct in prof["self_pct"].items()]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--events", type=int, help="events per run (default 1000)")
    ap.add_argument("--pods", type=int, help="pod netns churned (default 50)")
    ap.add_argument(
        "--rate", type=float, default=TARGET_RATE, help="paced runs: events/s (default 500)"
    )
    ap.add_argument("--sources", default="file,kubernetes", help="file,kubernetes (default both)")
    ap.add_argument("--modes", default="agent,inprocess", help="agent,inprocess (default both)")
    ap.add_argument(
        "--timeout", type=float, default=60, help="seconds per run, at most (default 60)"
    )
    ap.add_argument(
        "--py-spy",
        metavar="PATH",
        default=shutil.which("py-spy"),
        help="py-spy to profile the agent with (default: from PATH; '' for none)",
    )
    ap.add_argument(
        "--single",
        type=int,
        help="events of the one-at-a-time run (unloaded latency; default 50, 0: none)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="defaults of 200 events, 20 pods, --single 20"
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = ap.parse_args(argv)
    for name, default, quick in (("events", 1000, 200), ("pods", 50, 20), ("single", 50, 20)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else default)
    sources = list(dict.fromkeys(a.sources.split(",")))
    modes = list(dict.fromkeys(a.modes.split(",")))
    if not set(sources) <= {"file", "kubernetes"} or not set(modes) <= {"agent", "inprocess"}:
        ap.error("--sources: file,kubernetes; --modes: agent,inprocess")
    if not 1 <= a.events <= 20000 or not 3 <= a.pods <= 1000 or a.rate <= 0:
        ap.error("need 1 <= --events <= 20000, 3 <= --pods <= 1000, --rate > 0")
    if not 0 <= a.single <= a.events:
        ap.error("need 0 <= --single <= --events")
    settings = Settings(
        a.events, a.pods, a.rate, a.timeout, sources, modes, a.py_spy or None, a.single
    )
    return settings, a


MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM and SIGINT unwind as KeyboardInterrupt, so the finally clauses clean up
    (helper processes that pyroute2 forks inherit this handler: they die as by default)."""
    if os.getpid() != MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench_churn: must run as root (netns, cgroups, eBPF)")
    if not os.path.ismount("/sys/fs/bpf"):
        sys.exit("bench_churn: bpffs is not mounted: mount -t bpf bpf /sys/fs/bpf")
    for signum in (signal.SIGTERM, signal.SIGINT):  # (SIGINT too: even if inherited ignored)
        signal.signal(signum, _interrupt)
    lab = Sandbox(f"ma-churn-{os.getpid()}")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f"{lab.prefix}-"))
    bench = Bench(settings, lab, tmp)
    try:
        bench.run()
    except (RuntimeError, MeshaccelError, OSError) as e:
        log(f"bench_churn: FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        log("bench_churn: interrupted; cleaning up")
        return 130
    finally:
        try:
            bench.cleanup()
        finally:
            lab.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(bench))
    log(f"bench_churn: done in {time.monotonic() - started:.0f} s")
    if args.json:
        doc = {
            "command": " ".join(
                ["scripts/bench_churn.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "settings": asdict(settings),
            "runs": [asdict(r) for r in bench.results],
            "start_to_ready_s": bench.ready,
            "attach_child": bench.attach_child,
            "agent_rss_mib": bench.rss,
            "inprocess_steps": {
                k: {p: {"calls": c, "seconds": t} for p, (c, t) in v.items()}
                for k, v in bench.breakdown.items()
            },
            "agent_profiles": bench.profiles,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
