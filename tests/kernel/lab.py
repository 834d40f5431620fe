"""Test building blocks for kernel tests: network namespaces, cgroups and processes,
each named with a per-test prefix and removed by name/PID in teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

from meshaccel.datapath import bpfsys, loader, pods
from meshaccel.datapath import netns as netns_mod

PEER = str(Path(__file__).with_name("peer.py"))


def ours_on(cgroup: str) -> list[str]:
    """Names of meshaccel programs attached to a cgroup, one entry per attachment."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        for hook in [p for p in loader.PROGRAMS if p.hook == "cgroup"]:
            for prog_id in bpfsys.prog_query(fd, hook.attach_type):
                pfd = bpfsys.prog_fd_by_id(prog_id)
                names.append(bpfsys.prog_info(pfd).name.decode())
                os.close(pfd)
    finally:
        os.close(fd)
    return sorted(n for n in names if n.startswith("ma_"))


class Lab:
    """Everything one test creates; cleanup() removes all of it, in reverse."""

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
        ns = self._ns(name)
        with NetNS(ns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname="br0")[0], state="up")
        return ns

    def pod(self, name: str, node: str, ip4: str, ip6: str | None = None) -> str:
        """A pod netns with eth0 (ip4/24, ip6/64) on node's bridge, lo up."""
        ns = self._ns(name)
        host_if = f"{self.prefix[-6:]}{len(self.netns)}"
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, net_ns_fd=node)
        with NetNS(node) as ipr:
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
        with NetNS(ns) as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=idx, address=ip4, prefixlen=24)
            if ip6:
                ipr.addr(
                    "add", index=idx, address=ip6, prefixlen=64, flags=0x02
                )  # IFA_F_NODAD: usable at once
            ipr.link("set", index=idx, state="up")
        self.pod_ips[ns] = [ip4] + ([ip6] if ip6 else [])
        return ns

    def _ns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        netns.create(ns)
        self.netns.append(ns)
        with NetNS(ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return ns

    # -- cgroups and the datapath
    def cgroup(self, name: str = "cg") -> str:
        path = os.path.join(loader.default_cgroup(), f"{self.prefix}-{name}")
        os.mkdir(path)
        self.cgroups.append(path)
        return path

    def attach(self, cgroup: str, pods: tuple[str, ...] = (), **kw) -> str:
        """Attach the datapath to cgroup and register the given lab pods (by netns). App
        sockets take the shortcut here (app_shortcut=True) unless kw says otherwise: most
        tests are about the shortcut itself."""
        bpffs = f"/sys/fs/bpf/{self.prefix}"
        self.bpffs.append(bpffs)
        loader.attach(cgroup, bpffs=bpffs, **{"app_shortcut": True, **kw})
        for ns in pods:
            self.register(bpffs, ns)
        return bpffs

    def register(self, bpffs: str, ns: str, **kw) -> str:
        """meshaccel pod add for a lab pod (kw: istio_args, annotations)."""
        return pods.add(bpffs, ns, self.pod_ips[ns], netns=f"/var/run/netns/{ns}", **kw)

    # -- processes
    def spawn(
        self,
        argv: list[str],
        netns: str | None = None,
        cgroup: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        **kw,
    ) -> subprocess.Popen:
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

    def peer(self, *args: str, **kw) -> subprocess.Popen:
        return self.spawn([sys.executable, PEER, *map(str, args)], **kw)

    def listener(self, addr: str, port: int, *args: str, **kw) -> subprocess.Popen:
        """Start peer.py listen and wait until it is bound."""
        p = self.peer("listen", addr, port, *args, **kw)
        line = p.stdout.readline()
        if json.loads(line or "{}").get("ready") is not True:
            raise RuntimeError(f"listener {addr}:{port} failed: {line} {p.stderr.read()}")
        return p

    def run_peer(self, *args: str, timeout: float = 60, **kw) -> dict:
        """Run peer.py to completion; its JSON record."""
        p = self.peer(*args, **kw)
        stdout, stderr = p.communicate(timeout=timeout)
        lines = stdout.strip().splitlines()
        if not lines:
            raise RuntimeError(f"peer {args} printed nothing (rc {p.returncode}): {stderr}")
        return json.loads(lines[-1])

    @staticmethod
    def records(p: subprocess.Popen, timeout: float = 60) -> list[dict]:
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"{p.args} exited {p.returncode}: {stdout} {stderr}")
        return [json.loads(line) for line in stdout.strip().splitlines() if line]

    # -- teardown
    def cleanup(self) -> None:
        errors = []
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
            _rmdir_cgroup(cg, errors)
        for ns in reversed(self.netns):
            try:
                netns.remove(ns)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise RuntimeError(f"cleanup of {self.prefix} incomplete: {errors}")


def _rmdir_cgroup(path: str, errors: list) -> None:
    for _ in range(50):  # killed processes leave the cgroup asynchronously
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != 16:  # EBUSY
                errors.append(e)
                return
            time.sleep(0.05)
    errors.append(OSError(16, f"cgroup {path} still busy"))
