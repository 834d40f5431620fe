"""Pod churn against the node agent: the pods and the events that change them (add ->
update -> delete, round robin), the drivers that write events to a pod source (the pods
file, or the Kubernetes API double), and the tracker that times each event until the
pinned pod_config map shows it. scripts/bench_churn.py runs and reports it.

Event->map latency: from just before the write until the map shows the event's state for
that pod; a delete counts when the entry is gone. Events whose state is never visible
(the agent coalesced them) count as applied when a sentinel pod's update, written after
them, shows up ("by sentinel": an upper bound).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from meshaccel.agent import reconciler
from meshaccel.agent.reconciler import Reconciler
from meshaccel.datapath import bpfsys, pods, structs
from meshaccel.datapath.pins import Pins, pin_fd
from meshaccel.lab.fake_apiserver import FakeApiServer, make_pod

ANNOTATION = "traffic.sidecar.istio.io/excludeInboundPorts"
NODE = "churn-node"
NAMESPACE = "default"
POLL_SECONDS = 0.0005
SINGLE_GAP_SECONDS = 0.2  # idle gap before each event of the single run: 0 to this


def _quiet(_msg: str) -> None:
    pass


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
    """Marks events applied as the pinned pod_config map shows them (see the module docstring)."""

    def __init__(self, bpffs: str, churn: Churn) -> None:
        self.fd = pin_fd(Pins(bpffs).map("pod_config"))
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
        self.fd = pin_fd(Pins(self.churn.bpffs).map("pod_config"))

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
    """Poll until ev is applied; False if timeout passes first."""
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
    log: Callable[[str], None] = _quiet,
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
