"""Network namespaces: entering one (pyroute2's setns), from a thread of this process or
from a child between fork and exec, and the pod loopback alias istio-iptables adds.

setns() moves only the calling thread, so work inside a pod's netns runs in a thread of
its own (in_netns); a child enters before exec (entering), after joining its cgroup.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from meshaccel.errors import MeshaccelError

NETNS_DIR = "/var/run/netns"  # where `ip netns` (and pyroute2) keep named namespaces
# (handed to pyroute2, which would otherwise look libc up with ctypes.util.find_library,
# a subprocess: not something to run between fork and exec)
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def path_of(name: str) -> str:
    """/var/run/netns/NAME for a name; a path stays as it is."""
    return name if "/" in name else os.path.join(NETNS_DIR, name)


def enter(fd: int) -> None:
    """Move the calling thread into the netns open at fd (never creates one)."""
    pyroute2_netns.setns(fd, flags=0, libc=_libc)


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """fn() run in a thread that entered the netns at path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MeshaccelError(f"--netns {path}: {e.strerror}") from None
    result: dict[str, Any] = {}

    def inside() -> None:
        try:
            enter(fd)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            result["error"] = MeshaccelError(f"--netns {path}: not a network namespace ({why})")
            return
        try:
            result["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    try:
        t = threading.Thread(target=inside)
        t.start()
        t.join()
    finally:
        os.close(fd)
    if "error" in result:
        raise result["error"]
    return result["value"]


def entering(
    netns_fd: int | None, cgroup: str | None = None, uid: int | None = None, gid: int | None = None
) -> Callable[[], None]:
    """What a child runs between fork and exec: join the cgroup (first, while it may), the
    netns open at netns_fd, then drop to uid (and gid, by default uid's number)."""

    def enter_child() -> None:
        if cgroup:
            Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
        if netns_fd is not None:
            enter(netns_fd)
        if uid is not None or gid is not None:
            os.setgroups([])
            os.setgid(gid if gid is not None else uid)  # type: ignore[arg-type]
        if uid is not None:
            os.setuid(uid)

    return enter_child


def add_passthrough_v6(path: str) -> None:
    """::6/128 on the netns's lo, as istio-iptables adds it: the source address Envoy binds
    for its IPv6 inbound passthrough to the app (127.0.0.6's counterpart)."""

    def add() -> None:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("replace", index=lo, address="::6", prefixlen=128)

    try:
        in_netns(path, add)
    except (NetlinkError, OSError, IndexError) as e:  # (EPERM: no CAP_NET_ADMIN)
        raise MeshaccelError(f"cannot add ::6/128 to lo in {path}: {e}") from None
