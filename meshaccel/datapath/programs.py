"""The datapath's programs: the one table of them (which C file, which hook, which kernel
option provides their type).

Everything else derives from PROGRAMS: the C files the loader compiles, what attach pins
and attaches and in which order, what detach and upgrades walk, and doctor's type probes.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshaccel.datapath import bpfsys


@dataclass(frozen=True)
class Program:
    name: str  # pin name: prog_<name>
    func: str  # function in bpf/*.c (also the kernel's name for the program)
    source: str  # the C file in bpf/ that holds it
    prog_type: str  # bcc BPFProgType member (lower case: bpftool's name of the type)
    attach_type: int  # bpfsys attach type
    hook: str = "cgroup"  # "cgroup", a map name (sk_msg), or "netns" (one link per pod)


# Attach order: capture (connect4/6) goes last, once everything that serves a captured
# connection is in place; detach runs in reverse, so capture stops first.
PROGRAMS: tuple[Program, ...] = (
    Program("redirect", "ma_redirect", "redirect.c", "SK_MSG", bpfsys.SK_MSG_VERDICT,
            hook="sock_hash"),
    # no-op SK_SKB verdict: bytes that reach a sock_hash socket over TCP go to its psock
    # queue, where the kernel's sockmap FIONREAD and poll look (bpf/verdict.c)
    Program("verdict", "ma_verdict", "verdict.c", "SK_SKB", bpfsys.SK_SKB_STREAM_VERDICT,
            hook="sock_hash"),
    # loaded and pinned by attach; `meshaccel pod add` links it into each pod's netns
    Program("sk_lookup", "ma_sk_lookup", "sk_lookup.c", "SK_LOOKUP", bpfsys.SK_LOOKUP,
            hook="netns"),
    Program("sockops", "ma_sockops", "sockops.c", "SOCK_OPS", bpfsys.CGROUP_SOCK_OPS),
    Program("getsockopt", "ma_getsockopt", "getsockopt.c", "CGROUP_SOCKOPT",
            bpfsys.CGROUP_GETSOCKOPT),
    Program("getpeername4", "ma_getpeername4", "getpeername.c", "CGROUP_SOCK_ADDR",
            bpfsys.CGROUP_INET4_GETPEERNAME),
    Program("getpeername6", "ma_getpeername6", "getpeername.c", "CGROUP_SOCK_ADDR",
            bpfsys.CGROUP_INET6_GETPEERNAME),
    Program("connect4", "ma_connect4", "connect.c", "CGROUP_SOCK_ADDR",
            bpfsys.CGROUP_INET4_CONNECT),
    Program("connect6", "ma_connect6", "connect.c", "CGROUP_SOCK_ADDR",
            bpfsys.CGROUP_INET6_CONNECT),
)  # fmt: skip

# Programs a datapath of an earlier release may lack; attach over one adds them in place.
ADDED_PROGRAMS = frozenset({"verdict"})

# The kernel option that provides each program type (doctor's fix text).
KERNEL_CONFIG = {
    "SK_MSG": "CONFIG_BPF_STREAM_PARSER",
    "SK_SKB": "CONFIG_BPF_STREAM_PARSER",
    "SK_LOOKUP": "CONFIG_BPF_SYSCALL",
    "SOCK_OPS": "CONFIG_CGROUP_BPF",
    "CGROUP_SOCKOPT": "CONFIG_CGROUP_BPF",
    "CGROUP_SOCK_ADDR": "CONFIG_CGROUP_BPF",
}


def sources(programs: tuple[Program, ...] | None = None) -> tuple[str, ...]:
    """The C files compiled together, once each, in PROGRAMS order (maps are shared)."""
    return tuple(dict.fromkeys(p.source for p in (programs or PROGRAMS)))


def prog_types() -> dict[str, str]:
    """bpftool's name of each program type the datapath uses -> the kernel option."""
    return {p.prog_type.lower(): KERNEL_CONFIG[p.prog_type] for p in PROGRAMS}


def prog_type(prog: Program) -> int:
    """The kernel's enum bpf_prog_type value of a program."""
    from bcc import BPFProgType

    # bcc 0.26 predates BPF_PROG_TYPE_SK_LOOKUP (30 in the kernel's enum bpf_prog_type)
    return 30 if prog.prog_type == "SK_LOOKUP" else getattr(BPFProgType, prog.prog_type)
