"""What to capture, in istio-iptables' terms: the flags of `istio-iptables` (REDIRECT
mode) and Istio's per-pod `traffic.sidecar.istio.io/*` annotations, parsed into one
CaptureConfig that both the eBPF datapath and the iptables mode implement."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ALL: Literal["*"] = "*"  # istio-iptables' wildcard for "every address / every port"


@dataclass(frozen=True)
class CaptureConfig:
    """One pod's capture settings (istio-iptables flag in brackets)."""

    proxy_port: int = 15001  # -p: the sidecar's outbound listener
    inbound_port: int = 15006  # -z: the sidecar's inbound listener
    proxy_uids: tuple[int, ...] = (1337,)  # -u: never captured (comma-separated list)
    proxy_gids: tuple[int, ...] = (1337,)  # -g: defaults to -u
    mode: str = "REDIRECT"  # -m: only REDIRECT is supported
    include_outbound_cidrs: tuple[IPNetwork, ...] | Literal["*"] = ()  # -i
    exclude_outbound_cidrs: tuple[IPNetwork, ...] = ()  # -x
    include_inbound_ports: tuple[int, ...] | Literal["*"] = ()  # -b
    exclude_inbound_ports: tuple[int, ...] = ()  # -d
    include_outbound_ports: tuple[int, ...] = ()  # -q
    exclude_outbound_ports: tuple[int, ...] = ()  # -o
