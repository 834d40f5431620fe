"""A registered pod's inbound capture: the sk_lookup program linked into its netns, and
its sidecar's inbound listener in inbound_listener, where sk_lookup hands the pod's
inbound connections.

sockops files the listener when the sidecar calls listen() in a registered pod; a sidecar
that was listening before its pod was registered is adopted instead, through a copy of
its socket's fd (pidfd_getfd(2)).
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat

from meshaccel.datapath import bpfsys, lookup_tag, structs
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.pins import Pins, pin_fd
from meshaccel.datapath.programs import PROGRAMS
from meshaccel.errors import MeshaccelError

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD = 434, 438


# ---------------------------------------------------------------- sk_lookup link


def link_sk_lookup(bpffs: str, netns_path: str, cookie: int) -> str | None:
    """Link the pod's tag program, then the sk_lookup program, into the pod's netns
    (the kernel runs a netns' sk_lookup programs in link order), each pinned so that it
    outlives this process. Returns the new sk_lookup pin, or None if the pod had one
    already (then no tag is added: it would run after sk_lookup)."""
    pins = Pins(bpffs)
    pin = pins.link(cookie)
    if os.path.exists(pin):
        return None
    prog = next(p for p in PROGRAMS if p.hook == "netns")
    ns_fd = os.open(netns_path, os.O_RDONLY)
    try:
        tagged = _link_tag(pins, ns_fd, netns_path, cookie)
        try:
            _link(pin_fd(pins.prog(prog)), ns_fd, netns_path, pin)
        except BaseException:
            if tagged:
                os.unlink(pins.tag_link(cookie))
            raise
    finally:
        os.close(ns_fd)
    return pin


def _link_tag(pins: Pins, ns_fd: int, netns_path: str, cookie: int) -> bool:
    """The pod's tag program linked and pinned; False where the running datapath has no
    sk_lookup_netns (a build from before tags: its sk_lookup finds pods by address)."""
    map_pin = pins.map("sk_lookup_netns")
    if not os.path.exists(map_pin):
        return False
    tag_pin = pins.tag_link(cookie)
    if os.path.exists(tag_pin):  # left by a pod add that failed half-way
        os.unlink(tag_pin)
    prog_fd = lookup_tag.load(cookie, pin_fd(map_pin))
    try:
        _link(prog_fd, ns_fd, netns_path, tag_pin)
    finally:
        os.close(prog_fd)  # (the link holds it)
    return True


def _link(prog_fd: int, ns_fd: int, netns_path: str, pin: str) -> None:
    try:
        link_fd = bpfsys.link_create(prog_fd, ns_fd, bpfsys.SK_LOOKUP)
    except OSError as e:
        raise MeshaccelError(f"cannot attach sk_lookup to {netns_path}: {e}") from e
    try:
        bpfsys.obj_pin(link_fd, pin)
    finally:
        os.close(link_fd)


def unlink_sk_lookup(bpffs: str, cookie: int) -> None:
    """Detach the pod's tag program, then sk_lookup, from its netns (their pinned links
    are all that hold them): in the reverse of link order."""
    pins = Pins(bpffs)
    for link in (pins.tag_link(cookie), pins.link(cookie)):
        if os.path.exists(link):
            os.unlink(link)


class _LinkInfo(ctypes.Structure):
    """Leading part of struct bpf_link_info for a netns link (the kernel accepts a
    shorter info_len)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),  # (the union that follows is 8-aligned)
        ("netns_ino", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
    ]


def _link_info(pin: str) -> _LinkInfo:
    """What the kernel says of a pinned link (OSError if it cannot be read)."""
    fd = bpfsys.obj_get(pin)
    try:
        info = _LinkInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        ret = bpfsys.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
        if ret:
            raise OSError(-ret, f"link info {pin}: {os.strerror(-ret)}")
        return info
    finally:
        os.close(fd)


def link_prog_id(pin: str) -> int:
    """Id of the program a pinned link runs."""
    return _link_info(pin).prog_id


def linked_netns(bpffs: str, cookie: int) -> str | None:
    """A path of the pod's netns while it exists, found by the inode its sk_lookup link
    names (pod_config records no path, and pod remove is given only an address)."""
    try:
        info = _link_info(Pins(bpffs).link(cookie))
    except OSError:
        return None
    if not info.netns_ino:  # the netns is gone
        return None
    return netns_mod.find(info.netns_ino, cookie)


# ---------------------------------------------------------------- the inbound listener


def forget_listener(bpffs: str, ips: list[structs.IpKey]) -> None:
    """Take these pod addresses out of inbound_listener (the sidecar's socket stays)."""
    fd = pin_fd(Pins(bpffs).map("inbound_listener"))
    for key in ips:
        if any(key.ip):
            bpfsys.map_delete(fd, key)


def adopt_inbound_listener(bpffs: str, netns_path: str, pod: structs.PodConfig) -> bool:
    """A sidecar that started listening before its pod was registered (say, while the
    agent was down) was not seen by sockops: find its inbound listener in the pod's netns
    and put it in inbound_listener through a copy of its fd (pidfd_getfd(2))."""
    fd_map = pin_fd(Pins(bpffs).map("inbound_listener"))
    known = ctypes.c_uint64()
    if all(bpfsys.map_lookup(fd_map, k, known) for k in pod.ips if any(k.ip)):
        return True  # sockops saw it listen (or an earlier pod add adopted it)
    inodes = netns_mod.in_netns(netns_path, lambda: listening_inodes(pod.inbound_port))
    for pid, fd, inode in socket_owners(inodes, netns=os.stat(netns_path)):
        pidfd = _libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
        if pidfd < 0:
            continue
        try:
            sock = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        finally:
            os.close(pidfd)
        if sock < 0:
            continue
        got = os.fstat(sock)
        if not stat.S_ISSOCK(got.st_mode) or got.st_ino != inode:  # (see socket_owners)
            os.close(sock)
            continue
        try:
            for key in pod.ips:
                if any(key.ip):
                    bpfsys.map_update(fd_map, key, ctypes.c_uint64(sock))
        finally:
            os.close(sock)
        return True
    return False


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on port in the calling thread's netns, asked of
    the kernel's sock_diag (reading /proc/net/tcp walks the whole connection table)."""
    from pyroute2 import DiagSocket

    with DiagSocket() as diag:
        diag.bind()
        return {
            s["idiag_inode"]
            for family in (socket.AF_INET, socket.AF_INET6)
            for s in diag.get_sock_stats(family=family, states=1 << 10)  # TCP_LISTEN
            if s["idiag_sport"] == port
        }


def socket_owners(
    inodes: set[int], proc: str = "/proc", netns: os.stat_result | None = None
) -> list[tuple[int, int, int]]:
    """(pid, fd, inode) of the processes holding these sockets (only processes in the
    netns given by its stat, if given). Another user's /proc/PID/fd can only be searched
    with CAP_DAC_READ_SEARCH, which the agent is not given: there each fd's inode is read
    from /proc/PID/fdinfo instead (ptrace-checked: CAP_SYS_PTRACE), and the fd it leads to
    must be checked by the caller (fdinfo does not say it is a socket)."""
    wanted = {f"socket:[{i}]": i for i in inodes}
    found: list[tuple[int, int, int]] = []
    if not wanted:
        return found
    for pid in filter(str.isdigit, os.listdir(proc)):
        try:
            if netns is not None:
                ns = os.stat(f"{proc}/{pid}/ns/net")
                if (ns.st_dev, ns.st_ino) != (netns.st_dev, netns.st_ino):
                    continue
            try:
                fds, by_link = os.listdir(f"{proc}/{pid}/fd"), True
            except PermissionError:
                fds, by_link = os.listdir(f"{proc}/{pid}/fdinfo"), False
        except OSError:
            continue
        for fd in fds:
            try:
                if by_link:
                    target = os.readlink(f"{proc}/{pid}/fd/{fd}")
                else:
                    with open(f"{proc}/{pid}/fdinfo/{fd}") as f:
                        ino = next((ln.split()[1] for ln in f if ln.startswith("ino:")), "")
                    target = f"socket:[{ino}]"
            except (OSError, IndexError):
                continue
            if target in wanted:
                found.append((int(pid), int(fd), wanted.pop(target)))
    return found
