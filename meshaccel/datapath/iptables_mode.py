"""The `iptables` capture mode: in a pod's network namespace, the nat rules that
`istio-iptables` (REDIRECT mode) installs for the same CaptureConfig, and their removal.

This is the baseline users run today, and the reference the eBPF datapath is compared
against: both read the same rules (meshaccel.datapath.rules), which this module renders
as iptables-restore input.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import CaptureConfig
from meshaccel.datapath.rules import (
    FAMILIES,
    ISTIO_CHAINS,
    Jump,
    RedirectTo,
    Return,
    Rule,
    capture_rules,
)
from meshaccel.errors import MeshaccelError

# per family: (restore tool, save tool)
_TOOLS = {4: ("iptables-restore", "iptables-save"), 6: ("ip6tables-restore", "ip6tables-save")}
_TIMEOUT = 60.0
_JUMP = re.compile(r"\s-[jg]\s+(ISTIO_\S+)")


def render(rule: Rule) -> str:
    """One rule as an iptables-restore line, words in the order istio-iptables writes them."""
    words = ["-A", rule.chain]
    if rule.out_lo:
        words += ["-o", "lo"]
    if rule.src:
        words += ["-s", str(rule.src)]
    if rule.dst:
        words += ["!"] * rule.not_dst + ["-d", str(rule.dst)]
    if rule.proto:
        words += ["-p", rule.proto]
    if rule.dport is not None:
        words += ["!"] * rule.not_dport + ["--dport", str(rule.dport)]
    if rule.owner:
        kind, owner = rule.owner
        words += ["-m", "owner"] + ["!"] * rule.not_owner + [f"--{kind}-owner", str(owner)]
    return " ".join([*words, "-j", _target(rule.action)])


def _target(action: Return | Jump | RedirectTo) -> str:
    if isinstance(action, Jump):
        return action.chain
    if isinstance(action, RedirectTo):
        return f"REDIRECT --to-ports {action.port}"
    return "RETURN"


def rules(cfg: CaptureConfig, family: int = 4) -> str:
    """The iptables-restore input (nat table) istio-iptables would apply for cfg."""
    lines = [f"-N {chain}" for chain in ISTIO_CHAINS]
    lines += [render(r) for r in capture_rules(cfg, family)]
    return "\n".join(["*nat", *lines, "COMMIT", ""])


# ---------------------------------------------------------------- apply / remove


def install(netns: str, cfg: CaptureConfig) -> None:
    """Apply rules(cfg) for IPv4 and IPv6 in the named netns, replacing any ISTIO_* rules
    already there. Like istio-iptables, also put ::6/128 on lo (the IPv6 source address of
    Envoy's inbound passthrough). On failure nothing of ours is left behind."""
    _netns_path(netns)
    inputs = {family: rules(cfg, family) for family in FAMILIES}  # validate before changing
    remove(netns)
    try:
        netns_mod.add_passthrough_v6(_netns_path(netns))
        for family, text in inputs.items():
            _run(netns, [_TOOLS[family][0], "--noflush", "--wait", "10"], text)
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
    for restore, save in _TOOLS.values():
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


__all__ = ["install", "remove", "removal", "render", "rules"]
