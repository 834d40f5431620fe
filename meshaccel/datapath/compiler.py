"""The eBPF side of a pod's settings: its CaptureConfig compiled into its pod_config value
(structs.PodConfig), the rule lists connect4/6 and sk_lookup walk, and its own shortcut
setting into its pod_shortcut value.

The rules are those the iptables mode renders (meshaccel.datapath.rules), for both
families: ISTIO_OUTPUT and ISTIO_INBOUND become the pod's output and inbound lists, and
the ports ISTIO_REDIRECT and ISTIO_IN_REDIRECT redirect to become its proxy ports.
"""

from __future__ import annotations

import ctypes
import hashlib
import shlex

from meshaccel.datapath import structs
from meshaccel.datapath.capture import CaptureConfig, IPNetwork, to_istio_args
from meshaccel.datapath.rules import (
    FAMILIES,
    CaptureRules,
    Chain,
    Jump,
    Return,
    Rule,
    capture_rules,
)
from meshaccel.datapath.shortcut import ShortcutSetting
from meshaccel.errors import MeshaccelError

_ACTIONS = {Chain.REDIRECT: structs.RA_REDIRECT, Chain.IN_REDIRECT: structs.RA_IN_REDIRECT}
_LISTS = {Chain.ISTIO_OUTPUT: "output", Chain.INBOUND: "inbound"}
_ALL_BITS = (1 << 128) - 1


def _words(net: IPNetwork) -> tuple[ctypes.Array, ctypes.Array]:
    """A network as 128-bit address and mask words (IPv4 v4-mapped, as the datapath
    keys addresses)."""
    prefix = net.prefixlen + (96 if net.version == 4 else 0)
    mask = _ALL_BITS ^ ((1 << (128 - prefix)) - 1)
    raw = net.network_address.packed
    if net.version == 4:
        raw = b"\0" * 10 + b"\xff\xff" + raw
    addr = int.from_bytes(raw, "big") & mask
    words = (ctypes.c_uint32 * 4).from_buffer_copy(addr.to_bytes(16, "big"))
    return words, (ctypes.c_uint32 * 4).from_buffer_copy(mask.to_bytes(16, "big"))


def compile_rule(rule: Rule, family: int) -> structs.CaptureRule:
    """One ISTIO_OUTPUT or ISTIO_INBOUND rule as the datapath walks it."""
    if isinstance(rule.action, Return):
        action = structs.RA_RETURN
    elif isinstance(rule.action, Jump) and rule.action.chain in _ACTIONS:
        action = _ACTIONS[rule.action.chain]
    else:
        raise ValueError(f"the datapath has no action for {rule}")
    out = structs.CaptureRule(action=action, family=family)
    m = 0
    if rule.proto == "udp":
        m |= structs.RM_UDP
    if rule.out_lo:
        m |= structs.RM_OUT_LO
    if rule.src and rule.dst:
        raise ValueError(f"rule with both -s and -d: {rule}")
    if rule.src:
        m |= structs.RM_SRC
        out.addr, out.mask = _words(rule.src)
    if rule.dst:
        m |= structs.RM_DST | (structs.RM_NOT_DST if rule.not_dst else 0)
        out.addr, out.mask = _words(rule.dst)
    if rule.dport is not None:
        m |= structs.RM_DPORT | (structs.RM_NOT_DPORT if rule.not_dport else 0)
        out.port = rule.dport
    if rule.owner:
        m |= structs.RM_UID if rule.owner.kind == "uid" else structs.RM_GID
        m |= structs.RM_NOT_OWNER if rule.not_owner else 0
        out.owner = rule.owner.id
    out.match = m
    return out


def recorded_name(name: str) -> str:
    """The pod's name as pod_config records it (and pod list shows it): whole when it fits
    in 63 bytes, else its start and a hash of the whole (a Kubernetes namespace/name can be
    300 bytes), so that two long names stay apart and the record reads back as UTF-8."""
    raw = name.encode()
    if len(raw) <= 63 and b"\0" not in raw:
        return name
    head = raw[:54].replace(b"\0", b"").decode(errors="ignore")  # (no cut UTF-8 sequence)
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:8]}"


def compile_rules(
    families: list[CaptureRules], name: str = "", cookie: int = 0
) -> structs.PodConfig:
    """The pod_config value for both families' rules (the pod's addresses left empty)."""
    ports = {(r.proxy_port, r.inbound_port) for r in families}
    if len(ports) != 1:
        raise ValueError(f"the families' rules redirect to different ports: {sorted(ports)}")
    [(proxy_port, inbound_port)] = ports
    pod = structs.PodConfig(
        netns_cookie=cookie,
        proxy_port=proxy_port,
        inbound_port=inbound_port,
        name=recorded_name(name).encode(),
    )
    lists: dict[str, list[structs.CaptureRule]] = {"output": [], "inbound": []}
    for rules in families:
        for rule in rules:
            if rule.chain in _LISTS:
                lists[_LISTS[rule.chain]].append(compile_rule(rule, rules.family))
    for chain, field in _LISTS.items():
        if len(lists[field]) > structs.MAX_RULES:
            raise MeshaccelError(
                f"{len(lists[field])} {chain} rules: the datapath holds {structs.MAX_RULES} "
                "per pod (fewer ports, CIDRs or proxy uids)"
            )
    pod.n_output, pod.n_inbound = len(lists["output"]), len(lists["inbound"])
    for i, r in enumerate(lists["output"]):
        pod.output[i] = r
    for i, r in enumerate(lists["inbound"]):
        pod.inbound[i] = r
    return pod


def compile_config(cfg: CaptureConfig, name: str = "", cookie: int = 0) -> structs.PodConfig:
    """The pod_config value for cfg: both families' ISTIO_OUTPUT and ISTIO_INBOUND rules,
    and cfg spelled as istio-iptables arguments for people (pod list)."""
    pod = compile_rules([capture_rules(cfg, family) for family in FAMILIES], name, cookie)
    pod.args = istio_args_text(cfg).encode()[:511]
    return pod


def istio_args_text(cfg: CaptureConfig) -> str:
    """cfg as istio-iptables arguments, as pod list shows them (pod_config records at most
    511 bytes of them)."""
    return shlex.join(to_istio_args(cfg))


_POD_APPS = {None: structs.POD_APPS_NODE, False: structs.POD_APPS_OFF, True: structs.POD_APPS_ON}


def compile_shortcut(setting: ShortcutSetting) -> structs.ShortcutPolicy | None:
    """The pod_shortcut value for a pod's own shortcut setting; None for the default (as
    the node says), which is no entry."""
    if setting.is_default:
        return None
    ports = setting.exclude_ports
    apps = _POD_APPS[setting.apps] if setting.sidecars else structs.POD_APPS_NONE
    policy = structs.ShortcutPolicy(apps=apps, n_ports=len(ports))
    for i, port in enumerate(ports):
        policy.ports[i] = port
    return policy


def settings_digest(pod: structs.PodConfig, shortcut: structs.ShortcutPolicy | None) -> str:
    """A hash of the settings a pod's registration holds, the same whether taken from the
    maps or compiled from what a pod source wants: its pod_config value but for its netns
    cookie and addresses (compared on their own), and its pod_shortcut value."""
    held = structs.PodConfig.from_buffer_copy(pod)
    held.netns_cookie = 0
    held.ips = (structs.IpKey * 2)()
    digest = hashlib.sha256(bytes(held))
    if shortcut is not None:
        digest.update(bytes(shortcut))
    return digest.hexdigest()
