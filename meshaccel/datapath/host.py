"""What the datapath needs of this host: root with the capabilities eBPF needs, a cgroup v2
mount and a bpf filesystem.

attach, detach, status and pod add refuse with these checks' messages before touching
anything; doctor reports the same checks as its "root", "cgroup2" and "bpffs" lines.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable

from meshaccel.datapath import bpfsys
from meshaccel.errors import MeshaccelError

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39
NEEDED_CAPS = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_SYS_ADMIN": CAP_SYS_ADMIN}

NOT_ROOT = (
    "must run as root (loading and attaching eBPF needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
)


def read_text(path: str) -> str | None:
    """A file's text, or None when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


# ---------------------------------------------------------------- root and capabilities


def check_root(euid: int | None = None) -> None:
    """Refuse anyone but root: the pins are root's files (0600 in a 0700 directory), so
    even a process given every capability it needs could not open them."""
    if (os.geteuid() if euid is None else euid) != 0:
        raise MeshaccelError(NOT_ROOT)


def parse_cap_eff(status_text: str) -> int | None:
    """Return the CapEff bit mask from /proc/<pid>/status text, or None if absent."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return None
    return None


def missing_caps(status_path: str = "/proc/self/status") -> list[str] | None:
    """The NEEDED_CAPS this process lacks (CapEff), or None if CapEff is unreadable.

    Root in a container may lack some; each kernel operation then fails on its own, so
    check_root does not ask, and doctor reports them."""
    text = read_text(status_path)
    cap_eff = parse_cap_eff(text) if text is not None else None
    if cap_eff is None:
        return None
    return [name for name, bit in NEEDED_CAPS.items() if not cap_eff >> bit & 1]


# ---------------------------------------------------------------- cgroup v2


def _unescape_mount_path(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """Return (mount_point, fstype) pairs from /proc/<pid>/mountinfo text."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and tail:
            mounts.append((_unescape_mount_path(fields[4]), tail[0]))
    return mounts


def cgroup2_mount(mountinfo_path: str = "/proc/self/mountinfo") -> str | None:
    """Path of the cgroup v2 mount (prefer /sys/fs/cgroup), or None if there is none."""
    text = read_text(mountinfo_path)
    if text is None:
        return None
    paths = [mp for mp, fstype in parse_mountinfo(text) if fstype == "cgroup2"]
    if "/sys/fs/cgroup" in paths:
        return "/sys/fs/cgroup"
    return paths[0] if paths else None


def default_cgroup() -> str:
    """The root of the cgroup v2 mount: attaching there covers every process."""
    path = cgroup2_mount()
    if path is None:
        raise MeshaccelError("no cgroup v2 mount found: mount -t cgroup2 none /sys/fs/cgroup")
    return path


def check_cgroup(path: str) -> str:
    """The real path of a cgroup v2 directory given as --cgroup, or a one-line refusal."""
    real = os.path.realpath(path)
    if not os.path.isdir(real) or bpfsys.statfs_type(real) != bpfsys.CGROUP2_SUPER_MAGIC:
        raise MeshaccelError(
            f"--cgroup {path}: not a cgroup v2 directory (cgroup v2 is mounted at {_cgroup_hint()})"
        )
    return real


def _cgroup_hint() -> str:
    try:
        return default_cgroup()
    except MeshaccelError:
        return "no mount point: mount -t cgroup2 none /sys/fs/cgroup"


# ---------------------------------------------------------------- bpffs


def is_bpffs(path: str, fstype_of: Callable[[str], int | None] = bpfsys.statfs_type) -> bool:
    """True if path is on a bpf filesystem (statfs f_type == BPF_FS_MAGIC)."""
    return fstype_of(os.fspath(path)) == bpfsys.BPF_FS_MAGIC


def bpffs_problem(
    path: str, fstype_of: Callable[[str], int | None] = bpfsys.statfs_type
) -> tuple[str, str] | None:
    """Why pins cannot be made in the directory path, and the fix; None if they can."""
    if not os.path.isdir(path):
        return f"{path} is not a bpf filesystem: it does not exist", (
            f"mkdir -p {path} && mount -t bpf bpf {path}"
        )
    if is_bpffs(path, fstype_of):
        return None
    fstype = fstype_of(path)
    found = "unknown" if fstype is None else hex(fstype)
    return f"{path} is not a bpf filesystem (f_type {found})", f"mount -t bpf bpf {path}"


def check_bpffs(bpffs: str) -> None:
    """Refuse a --bpffs pin directory whose parent is not a bpf filesystem (attach makes
    the directory itself)."""
    parent = os.path.dirname(os.path.abspath(bpffs.rstrip("/")))
    problem = bpffs_problem(parent)
    if problem:
        raise MeshaccelError(f"--bpffs {bpffs}: {problem[0]}; {problem[1]}")


def remove_cgroup(path: str, kill_members: bool = False) -> str | None:
    """rmdir a cgroup, waiting (up to 5 s) while killed processes leave it asynchronously;
    kill_members: SIGKILL whatever still runs in it (for a cgroup that holds only the
    caller's own children). None when it is gone, else why not."""
    for _ in range(100):
        try:
            os.rmdir(path)
            return None
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.EBUSY:
                return f"{path}: {e.strerror}"
        if kill_members:
            for pid in _cgroup_pids(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    return f"{path}: still busy"


def _cgroup_pids(path: str) -> list[int]:
    text = read_text(os.path.join(path, "cgroup.procs")) or ""
    return [int(line) for line in text.splitlines() if line.strip()]
