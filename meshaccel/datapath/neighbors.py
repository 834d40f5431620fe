"""Other BPF programs on meshaccel's hooks, and whether their order breaks Istio semantics.

Nodes often run other eBPF programs on the same hooks (Cilium's socket load balancer
attaches cgroup/connect4 too). For the cgroup hooks meshaccel uses, this looks at the
cgroup meshaccel is attached to, its ancestors and its descendants; for sk_lookup, at
each registered pod's netns. Each program found gets its order relative to meshaccel's:

- cgroup hooks: the kernel runs a cgroup's *effective* array, built by
  compute_effective_progs() (kernel/bpf/cgroup.c): the cgroup's own programs first, then
  its parent's, up to the root; within one cgroup in list order (BPF_F_ALLOW_MULTI
  appends). So a program on a descendant cgroup runs before meshaccel's, one on the same
  cgroup runs before it if attached earlier, and one on an ancestor runs after it.
  Since 6.15 BPF_F_PREORDER programs (an ancestor's first) run before all others, and an
  ancestor's program yields to a descendant's if the ancestor is not ALLOW_MULTI; rather
  than re-derive all of that, the order is read from the kernel's effective array
  (BPF_PROG_QUERY with BPF_F_QUERY_EFFECTIVE) of the cgroup whose processes see both.
- sk_lookup: a netns runs its programs in link order; a later program's selected socket
  replaces an earlier one's, and any program can drop.

Reading attachments needs root, like status.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from meshaccel.datapath import bpfsys, loader, programs
from meshaccel.datapath.pins import Pins, pin_fd, read_state

# enum bpf_prog_type names of the programs that can sit on these hooks
PROG_TYPE_NAMES = {13: "sock_ops", 18: "cgroup_sock_addr", 25: "cgroup_sockopt", 30: "sk_lookup"}

# One line each: what the order breaks, and what to do about it.
WARN_CONNECT_BEFORE = (
    "runs before meshaccel's {hook}: if it rewrites Service addresses to backends in pods "
    "(e.g. Cilium's socket LB), the sidecar sees the backend, not the Service -- limit it "
    "to the host netns (Cilium: socketLB.hostNamespaceOnly=true, as Istio advises; then "
    "this warning is harmless) or attach meshaccel to a cgroup below it to run first"
)
WARN_GETSOCKOPT_AFTER = (
    "runs after meshaccel's getsockopt and can overwrite SO_ORIGINAL_DST -- make sure it "
    "leaves SOL_IP/SOL_IPV6 option 80 alone, or attach it to a cgroup below meshaccel's so "
    "it runs first"
)
WARN_SK_LOOKUP = (
    "another sk_lookup program in this pod's netns can hand its inbound connections to "
    "another socket or drop them -- remove it from the pod's netns, or make sure it "
    "ignores the pod's captured ports"
)


@dataclass(frozen=True)
class Found:
    """One other program on one of meshaccel's hooks."""

    hook: str  # meshaccel's program name for the hook: connect4, getsockopt, sk_lookup, ...
    id: int
    name: str
    type: str
    tag: str
    where: str  # "same cgroup", "descendant", "ancestor" or "pod netns"
    target: str  # the cgroup path, or the pod (name and netns) it is attached to
    order: str | None  # "before"/"after" meshaccel's program; None: unknown or not run

    def as_dict(self) -> dict:
        """JSON-ready, with the warning (or None)."""
        return {
            "hook": self.hook,
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "tag": self.tag,
            "where": self.where,
            "attached_to": self.target,
            "order": self.order,
            "warning": warning(self.hook, self.order),
        }


# ---------------------------------------------------------------- pure logic


def relative_order(run_order: Sequence[int], ours: int | None, theirs: int) -> str | None:
    """'before'/'after' from an array of program ids in the order the kernel runs them;
    None when either is not in it (e.g. an overridden ancestor's program never runs)."""
    if ours is None or ours not in run_order or theirs not in run_order:
        return None
    return "before" if run_order.index(theirs) < run_order.index(ours) else "after"


def warning(hook: str, order: str | None) -> str | None:
    """The one-line warning for an order known to break Istio semantics, else None."""
    if hook in ("connect4", "connect6") and order == "before":
        return WARN_CONNECT_BEFORE.format(hook=hook)
    if hook == "getsockopt" and order == "after":
        return WARN_GETSOCKOPT_AFTER
    if hook == "sk_lookup":
        return WARN_SK_LOOKUP  # before or after: either can take the pod's connections
    return None


def relation(cgroup: str, ours: str) -> str | None:
    """Where cgroup sits relative to meshaccel's cgroup (both real paths)."""
    if cgroup == ours:
        return "same cgroup"
    if cgroup.startswith(ours.rstrip("/") + "/"):
        return "descendant"
    if ours.startswith(cgroup.rstrip("/") + "/"):
        return "ancestor"
    return None


def is_ours(prog_id: int, name: str, our_ids: Iterable[int]) -> bool:
    """meshaccel's own: pinned by this datapath, or named ma_* (another datapath's)."""
    return prog_id in set(our_ids) or name.startswith("ma_")


def summary(found: Sequence[dict]) -> str:
    """One line: 'none', or each program as 'hook name (id N, order)'."""
    if not found:
        return "none"
    return "; ".join(f"{f['hook']} {f['name'] or '?'} (id {f['id']}, {_order(f)})" for f in found)


def _order(f: dict) -> str:
    if f["order"] is None:
        return "order unknown"
    return f"runs {f['order']} meshaccel's"


def format_text(found: Sequence[dict]) -> list[str]:
    """Lines for `meshaccel status`: one per program, its warning under it."""
    if not found:
        return ["other programs on meshaccel's hooks: none"]
    lines = ["other programs on meshaccel's hooks:"]
    for f in found:
        lines.append(
            f"  {f['hook']:<12} id {f['id']:<7} {f['name'] or '?':<16} {f['type']:<16} "
            f"{_order(f)}; on {f['attached_to']} ({f['where']})"
        )
        if f["warning"]:
            lines.append(f"    WARNING: {f['warning']}")
    return lines


# ---------------------------------------------------------------- reading the kernel


def _describe(prog_id: int) -> tuple[str, str, str] | None:
    """(name, type, tag) of a program id; None if it went away meanwhile."""
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        info = bpfsys.prog_info(fd)
    finally:
        os.close(fd)
    kind = PROG_TYPE_NAMES.get(info.type, str(info.type))
    return info.name.decode(errors="replace"), kind, bytes(info.tag).hex()


def _query_cgroup(path: str, attach_types: Sequence[int], flags: int = 0) -> dict[int, list[int]]:
    """bpfsys.prog_query() of several hooks of one cgroup; empty if it was removed since listed (or
    is not a cgroup v2 directory: EBADF)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return {}
    try:
        return {t: bpfsys.prog_query(fd, t, flags) for t in attach_types}
    except OSError:
        return {}
    finally:
        os.close(fd)


def ancestors(cgroup: str) -> list[str]:
    """Parents of a cgroup up to the root of its cgroup v2 mount, nearest first."""
    out = []
    path = cgroup
    while True:
        parent = os.path.dirname(path)
        if parent == path or bpfsys.statfs_type(parent) != bpfsys.CGROUP2_SUPER_MAGIC:
            return out
        out.append(parent)
        path = parent


def descendants(cgroup: str) -> Iterator[str]:
    """Every cgroup below one (a node has a few hundred): directories only, no stat."""
    stack = [cgroup]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                yield e.path
                stack.append(e.path)


def cgroup_programs(cgroup: str, our_ids: dict[str, int]) -> list[Found]:
    """Other programs on meshaccel's cgroup hooks of cgroup, its ancestors and descendants.

    our_ids: meshaccel's program id per hook name (from the pins)."""
    hooks = [p for p in programs.PROGRAMS if p.hook == "cgroup"]
    types = [h.attach_type for h in hooks]
    ours = set(our_ids.values())
    found: list[Found] = []
    effective: dict[str, dict[int, list[int]]] = {}  # cgroup -> attach type -> run order

    def run_order(path: str, attach_type: int) -> list[int]:
        if path not in effective:
            effective[path] = _query_cgroup(path, types, bpfsys.QUERY_EFFECTIVE)
        return effective[path].get(attach_type, [])

    for path in [cgroup, *ancestors(cgroup), *descendants(cgroup)]:
        attached = _query_cgroup(path, types)
        where = relation(path, cgroup)
        for hook in hooks:
            for prog_id in attached.get(hook.attach_type, []):
                if prog_id in ours:
                    continue
                desc = _describe(prog_id)
                if desc is None or is_ours(prog_id, desc[0], ours):
                    continue
                # the processes of the lower of the two cgroups run both programs
                seen_from = path if where == "descendant" else cgroup
                order = relative_order(
                    run_order(seen_from, hook.attach_type), our_ids.get(hook.name), prog_id
                )
                found.append(Found(hook.name, prog_id, *desc, where or "?", path, order))
    return found


class LinkInfo(ctypes.Structure):
    """struct bpf_link_info up to its netns member (type, id, prog_id, then the union,
    8-byte aligned)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("netns_ino", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
    ]


def _link_netns_ino(pin: str) -> int | None:
    """The netns inode a pinned sk_lookup link sits in (the link knows it; the pod
    registry keeps only the netns cookie)."""
    try:
        fd = bpfsys.obj_get(pin)
    except OSError:
        return None
    try:
        info = LinkInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        ret = bpfsys.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
        return info.netns_ino if ret == 0 and info.netns_ino else None
    finally:
        os.close(fd)


def _netns_paths(wanted: set[int], proc: str = "/proc") -> dict[int, str]:
    """A path for each wanted netns inode: named netns first (cheap), then processes."""
    out: dict[int, str] = {}

    def consider(path: str) -> None:
        try:
            ino = os.stat(path).st_ino
        except OSError:
            return
        if ino in wanted and ino not in out:
            out[ino] = path

    for d in ("/var/run/netns", "/run/netns"):
        try:
            for name in sorted(os.listdir(d)):
                consider(f"{d}/{name}")
        except OSError:
            pass
    if wanted - out.keys():
        for pid in filter(str.isdigit, os.listdir(proc)):
            consider(f"{proc}/{pid}/ns/net")
            if not wanted - out.keys():
                break
    return out


def pod_programs(bpffs: str, our_sk_lookup: int | None) -> list[Found]:
    """Other sk_lookup programs in each registered pod's netns (link order = run order)."""
    from meshaccel.datapath import pods  # (pods imports loader, which imports this lazily)

    pins = Pins(bpffs)
    if not os.path.exists(pins.map("pod_config")):
        return []
    inos = {}
    for pod in pods.list_pods(bpffs, count_sockets=False):
        ino = _link_netns_ino(pins.link(pod["netns_cookie"]))
        if ino is not None:
            inos[ino] = pod["name"]
    paths = _netns_paths(set(inos))
    ours = {our_sk_lookup} if our_sk_lookup is not None else set()
    found = []
    for ino, path in sorted(paths.items(), key=lambda kv: inos[kv[0]]):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            run = bpfsys.prog_query(fd, bpfsys.SK_LOOKUP)
        except OSError:
            continue
        finally:
            os.close(fd)
        for prog_id in run:
            desc = _describe(prog_id)
            if desc is None or is_ours(prog_id, desc[0], ours):
                continue
            order = relative_order(run, our_sk_lookup, prog_id)
            target = f"pod {inos[ino]} (netns {path})"
            found.append(Found("sk_lookup", prog_id, *desc, "pod netns", target, order))
    return found


def our_program_ids(bpffs: str) -> dict[str, int]:
    """meshaccel's program id per hook name, from the pins."""
    pins = Pins(bpffs)
    out = {}
    for prog in programs.PROGRAMS:
        path = pins.prog(prog)
        if os.path.exists(path):
            out[prog.name] = bpfsys.prog_info(pin_fd(path)).id
    return out


def find(bpffs: str = loader.DEFAULT_BPFFS, cgroup: str | None = None) -> list[dict]:
    """Every other program on meshaccel's hooks, JSON-ready (see Found.as_dict).

    cgroup: where meshaccel is attached (default: read from the pins). Empty when nothing
    is attached."""
    pins = Pins(bpffs)
    if not pins.present():
        return []
    if cgroup is None:
        cgroup = read_state(bpffs).cgroup
    ids = our_program_ids(bpffs)
    found: list[Found] = []
    if cgroup and os.path.isdir(cgroup):
        found += cgroup_programs(os.path.realpath(cgroup), ids)
    found += pod_programs(bpffs, ids.get("sk_lookup"))
    return [f.as_dict() for f in found]


def warnings(found: Sequence[dict]) -> list[dict]:
    """The programs whose order is known to break Istio semantics."""
    return [f for f in found if f["warning"]]
