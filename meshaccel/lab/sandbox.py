"""A scratch lab for tests and benchmarks: network namespaces, cgroups, datapath pins and
processes, each named with one prefix and removed by name (processes by PID) in cleanup().

Unlike `meshaccel lab` (meshaccel.lab.topology), a Sandbox is built piece by piece by
its caller and lives only as long as the test or benchmark run that made it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable
from typing import Any

from meshaccel.datapath import loader, pods
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.host import default_cgroup, remove_cgroup
from meshaccel.lab import network


class Sandbox:
    """Everything one test or benchmark creates; cleanup() removes all of it, in reverse."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.procs: list[subprocess.Popen] = []
        self.netns: list[str] = []
        self.cgroups: list[str] = []
        self.bpffs: list[str] = []
        self.pod_ips: dict[str, list[str]] = {}  # pod netns -> its addresses

    # -- namespaces
    def node(self, name: str = "node") -> str:
        """A node netns holding a bridge `br0` that pods plug into."""
        ns = self.new_netns(name)
        network.add_bridge(ns)
        return ns

    def pod(self, name: str, node: str, ip4: str, ip6: str | None = None) -> str:
        """A pod netns with eth0 (ip4/24, ip6/64) on node's bridge, lo up."""
        ns = self.new_netns(name)
        addresses = [(ip4, 24)] + ([(ip6, 64)] if ip6 else [])
        network.plug_pod(node, ns, f"{self.prefix[-6:]}{len(self.netns)}", addresses)
        self.pod_ips[ns] = [ip4] + ([ip6] if ip6 else [])
        return ns

    def new_netns(self, name: str, loopback_up: bool = True) -> str:
        """A netns PREFIX-NAME (lo up unless told otherwise), removed at cleanup."""
        ns = f"{self.prefix}-{name}"
        network.create_netns(ns, loopback_up=False)
        self.netns.append(ns)
        if loopback_up:
            network.set_loopback_up(ns)
        return ns

    # -- cgroups and the datapath
    def cgroup(self, name: str = "cg", parent: str | None = None) -> str:
        """A cgroup PREFIX-NAME under the default cgroup (or NAME under parent)."""
        if parent is None:
            path = os.path.join(default_cgroup(), f"{self.prefix}-{name}")
        else:
            path = os.path.join(parent, name)
        os.mkdir(path)
        self.cgroups.append(path)
        return path

    def attach(self, cgroup: str, pods: tuple[str, ...] = (), **kw: Any) -> str:
        """Attach the datapath to cgroup and register the given sandbox pods (by netns). App
        sockets take the shortcut here (app_shortcut=True) unless kw says otherwise: tests
        and benchmarks of a sandbox are mostly about the shortcut itself."""
        bpffs = f"/sys/fs/bpf/{self.prefix}"
        self.bpffs.append(bpffs)  # detached at cleanup, also when attach fails half-way
        loader.attach(cgroup, bpffs=bpffs, **{"app_shortcut": True, **kw})
        for ns in pods:
            self.register(bpffs, ns)
        return bpffs

    def register(self, bpffs: str, ns: str, **kw: Any) -> str:
        """meshaccel pod add for a sandbox pod (kw: istio_args, annotations)."""
        return pods.add(bpffs, ns, self.pod_ips[ns], netns=f"/var/run/netns/{ns}", **kw)

    # -- processes
    def spawn(
        self,
        argv: list[str],
        netns: str | None = None,
        cgroup: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        **kw: Any,
    ) -> subprocess.Popen:
        """A process in netns (a name or path) and cgroup, as uid; killed at cleanup."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        fd = os.open(netns_mod.path_of(netns), os.O_RDONLY | os.O_CLOEXEC) if netns else None
        try:
            enter = netns_mod.entering(fd, cgroup, uid, gid)
            p = subprocess.Popen(argv, preexec_fn=enter, text=True, **kw)
        finally:
            if fd is not None:
                os.close(fd)
        self.procs.append(p)
        return p

    # -- teardown
    def cleanup(self) -> None:
        errors: list[Exception] = []
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except Exception as e:  # noqa: BLE001 - keep tearing down
                errors.append(e)
        for bpffs in self.bpffs:
            try:
                loader.detach(bpffs=bpffs)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        for cg in reversed(self.cgroups):
            if why := remove_cgroup(cg):
                errors.append(OSError(why))
        for ns in reversed(self.netns):
            try:
                network.remove_netns(ns)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise RuntimeError(f"cleanup of {self.prefix} incomplete: {errors}")


def sweep_dead(owned: str, log: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Remove what sandboxes of runs that died without their cleanup (SIGKILL, a cancelled
    CI job) left behind. owned: a regex matching a sandbox's prefix (the start of each of
    its names, up to a "-" or the end), its group 1 the PID of the process that made it; a
    sandbox whose process still runs is left alone. Its processes are killed by PID (those
    in its cgroups or its netns), its datapath detached, its cgroups and netns removed;
    a step that fails is logged, not raised (what is left is the next sweep's). Returns
    the prefixes swept."""
    cg_root = default_cgroup()
    found = left_by_dead(rf"(?:{owned})(?=-|$)", [netns_mod.NETNS_DIR, cg_root, "/sys/fs/bpf"])

    def step(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - keep sweeping
            log(f"{what}: {type(e).__name__}: {e}")

    for paths in (found[prefix] for prefix in sorted(found)):
        log(f"removing {', '.join(paths)}: left by a run that died")
        netns = [p for p in paths if p.startswith(netns_mod.NETNS_DIR + "/")]
        step("processes", lambda netns=netns: _kill_in_netns({os.stat(p).st_ino for p in netns}))
        for path in (p for p in paths if p.startswith("/sys/fs/bpf/")):
            step(path, lambda path=path: loader.detach(bpffs=path))
        for path in (p for p in paths if p.startswith(cg_root + "/")):
            for sub, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
                if why := remove_cgroup(sub, kill_members=True):
                    log(why)
        for path in netns:
            step(path, lambda path=path: network.remove_netns(os.path.basename(path)))
    return sorted(found)


def left_by_dead(owned: str, dirs: list[str]) -> dict[str, list[str]]:
    """The paths in dirs whose names start with a match of owned (a regex, group 1 the PID
    of the process that made them) while that process is gone, by the match."""
    found: dict[str, list[str]] = {}
    for d in dirs:
        for name in _listdir(d):
            m = re.match(owned, name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                found.setdefault(m.group(0), []).append(os.path.join(d, name))
    return found


def _kill_in_netns(inodes: set[int]) -> None:
    """SIGKILL every process whose network namespace is one of these."""
    for pid in filter(str.isdigit, _listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass


def _listdir(d: str) -> list[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []
