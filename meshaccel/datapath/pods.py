"""The pods the datapath captures for: `meshaccel pod add/remove/list`.

Each pod's istio-iptables settings (and Istio annotations) become the very rules the
iptables mode would install (meshaccel.datapath.rules), compiled
(meshaccel.datapath.compiler) into the pod_config map under each of the pod's addresses;
pod_by_netns maps its netns cookie to one of them, so connect4/6 can tell which pod a
socket belongs to.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from meshaccel.datapath import bpfsys, loader, structs
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import (
    CaptureConfig,
    ShortcutSetting,
    apply_annotations,
    parse_istio_args,
    shortcut_setting,
)
from meshaccel.datapath.compiler import (
    compile_config,
    compile_shortcut,
    istio_args_text,
    settings_digest,
)
from meshaccel.errors import MeshaccelError, one_line

SO_NETNS_COOKIE = 71
_libc = ctypes.CDLL(None, use_errno=True)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")

# ---------------------------------------------------------------- netns


def netns_cookie(path: str) -> int:
    """The kernel's cookie for the netns at path (what bpf_get_netns_cookie() returns).
    Not cached by the namespace's inode: the kernel reuses those once a netns is gone."""

    def cookie() -> int:
        with socket.socket() as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")

    return netns_mod.in_netns(path, cookie)


def local_addresses(path: str) -> list[Address]:
    """Every address on the pod's interfaces but lo (secondary interfaces, as Multus adds
    them, and IPv6 link-local ones included): istio-iptables' PREROUTING captures a
    connection to any of them, so the datapath must know them all."""
    from pyroute2 import IPRoute

    def read() -> list[Address]:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            found = {
                ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
                for a in ipr.get_addr()
                if a["index"] not in lo and a.get_attr("IFA_ADDRESS")
            }
        return sorted((ip for ip in found if not ip.is_multicast), key=lambda ip: ip.packed)

    return netns_mod.in_netns(path, read)


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
    pins = loader.Pins(bpffs)
    if not os.path.exists(pins.map("pod_config")):
        raise MeshaccelError(f"no datapath attached at {bpffs}: run meshaccel attach first")
    return loader.pin_fd(pins.map("pod_config")), loader.pin_fd(pins.map("pod_by_netns"))


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
    loader.check_root()
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
    others, taken = _other_addresses(config_fd, path, cookie, addrs)
    keys = [structs.IpKey(structs.ip_words(str(ip))) for ip in addrs + others]
    # what an update replaces, put back if it fails (a new pod has nothing to put back)
    earlier = _Entries.read(bpffs, config_fd, netns_fd, cookie) if update else _Entries()
    undo: list[Callable[[], object]] = []
    try:
        if any(ip.version == 6 for ip in addrs) and netns_mod.add_passthrough_v6(path, mark=True):
            undo.append(lambda: netns_mod.remove_passthrough_v6(path))
        if not update:  # before capture starts: sk_lookup refuses what no known sidecar takes
            undo.append(lambda: _forget_listener(bpffs, list(pod.ips)))
            adopt_inbound_listener(bpffs, path, pod)  # (later listen()s are seen by sockops)
        if linked := _link_sk_lookup(bpffs, path, cookie):
            undo.append(lambda: os.unlink(linked))
        _forget_addresses_not_in(config_fd, earlier.configs, keys)
        for key in keys:
            bpfsys.map_update(config_fd, key, pod)
        bpfsys.map_update(netns_fd, ctypes.c_uint64(cookie), keys[0])
        _write_shortcut(bpffs, cookie, shortcut)
    except (OSError, MeshaccelError) as e:
        earlier.restore(bpffs, config_fd, netns_fd, cookie, keys)
        for step in reversed(undo):
            try:
                step()
            except (OSError, MeshaccelError):
                pass  # report the first error, which says what went wrong
        why = str(e)
        if isinstance(e, OSError) and e.errno == errno.E2BIG:  # a full hash map
            capacity = bpfsys.map_info(config_fd).max_entries
            why = f"the datapath's pod maps are full ({capacity} pod addresses: MA_MAX_PODS)"
        kept = "its earlier registration kept" if update else "nothing registered"
        raise MeshaccelError(f"pod add {name} failed, {kept}: {why}") from e
    if earlier.ips:  # addresses it lost keep no inbound listener of its sidecar
        kept_ips = {bytes(k) for k in pod.ips}
        _forget_listener(bpffs, [k for k in earlier.ips if bytes(k) not in kept_ips])
    also = f"; also its {', '.join(map(str, others))}" if others else ""
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
) -> tuple[list, list]:
    """The pod's local addresses besides addrs, and those of them registered for another
    pod already (left to it: the same link-local address can exist in two netns)."""
    others, taken = [], []
    existing = structs.PodConfig()
    for ip in local_addresses(path):
        if ip in addrs:
            continue
        key = structs.IpKey(structs.ip_words(str(ip)))
        if bpfsys.map_lookup(config_fd, key, existing) and existing.netns_cookie != cookie:
            taken.append(ip)
        else:
            others.append(ip)
    return others, taken


def _write_shortcut(bpffs: str, cookie: int, setting: ShortcutSetting) -> None:
    """The pod's own shortcut setting; the default (as the node says) is no entry."""
    policy = compile_shortcut(setting)
    pin = loader.Pins(bpffs).map("pod_shortcut")
    if not os.path.exists(pin):  # a datapath from before per-pod settings (until upgraded)
        if policy is None:
            return
        raise MeshaccelError(
            f"the datapath at {bpffs} predates per-pod shortcut settings: meshaccel attach "
            "upgrades it"
        )
    fd = loader.pin_fd(pin)
    if policy is None:
        bpfsys.map_delete(fd, ctypes.c_uint64(cookie))
    else:
        bpfsys.map_update(fd, ctypes.c_uint64(cookie), policy)


def _shortcut_policy(bpffs: str, cookie: int) -> structs.ShortcutPolicy | None:
    """The pod's pod_shortcut entry (None: none, as the node says)."""
    pin = loader.Pins(bpffs).map("pod_shortcut")
    policy = structs.ShortcutPolicy()
    if not os.path.exists(pin):  # a datapath from before per-pod settings
        return None
    if not bpfsys.map_lookup(loader.pin_fd(pin), ctypes.c_uint64(cookie), policy):
        return None
    return policy


def _read_shortcut(bpffs: str, cookie: int) -> str:
    """The pod's own shortcut setting as pod list shows it: default (as the node says),
    off (none of its app sockets), apps (its app sockets too), maybe except ports."""
    policy = _shortcut_policy(bpffs, cookie)
    if policy is None:
        return "default"
    apps = {structs.POD_APPS_OFF: "off", structs.POD_APPS_ON: "apps"}.get(policy.apps, "default")
    if apps == "off" or not policy.n_ports:
        return apps
    return f"{apps} except ports " + ",".join(str(p) for p in policy.ports[: policy.n_ports])


def capture_config(
    bpffs: str, istio_args: str | None, annotations: Mapping[str, str] | None
) -> CaptureConfig:
    """A pod's settings: its args (default: attach's) with its annotations applied."""
    args = istio_args if istio_args is not None else loader.default_args(bpffs)
    return apply_annotations(parse_istio_args(args), annotations or {})


def capture_args(bpffs: str, istio_args: str | None, annotations: Mapping[str, str] | None) -> str:
    """capture_config() spelled as pod list shows it."""
    return istio_args_text(capture_config(bpffs, istio_args, annotations))[:511]


def _listening_inodes(port: int) -> set[int]:
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


def _socket_owners(
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


_SYS_PIDFD_OPEN, _SYS_PIDFD_GETFD = 434, 438


def adopt_inbound_listener(bpffs: str, netns_path: str, pod: structs.PodConfig) -> bool:
    """A sidecar that started listening before its pod was registered (say, while the
    agent was down) was not seen by sockops: find its inbound listener in the pod's netns
    and put it in inbound_listener through a copy of its fd (pidfd_getfd(2))."""
    fd_map = loader.pin_fd(loader.Pins(bpffs).map("inbound_listener"))
    known = ctypes.c_uint64()
    if all(bpfsys.map_lookup(fd_map, k, known) for k in pod.ips if any(k.ip)):
        return True  # sockops saw it listen (or an earlier pod add adopted it)
    inodes = netns_mod.in_netns(netns_path, lambda: _listening_inodes(pod.inbound_port))
    for pid, fd, inode in _socket_owners(inodes, netns=os.stat(netns_path)):
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
        if not stat.S_ISSOCK(got.st_mode) or got.st_ino != inode:  # (see _socket_owners)
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


def _forget_addresses_not_in(
    config_fd: int, earlier: Iterable[bytes], keep: list[structs.IpKey]
) -> None:
    """On an update: the pod's earlier addresses that it no longer has."""
    kept = {bytes(k) for k in keep}
    for raw in earlier:
        if raw not in kept:
            bpfsys.map_delete(config_fd, structs.IpKey.from_buffer_copy(raw))


def _link_sk_lookup(bpffs: str, netns_path: str, cookie: int) -> str | None:
    """Link the sk_lookup program into the pod's netns (inbound capture), pinned so it
    outlives this process. Returns the new pin, or None if the pod had one already."""
    pins = loader.Pins(bpffs)
    pin = pins.link(cookie)
    if os.path.exists(pin):
        return None
    prog = next(p for p in loader.PROGRAMS if p.hook == "netns")
    ns_fd = os.open(netns_path, os.O_RDONLY)
    try:
        link_fd = bpfsys.link_create(loader.pin_fd(pins.prog(prog)), ns_fd, prog.attach_type)
    except OSError as e:
        raise MeshaccelError(f"cannot attach sk_lookup to {netns_path}: {e}") from e
    finally:
        os.close(ns_fd)
    try:
        bpfsys.obj_pin(link_fd, pin)
    finally:
        os.close(link_fd)
    return pin


def remove(bpffs: str, ip: str) -> str:
    """Stop capturing for the pod with this address (all its addresses), undoing what pod
    add did: its map entries, its sk_lookup link, its sidecar's inbound listener entries
    and the ::6 on its lo if pod add put it there. Idempotent."""
    loader.check_root()
    [addr] = _ips([ip])
    config_fd, netns_fd = _fds(bpffs)
    pod = structs.PodConfig()
    if not bpfsys.map_lookup(config_fd, structs.IpKey(structs.ip_words(str(addr))), pod):
        return f"no pod with address {addr}"
    # (found through its sk_lookup link, so before the link goes)
    path = _netns_path(bpffs, pod.netns_cookie) if any(pod.ips[1].ip) else None
    bpfsys.map_delete(netns_fd, ctypes.c_uint64(pod.netns_cookie))
    link = loader.Pins(bpffs).link(pod.netns_cookie)
    if os.path.exists(link):
        os.unlink(link)  # detaches sk_lookup from the pod's netns
    for key in _registered(config_fd)[1].get(pod.netns_cookie, []):
        bpfsys.map_delete(config_fd, key)
    _forget_listener(bpffs, list(pod.ips))
    _write_shortcut(bpffs, pod.netns_cookie, ShortcutSetting())
    if path is not None:
        try:
            netns_mod.remove_passthrough_v6(path)
        except MeshaccelError:
            pass  # the netns went meanwhile, and its lo with it
    return f"pod {pod.name.decode()} removed"


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


def _netns_path(bpffs: str, cookie: int) -> str | None:
    """A path of the registered pod's netns while it exists: the inode its sk_lookup link
    names, looked up among named namespaces and processes' ones (and checked by cookie,
    as inodes are reused). pod_config records no path: pod remove is given an address."""
    link = loader.Pins(bpffs).link(cookie)
    try:
        fd = bpfsys.obj_get(link)
    except OSError:
        return None
    try:
        info = _LinkInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if bpfsys.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)):
            return None
    finally:
        os.close(fd)
    if not info.netns_ino:  # the netns is gone
        return None
    named = [os.path.join(netns_mod.NETNS_DIR, n) for n in _listdir(netns_mod.NETNS_DIR)]
    procs = [f"/proc/{pid}/ns/net" for pid in _listdir("/proc") if pid.isdigit()]
    for path in named + procs:
        try:
            if os.stat(path).st_ino == info.netns_ino and netns_cookie(path) == cookie:
                return path
        except (OSError, MeshaccelError):
            continue
    return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _forget_listener(bpffs: str, ips: list[structs.IpKey]) -> None:
    """Take these pod addresses out of inbound_listener (the sidecar's socket stays)."""
    fd = loader.pin_fd(loader.Pins(bpffs).map("inbound_listener"))
    for key in ips:
        if any(key.ip):
            bpfsys.map_delete(fd, key)


@dataclass
class _Entries:
    """A registered pod's map entries, as an update found them: what a failed update puts
    back."""

    configs: dict[bytes, structs.PodConfig] = field(default_factory=dict)  # by address
    by_netns: structs.IpKey | None = None
    shortcut: structs.ShortcutPolicy | None = None

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
        pin = loader.Pins(bpffs).map("pod_shortcut")
        policy = structs.ShortcutPolicy()
        if os.path.exists(pin) and bpfsys.map_lookup(
            loader.pin_fd(pin), ctypes.c_uint64(cookie), policy
        ):
            found.shortcut = policy
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
        pin = loader.Pins(bpffs).map("pod_shortcut")
        if os.path.exists(pin):
            if self.shortcut is None:
                steps.append(lambda: bpfsys.map_delete(loader.pin_fd(pin), cookie_key))
            else:
                steps.append(
                    lambda: bpfsys.map_update(loader.pin_fd(pin), cookie_key, self.shortcut)
                )
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
    pin = loader.Pins(bpffs).map("sock_hash")
    if not os.path.exists(pin):
        return []
    raw = set(bpfsys.map_keys(loader.pin_fd(pin), ctypes.sizeof(structs.SockKey)))
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
    pin = loader.Pins(bpffs).map("pod_config")
    if not os.path.exists(pin):
        return {}
    registered, addresses = _registered(loader.pin_fd(pin))
    counts = shortcut_counts(_sock_hash_keys(bpffs), addresses.items())
    return {registered[c].name.decode(): n for c, n in counts.items()}


@dataclass(frozen=True)
class Registration:
    """A registered pod as a pod source's reconciler compares it with the pod it wants."""

    name: str  # as pod_config records it (compiler.recorded_name)
    ips: tuple[str, ...]  # its own addresses, IPv4 first
    netns_cookie: int
    settings: str  # compiler.settings_digest of its entries


def registrations(bpffs: str) -> list[Registration]:
    """Every registered pod once: one walk of pod_config and a lookup per pod of its
    shortcut setting (no sock_hash read, unlike list_pods)."""
    loader.check_root()
    config_fd, _ = _fds(bpffs)
    return [
        Registration(
            pod.name.decode(),
            tuple(structs.words_ip(k.ip) for k in pod.ips if any(k.ip)),
            cookie,
            settings_digest(pod, _shortcut_policy(bpffs, cookie)),
        )
        for cookie, pod in _registered(config_fd)[0].items()
    ]


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
    loader.check_root()
    config_fd, _ = _fds(bpffs)
    registered, addresses = _registered(config_fd)
    counts: dict[int, int] = {}
    if count_sockets:
        counts = shortcut_counts(_sock_hash_keys(bpffs), addresses.items())
    found = [
        {
            "name": pod.name.decode(),
            "ips": [structs.words_ip(k.ip) for k in pod.ips if any(k.ip)],
            # every address captured for it: its own and its other interfaces'
            "addresses": sorted(structs.words_ip(k.ip) for k in addresses.get(cookie, [])),
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
