"""The kernel and e2e tests' lab: a Sandbox (meshaccel.lab.sandbox) with helpers that run
tests/kernel/peer.py in its pods, what is attached to a cgroup, the tags a build's
programs get, and code snippets the tests' child processes share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from meshaccel.datapath import bpfsys, loader, programs
from meshaccel.datapath.programs import PROGRAMS
from meshaccel.lab.sandbox import Sandbox

PEER = str(Path(__file__).with_name("peer.py"))
# the tests' sandbox prefixes, ma-t<pid>-<tag>: the next run sweeps those of a run that died
SANDBOX_PREFIX = r"ma-t(\d+)-[a-z0-9]+"


def sandbox_prefix(tag: str) -> str:
    """The prefix of a sandbox of this test run (tag: lowercase letters and digits)."""
    return f"ma-t{os.getpid()}-{tag}"


# the e2e tests' `meshaccel lab` prefixes, ma-tlab<pid>-<n>-: taken down the same way
LAB_PREFIX = r"ma-tlab(\d+)-\d+-"


def lab_prefix(n: int) -> str:
    """The prefix of this test run's n-th `meshaccel lab`."""
    return f"ma-tlab{os.getpid()}-{n}-"


def missing_requirement() -> str | None:
    """Why the kernel tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "kernel tests need root (eBPF, netns, cgroups)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (apt-get install python3-bpfcc; run scripts/test.sh)"
    if not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted at /sys/fs/bpf (scripts/test.sh mounts it)"
    return None


# The children's SO_ORIGINAL_DST of an accepted socket: "ip:port", or "error:<errno>".
ORIG_DST = r"""
def orig(c):
    try:
        port, ip = struct.unpack_from("!2xH4s", c.getsockopt(socket.SOL_IP, 80, 16))
        return f"{socket.inet_ntoa(ip)}:{port}"
    except OSError as e:
        return f"error:{e.errno}"
"""


def ours_on(cgroup: str) -> list[str]:
    """Names of meshaccel programs attached to a cgroup, one entry per attachment."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    names = []
    try:
        for hook in [p for p in PROGRAMS if p.hook == "cgroup"]:
            for prog_id in bpfsys.prog_query(fd, hook.attach_type):
                pfd = bpfsys.prog_fd_by_id(prog_id)
                names.append(bpfsys.prog_info(pfd).name.decode())
                os.close(pfd)
    finally:
        os.close(fd)
    return sorted(n for n in names if n.startswith("ma_"))


def fresh_tags(bpf_dir: Path | None = None, cflags: list[str] | None = None) -> dict[str, str]:
    """The tags a fresh attach of this source gets (loaded, not attached)."""
    b = loader.compile_bpf(bpf_dir, cflags)
    try:
        tags = {}
        for prog in PROGRAMS:
            expected = -1 if prog.hook == "sock_hash" else prog.attach_type
            fn = b.load_func(prog.func.encode(), programs.prog_type(prog), attach_type=expected)
            tags[prog.name] = bpfsys.prog_tag(fn.fd)
        return tags
    finally:
        b.cleanup()


def prog_ids(bpffs: str) -> dict[str, int]:
    return {p["name"]: p["id"] for p in loader.status(bpffs)["programs"]}


class Lab(Sandbox):
    """A Sandbox whose pods run peer.py (listen, connect, ... printing JSON records)."""

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
