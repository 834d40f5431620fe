"""The pod registry: the pods the datapath captures for (`meshaccel pod add/remove/list`).

Each pod's istio-iptables settings (and Istio annotations) become the very rules the
iptables mode would install (meshaccel.datapath.rules), compiled
(meshaccel.datapath.compiler) into the pod_config map under each of the pod's addresses;
pod_by_netns maps its netns cookie to one of them, so connect4/6 can tell which pod a
socket belongs to, pod_local_routes holds the prefixes its netns accepts by a local route,
and pod_shortcut holds its own shortcut setting. Its inbound capture
(the sk_lookup link in its netns, its sidecar's listener) is meshaccel.datapath.inbound's.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from meshaccel.datapath import bpfsys, structs
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import CaptureConfig, apply_annotations, parse_istio_args
from meshaccel.datapath.compiler import (
    compile_config,
    compile_shortcut,
    istio_args_text,
    settings_digest,
)
from meshaccel.datapath.host import check_root
from meshaccel.datapath.inbound import (
    adopt_inbound_listener,
    forget_listener,
    link_sk_lookup,
    linked_netns,
    unlink_sk_lookup,
)
from meshaccel.datapath.netns import netns_cookie
from meshaccel.datapath.pins import Pins, default_args, pin_fd
from meshaccel.datapath.shortcut import ShortcutSetting, shortcut_setting
from meshaccel.errors import MeshaccelError, one_line

Address = netns_mod.Address

# ---------------------------------------------------------------- add / remove / list


def pod_address(text: str) -> Address:
    """A pod's address, or ValueError saying why text is not one."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("not an IP address") from None
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        raise ValueError("not a pod address (loopback/unspecified/multicast)")
    if getattr(ip, "scope_id", None) is not None:  # (the datapath would drop the zone)
        raise ValueError("not a pod address (an address with a zone)")
    if getattr(ip, "ipv4_mapped", None) is not None:  # (the datapath keys IPv4 so)
        raise ValueError("not a pod address (an IPv4-mapped IPv6 address: give the IPv4 one)")
    return ip


def _ips(ips: list[str]) -> list[Address]:
    out = []
    for text in ips:
        try:
            out.append(pod_address(text))
        except ValueError as e:
            raise MeshaccelError(one_line(f"--ip {text}: {e}")) from None
    if not out:
        raise MeshaccelError("--ip: give the pod's address (once per family)")
    versions = [ip.version for ip in out]
    if len(set(versions)) != len(versions):
        raise MeshaccelError(f"--ip {' '.join(ips)}: at most one address per family")
    return sorted(out, key=lambda ip: ip.version)


def _fds(bpffs: str) -> tuple[int, int]:
    pins = Pins(bpffs)
    if not os.path.exists(pins.map("pod_config")):
        raise MeshaccelError(f"no datapath attached at {bpffs}: run meshaccel attach first")
    return pin_fd(pins.map("pod_config")), pin_fd(pins.map("pod_by_netns"))


def add(
    bpffs: str,
    name: str,
    ips: list[str],
    netns: str | None = None,
    pid: int | None = None,
    istio_args: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> str:
    """Register (or update) a pod: its addresses, its netns, its capture settings."""
    check_root()
    addrs = _ips(ips)
    if (netns is None) == (pid is None):
        raise MeshaccelError("give the pod's network namespace: --netns PATH or --pid PID")
    path = netns if netns is not None else f"/proc/{pid}/ns/net"
    if pid is not None:
        try:
            os.stat(path)
        except FileNotFoundError:
            raise MeshaccelError(f"--pid {pid}: no such process") from None
        except PermissionError:  # a ptrace access check: another user's process
            raise MeshaccelError(
                f"--pid {pid}: may not open its network namespace (needs CAP_SYS_PTRACE)"
            ) from None
    config_fd, netns_fd = _fds(bpffs)
    cfg = capture_config(bpffs, istio_args, annotations)
    shortcut = shortcut_setting(annotations or {})
    cookie = netns_cookie(path)

    existing = structs.PodConfig()
    update = False  # the pod is registered already (same netns): new settings only
    for ip in addrs:
        if bpfsys.map_lookup(config_fd, structs.IpKey(structs.ip_words(str(ip))), existing):
            update = existing.netns_cookie == cookie
            if not update:
                raise MeshaccelError(
                    f"--ip {ip}: already the address of pod {existing.name.decode()!r} in "
                    f"another netns: meshaccel pod remove --ip {ip} first"
                )
    pod = compile_config(cfg, name, cookie)
    for ip in addrs:  # ips[0] holds the IPv4 address, ips[1] the IPv6 one
        pod.ips[0 if ip.version == 4 else 1] = structs.IpKey(structs.ip_words(str(ip)))
    others, taken, prefixes = _other_addresses(config_fd, path, cookie, addrs)
    keys = [structs.IpKey(structs.ip_words(str(ip))) for ip in addrs + others]
    # what an update replaces, put back if it fails (a new pod has nothing to put back)
    earlier = _Entries.read(bpffs, config_fd, netns_fd, cookie) if update else _Entries()
    undo: list[Callable[[], object]] = []
    try:
        if any(ip.version == 6 for ip in addrs) and netns_mod.add_passthrough_v6(path, mark=True):
            undo.append(lambda: netns_mod.remove_passthrough_v6(path))
        if not update:  # before capture starts: sk_lookup refuses what no known sidecar takes
            undo.append(lambda: forget_listener(bpffs, list(pod.ips)))
            adopt_inbound_listener(bpffs, path, pod)  # (later listen()s are seen by sockops)
        if link_sk_lookup(bpffs, path, cookie):  # (its tag link too)
            undo.append(lambda: unlink_sk_lookup(bpffs, cookie))
        _forget_addresses_not_in(config_fd, earlier.configs, keys)
        for key in keys:
            bpfsys.map_update(config_fd, key, pod)
        bpfsys.map_update(netns_fd, ctypes.c_uint64(cookie), keys[0])
        _write_shortcut(bpffs, cookie, shortcut)
        _write_local_routes(bpffs, cookie, prefixes)
    except (OSError, MeshaccelError) as e:
        earlier.restore(bpffs, config_fd, netns_fd, cookie, keys)
        for step in reversed(undo):
            try:
                step()
            except (OSError, MeshaccelError):
                pass  # report the first error, which says what went wrong
        why = str(e)
        if isinstance(e, OSError) and e.errno in (errno.E2BIG, errno.ENOSPC):  # a full map
            capacity = bpfsys.map_info(config_fd).max_entries
            why = (
                f"the datapath's pod maps are full ({capacity} pod addresses or local-route "
                "prefixes: MA_MAX_PODS)"
            )
        kept = "its earlier registration kept" if update else "nothing registered"
        raise MeshaccelError(f"pod add {name} failed, {kept}: {why}") from e
    if earlier.ips:  # addresses it lost keep no inbound listener of its sidecar
        kept_ips = {bytes(k) for k in pod.ips}
        forget_listener(bpffs, [k for k in earlier.ips if bytes(k) not in kept_ips])
    also = f"; also its {', '.join(map(str, others + prefixes))}" if others or prefixes else ""
    if not shortcut.is_default:
        also += f"; shortcut {_read_shortcut(bpffs, cookie)}"
    if taken:
        also += f"; not {', '.join(map(str, taken))} (another pod's address)"
    return f"pod {name} ({', '.join(map(str, addrs))}{also}) captured: {pod.args.decode()}"


def _other_addresses(
    config_fd: int,
    path: str,
    cookie: int,
    addrs: list[Address],
) -> tuple[list[Address], list[Address], list[netns_mod.Network]]:
    """The pod's local addresses besides addrs, those of them registered for another pod
    already (left to it: the same link-local address can exist in two netns), and the
    prefixes its local routes accept besides (AnyIP)."""
    others, taken = [], []
    existing = structs.PodConfig()
    addresses, prefixes = netns_mod.local_destinations(path)
    # istio-iptables' PREROUTING captures a connection to any of them
    for ip in addresses:
        if ip in addrs:
            continue
        key = structs.IpKey(structs.ip_words(str(ip)))
        if bpfsys.map_lookup(config_fd, key, existing) and existing.netns_cookie != cookie:
            taken.append(ip)
        else:
            others.append(ip)
    return others, taken, prefixes


def _local_routes(bpffs: str) -> dict[int, list[str]]:
    """Every pod's prefixes in pod_local_routes, by netns cookie (none when the datapath
    predates the map)."""
    pin = Pins(bpffs).map("pod_local_routes")
    return _local_routes_in(pin_fd(pin)) if os.path.exists(pin) else {}


def _local_routes_in(fd: int) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for raw in bpfsys.map_keys(fd, ctypes.sizeof(structs.LocalRouteKey)):
        cookie, prefix = structs.local_route_prefix(structs.LocalRouteKey.from_buffer_copy(raw))
        found.setdefault(cookie, []).append(prefix)
    return {cookie: sorted(prefixes) for cookie, prefixes in found.items()}


def _write_local_routes(
    bpffs: str, cookie: int, prefixes: Iterable[netns_mod.Network | str]
) -> None:
    """The pod's entries in pod_local_routes at bpffs (write_local_routes). A datapath from
    before the map (until upgraded) has none: its connect4/6 would not read them."""
    pin = Pins(bpffs).map("pod_local_routes")
    if os.path.exists(pin):
        write_local_routes(pin_fd(pin), cookie, prefixes)


def write_local_routes(fd: int, cookie: int, prefixes: Iterable[netns_mod.Network | str]) -> None:
    """Make the pod's entries in the pod_local_routes map fd exactly these prefixes."""
    want = {str(p) for p in prefixes}
    have = set(_local_routes_in(fd).get(cookie, []))
    for prefix in have - want:
        bpfsys.map_delete(fd, structs.local_route_key(cookie, prefix))
    for prefix in sorted(want - have):
        bpfsys.map_update(fd, structs.local_route_key(cookie, prefix), ctypes.c_uint8(1))


def _write_shortcut(bpffs: str, cookie: int, setting: ShortcutSetting) -> None:
    """The pod's own shortcut setting; the default (as the node says) is no entry."""
    policy = compile_shortcut(setting)
    pin = Pins(bpffs).map("pod_shortcut")
    if not os.path.exists(pin):  # a datapath from before per-pod settings (until upgraded)
        if policy is None:
            return
        raise MeshaccelError(
            f"the datapath at {bpffs} predates per-pod shortcut settings: meshaccel attach "
            "upgrades it"
        )
    fd = pin_fd(pin)
    if policy is None:
        bpfsys.map_delete(fd, ctypes.c_uint64(cookie))
    else:
        bpfsys.map_update(fd, ctypes.c_uint64(cookie), policy)


def _shortcut_policy(bpffs: str, cookie: int) -> structs.ShortcutPolicy | None:
    """The pod's pod_shortcut entry (None: none, as the node says)."""
    pin = Pins(bpffs).map("pod_shortcut")
    policy = structs.ShortcutPolicy()
    if not os.path.exists(pin):  # a datapath from before per-pod settings
        return None
    if not bpfsys.map_lookup(pin_fd(pin), ctypes.c_uint64(cookie), policy):
        return None
    return policy


def _read_shortcut(bpffs: str, cookie: int) -> str:
    """The pod's own shortcut setting as pod list shows it: default (as the node says),
    off (none of its app sockets), none (no socket of the pod, its sidecar's neither),
    apps (its app sockets too), maybe except ports."""
    policy = _shortcut_policy(bpffs, cookie)
    if policy is None:
        return "default"
    apps = {
        structs.POD_APPS_OFF: "off",
        structs.POD_APPS_ON: "apps",
        structs.POD_APPS_NONE: "none",
    }.get(policy.apps, "default")
    if apps in ("off", "none") or not policy.n_ports:
        return apps
    return f"{apps} except ports " + ",".join(str(p) for p in policy.ports[: policy.n_ports])


def capture_config(
    bpffs: str, istio_args: str | None, annotations: Mapping[str, str] | None
) -> CaptureConfig:
    """A pod's settings: its args (default: attach's) with its annotations applied."""
    args = istio_args if istio_args is not None else default_args(bpffs)
    return apply_annotations(_parsed_args(args), annotations or {})


# attach's default args are read back from the datapath for every pod added or compared:
# parsed once per spelling (a CaptureConfig is immutable)
_parsed_args = functools.lru_cache(maxsize=64)(parse_istio_args)


def capture_args(bpffs: str, istio_args: str | None, annotations: Mapping[str, str] | None) -> str:
    """capture_config() spelled as pod list shows it."""
    return istio_args_text(capture_config(bpffs, istio_args, annotations))[:511]


def _forget_addresses_not_in(
    config_fd: int, earlier: Iterable[bytes], keep: list[structs.IpKey]
) -> None:
    """On an update: the pod's earlier addresses that it no longer has."""
    kept = {bytes(k) for k in keep}
    for raw in earlier:
        if raw not in kept:
            bpfsys.map_delete(config_fd, structs.IpKey.from_buffer_copy(raw))


def remove(bpffs: str, ip: str) -> str:
    """Stop capturing for the pod with this address (all its addresses), undoing what pod
    add did: its map entries, its sk_lookup link, its sidecar's inbound listener entries
    and the ::6 on its lo if pod add put it there. Idempotent."""
    check_root()
    [addr] = _ips([ip])
    config_fd, netns_fd = _fds(bpffs)
    pod = structs.PodConfig()
    if not bpfsys.map_lookup(config_fd, structs.IpKey(structs.ip_words(str(addr))), pod):
        return f"no pod with address {addr}"
    # (found through its sk_lookup link, so before the link goes)
    path = linked_netns(bpffs, pod.netns_cookie) if any(pod.ips[1].ip) else None
    bpfsys.map_delete(netns_fd, ctypes.c_uint64(pod.netns_cookie))
    unlink_sk_lookup(bpffs, pod.netns_cookie)
    for key in _registered(config_fd)[1].get(pod.netns_cookie, []):
        bpfsys.map_delete(config_fd, key)
    forget_listener(bpffs, list(pod.ips))
    _write_shortcut(bpffs, pod.netns_cookie, ShortcutSetting())
    _write_local_routes(bpffs, pod.netns_cookie, [])
    if path is not None:
        try:
            netns_mod.remove_passthrough_v6(path)
        except MeshaccelError:
            pass  # the netns went meanwhile, and its lo with it
    return f"pod {pod.name.decode()} removed"


@dataclass
class _Entries:
    """A registered pod's map entries, as an update found them: what a failed update puts
    back."""

    configs: dict[bytes, structs.PodConfig] = field(default_factory=dict)  # by address
    by_netns: structs.IpKey | None = None
    shortcut: structs.ShortcutPolicy | None = None
    routes: list[str] = field(default_factory=list)  # pod_local_routes' prefixes

    @property
    def ips(self) -> list[structs.IpKey]:
        """The pod's own addresses (pod_config's ips) as registered."""
        held = next(iter(self.configs.values()), None)
        return [] if held is None else [k for k in held.ips if any(k.ip)]

    @classmethod
    def read(cls, bpffs: str, config_fd: int, netns_fd: int, cookie: int) -> _Entries:
        found = cls()
        for key in _registered(config_fd)[1].get(cookie, []):
            if bpfsys.map_lookup(config_fd, key, held := structs.PodConfig()):
                found.configs[bytes(key)] = held
        if bpfsys.map_lookup(netns_fd, ctypes.c_uint64(cookie), by_netns := structs.IpKey()):
            found.by_netns = by_netns
        pin = Pins(bpffs).map("pod_shortcut")
        policy = structs.ShortcutPolicy()
        if os.path.exists(pin) and bpfsys.map_lookup(pin_fd(pin), ctypes.c_uint64(cookie), policy):
            found.shortcut = policy
        found.routes = _local_routes(bpffs).get(cookie, [])
        return found

    def restore(
        self, bpffs: str, config_fd: int, netns_fd: int, cookie: int, written: list[structs.IpKey]
    ) -> None:
        """Put these entries back over what a failed update wrote (keys: the addresses it
        wrote); entries it wrote that were not there before go. Best effort: a step that
        fails does not stop the others."""
        steps: list[Callable[[], object]] = []
        for key in written:
            if bytes(key) not in self.configs:
                steps.append(lambda k=key: bpfsys.map_delete(config_fd, k))
        for raw, held in self.configs.items():
            key = structs.IpKey.from_buffer_copy(raw)
            steps.append(lambda k=key, v=held: bpfsys.map_update(config_fd, k, v))
        cookie_key = ctypes.c_uint64(cookie)
        if self.by_netns is None:
            steps.append(lambda: bpfsys.map_delete(netns_fd, cookie_key))
        else:
            steps.append(lambda: bpfsys.map_update(netns_fd, cookie_key, self.by_netns))
        pin = Pins(bpffs).map("pod_shortcut")
        if os.path.exists(pin):
            if self.shortcut is None:
                steps.append(lambda: bpfsys.map_delete(pin_fd(pin), cookie_key))
            else:
                steps.append(lambda: bpfsys.map_update(pin_fd(pin), cookie_key, self.shortcut))
        steps.append(lambda: _write_local_routes(bpffs, cookie, self.routes))
        for step in steps:
            try:
                step()
            except OSError:
                pass


def shortcut_counts(
    keys: Iterable[structs.SockKey], registered: Iterable[tuple[int, Iterable[structs.IpKey]]]
) -> dict[int, int]:
    """How many of these sock_hash keys belong to each registered pod, by netns cookie
    (registered: each pod's netns cookie and addresses). A key carrying a netns cookie is a
    loopback tuple inside that pod (app<->sidecar); a key without one is a tuple of two pod
    addresses (sidecar<->sidecar), whose end belongs to the pod holding its local_ip. Keys
    of no registered pod are not counted; every registered pod is in the result."""
    counts: dict[int, int] = {}
    by_ip: dict[bytes, int] = {}
    for cookie, ips in registered:
        counts[cookie] = 0
        for ip in ips:
            if any(ip.ip):
                by_ip[bytes(ip)] = cookie
    for key in keys:
        owner = key.netns_cookie if key.netns_cookie else by_ip.get(bytes(key.local_ip))
        if owner in counts:
            counts[owner] += 1
    return counts


def _sock_hash_keys(bpffs: str) -> list[structs.SockKey]:
    """Every key of the pinned sock_hash, read once (none if it is not pinned). A key seen
    twice (the walk restarts when an entry goes mid-walk) counts once."""
    pin = Pins(bpffs).map("sock_hash")
    if not os.path.exists(pin):
        return []
    raw = set(bpfsys.map_keys(pin_fd(pin), ctypes.sizeof(structs.SockKey)))
    return [structs.SockKey.from_buffer_copy(k) for k in raw]


def _registered(
    config_fd: int,
) -> tuple[dict[int, structs.PodConfig], dict[int, list[structs.IpKey]]]:
    """Every registered pod once, and every address registered for it (pod_config holds
    the pod under each of its addresses), both by netns cookie: one walk of the map."""
    pods: dict[int, structs.PodConfig] = {}
    addresses: dict[int, list[structs.IpKey]] = {}
    for raw in bpfsys.map_keys(config_fd, ctypes.sizeof(structs.IpKey)):
        key, pod = structs.IpKey.from_buffer_copy(raw), structs.PodConfig()
        if bpfsys.map_lookup(config_fd, key, pod):
            pods.setdefault(pod.netns_cookie, pod)
            addresses.setdefault(pod.netns_cookie, []).append(key)
    return pods, addresses


def shortcut_sockets(bpffs: str) -> dict[str, int]:
    """Each registered pod's sockets on the shortcut now (in sock_hash), by pod name; empty
    when no datapath is pinned at bpffs. One walk of each map: cheap enough per scrape."""
    pin = Pins(bpffs).map("pod_config")
    if not os.path.exists(pin):
        return {}
    registered, addresses = _registered(pin_fd(pin))
    counts = shortcut_counts(_sock_hash_keys(bpffs), addresses.items())
    return {registered[c].name.decode(): n for c, n in counts.items()}


@dataclass(frozen=True)
class Registration:
    """A registered pod as a pod source's reconciler compares it with the pod it wants."""

    name: str  # as pod_config records it (compiler.recorded_name)
    ips: tuple[str, ...]  # its own addresses, IPv4 first
    netns_cookie: int
    settings: str  # compiler.settings_digest of its entries
    # every address registered for it (ips too), and every prefix routed into it
    addresses: frozenset[str] = frozenset()


def registrations(bpffs: str) -> list[Registration]:
    """Every registered pod once: one walk of pod_config and a lookup per pod of its
    shortcut setting (no sock_hash read, unlike list_pods)."""
    check_root()
    config_fd, _ = _fds(bpffs)
    registered, addresses = _registered(config_fd)
    routes = _local_routes(bpffs)
    return [
        Registration(
            pod.name.decode(),
            tuple(structs.words_ip(k.ip) for k in pod.ips if any(k.ip)),
            cookie,
            settings_digest(pod, _shortcut_policy(bpffs, cookie)),
            frozenset(structs.words_ip(k.ip) for k in addresses[cookie])
            | frozenset(routes.get(cookie, [])),
        )
        for cookie, pod in registered.items()
    ]


def addresses_now(bpffs: str, netns: str, ips: Iterable[str]) -> frozenset[str]:
    """The addresses pod add would register for the pod now: its own (ips), the other
    addresses its netns holds, but those registered for another pod, and the prefixes
    its local routes accept. One put on the pod after pod add counts as the pod's only
    once registered (an app's call to it would go to its sidecar, where Istio's rules let
    it reach the app): compare with the Registration's, and pod add again when they
    differ."""
    config_fd, _ = _fds(bpffs)
    own = [ipaddress.ip_address(ip) for ip in ips]
    others, _taken, prefixes = _other_addresses(config_fd, netns, netns_cookie(netns), own)
    return frozenset(str(ip) for ip in [*own, *others, *prefixes])


def desired_settings(bpffs: str, name: str, annotations: Mapping[str, str] | None) -> str:
    """The settings digest pod add would give the pod of this name and annotations (with
    attach's default args): equal to its Registration's settings when it is up to date.
    Raises as pod add does for settings it cannot take."""
    pod = compile_config(capture_config(bpffs, None, annotations), name)
    return settings_digest(pod, compile_shortcut(shortcut_setting(annotations or {})))


def list_pods(bpffs: str, count_sockets: bool = True) -> list[dict]:
    """Every registered pod once, JSON-ready, with the number of its sockets on the
    shortcut now (shortcut_sockets; None with count_sockets=False, which skips reading
    sock_hash)."""
    check_root()
    config_fd, _ = _fds(bpffs)
    registered, addresses = _registered(config_fd)
    routes = _local_routes(bpffs)
    counts: dict[int, int] = {}
    if count_sockets:
        counts = shortcut_counts(_sock_hash_keys(bpffs), addresses.items())
    found = [
        {
            "name": pod.name.decode(),
            "ips": [structs.words_ip(k.ip) for k in pod.ips if any(k.ip)],
            # every address captured for it: its own and its other interfaces'
            "addresses": sorted(structs.words_ip(k.ip) for k in addresses.get(cookie, [])),
            # the prefixes its local routes accept (AnyIP): local to it, as its addresses
            "local_routes": routes.get(cookie, []),
            "netns_cookie": pod.netns_cookie,
            "proxy_port": pod.proxy_port,
            "inbound_port": pod.inbound_port,
            "rules": {"output": pod.n_output, "inbound": pod.n_inbound},
            "istio_iptables_args": pod.args.decode(),
            "shortcut": _read_shortcut(bpffs, cookie),
            "shortcut_sockets": counts.get(cookie) if count_sockets else None,
        }
        for cookie, pod in registered.items()
    ]
    return sorted(found, key=lambda p: p["name"])
