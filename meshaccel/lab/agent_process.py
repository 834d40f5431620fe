"""The node agent as users run it, `meshaccel run` in a subprocess, for benchmarks: its
start-to-ready time, the `meshaccel attach` child it may spawn (bcc compilation), its RSS,
its reconcile metrics; stopped by PID.
"""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess
import time
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from meshaccel.lab.http_probe import free_port, get


def vm_hwm(pid: int) -> int:
    """Peak RSS of a process (bytes), from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class AgentProcess:
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


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Reconciles (syncs), their mean and total time, failed pods and errors between two
    AgentProcess.metrics() readings."""
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
