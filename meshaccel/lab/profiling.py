"""Where a Python process spends its time: py-spy sampling another process, and a timer
of calls to chosen public functions of this one (inclusive time per call path); and the
kernel timing BPF programs (bpf_stats).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled on for the block (every program's run_time_ns and run_cnt
    count), then as it was."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(before)


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


class CallTimer:
    """Inclusive time of calls to the given functions, by call path ("sync/add/in_netns"),
    while installed(): each (owner, name) is replaced by a timed wrapper and put back on
    exit. Only public functions are timed; a module's own calls reach the wrappers because
    they look the name up in the module at call time. Calls from the main thread are not
    timed (the benchmark's own). For names in runs_in_thread (functions that run their
    second argument in another thread), that thread continues the caller's path."""

    def __init__(
        self, targets: tuple[tuple[Any, str], ...], runs_in_thread: tuple[str, ...] = ()
    ) -> None:
        for _, name in targets:
            if name.startswith("_"):
                raise ValueError(f"{name}: only public functions are timed")
        self.targets = targets
        self.runs_in_thread = runs_in_thread
        self.totals: dict[str, list[float]] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[CallTimer]:
        try:
            for owner, name in self.targets:
                orig = getattr(owner, name)
                self._saved.append((owner, name, orig))
                setattr(owner, name, self._wrap(name, orig))
            yield self
        finally:
            for owner, name, orig in reversed(self._saved):
                setattr(owner, name, orig)
            self._saved.clear()

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                return fn(*args, **kwargs)
            stack = self._local.__dict__.setdefault("stack", [])
            stack.append(name)
            path = "/".join(stack)
            if name in self.runs_in_thread:
                inherited, inner = list(stack), args[1]

                def inside() -> Any:
                    self._local.stack = inherited
                    return inner()

                args = (args[0], inside, *args[2:])
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
        """The totals so far ({path: [calls, seconds]}), and start anew."""
        with self._lock:
            out, self.totals = self.totals, {}
        return out
