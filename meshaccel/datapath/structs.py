"""Python mirrors of bpf/include/types.h (tests/kernel/test_layout.py checks them against
what bcc compiled), and the names under which maps and programs are pinned."""

from __future__ import annotations

import ctypes
import ipaddress


class SockKey(ctypes.Structure):
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("local_ip", ctypes.c_uint32 * 4),
        ("remote_ip", ctypes.c_uint32 * 4),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("_pad", ctypes.c_uint32),
    ]


class OrigDst(ctypes.Structure):
    _fields_ = [
        ("ip", ctypes.c_uint32 * 4),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("flags", ctypes.c_uint32),
    ]


OD_REWRITTEN, OD_ASKED = 1 << 0, 1 << 1  # enum orig_dst_flags


# enum shortcut_mode: which captured connections' sockets join sock_hash
SHORTCUT_OFF, SHORTCUT_ALL, SHORTCUT_SIDECARS = 0, 1, 2


class MaConfig(ctypes.Structure):
    _fields_ = [("shortcut", ctypes.c_uint32)]  # enum shortcut_mode


class IpKey(ctypes.Structure):
    _fields_ = [("ip", ctypes.c_uint32 * 4)]


class LocalRouteKey(ctypes.Structure):
    """struct local_route_key: a prefix a pod's netns accepts by a local route (AnyIP)."""

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("netns_cookie", ctypes.c_uint32 * 2),
        ("ip", ctypes.c_uint32 * 4),
    ]


def local_route_key(cookie: int, prefix: str) -> LocalRouteKey:
    """The pod_local_routes key of a prefix of the pod in netns cookie."""
    net = ipaddress.ip_network(prefix)
    bits = net.prefixlen + (96 if net.version == 4 else 0)  # (v4-mapped)
    key = LocalRouteKey(prefixlen=64 + bits, ip=ip_words(str(net.network_address)))
    ctypes.memmove(key.netns_cookie, ctypes.byref(ctypes.c_uint64(cookie)), 8)  # (as C's)
    return key


def local_route_prefix(key: LocalRouteKey) -> tuple[int, str]:
    """Inverse of local_route_key: (netns cookie, prefix)."""
    cookie = ctypes.c_uint64.from_buffer_copy(key.netns_cookie).value
    addr = ipaddress.ip_address(words_ip(key.ip))
    bits = key.prefixlen - 64 - (96 if addr.version == 4 else 0)
    return cookie, str(ipaddress.ip_network(f"{addr}/{bits}"))


# enum rule_match / enum rule_action
RM_OUT_LO, RM_SRC, RM_DST, RM_NOT_DST, RM_UDP = 1, 2, 4, 8, 16
RM_DPORT, RM_NOT_DPORT, RM_UID, RM_GID, RM_NOT_OWNER = 32, 64, 128, 256, 512
RA_RETURN, RA_REDIRECT, RA_IN_REDIRECT = 1, 2, 3
MAX_RULES = 48


class CaptureRule(ctypes.Structure):
    _fields_ = [
        ("match", ctypes.c_uint32),
        ("action", ctypes.c_uint32),
        ("addr", ctypes.c_uint32 * 4),
        ("mask", ctypes.c_uint32 * 4),
        ("owner", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
    ]


class PodConfig(ctypes.Structure):
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("ips", IpKey * 2),
        ("proxy_port", ctypes.c_uint16),
        ("inbound_port", ctypes.c_uint16),
        ("n_output", ctypes.c_uint16),
        ("n_inbound", ctypes.c_uint16),
        ("output", CaptureRule * MAX_RULES),
        ("inbound", CaptureRule * MAX_RULES),
        ("name", ctypes.c_char * 64),
        ("args", ctypes.c_char * 512),
    ]


MAX_SHORTCUT_EXCLUDE = 16


# enum pod_apps: a pod's own app<->sidecar sockets on the shortcut
POD_APPS_NODE, POD_APPS_OFF, POD_APPS_ON, POD_APPS_NONE = 0, 1, 2, 3


class ShortcutPolicy(ctypes.Structure):
    _fields_ = [
        ("apps", ctypes.c_uint32),  # enum pod_apps
        ("n_ports", ctypes.c_uint16),
        ("ports", ctypes.c_uint16 * MAX_SHORTCUT_EXCLUDE),
        ("_pad", ctypes.c_uint16),
    ]


class LookupTag(ctypes.Structure):
    """struct lookup_tag: what a pod's tag program writes for the sk_lookup under way."""

    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("remote_ip", ctypes.c_uint32 * 4),
        ("family", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("remote_port", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16 * 3),
    ]


class AttachInfo(ctypes.Structure):
    _fields_ = [
        ("cgroup_id", ctypes.c_uint64),
        ("cgroup_path", ctypes.c_char * 248),
        ("default_args", ctypes.c_char * 512),
    ]


# enum counter, in order: index i counts COUNTERS[i] (CNT_<NAME> in upper case).
COUNTERS: tuple[str, ...] = (
    "connect_captured",
    "connect_captured_inbound",
    "connect_sidecar_to_pod",
    "connect_passthrough",
    "connect_skipped_no_pod",
    "connect_skipped_proxy_uid",
    "connect_skipped_local",
    "connect_skipped_rule",
    "connect_skipped_not_tcp",
    "inbound_captured",
    "inbound_no_listener",
    "inbound_assign_failed",
    "connect_record_failed",
    "orig_dst_answered",
    "orig_dst_not_found",
    "sock_inserted",
    "sock_insert_failed",
    "msg_redirected",
    "msg_redirected_bytes",
    "msg_fallback_no_peer",
    "msg_fallback_bytes",
    "orig_dst_by_conntrack",
    "sock_kept_off_by_pod",
    "sock_kept_off_app",
)

# Every map in bpf/include/maps.h, pinned under the bpffs directory by this name.
MAPS: tuple[str, ...] = (
    "config_map",
    "pod_config",
    "pod_by_netns",
    "pod_shortcut",
    "pod_local_routes",
    "sk_lookup_netns",
    "attach_info_map",
    "counters",
    "orig_dst_by_cookie",
    "orig_dst_by_sock",
    "sock_hash",
    "nat_peer",
    "fell_back_sk",
    "fell_back",
    "inbound_listener",
)

# Maps whose entry count `status` reports (arrays are always full).
ENTRY_MAPS = frozenset(
    {
        "pod_config",
        "pod_by_netns",
        "pod_shortcut",
        "pod_local_routes",
        "orig_dst_by_cookie",
        "orig_dst_by_sock",
        "sock_hash",
        "nat_peer",
        "fell_back",
        "inbound_listener",
    }
)


def ip_words(addr: str) -> ctypes.Array:
    """An address as the datapath stores it: 16 bytes, IPv4 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return (ctypes.c_uint32 * 4).from_buffer_copy(ip.packed)


def words_ip(words: ctypes.Array) -> str:
    """Inverse of ip_words: IPv4-mapped addresses come back as plain IPv4."""
    ip = ipaddress.IPv6Address(bytes(words))
    return str(ip.ipv4_mapped or ip)
