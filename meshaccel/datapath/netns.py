"""Network namespaces: entering one (pyroute2's setns), from a thread of this process or
from a child between fork and exec, the pod loopback alias istio-iptables adds, and what
the pod registry asks of a netns (its cookie, its addresses, where it is).

setns() moves only the calling thread, so work inside a pod's netns runs in a thread of
its own (in_netns); a child enters before exec (entering), after joining its cgroup.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
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
            # setns says EINVAL for a file that is no netns, EPERM without CAP_SYS_ADMIN
            why = os.strerror(e.errno) if e.errno else str(e)
            what = "not a network namespace"
            if e.errno != errno.EINVAL:
                what = f"cannot enter this network namespace ({why})"
            result["error"] = MeshaccelError(f"--netns {path}: {what}")
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


# Marks the ::6 that pod add put on lo, so that pod remove takes away only that one: DAD
# never runs on lo, so the flag changes nothing else. Re-adding the address without it
# (istio-iptables, the iptables mode) clears the mark, and the address is no longer ours.
_IFA_F_NODAD = 0x02
_PASSTHROUGH_V6 = "::6"


def add_passthrough_v6(path: str, mark: bool = False) -> bool:
    """::6/128 on the netns's lo, as istio-iptables adds it: the source address Envoy binds
    for its IPv6 inbound passthrough to the app (127.0.0.6's counterpart). With mark, an
    address already there is left as it is and one added is marked as meshaccel's; returns
    whether it was added."""

    def add() -> bool:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            if not mark:
                ipr.addr("replace", index=lo, address=_PASSTHROUGH_V6, prefixlen=128)
                return True
            if _passthrough_flags(ipr, lo) is not None:
                return False
            try:
                ipr.addr(
                    "add", index=lo, address=_PASSTHROUGH_V6, prefixlen=128, flags=_IFA_F_NODAD
                )
            except NetlinkError as e:
                if e.code != errno.EEXIST:  # (added meanwhile by someone else: theirs)
                    raise
                return False
            return True

    try:
        return in_netns(path, add)
    except (NetlinkError, OSError, IndexError) as e:  # (EPERM: no CAP_NET_ADMIN)
        raise MeshaccelError(f"cannot add ::6/128 to lo in {path}: {_why(e)}") from None


def remove_passthrough_v6(path: str) -> bool:
    """Take ::6/128 off the netns's lo if add_passthrough_v6(mark=True) put it there;
    returns whether it did."""

    def remove() -> bool:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            flags = _passthrough_flags(ipr, lo)
            if flags is None or not flags & _IFA_F_NODAD:
                return False
            try:
                ipr.addr("del", index=lo, address=_PASSTHROUGH_V6, prefixlen=128)
            except NetlinkError as e:
                if e.code != errno.EADDRNOTAVAIL:  # (gone meanwhile)
                    raise
                return False
            return True

    try:
        return in_netns(path, remove)
    except (NetlinkError, OSError, IndexError) as e:
        raise MeshaccelError(f"cannot remove ::6/128 from lo in {path}: {_why(e)}") from None


def _why(e: Exception) -> str:
    """A netlink or OS error as one line ("Operation not permitted")."""
    code = e.code if isinstance(e, NetlinkError) else getattr(e, "errno", None)
    return os.strerror(code) if code else str(e) or type(e).__name__


def _passthrough_flags(ipr: IPRoute, lo: int) -> int | None:
    """The flags of ::6/128 on lo, or None if it is not there."""
    for a in ipr.get_addr(index=lo, family=socket.AF_INET6):
        if a.get_attr("IFA_ADDRESS") == _PASSTHROUGH_V6 and a["prefixlen"] == 128:
            return a.get_attr("IFA_FLAGS") or a["flags"]
    return None


SO_NETNS_COOKIE = 71
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_RT_TABLE_LOCAL, _RTN_LOCAL = 255, 2  # the local routing table; a route of type local


def netns_cookie(path: str) -> int:
    """The kernel's cookie for the netns at path (what bpf_get_netns_cookie() returns).
    Not cached by the namespace's inode: the kernel reuses those once a netns is gone."""

    def cookie() -> int:
        with socket.socket() as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")

    return in_netns(path, cookie)


def local_destinations(path: str) -> tuple[list[Address], list[Network]]:
    """What the netns accepts as its own, read in one visit:
    - every address on its interfaces but lo (secondary interfaces, as Multus adds them,
      and IPv6 link-local ones included), multicast ones left out;
    - every prefix a local route accepts that is not one of those addresses (AnyIP:
      `ip route add local 10.77.0.0/24 dev lo`, or an address put on lo), loopback and
      the ::6 Envoy's passthrough binds left out."""

    def read() -> tuple[list[Address], list[Network]]:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            found = {
                ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
                for a in ipr.get_addr()
                if a["index"] not in lo and a.get_attr("IFA_ADDRESS")
            }
            routes = {
                ipaddress.ip_network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}")
                for r in ipr.get_routes(family=socket.AF_UNSPEC, table=_RT_TABLE_LOCAL)
                if r["type"] == _RTN_LOCAL and r.get_attr("RTA_DST")
            }
        addresses = sorted((ip for ip in found if not ip.is_multicast), key=lambda ip: ip.packed)
        own = {ipaddress.ip_network(ip) for ip in addresses}
        own.add(ipaddress.ip_network(_PASSTHROUGH_V6))
        prefixes = [n for n in routes if n not in own and not n.network_address.is_loopback]
        return addresses, sorted(prefixes, key=lambda n: (n.version, n.network_address.packed))

    try:
        return in_netns(path, read)
    except (NetlinkError, OSError) as e:
        raise MeshaccelError(f"cannot read the addresses and routes in {path}: {_why(e)}") from None


def find(inode: int, cookie: int) -> str | None:
    """A path of the live netns with this inode and cookie (inodes are reused, cookies
    are not): among the named ones, then those of processes."""
    named = [os.path.join(NETNS_DIR, n) for n in _listdir(NETNS_DIR)]
    procs = [f"/proc/{pid}/ns/net" for pid in _listdir("/proc") if pid.isdigit()]
    for path in named + procs:
        try:
            if os.stat(path).st_ino == inode and netns_cookie(path) == cookie:
                return path
        except (OSError, MeshaccelError):
            continue
    return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
