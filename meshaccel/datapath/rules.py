"""The capture rules: what `istio-iptables` (REDIRECT mode) installs for a CaptureConfig,
as typed rules that both capture modes read. The iptables mode renders them as
iptables-restore input (meshaccel.datapath.iptables_mode); the eBPF compiler
(meshaccel.datapath.compiler) compiles the ISTIO_OUTPUT and ISTIO_INBOUND chains into a
pod's pod_config and takes the sidecar's ports from the ISTIO_REDIRECT and
ISTIO_IN_REDIRECT chains. Both modes thus decide from the very same rules.

capture_rules() follows Istio's tools/istio-iptables/pkg/capture/run.go
(IptablesConfigurator.Run) rule by rule, in the order Run() appends them, so the rendered
rules match Istio's own golden files line for line. Only what CaptureConfig can express is
generated: no DNS capture (ISTIO_OUTPUT_DNS), no TPROXY, no virtual/excluded interfaces,
no owner-group filters, and the host loopback CIDR is Istio's default (127.0.0.1/32).

What the rules mean (IPv4; IPv6 uses ::1/128 and ::6/128 in their place):
  inbound  PREROUTING -> ISTIO_INBOUND: tunnel port 15008 and -d ports RETURN; with -b '*'
           all other TCP, with -b LIST only those ports, REDIRECT to -z (15006). PREROUTING
           sees only packets that arrive on an interface: a pod's own traffic to its own IP
           is decided in OUTPUT, never here.
  outbound OUTPUT -> ISTIO_OUTPUT, first match wins:
           -o ports RETURN (tcp and udp);
           source 127.0.0.6 out lo RETURN (Envoy's inbound passthrough to the app);
           per proxy uid, then per proxy gid:
             out lo, not to 127.0.0.1, not to 15008, owned by the proxy -> REDIRECT to -z
               (the proxy calling its own pod IP or a VIP that resolves to it goes through
               its inbound listener);
             out lo, not owned by the proxy -> RETURN (the app calling itself; omitted when
               an -i CIDR is a loopback address);
             owned by the proxy -> RETURN (the proxy's own traffic is never captured);
           to 127.0.0.1 RETURN; -x CIDRs RETURN; -q ports and -i CIDRs (or '*') -> REDIRECT
           to -p (15001). Only TCP is redirected: ISTIO_REDIRECT matches -p tcp.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, NamedTuple

from meshaccel.datapath.capture import ALL, INBOUND_TUNNEL_PORT, CaptureConfig, IPNetwork
from meshaccel.errors import MeshaccelError

TUNNEL_PORT = INBOUND_TUNNEL_PORT  # Istio's HBONE port: never captured


class Chain(StrEnum):
    """The nat chains the rules live in (a str: the chain's iptables name)."""

    PREROUTING = "PREROUTING"
    OUTPUT = "OUTPUT"
    INBOUND = "ISTIO_INBOUND"
    REDIRECT = "ISTIO_REDIRECT"
    IN_REDIRECT = "ISTIO_IN_REDIRECT"
    ISTIO_OUTPUT = "ISTIO_OUTPUT"


# The chains istio-iptables creates, in the order it creates them.
ISTIO_CHAINS = (Chain.INBOUND, Chain.REDIRECT, Chain.IN_REDIRECT, Chain.ISTIO_OUTPUT)


@dataclass(frozen=True)
class Return:
    """Leave the connection alone (-j RETURN)."""


@dataclass(frozen=True)
class Jump:
    """Go on in another chain (-j CHAIN): ISTIO_REDIRECT sends to the sidecar's outbound
    port, ISTIO_IN_REDIRECT to its inbound port."""

    chain: Chain


@dataclass(frozen=True)
class RedirectTo:
    """Redirect to a local port (-j REDIRECT --to-ports PORT)."""

    port: int


Action = Return | Jump | RedirectTo
RETURN = Return()


class Owner(NamedTuple):
    """-m owner --uid-owner ID / --gid-owner ID."""

    kind: Literal["uid", "gid"]
    id: int


@dataclass(frozen=True)
class Rule:
    """One istio-iptables rule: every condition given must hold for the action to apply."""

    chain: Chain
    action: Action
    proto: Literal["tcp", "udp"] | None = None  # -p
    out_lo: bool = False  # -o lo: the destination is local to the pod
    src: IPNetwork | None = None  # -s
    dst: IPNetwork | None = None  # -d
    not_dst: bool = False  # ! -d
    dport: int | None = None  # --dport
    not_dport: bool = False  # ! --dport
    owner: Owner | None = None
    not_owner: bool = False


@dataclass(frozen=True)
class CaptureRules:
    """One family's rules (4: iptables, 6: ip6tables), in the order istio-iptables appends
    them, with the sidecar's ports where the rules hold them."""

    family: int
    rules: tuple[Rule, ...]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def chain(self, chain: Chain) -> list[Rule]:
        return [r for r in self.rules if r.chain == chain]

    @property
    def proxy_port(self) -> int:
        """The sidecar's outbound port: where ISTIO_REDIRECT redirects to (-p)."""
        return self._redirect_port(Chain.REDIRECT)

    @property
    def inbound_port(self) -> int:
        """The sidecar's inbound port: where ISTIO_IN_REDIRECT redirects to (-z)."""
        return self._redirect_port(Chain.IN_REDIRECT)

    def _redirect_port(self, chain: Chain) -> int:
        [port] = [r.action.port for r in self.chain(chain) if isinstance(r.action, RedirectTo)]
        return port


# per family: the host loopback CIDR, the source of Envoy's inbound passthrough
_LOOPBACK = {4: ipaddress.ip_network("127.0.0.1/32"), 6: ipaddress.ip_network("::1/128")}
_PASSTHROUGH = {4: ipaddress.ip_network("127.0.0.6/32"), 6: ipaddress.ip_network("::6/128")}
FAMILIES = tuple(_LOOPBACK)


def capture_rules(cfg: CaptureConfig, family: int = 4) -> CaptureRules:
    """The rules istio-iptables would append for cfg, in the order Run() appends them."""
    if family not in _LOOPBACK:
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    if cfg.mode != "REDIRECT":
        raise MeshaccelError(f"-m {cfg.mode}: only REDIRECT mode is supported")
    loopback, passthrough = _LOOPBACK[family], _PASSTHROUGH[family]
    inbound, output = Chain.INBOUND, Chain.ISTIO_OUTPUT
    redirect, in_redirect = Jump(Chain.REDIRECT), Jump(Chain.IN_REDIRECT)
    out = [
        Rule(inbound, RETURN, "tcp", dport=TUNNEL_PORT),
        Rule(Chain.REDIRECT, RedirectTo(cfg.proxy_port), "tcp"),
        Rule(Chain.IN_REDIRECT, RedirectTo(cfg.inbound_port), "tcp"),
    ]
    if cfg.include_inbound_ports:  # -b "" captures nothing inbound: no PREROUTING jump
        out.append(Rule(Chain.PREROUTING, Jump(inbound), "tcp"))
        if cfg.include_inbound_ports == ALL:
            for port in cfg.exclude_inbound_ports:  # -d only applies with -b '*'
                out.append(Rule(inbound, RETURN, "tcp", dport=port))
            out.append(Rule(inbound, in_redirect, "tcp"))
        else:
            for port in cfg.include_inbound_ports:
                out.append(Rule(inbound, in_redirect, "tcp", dport=port))

    out.append(Rule(Chain.OUTPUT, Jump(output)))
    for port in cfg.exclude_outbound_ports:
        out.append(Rule(output, RETURN, "tcp", dport=port))
        out.append(Rule(output, RETURN, "udp", dport=port))
    out.append(Rule(output, RETURN, out_lo=True, src=passthrough))

    # Istio checks both families' -i lists for a loopback CIDR, whichever table it builds.
    include = cfg.include_outbound_cidrs
    loopback_included = include != ALL and any(n.network_address.is_loopback for n in include)
    owners = [Owner("uid", i) for i in cfg.proxy_uids] + [Owner("gid", i) for i in cfg.proxy_gids]
    for owner in owners:
        out.append(
            Rule(output, in_redirect, "tcp", out_lo=True, dst=loopback, not_dst=True,
                 dport=TUNNEL_PORT, not_dport=True, owner=owner)
        )  # fmt: skip
        if not loopback_included:
            out.append(Rule(output, RETURN, out_lo=True, owner=owner, not_owner=True))
        out.append(Rule(output, RETURN, owner=owner))

    out.append(Rule(output, RETURN, dst=loopback))
    for net in _of_family(cfg.exclude_outbound_cidrs, family):
        out.append(Rule(output, RETURN, dst=net))
    for port in cfg.include_outbound_ports:
        out.append(Rule(output, redirect, "tcp", dport=port))
    if include == ALL:
        out.append(Rule(output, redirect))
    else:
        for net in _of_family(include, family):
            out.append(Rule(output, redirect, dst=net))
    return CaptureRules(family, tuple(out))


def _of_family(nets: tuple[IPNetwork, ...], family: int) -> list[IPNetwork]:
    return [n for n in nets if n.version == family]
