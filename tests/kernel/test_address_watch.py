"""AddressWatch on real network namespaces: an address or a local route put on a pod's
netns is seen at once, its notifications drained; a watch is closed as soon as its
netns path is gone or names another netns (a socket holds its netns alive)."""

from __future__ import annotations

import os

from pyroute2 import NetNS

from meshaccel.agent.address_watch import AddressWatch
from meshaccel.datapath import netns as netns_mod
from meshaccel.lab import network
from tests.wait import wait_for


def seen(watch: AddressWatch, path: str) -> bool:
    return wait_for(lambda: path in watch.changed(), timeout=5)


def test_address_and_route_changes_are_seen_and_a_gone_netns_is_let_go(lab):
    ns = lab.new_netns("w")
    other = lab.new_netns("quiet")
    path, quiet = netns_mod.path_of(ns), netns_mod.path_of(other)
    fds = set(os.listdir("/proc/self/fd"))
    watch = AddressWatch()
    try:
        assert watch.follow([path, quiet, "/nonexistent/netns"]) == {path, quiet}
        assert watch.changed() == set()
        assert watch.follow([path, quiet]) == set()  # already watched

        with NetNS(ns) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.addr("add", index=lo, address="10.77.1.1", prefixlen=32)
        assert seen(watch, path)
        assert watch.changed() == set()  # drained; the other netns saw nothing
        with NetNS(ns) as ipr:
            ipr.route("add", dst="10.77.0.0/24", type="local", table=255, oif=lo, scope="host")
        assert seen(watch, path)

        network.remove_netns(ns)  # the pod is deleted: the socket must not keep its netns
        lab.netns.remove(ns)
        assert watch.follow([path, quiet]) == set()
        assert watch.watched == {quiet}
        network.create_netns(ns)  # the same path, another netns: watched anew
        lab.netns.append(ns)
        assert watch.follow([path, quiet]) == {path}
        assert watch.follow([quiet]) == set() and watch.watched == {quiet}
    finally:
        watch.close()
    assert set(os.listdir("/proc/self/fd")) <= fds  # every socket closed


def test_a_path_that_cannot_be_watched_is_said_once(tmp_path, caplog):
    """Not a netns (or not enterable): one warning, no retry until the path changes."""
    path = tmp_path / "not-a-netns"
    path.write_text("")
    watch = AddressWatch()
    try:
        assert watch.follow([str(path)]) == set()
        assert watch.follow([str(path)]) == set() and watch.watched == set()
    finally:
        watch.close()
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"cannot watch {path} for address changes (--netns {path}: not a network" in warning
