"""The `iptables` capture mode: in a pod's network namespace, the nat rules that
`istio-iptables` (REDIRECT mode) installs for the same CaptureConfig, and their removal.

This is the baseline users run today, and the reference the eBPF datapath is compared
against. rules() follows Istio's tools/istio-iptables/pkg/capture/run.go
(IptablesConfigurator.Run) rule by rule, in the order Run() appends them, so its output
matches Istio's own golden files line for line. Only what CaptureConfig can express is
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

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import ALL, INBOUND_TUNNEL_PORT, CaptureConfig, IPNetwork
from meshaccel.errors import MeshaccelError

TUNNEL_PORT = INBOUND_TUNNEL_PORT  # Istio's HBONE port: never captured
CHAINS = ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT")
# per family: (host loopback, inbound passthrough source, restore tool, save tool)
_FAMILY = {
    4: ("127.0.0.1/32", "127.0.0.6/32", "iptables-restore", "iptables-save"),
    6: ("::1/128", "::6/128", "ip6tables-restore", "ip6tables-save"),
}
_TIMEOUT = 60.0
_JUMP = re.compile(r"\s-[jg]\s+(ISTIO_\S+)")


@dataclass(frozen=True)
class Rule:
    """One istio-iptables rule, structured: rendered as iptables text for the iptables
    mode, compiled into the eBPF datapath's per-pod rule list (meshaccel.datapath.pods) for the
    eBPF mode, so both modes decide from the very same rules."""

    chain: str  # ISTIO_INBOUND, ISTIO_OUTPUT, ... (or PREROUTING/OUTPUT for the jumps)
    target: str  # RETURN, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, or a REDIRECT spec
    proto: str | None = None  # tcp / udp
    out_lo: bool = False  # -o lo: the destination is local to the pod
    src: str | None = None  # -s CIDR
    dst: str | None = None  # -d CIDR
    not_dst: bool = False  # ! -d
    dport: int | None = None  # --dport
    not_dport: bool = False  # ! --dport
    owner: tuple[str, int] | None = None  # -m owner --uid-owner/--gid-owner
    not_owner: bool = False

    def render(self) -> str:
        words = ["-A", self.chain]
        if self.out_lo:
            words += ["-o", "lo"]
        if self.src:
            words += ["-s", self.src]
        if self.dst:
            words += ["!"] * self.not_dst + ["-d", self.dst]
        if self.proto:
            words += ["-p", self.proto]
        if self.dport is not None:
            words += ["!"] * self.not_dport + ["--dport", str(self.dport)]
        if self.owner:
            kind, owner = self.owner
            words += ["-m", "owner"] + ["!"] * self.not_owner + [f"--{kind}-owner", str(owner)]
        return " ".join([*words, "-j", self.target])


def capture_rules(cfg: CaptureConfig, family: int = 4) -> list[Rule]:
    """The rules istio-iptables would append for cfg, in the order Run() appends them."""
    if family not in _FAMILY:
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    if cfg.mode != "REDIRECT":
        raise MeshaccelError(f"-m {cfg.mode}: only REDIRECT mode is supported")
    loopback, passthrough = _FAMILY[family][:2]
    inbound, output = "ISTIO_INBOUND", "ISTIO_OUTPUT"
    out = [
        Rule(inbound, "RETURN", "tcp", dport=TUNNEL_PORT),
        Rule("ISTIO_REDIRECT", f"REDIRECT --to-ports {cfg.proxy_port}", "tcp"),
        Rule("ISTIO_IN_REDIRECT", f"REDIRECT --to-ports {cfg.inbound_port}", "tcp"),
    ]
    if cfg.include_inbound_ports:  # -b "" captures nothing inbound: no PREROUTING jump
        out.append(Rule("PREROUTING", inbound, "tcp"))
        if cfg.include_inbound_ports == ALL:
            for port in cfg.exclude_inbound_ports:  # -d only applies with -b '*'
                out.append(Rule(inbound, "RETURN", "tcp", dport=port))
            out.append(Rule(inbound, "ISTIO_IN_REDIRECT", "tcp"))
        else:
            for port in cfg.include_inbound_ports:
                out.append(Rule(inbound, "ISTIO_IN_REDIRECT", "tcp", dport=port))

    out.append(Rule("OUTPUT", output))
    for port in cfg.exclude_outbound_ports:
        out.append(Rule(output, "RETURN", "tcp", dport=port))
        out.append(Rule(output, "RETURN", "udp", dport=port))
    out.append(Rule(output, "RETURN", out_lo=True, src=passthrough))

    # Istio checks both families' -i lists for a loopback CIDR, whichever table it builds.
    include = cfg.include_outbound_cidrs
    loopback_included = include != ALL and any(n.network_address.is_loopback for n in include)
    owners = [("uid", i) for i in cfg.proxy_uids] + [("gid", i) for i in cfg.proxy_gids]
    for owner in owners:
        out.append(
            Rule(output, "ISTIO_IN_REDIRECT", "tcp", out_lo=True, dst=loopback, not_dst=True,
                 dport=TUNNEL_PORT, not_dport=True, owner=owner)
        )  # fmt: skip
        if not loopback_included:
            out.append(Rule(output, "RETURN", out_lo=True, owner=owner, not_owner=True))
        out.append(Rule(output, "RETURN", owner=owner))

    out.append(Rule(output, "RETURN", dst=loopback))
    for net in _of_family(cfg.exclude_outbound_cidrs, family):
        out.append(Rule(output, "RETURN", dst=str(net)))
    for port in cfg.include_outbound_ports:
        out.append(Rule(output, "ISTIO_REDIRECT", "tcp", dport=port))
    if include == ALL:
        out.append(Rule(output, "ISTIO_REDIRECT"))
    else:
        for net in _of_family(include, family):
            out.append(Rule(output, "ISTIO_REDIRECT", dst=str(net)))
    return out


def rules(cfg: CaptureConfig, family: int = 4) -> str:
    """The iptables-restore input (nat table) istio-iptables would apply for cfg."""
    lines = [f"-N {chain}" for chain in CHAINS] + [r.render() for r in capture_rules(cfg, family)]
    return "\n".join(["*nat", *lines, "COMMIT", ""])


def _of_family(nets: tuple[IPNetwork, ...], family: int) -> list[IPNetwork]:
    return [n for n in nets if n.version == family]


# ---------------------------------------------------------------- apply / remove


def install(netns: str, cfg: CaptureConfig) -> None:
    """Apply rules(cfg) for IPv4 and IPv6 in the named netns, replacing any ISTIO_* rules
    already there. Like istio-iptables, also put ::6/128 on lo (the IPv6 source address of
    Envoy's inbound passthrough). On failure nothing of ours is left behind."""
    _netns_path(netns)
    inputs = {family: rules(cfg, family) for family in _FAMILY}  # validate before changing
    remove(netns)
    try:
        netns_mod.add_passthrough_v6(_netns_path(netns))
        for family, text in inputs.items():
            _run(netns, [_FAMILY[family][2], "--noflush", "--wait", "10"], text)
    except MeshaccelError:
        try:
            remove(netns)
        except MeshaccelError:
            pass  # report the first error, which says what went wrong
        raise


def remove(netns: str) -> None:
    """Delete every ISTIO_* chain and every jump to one, in every table, IPv4 and IPv6.
    Other rules stay; running it again (or where nothing was installed) changes nothing."""
    _netns_path(netns)
    for family in _FAMILY:
        restore, save = _FAMILY[family][2:]
        text = removal(_run(netns, [save]))
        if text:
            _run(netns, [restore, "--noflush", "--wait", "10"], text)


def removal(save: str) -> str:
    """iptables-restore input that undoes the ISTIO_* chains in an iptables-save dump."""
    tables: dict[str, tuple[list[str], list[str]]] = {}  # table: (jump deletions, chains)
    jumps: list[str] = []
    chains: list[str] = []
    for line in save.splitlines():
        if line.startswith("*"):
            jumps, chains = tables.setdefault(line[1:].strip(), ([], []))
        elif line.startswith(":ISTIO_"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and not line.split()[1].startswith("ISTIO_"):
            if _JUMP.search(line):
                jumps.append("-D" + line[2:])
    out: list[str] = []
    for table, (deletions, istio) in tables.items():
        if deletions or istio:
            out += [f"*{table}", *deletions]
            out += [f"-F {c}" for c in istio] + [f"-X {c}" for c in istio] + ["COMMIT"]
    return "\n".join([*out, ""]) if out else ""


def _netns_path(netns: str) -> str:
    """/var/run/netns/NAME, checked to exist and not to be the root netns."""
    if not netns:
        raise MeshaccelError(
            "iptables mode needs a pod netns name: refusing to change the root netns's rules"
        )
    if "/" in netns or netns in (".", ".."):
        raise MeshaccelError(
            f"netns {netns!r}: give a name under {netns_mod.NETNS_DIR}, not a path"
        )
    path = os.path.join(netns_mod.NETNS_DIR, netns)
    try:
        ns = os.stat(path)
    except FileNotFoundError:
        raise MeshaccelError(f"netns {netns!r} not found: no {path}") from None
    try:
        root = os.stat("/proc/1/ns/net")
    except OSError:
        return path  # cannot see init's netns; the restore itself will need root anyway
    if (ns.st_dev, ns.st_ino) == (root.st_dev, root.st_ino):
        raise MeshaccelError(f"netns {netns!r} is the root netns: refusing to change its rules")
    return path


def _run(netns: str, argv: list[str], stdin: str | None = None) -> str:
    """Run an iptables tool inside the netns (setns in the child, before exec); its stdout."""
    tool = argv[0]
    exe = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if exe is None:
        raise MeshaccelError(f"{tool} not found: apt-get install iptables")
    fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)

    try:
        p = subprocess.run(
            [exe, *argv[1:]], input=stdin, capture_output=True, text=True,
            timeout=_TIMEOUT, preexec_fn=netns_mod.entering(fd),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise MeshaccelError(f"{tool} in netns {netns!r} did not finish in {_TIMEOUT:g}s") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise MeshaccelError(f"cannot run {tool} in netns {netns!r}: {e}") from None
    finally:
        os.close(fd)
    if p.returncode != 0:
        lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        why = lines[0] if lines else f"exit status {p.returncode}"
        raise MeshaccelError(f"{tool} in netns {netns!r} failed: {why}")
    return p.stdout


__all__ = [
    "CHAINS",
    "TUNNEL_PORT",
    "Rule",
    "capture_rules",
    "install",
    "remove",
    "removal",
    "rules",
]
