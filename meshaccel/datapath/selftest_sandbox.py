"""The self-test's throw-away pod: a network namespace, a cgroup and a bpffs directory
named ma-selftest-<pid>, the probe children run in them, and their removal, also after a
self-test that was killed (sweep_stale)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.host import default_cgroup, remove_cgroup
from meshaccel.datapath.pins import read_counters

if TYPE_CHECKING:
    from meshaccel.datapath.selftest import Probe

PREFIX = "ma-selftest"

Log = Callable[[str], None]


class Sandbox:
    """The throw-away pod: netns, cgroup, bpffs directory and probe children, all named
    with the prefix; remove() undoes whatever create() got to, and is safe to repeat."""

    def __init__(self, prefix: str) -> None:

        self.prefix = prefix
        self.netns = prefix
        self.netns_path = netns_mod.path_of(prefix)
        self.cgroup = os.path.join(default_cgroup(), prefix)
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
        "counters" (how each counter moved meanwhile: the path the run took), and "error"
        or "timed_out" when it went wrong}."""

        argv = [sys.executable, "-m", "meshaccel.datapath.selftest_probes", "--child", probe.name]
        argv += ["--budget", str(probe.budget)]
        argv += ["--bpffs", self.bpffs, "--netns-cookie", str(self._cookie())]
        if shortcut:
            argv.append("--join")
        before = read_counters(self.bpffs)
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
        after = read_counters(self.bpffs)
        out["counters"] = {k: after[k] - before.get(k, 0) for k in after}
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
        # (only the self-test's own children live there)
        if why := remove_cgroup(self.cgroup, kill_members=True):
            errors.append(why)
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

    found = []
    for d in (netns_mod.NETNS_DIR, default_cgroup(), "/sys/fs/bpf"):
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


def raise_on_sigterm() -> object:
    """SIGTERM unwinds like Ctrl-C, so that the cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    me = os.getpid()

    def stop(_sig: int, _frame: object) -> None:
        if os.getpid() != me:  # a forked helper (pyroute2's) being told to stop: just stop
            os._exit(128 + signal.SIGTERM)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


def restore_sigterm(previous: object) -> None:
    """Undo raise_on_sigterm."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]
