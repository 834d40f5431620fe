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
                with timers around the reconcile steps (where the time goes).

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
import collections
import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kubernetes import client  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from meshaccel.agent import file_source, kubernetes_source, reconciler  # noqa: E402
from meshaccel.agent.file_source import FileSource  # noqa: E402
from meshaccel.agent.reconciler import Reconciler  # noqa: E402
from meshaccel.datapath import bpfsys, loader, pods, structs  # noqa: E402
from meshaccel.datapath import netns as netns_mod  # noqa: E402
from meshaccel.errors import MeshaccelError  # noqa: E402
from meshaccel.lab.fake_apiserver import FakeApiServer, make_pod  # noqa: E402
from meshaccel.lab.http_probe import free_port, get  # noqa: E402
from meshaccel.lab.sandbox import Sandbox  # noqa: E402

ANNOTATION = "traffic.sidecar.istio.io/excludeInboundPorts"
NODE = "churn-node"
NAMESPACE = "default"
POLL_SECONDS = 0.0005
SINGLE_GAP_SECONDS = 0.2  # idle gap before each event of the single run: 0 to this
TARGET_P99_MS = 50.0
TARGET_RATE = 500.0
TARGET_RSS_MIB = 150.0
TARGET_READY_S = 5.0
MESHACCEL = os.path.join(os.path.dirname(sys.executable), "meshaccel")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ pods and events


@dataclass
class Slot:
    """One lab pod: its netns is reused by every incarnation of the pod."""

    index: int
    name: str  # pod name (namespace default)
    ip: str
    netns: str  # /var/run/netns/...
    uid: str
    key: structs.IpKey


@dataclass
class Event:
    seq: int
    slot: int
    kind: str  # add, update, delete (the sentinel's are updates)
    annotations: dict[str, str] | None  # None: absent after the event
    expected: bytes | None = None  # pod_config args after the event; None: no entry
    t_write: float = math.nan
    t_done: float = math.nan
    by_sentinel: bool = False


class Churn:
    """The desired pods, and the events that change them (round robin over the slots)."""

    def __init__(self, slots: list[Slot], sentinel: Slot) -> None:
        self.slots = slots
        self.sentinel = sentinel
        self.desired: dict[int, dict[str, str]] = {}  # slot index -> annotations
        self.updated: set[int] = set()  # present and already updated: next is a delete
        self.cursor = 0
        self.serial = 0
        self.bpffs = ""
        for s in slots:  # 1/3 absent, 1/3 present, 1/3 present and updated
            if s.index % 3:
                self.desired[s.index] = self._annotations()
                if s.index % 3 == 2:
                    self.updated.add(s.index)
        self.desired[sentinel.index] = self._annotations()

    def slot(self, index: int) -> Slot:
        return self.sentinel if index == self.sentinel.index else self.slots[index]

    def _annotations(self) -> dict[str, str]:
        self.serial += 1
        return {ANNOTATION: str(10000 + self.serial % 50000)}

    @functools.cache  # noqa: B019 - a few thousand entries, for the run's life
    def _args(self, value: str) -> bytes:
        return pods.capture_args(self.bpffs, None, {ANNOTATION: value}).encode()

    def expected(self, index: int) -> bytes | None:
        ann = self.desired.get(index)
        return None if ann is None else self._args(ann[ANNOTATION])

    def next_event(self, seq: int) -> Event:
        i = self.cursor % len(self.slots)
        self.cursor += 1
        return self._change(seq, i)

    def sentinel_event(self, seq: int) -> Event:
        return self._change(seq, self.sentinel.index)

    def _change(self, seq: int, i: int) -> Event:
        if i == self.sentinel.index:
            kind = "update"
        elif i not in self.desired:
            kind = "add"
        else:
            kind = "delete" if i in self.updated else "update"
        if kind == "delete":
            del self.desired[i]
            self.updated.discard(i)
        else:
            self.desired[i] = self._annotations()
            if kind == "update" and i != self.sentinel.index:
                self.updated.add(i)
        ann = self.desired.get(i)
        return Event(seq, i, kind, None if ann is None else dict(ann), self.expected(i))


# ------------------------------------------------------------------ drivers (the sources)


class Driver(Protocol):
    def seed(self) -> None:
        """Make the source hold the current desired pods (no events measured)."""

    def apply(self, ev: Event) -> None:
        """Write one event to the source."""


class FileDriver:
    """The pods file, rewritten whole per event and renamed into place. Every version
    keeps a hard link for a while, so inode numbers are not reused: FileSource notices a
    change by (inode, mtime, size), and mtime is coarse."""

    def __init__(self, path: Path, churn: Churn) -> None:
        self.path = path
        self.churn = churn
        self.versions = path.parent / "versions"
        self.versions.mkdir(exist_ok=True)
        self.n = 0

    def render(self) -> str:
        lines = ["pods:"]
        for i in sorted(self.churn.desired):
            s = self.churn.slot(i)
            lines += [
                f"  - name: {s.name}",
                f"    namespace: {NAMESPACE}",
                f"    ips: [{s.ip}]",
                f"    netns: {s.netns}",
                "    annotations:",
            ]
            lines += [f'      {k}: "{v}"' for k, v in self.churn.desired[i].items()]
        return "\n".join(lines) + "\n"

    def seed(self) -> None:
        self._write()

    def apply(self, ev: Event) -> None:
        self._write()

    def _write(self) -> None:
        self.n += 1
        version = self.versions / str(self.n)
        version.write_text(self.render())
        tmp = self.path.with_suffix(".tmp")
        os.link(version, tmp)
        os.replace(tmp, self.path)
        with contextlib.suppress(FileNotFoundError):
            (self.versions / str(self.n - 64)).unlink()


class ApiDriver:
    """The pods in the API double: created, annotated and deleted per event."""

    def __init__(self, server: FakeApiServer, churn: Churn) -> None:
        self.server = server
        self.churn = churn

    def _pod(self, i: int) -> dict[str, Any]:
        s = self.churn.slot(i)
        return make_pod(
            s.name, namespace=NAMESPACE, node=NODE, ips=(s.ip,), uid=s.uid,
            annotations=dict(self.churn.desired[i]),
        )  # fmt: skip

    def seed(self) -> None:
        have = {p["metadata"]["name"]: p for p in self.server.pods()}
        for i, ann in self.churn.desired.items():
            s = self.churn.slot(i)
            if s.name not in have:
                self.server.create(self._pod(i))
            elif have[s.name]["metadata"].get("annotations", {}).get(ANNOTATION) != ann[ANNOTATION]:
                self._annotate(s.name, ann)
        names = {self.churn.slot(i).name for i in self.churn.desired}
        for name in set(have) - names:
            self.server.delete(NAMESPACE, name)

    def _annotate(self, name: str, ann: dict[str, str]) -> None:
        self.server.modify(NAMESPACE, name, lambda p: p["metadata"]["annotations"].update(ann))

    def apply(self, ev: Event) -> None:
        name = self.churn.slot(ev.slot).name
        if ev.kind == "add":
            self.server.create(self._pod(ev.slot))
        elif ev.kind == "update":
            assert ev.annotations is not None
            self._annotate(name, ev.annotations)
        else:
            self.server.delete(NAMESPACE, name)


# ------------------------------------------------------------------ watching the map


class Tracker:
    """Marks events applied as the pinned pod_config map shows them (see the docstring)."""

    def __init__(self, bpffs: str, churn: Churn) -> None:
        self.fd = loader.pin_fd(loader.Pins(bpffs).map("pod_config"))
        self.churn = churn
        self.pending: dict[int, collections.deque[Event]] = collections.defaultdict(
            collections.deque
        )
        self.seen: dict[int, bytes | None] = {}  # last state observed per slot
        self.value = structs.PodConfig()
        self.applied = 0
        self.vanished = 0  # entries that disappeared with no delete pending

    def reopen(self) -> None:
        """After the datapath was detached and attached anew: its new pod_config map."""
        self.fd = loader.pin_fd(loader.Pins(self.churn.bpffs).map("pod_config"))

    def state(self, index: int) -> bytes | None:
        found = bpfsys.map_lookup(self.fd, self.churn.slot(index).key, self.value)
        return bytes(self.value.args) if found else None

    def start(self) -> None:
        """Before a run: every slot as the map shows it now."""
        self.pending.clear()
        self.applied = self.vanished = 0
        self.seen = {s.index: self.state(s.index) for s in self.churn.slots}
        self.seen[self.churn.sentinel.index] = self.state(self.churn.sentinel.index)

    def add(self, ev: Event) -> None:
        self.pending[ev.slot].append(ev)

    @property
    def in_flight(self) -> int:
        return sum(len(q) for q in self.pending.values())

    def poll(self) -> None:
        now = time.monotonic()
        for index, queue in self.pending.items():
            if not queue:
                continue
            state = self.state(index)
            upto = None
            if state is not None:
                upto = next((n for n, e in enumerate(queue) if e.expected == state), None)
            elif self.seen.get(index) is not None:  # present -> absent: the next delete
                upto = next((n for n, e in enumerate(queue) if e.expected is None), None)
                self.vanished += upto is None
            self.seen[index] = state
            for _ in range(0 if upto is None else upto + 1):
                ev = queue.popleft()
                ev.t_done = now
                self.applied += 1

    def flush_by_sentinel(self, t: float) -> int:
        """The sentinel (written last) is applied: so is everything written before it."""
        n = 0
        for queue in self.pending.values():
            while queue:
                ev = queue.popleft()
                ev.t_done, ev.by_sentinel = t, True
                n += 1
        return n

    def mismatched(self) -> list[str]:
        """Slots whose map entry differs from the desired state."""
        return [
            s.name
            for s in [*self.churn.slots, self.churn.sentinel]
            if self.state(s.index) != self.churn.expected(s.index)
        ]


# ------------------------------------------------------------------ runs


@dataclass
class RunResult:
    source: str
    mode: str
    run: str  # single, paced or unpaced
    events: int
    offered_per_s: float
    applied_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    p99_seen_ms: float  # over the events not counted by the sentinel
    by_sentinel: int
    lost: int
    vanished: int
    seconds: float
    agent: dict[str, float] = field(default_factory=dict)  # syncs, sync ms, failures


def wait_applied(tracker: Tracker, ev: Event, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while ev.t_done != ev.t_done:  # NaN until applied
        if time.monotonic() > deadline:
            return False
        tracker.poll()
        time.sleep(POLL_SECONDS)
    return True


def settle(driver: Driver, tracker: Tracker, churn: Churn, seq: int, timeout: float) -> None:
    """Seed the source with the desired pods and wait until the map holds exactly them."""
    tracker.start()
    driver.seed()
    ev = churn.sentinel_event(seq)
    ev.t_write = time.monotonic()
    driver.apply(ev)
    tracker.add(ev)
    if not wait_applied(tracker, ev, timeout):
        raise RuntimeError(f"the sentinel pod was not updated within {timeout:.0f}s")
    deadline = time.monotonic() + 5
    while bad := tracker.mismatched():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the maps did not converge: {', '.join(bad[:5])} ...")
        time.sleep(0.05)


def run_events(
    label: str,
    driver: Driver,
    tracker: Tracker,
    churn: Churn,
    n: int,
    rate: float,
    timeout: float,
) -> tuple[list[Event], float, float]:
    """n events, then the sentinel; (events, start, last write). rate > 0: offered at that
    rate; 0: unpaced; < 0: one at a time (the next once the last is applied)."""
    tracker.start()
    events: list[Event] = []
    start = time.monotonic()
    next_report = start + 1
    deadline = start + timeout
    written_at = gap_until = start
    while len(events) < n:
        now = time.monotonic()
        if rate < 0:  # after a random idle gap: writes do not line up with polling
            due = tracker.in_flight == 0 and now >= gap_until
            if tracker.in_flight and not due:
                gap_until = now + random.uniform(0, SINGLE_GAP_SECONDS)
        else:
            due = rate == 0 or now >= start + len(events) / rate
        if due:
            ev = churn.next_event(len(events))
            ev.t_write = written_at = time.monotonic()
            driver.apply(ev)
            tracker.add(ev)
            events.append(ev)
        else:
            time.sleep(POLL_SECONDS)
        tracker.poll()
        if now >= next_report:
            log(f"    {label}: {len(events)}/{n} written, {tracker.applied} applied")
            next_report += 1
        if now > deadline:
            raise RuntimeError(f"{label}: could not write {n} events within {timeout:.0f}s")
    sentinel = churn.sentinel_event(n)
    sentinel.t_write = time.monotonic()
    driver.apply(sentinel)
    tracker.add(sentinel)
    while sentinel.t_done != sentinel.t_done:
        tracker.poll()
        now = time.monotonic()
        if now >= next_report:
            log(f"    {label}: {n}/{n} written, {tracker.applied} applied")
            next_report += 1
        if now > deadline:
            break
        time.sleep(POLL_SECONDS)
    if sentinel.t_done == sentinel.t_done:
        tracker.flush_by_sentinel(sentinel.t_done)
    return events, start, written_at


def summarize(
    source: str,
    mode: str,
    run: str,
    events: list[Event],
    start: float,
    last_write: float,
    vanished: int,
) -> RunResult:
    done = [e for e in events if e.t_done == e.t_done]
    lat = sorted((e.t_done - e.t_write) * 1000 for e in done)
    end = max((e.t_done for e in done), default=start)
    return RunResult(
        source=source,
        mode=mode,
        run=run,
        events=len(events),
        offered_per_s=len(events) / max(last_write - start, 1e-9),
        applied_per_s=len(done) / max(end - start, 1e-9),
        p50_ms=percentile(lat, 50),
        p99_ms=percentile(lat, 99),
        max_ms=lat[-1] if lat else math.nan,
        p99_seen_ms=percentile(
            sorted((e.t_done - e.t_write) * 1000 for e in done if not e.by_sentinel), 99
        ),
        by_sentinel=sum(e.by_sentinel for e in events),
        lost=len(events) - len(done),
        vanished=vanished,
        seconds=end - start,
    )


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


# ------------------------------------------------------------------ the agent


def vm_hwm(pid: int) -> int:
    """Peak RSS of a process (bytes), from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Agent:
    """`meshaccel run` as a subprocess in its own session (Ctrl-C reaches us, not it), its
    log in a file; stopped by PID with SIGTERM (then SIGKILL), its children too."""

    def __init__(self, argv: list[str], env: dict[str, str], logfile: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*argv, "--metrics-address", f"127.0.0.1:{self.port}"]
        self.env = env
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None
        self.attach_child: dict[str, float] = {}

    def start(self, timeout: float) -> float:
        """Start it; seconds until /readyz answered 200. Watches the attach child it may
        spawn (bcc compilation) for its lifetime and peak RSS."""
        with open(self.logfile, "ab") as out:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        me = psutil.Process(self.proc.pid)
        child: dict[int, tuple[float, float]] = {}  # pid -> (first seen, last seen)
        peak = 0
        while True:
            code, _ = get(f"{self.url}/readyz")
            now = time.monotonic()
            if code == 200:
                ready = now - t0
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited {self.proc.returncode}:\n{self.tail()}")
            if now - t0 > timeout:
                raise RuntimeError(f"the agent was not ready within {timeout:.0f}s:\n{self.tail()}")
            with contextlib.suppress(psutil.Error):
                for c in me.children(recursive=True):
                    first = child.get(c.pid, (now, now))[0]
                    child[c.pid] = (first, now)
                    peak = max(peak, c.memory_info().rss)
            time.sleep(0.01)
        if child:
            first, last = min(v[0] for v in child.values()), max(v[1] for v in child.values())
            self.attach_child = {"seconds": last - first, "peak_rss_mib": peak / 2**20}
        return ready

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def rss(self) -> tuple[float, float]:
        """(RSS now, peak RSS) in MiB."""
        assert self.proc is not None
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20, vm_hwm(
            self.proc.pid
        ) / 2**20

    def metrics(self) -> dict[str, float]:
        """The agent's reconcile and error metrics, by name{label=value,...}."""
        code, text = get(f"{self.url}/metrics")
        if code != 200:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(("meshaccel_reconcile", "meshaccel_errors")):
                    if "le" in s.labels:
                        continue  # histogram buckets
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for c in children:  # (the attach child, if it was stopped mid-way)
            with contextlib.suppress(psutil.Error):
                c.kill()


def agent_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    syncs = d.get("meshaccel_reconcile_duration_seconds_count", 0)
    seconds = d.get("meshaccel_reconcile_duration_seconds_sum", 0)
    return {
        "syncs": syncs,
        "sync_ms_mean": seconds / syncs * 1000 if syncs else math.nan,
        "sync_seconds": seconds,
        "failed": d.get("meshaccel_reconcile_pods_total{result=failed}", 0),
        "errors": sum(v for k, v in d.items() if k.startswith("meshaccel_errors")),
    }


class PySpy:
    """py-spy record of a process, stopped with SIGINT; top functions from the raw output."""

    def __init__(self, exe: str, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
             "--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return top_frames(self.out)


_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^():]*)(?::\d+)?\)$")


def top_frames(path: Path, n: int = 14) -> dict[str, Any]:
    """Inclusive share of samples of meshaccel's (and yaml's) functions, and self time."""
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m:
                f = m["file"]
                short = f.split("site-packages/")[-1].split("/main/")[-1].split("lib/python3")[-1]
                names.append(f"{m['fn']} ({short})")
        if names:
            self_time[names[-1]] += int(count)
        for name in set(names):
            if "meshaccel/" in name or "yaml/" in name or "kubernetes/" in name:
                inclusive[name] += int(count)
    pct = {k: round(100 * v / total, 1) for k, v in inclusive.most_common(n)} if total else {}
    slf = {k: round(100 * v / total, 1) for k, v in self_time.most_common(8)} if total else {}
    return {"samples": total, "inclusive_pct": pct, "self_pct": slf}


# ------------------------------------------------------------------ in-process timing


class StepTimer:
    """Wraps the reconcile steps with timers: totals per call path (sync/add/...)."""

    TARGETS: tuple[tuple[Any, str], ...] = (
        (Reconciler, "sync"),
        (file_source, "read_pods_file"),
        (kubernetes_source, "pod_spec"),
        (pods, "list_pods"),
        (pods, "add"),
        (pods, "remove"),
        (pods, "netns_cookie"),
        (netns_mod, "in_netns"),
        (pods, "capture_args"),
        (pods, "capture_config"),
        (pods, "compile_config"),
        (pods, "_link_sk_lookup"),
        (pods, "_forget_addresses_not_in"),
        (pods, "adopt_inbound_listener"),
        (pods, "_listening_inodes"),
        (pods, "_socket_owners"),
    )

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepTimer]:
        for owner, name in self.TARGETS:
            orig = getattr(owner, name)
            self._saved.append((owner, name, orig))
            setattr(owner, name, self._wrap(name, orig))
        try:
            yield self
        finally:
            for owner, name, orig in reversed(self._saved):
                setattr(owner, name, orig)
            self._saved.clear()

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                return fn(*args, **kwargs)  # the bench's own calls (expected args)
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(name.lstrip("_"))
            path = "/".join(stack)
            if name == "in_netns":  # fn runs in a thread of its own: give it our path
                inherited, inner = list(stack), args[1]

                def inside() -> Any:
                    self._local.stack = inherited
                    return inner()

                args = (args[0], inside)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                stack.pop()
                with self._lock:
                    tot = self.totals.setdefault(path, [0, 0.0])
                    tot[0] += 1
                    tot[1] += dt

        return timed

    def reset(self) -> dict[str, list[float]]:
        with self._lock:
            out, self.totals = self.totals, {}
        return out


class InProcess:
    """A pod source and a Reconciler in a thread of this process."""

    def __init__(self, source: Any, bpffs: str) -> None:
        self.reconciler = Reconciler(bpffs)
        self.stop_event = threading.Event()
        self.failed = 0
        self.thread = threading.Thread(
            target=source.run, args=(self._on_desired, self.stop_event), daemon=True
        )
        self.thread.start()

    def _on_desired(self, desired: list[reconciler.PodSpec]) -> None:
        self.failed += len(self.reconciler.sync(desired).failed)

    def take_failed(self) -> int:
        n, self.failed = self.failed, 0
        return n

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(15)


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
        self.agent: Agent | None = None
        self.inproc: InProcess | None = None
        self.server: FakeApiServer | None = None
        self.cgroup = ""
        self.churn: Churn | None = None
        self.drivers: dict[str, Driver] = {}
        self.agent_source: str | None = None
        self.timer = StepTimer()

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

    def start_agent(self, source: str, what: str) -> Agent:
        agent = self.agent = Agent(
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
                what, driver, tracker, self.churn, n, rate, self.s.timeout
            )
            r = summarize(source, mode, run, events, start, last, tracker.vanished)
            if self.agent:
                time.sleep(0.1)  # (the sync that applied the sentinel records its metrics)
                r.agent = agent_delta(before, self.agent.metrics())
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
