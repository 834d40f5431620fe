"""Replace a running datapath with another build, in place and under traffic.

loader.attach calls replace() when the datapath pinned at --bpffs came from another source
(another release, up or down, or one of unknown version). Everything that can fail or be
refused is done before the first hook changes: compile, check the build against this
release's userspace, plan the maps, migrate into new maps, load every new program. Then
each hook gets its new program in one kernel operation, in programs.PROGRAMS order:

- cgroup hooks: BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI | BPF_F_REPLACE swaps the old
  program for the new one in its slot (no moment with neither or both);
- sk_lookup: each pod's netns link is pointed at the new program (BPF_LINK_UPDATE with
  BPF_F_REPLACE: one slot of the netns' run array);
- sk_msg: attaching to the sock_hash replaces the map's program. Sockets already in the
  map keep the program they were linked with (the kernel copies it into the socket's psock
  when it joins) and that program keeps its maps alive: live connections stay on the
  datapath they joined until they close; new sockets get the new program.

Maps whose layout is unchanged are the pinned ones themselves (the new programs are loaded
against them), so pods, settings and live connections' entries carry over untouched. A map
whose layout changed is a new map: pods are re-registered into it from the old entries
(name, addresses, netns, istio-iptables args), settings rewritten, per-connection entries
copied when their key and value sizes are unchanged, counters start at zero; no program
ever reads a map of another layout. A map the running datapath lacks starts empty, but
pod_local_routes, which is filled from each pod's netns. A failed swap puts back what it
swapped.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from meshaccel.datapath import (
    bpfsys,
    build,
    inbound,
    loader,
    lookup_tag,
    programs,
    structs,
    version,
)
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import parse_istio_args
from meshaccel.datapath.pins import (
    LINK_PREFIX,
    TAG_LINK_PREFIX,
    Pins,
    forget_fds,
    pin_fd,
    pinned_layouts,
    pinned_tags,
    write_record,
    write_settings_to,
)
from meshaccel.errors import MeshaccelError

# per-connection maps copied entry by entry into a new map when only capacity or flags
# changed (an LRU map's entries are all still valid in a bigger or smaller one)
COPIED = ("orig_dst_by_cookie", "orig_dst_by_sock", "fell_back")
# pod maps copied entry by entry into a new map of the same entry layout (another
# capacity or flags): all of them, or the replace is refused (a pod that opted out of the
# shortcut would be back on it, a prefix routed into a pod would go to its sidecar)
CARRIED = ("pod_shortcut", "pod_local_routes")
# the tail of struct pod_config, in every release: name[64] then args[512]
_POD_NAME, _POD_ARGS = 64, 512
_POD_HEAD = 8 + 2 * 16  # netns_cookie, ips[2]


def replace(
    cgroup: str,
    pins: Pins,
    defaults: str,
    mode: int,
    running: version.Build | None,
    new: version.Build,
    bpf_dir: Path,
    cflags: list[str],
    log: loader.Log,
) -> str:
    """Replace the datapath at pins (attached to cgroup) with new's source. Returns a
    summary; MeshaccelError (one line, nothing changed) when it cannot be done safely."""
    log(
        f"datapath {version.describe(running)} differs from {new.short()}: "
        "compiling the new one to replace it in place"
    )
    for name in os.listdir(pins.dir):  # left by a replace that died half-way
        if name.endswith("_new"):
            os.unlink(f"{pins.dir}/{name}")
    b = build.compile_bpf(bpf_dir, cflags)
    try:
        return _replace(b, cgroup, pins, defaults, mode, running, new, bpf_dir, log)
    finally:
        b.cleanup()
        forget_fds()  # fds of replaced maps and programs: let them go


def _replace(
    b,
    cgroup: str,
    pins: Pins,
    defaults: str,
    mode: int,
    running: version.Build | None,
    new: version.Build,
    bpf_dir: Path,
    log: loader.Log,
) -> str:
    from bcc import lib

    new.maps = build.compiled_layouts(b)
    build.check_userspace(new, bpf_dir)
    old_layouts = pinned_layouts(pins)
    plan = version.compare_maps(old_layouts, new.maps)
    log(plan.describe())
    old_fd = {name: pin_fd(pins.map(name)) for name in old_layouts}
    new_fd = {name: lib.bpf_table_fd(b.module, name.encode()) for name in new.maps}
    # the maps the new programs use: the pinned one where its layout is unchanged
    target = {n: old_fd[n] if n in plan.same else new_fd[n] for n in new.maps}
    fresh = [n for n in new.maps if n not in plan.same]

    # -- everything that may refuse, before anything changes
    pods = _pods_to_carry(plan, old_fd, old_layouts)
    registered = _entries(old_fd, old_layouts, "pod_config")
    copy, learn = _carry_plan(plan, old_fd, old_layouts)
    if "inbound_listener" in fresh and registered:
        # (a socket can only be put in a sockhash through its fd: sockops saw each listen()
        # once; sk_lookup would find no listener and hand inbound connections to the app)
        raise MeshaccelError(
            f"inbound_listener changes layout and {registered} pod address(es) are "
            "registered: their "
            "sidecars' listening sockets cannot be moved to a new map; refusing, nothing "
            "changed (detach, attach, then restart the sidecars)"
        )

    # -- fill the new maps (nothing uses them yet)
    for pod, keys in pods:
        _register(target["pod_config"], target["pod_by_netns"], pod, keys)
    if pods:
        log(f"re-registered {len(pods)} pod(s) in the new pod maps")
    for name in COPIED:
        if name in plan.changed:
            old, cur = plan.changed[name]
            if _entries_fit(old, cur):
                n = _copy_entries(old_fd[name], new_fd[name], cur.key_size, cur.value_size)
                log(f"copied {n} {name} entries")
            else:
                log(f"{name}: new entry layout, starts empty")
    for name in copy:
        cur = plan.changed[name][1]
        n = _copy_entries(old_fd[name], new_fd[name], cur.key_size, cur.value_size)
        if n < (held := _entries(old_fd, old_layouts, name)):
            raise MeshaccelError(
                f"{name}: the new map holds {n} of its {held} entries: refusing, nothing changed"
            )
        log(f"copied {n} {name} entries")
    if learn and registered:
        _learn_local_routes(pins, target["pod_local_routes"], log)
    if "counters" in fresh:
        log("counters: new layout, they start from zero")
    if "sock_hash" in fresh:
        log("sock_hash: new map; sockets on the shortcut now stay in the old one until they close")

    # -- load every new program against the target maps
    for name in plan.same:
        # bcc loads each program with the fds it created its maps under baked into the
        # instructions; the kernel resolves them at load: make those fds the pinned maps
        os.dup2(old_fd[name], new_fd[name])
    loaded: dict[str, int] = {}
    try:
        for prog in programs.PROGRAMS:
            loaded[prog.name] = build.load_program(b, prog).fd
    except MeshaccelError as e:
        raise MeshaccelError(
            f"the new programs do not load ({e}): refusing, the running datapath "
            f"{version.describe(running)} is unchanged"
        ) from e

    # the settings the new programs start with (the pinned maps' only change, if reused)
    write_settings_to(target["config_map"], target["attach_info_map"], cgroup, defaults, mode)

    # -- swap, hook by hook
    # (a program the running datapath lacks, e.g. verdict before it existed, is attached
    # beside the others instead of swapped; a failed replace detaches it again)
    present = [p for p in programs.PROGRAMS if os.path.exists(pins.prog(p))]
    old_prog = {p.name: bpfsys.obj_get(pins.prog(p)) for p in present}
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    done: list[programs.Program] = []
    try:
        try:
            for prog in programs.PROGRAMS:
                if prog.name in old_prog:
                    _swap(prog, loaded[prog.name], old_prog[prog.name], cg_fd, pins, target)
                else:
                    _add(prog, loaded[prog.name], cg_fd, target)
                done.append(prog)
        except OSError as e:
            for prog in reversed(done):
                if prog.name in old_prog:
                    _swap(prog, old_prog[prog.name], loaded[prog.name], cg_fd, pins, target, True)
                else:
                    _remove(prog, loaded[prog.name], cg_fd, target)
            raise MeshaccelError(
                f"replacing {programs.PROGRAMS[len(done)].name} failed ({e}): put back what was "
                f"swapped; the running datapath {version.describe(running)} is unchanged"
            ) from e
        if "sk_lookup_netns" in fresh:
            _retag(pins, target["sk_lookup_netns"], log)
        # -- the pins follow (renamed over the old ones: never missing)
        for prog in programs.PROGRAMS:
            _repin(loaded[prog.name], pins.prog(prog))
        for name in fresh:
            _repin(target[name], pins.map(name))
        for name in plan.dropped:
            os.unlink(pins.map(name))
    finally:
        os.close(cg_fd)
        for fd in old_prog.values():
            os.close(fd)
    forget_fds()
    new.programs = pinned_tags(pins)
    write_record(pins, new)
    for prog in programs.PROGRAMS:
        log(f"replaced {prog.name} (now {new.programs[prog.name]})")
    return (
        f"replaced datapath {version.describe(running)} with {new.short()} on {cgroup}: "
        f"{len(programs.PROGRAMS)} programs swapped in place, {plan.describe()}"
    )


def _swap(
    prog: programs.Program,
    new_fd: int,
    old_fd: int,
    cg_fd: int,
    pins: Pins,
    target: dict[str, int],
    undo: bool = False,
) -> None:
    """Put new_fd's program where old_fd's runs, in one kernel operation."""
    if prog.hook == "cgroup":
        bpfsys.prog_replace(new_fd, cg_fd, prog.attach_type, old_fd)
    elif prog.hook == "netns":
        updated: list[str] = []
        try:
            for link in pins.links():
                _update_link(link, new_fd, old_fd)
                updated.append(link)
        except OSError:
            for link in updated:  # all of a pod's links or none
                _update_link(link, old_fd, new_fd)
            raise
    else:
        map_fd = target[prog.hook]
        if undo and map_fd != pin_fd(pins.map(prog.hook)):
            bpfsys.prog_detach(old_fd, map_fd, prog.attach_type)  # the new, unused map
        else:
            # one pointer exchange on the map; sockets keep the program they joined with
            bpfsys.prog_attach(new_fd, map_fd, prog.attach_type)


def _add(prog: programs.Program, new_fd: int, cg_fd: int, target: dict[str, int]) -> None:
    """Attach a program the running datapath does not have (a cgroup or map hook)."""
    if prog.hook == "cgroup":
        bpfsys.prog_attach(new_fd, cg_fd, prog.attach_type, bpfsys.F_ALLOW_MULTI)
    elif prog.hook == "netns":  # (each pod would need a new link: not done here)
        raise OSError(95, f"{prog.name} is new and links into pods' netns")
    else:
        bpfsys.prog_attach(new_fd, target[prog.hook], prog.attach_type)


def _remove(prog: programs.Program, new_fd: int, cg_fd: int, target: dict[str, int]) -> None:
    """Undo _add."""
    hook_fd = cg_fd if prog.hook == "cgroup" else target[prog.hook]
    bpfsys.prog_detach(new_fd, hook_fd, prog.attach_type)


def _retag(pins: Pins, map_fd: int, log: loader.Log) -> None:
    """Point each pod's tag link at a tag program of its own that writes the new
    sk_lookup_netns map (the new sk_lookup reads only that one). Tag links are never
    given ma_sk_lookup. A pod whose tag cannot be moved is found by address alone, as by
    a release before tags: logged, not a reason to undo the replace."""
    moved = 0
    for link in pins.tag_links():
        cookie = int(os.path.basename(link).removeprefix(TAG_LINK_PREFIX))
        try:
            new_fd = lookup_tag.load(cookie, map_fd)
            try:
                old_fd = bpfsys.prog_fd_by_id(inbound.link_prog_id(link))
                try:
                    _update_link(link, new_fd, old_fd)
                    moved += 1
                finally:
                    os.close(old_fd)
            finally:
                os.close(new_fd)
        except (OSError, MeshaccelError) as e:
            log(f"{os.path.basename(link)}: kept its old tag ({e}): the pod is found by address")
    if moved:
        log(f"moved {moved} pod(s)' tag programs to the new sk_lookup_netns")


def _learn_local_routes(pins: Pins, map_fd: int, log: loader.Log) -> None:
    """Fill pod_local_routes, new in this release, with each registered pod's local-route
    prefixes, read from its netns (found through its sk_lookup link), as pod add would
    have. A pod whose netns cannot be read keeps none until its next pod add: logged, not
    a reason to refuse the replace."""
    from meshaccel.datapath import pods  # (it imports the loader)

    learned = 0
    for link in pins.links():
        cookie = int(os.path.basename(link).removeprefix(LINK_PREFIX))
        try:
            path = inbound.linked_netns(pins.dir, cookie)
            if path is None:
                continue  # the pod's netns is gone: nothing to call it by
            prefixes = netns_mod.local_destinations(path)[1]
            pods.write_local_routes(map_fd, cookie, prefixes)
            learned += len(prefixes)
        except (OSError, MeshaccelError) as e:
            log(f"{os.path.basename(link)}: its local-route prefixes not registered ({e})")
    if learned:
        log(f"registered {learned} local-route prefix(es) of the pods in pod_local_routes")


def _update_link(link: str, new_fd: int, old_fd: int) -> None:
    fd = bpfsys.obj_get(link)
    try:
        bpfsys.link_update(fd, new_fd, old_fd)
    finally:
        os.close(fd)


def _repin(fd: int, path: str) -> None:
    """Pin fd at path, replacing what is pinned there in one rename (bpffs names take
    no dots)."""
    tmp = f"{path}_new"
    bpfsys.obj_pin(fd, tmp)
    os.rename(tmp, path)


def _entries(fds: dict[str, int], layouts: dict[str, version.MapLayout], name: str) -> int:
    if name not in fds:
        return 0
    return sum(1 for _ in bpfsys.map_keys(fds[name], layouts[name].key_size))


def _copy_entries(src: int, dst: int, key_size: int, value_size: int) -> int:
    n = 0
    value = ctypes.create_string_buffer(value_size)
    for raw in list(bpfsys.map_keys(src, key_size)):
        key = ctypes.create_string_buffer(raw, key_size)
        if bpfsys.map_lookup(src, key, value):
            try:
                bpfsys.map_update(dst, key, value)
                n += 1
            except OSError:
                break  # the new map is full: the rest ages out as it would anyway
    return n


def _carry_plan(
    plan: version.MapPlan, old_fd: dict[str, int], old: dict[str, version.MapLayout]
) -> tuple[list[str], bool]:
    """Which CARRIED maps are new and copied, and whether pod_local_routes is instead
    filled from the pods' netns (new in this release, or its entries of another layout).
    Refuses when pods' own shortcut settings cannot be carried."""
    copy = [n for n in CARRIED if n in plan.changed and _entries_fit(*plan.changed[n])]
    name = "pod_shortcut"
    if name in plan.changed and name not in copy and (n := _entries(old_fd, old, name)):
        raise MeshaccelError(
            f"{name} changes entry layout ({old[name].describe()}) and {n} pod(s) have "
            "their own shortcut setting, which this release cannot read: refusing, nothing "
            "changed"
        )
    routes = "pod_local_routes"
    learn = routes in plan.added or (routes in plan.changed and routes not in copy)
    return copy, learn


def _entries_fit(old: version.MapLayout, new: version.MapLayout) -> bool:
    """Whether old's entries can be copied into new as they are."""
    return (old.type, old.key_size, old.value_size) == (new.type, new.key_size, new.value_size)


def _pods_to_carry(
    plan: version.MapPlan, old_fd: dict[str, int], old: dict[str, version.MapLayout]
) -> list[tuple[structs.PodConfig, list[structs.IpKey]]]:
    """The registered pods, recompiled by this release, each with every address it is
    registered under (its own and its other interfaces'), when a pod map is new (else
    none: the pinned pod maps are used as they are). Refuses when they cannot be read."""
    if "pod_config" in plan.same and "pod_by_netns" in plan.same:
        return []
    from meshaccel.datapath import pods  # (it imports the loader)

    layout = old.get("pod_config")
    if layout is None:
        return []
    if layout.key_size != ctypes.sizeof(structs.IpKey) or layout.value_size < (
        _POD_HEAD + _POD_NAME + _POD_ARGS
    ):
        raise MeshaccelError(
            f"pod_config changes layout and its entries ({layout.describe()}) cannot be read "
            "by this release: refusing, nothing changed"
        )
    fd = old_fd["pod_config"]
    raw = ctypes.create_string_buffer(layout.value_size)
    found: dict[int, tuple[structs.PodConfig, list[structs.IpKey]]] = {}
    for key in map(structs.IpKey.from_buffer_copy, bpfsys.map_keys(fd, layout.key_size)):
        if not bpfsys.map_lookup(fd, key, raw):
            continue
        cookie = int.from_bytes(raw.raw[:8], "little")
        if cookie in found:
            found[cookie][1].append(key)
            continue
        name = raw.raw[-(_POD_NAME + _POD_ARGS) : -_POD_ARGS].split(b"\0", 1)[0].decode()
        args = raw.raw[-_POD_ARGS:].split(b"\0", 1)[0].decode()
        try:
            pod = pods.compile_config(parse_istio_args(args), name, cookie)
        except MeshaccelError as e:
            raise MeshaccelError(
                f"pod {name}: its capture settings cannot be carried over ({e}): refusing, "
                "nothing changed"
            ) from e
        ctypes.memmove(ctypes.addressof(pod.ips), raw.raw[8:_POD_HEAD], _POD_HEAD - 8)
        found[cookie] = (pod, [key])
    return list(found.values())


def _register(
    config_fd: int, netns_fd: int, pod: structs.PodConfig, keys: list[structs.IpKey]
) -> None:
    """pod add's map writes, for a pod whose netns and links exist already: the pod under
    each of its addresses, and its netns to its own first address."""
    for key in keys:
        bpfsys.map_update(config_fd, key, pod)
    own = [k for k in pod.ips if any(k.ip)]
    if own:
        bpfsys.map_update(netns_fd, ctypes.c_uint64(pod.netns_cookie), own[0])
