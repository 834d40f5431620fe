"""Which pods' network namespaces had an address or a route change: one rtnetlink socket
per pod netns, opened in it and subscribed to address and route notifications, so that
the agent reads a pod's netns again when something changed there, at once, instead of
every pod's on a timer.

A socket holds its netns alive: the watch of a netns whose path is gone, or names
another netns now, is closed on the next look (so a deleted pod's netns is freed)."""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
from collections.abc import Iterable

from meshaccel.datapath import netns
from meshaccel.errors import MeshaccelError

log = logging.getLogger("meshaccel.agent.address_watch")

# rtnetlink multicast groups (linux/rtnetlink.h RTMGRP_*): IPv4 and IPv6 addresses and
# routes (a local route is how a prefix is routed into a pod)
_GROUPS = 0x10 | 0x40 | 0x100 | 0x400  # IPV4_IFADDR, IPV4_ROUTE, IPV6_IFADDR, IPV6_ROUTE


class AddressWatch:
    """The pods' netns watched for address and route changes (by path)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._watched: dict[str, tuple[socket.socket, int]] = {}  # path -> (socket, inode)
        self._unwatchable: dict[str, int] = {}  # path -> inode: retried once it changes

    @property
    def watched(self) -> set[str]:
        return set(self._watched)

    def follow(self, paths: Iterable[str]) -> set[str]:
        """Watch the netns at these paths, and no others. Returns the paths watched from
        now on, whose changes until now were not seen (read them once)."""
        wanted = set(paths)
        for path, (_sock, inode) in list(self._watched.items()):
            if path not in wanted or _inode(path) != inode:
                self._close(path)
        self._unwatchable = {p: i for p, i in self._unwatchable.items() if p in wanted}
        new = set()
        for path in wanted - set(self._watched):
            inode = _inode(path)
            if inode is None or self._unwatchable.get(path) == inode:
                continue  # gone (the sync reports it), or failed before: the timer's
            try:
                sock = netns.in_netns(path, _subscribe)
            except (OSError, MeshaccelError) as e:
                why = "read on the periodic check only"
                log.warning("cannot watch %s for address changes (%s): %s", path, e, why)
                self._unwatchable[path] = inode
                continue
            self._watched[path] = (sock, inode)
            self._selector.register(sock, selectors.EVENT_READ, path)
            new.add(path)
        return new

    def changed(self) -> set[str]:
        """The watched paths whose netns had an address or route change since the last
        call (its notifications are read and dropped: the pod's netns is read again)."""
        if not self._watched:
            return set()
        found = set()
        for key, _events in self._selector.select(timeout=0):
            _drain(key.fileobj)  # type: ignore[arg-type]
            found.add(key.data)
        return found

    def close(self) -> None:
        for path in list(self._watched):
            self._close(path)
        self._selector.close()

    def _close(self, path: str) -> None:
        sock, _inode = self._watched.pop(path)
        self._selector.unregister(sock)
        sock.close()


def _subscribe() -> socket.socket:
    """An rtnetlink socket of the calling thread's netns, subscribed to _GROUPS."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        socket.NETLINK_ROUTE,
    )  # fmt: skip
    try:
        sock.bind((0, _GROUPS))
    except OSError:
        sock.close()
        raise
    return sock


def _drain(sock: socket.socket) -> None:
    """Read every notification waiting (ENOBUFS: some were dropped, which changes nothing
    here: the netns is read again anyway)."""
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                return


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
