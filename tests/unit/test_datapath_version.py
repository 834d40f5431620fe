"""The version record and the comparisons an upgrade acts on (no kernel needed)."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest

from meshaccel import __version__
from meshaccel.agent.metrics import Metrics
from meshaccel.cli import format_datapath_version
from meshaccel.datapath import structs, upgrade, version
from meshaccel.datapath.version import Build, MapLayout
from meshaccel.errors import MeshaccelError

HASH, LRU, ARRAY, PERCPU, SOCKHASH, SK_STORAGE, LPM_TRIE = 1, 9, 2, 6, 18, 24, 11


def current_layouts() -> dict[str, MapLayout]:
    """The layouts this release's C compiles to (as bcc reports them), from the sizes
    userspace reads and writes (version.USERSPACE)."""
    kinds = {
        "config_map": ARRAY,
        "pod_config": HASH,
        "pod_by_netns": HASH,
        "pod_shortcut": HASH,
        "pod_local_routes": LPM_TRIE,
        "sk_lookup_netns": PERCPU,
        "attach_info_map": ARRAY,
        "counters": PERCPU,
        "orig_dst_by_cookie": LRU,
        "orig_dst_by_sock": LRU,
        "sock_hash": SOCKHASH,
        "nat_peer": LRU,
        "fell_back_sk": SK_STORAGE,
        "fell_back": LRU,
        "inbound_listener": SOCKHASH,
    }
    out = {}
    for name, (key, value) in version.USERSPACE.items():
        entries = {"counters": len(structs.COUNTERS), "sk_lookup_netns": 1, "fell_back_sk": 0}
        entries = entries.get(name, 1024)
        out[name] = MapLayout(kinds[name], key, value, entries)
    return out


def test_source_hash_covers_the_text_and_the_cflags():
    base = version.source_hash("int x;")
    assert base == version.source_hash("int x;", [])
    assert base != version.source_hash("int x; ")
    assert base != version.source_hash("int x;", ["-DMA_MAX_CONNS=4096"])
    # flags are separated: ["-Da", "b"] is not ["-Dab"]
    assert version.source_hash("", ["-Da", "b"]) != version.source_hash("", ["-Dab"])


def test_record_round_trip():
    build = Build(
        "0.2.0",
        "ab" * 32,
        ("-DX=1",),
        current_layouts(),
        {"connect4": "0011223344556677", "redirect": "8899aabbccddeeff"},
    )
    raw = version.encode(build)
    assert len(raw) == version.RECORD_VALUE_SIZE
    assert version.decode(raw) == build


def test_unreadable_records_are_no_version():
    assert version.decode(b"\0" * version.RECORD_VALUE_SIZE) is None
    assert version.decode(b"not json\0") is None
    assert version.decode(b'{"schema": 99, "release": "9"}\0') is None
    assert version.decode(b'{"schema": 1}\0') is None


def test_a_record_is_believed_only_for_the_programs_it_names():
    record = Build("0.2.0", "ab" * 32, programs={"connect4": "aa", "sockops": "bb"})
    assert version.believable(record, {"connect4": "aa", "sockops": "bb"})
    # an older release replaced a program (or a replace died half-way): not this record
    assert not version.believable(record, {"connect4": "aa", "sockops": "cc"})
    assert not version.believable(record, {"connect4": "aa"})
    assert not version.believable(None, {"connect4": "aa"})
    assert not version.believable(record, {})


def test_same_layouts_reuse_every_map():
    plan = version.compare_maps(current_layouts(), current_layouts())
    assert plan.identical and sorted(plan.same) == sorted(structs.MAPS)
    assert plan.describe() == "map layouts unchanged"


def test_998e13c_to_now_changes_the_counters_and_adds_pod_shortcut():
    """The release before orig_dst_by_conntrack and sock_kept_off_by_pod had two counters
    less and no pod_shortcut, nat_peer, sk_lookup_netns or fell_back_sk map: everything
    else is the same map."""
    old = current_layouts()
    old["counters"] = MapLayout(PERCPU, 4, 8, 21)
    new_maps = {"pod_shortcut", "nat_peer", "sk_lookup_netns", "fell_back_sk"}
    for name in new_maps:
        del old[name]
    plan = version.compare_maps(old, current_layouts())
    assert list(plan.changed) == ["counters"]
    assert sorted(plan.same) == sorted(set(structs.MAPS) - {"counters", *new_maps})
    assert set(plan.added) == new_maps and not plan.dropped
    assert f"counters: percpu_array 4->8 x21 -> percpu_array 4->8 x{len(structs.COUNTERS)}" in (
        plan.describe()
    )


def test_capacity_flags_added_and_dropped_maps():
    old = current_layouts()
    new = current_layouts()
    new["sock_hash"] = MapLayout(SOCKHASH, 48, 4, 4096)
    new["orig_dst_by_sock"] = MapLayout(LRU, 48, 24, 1024, flags=1)
    new["extra"] = MapLayout(HASH, 8, 8, 16)
    del new["fell_back"]
    plan = version.compare_maps(old, new)
    assert sorted(plan.changed) == ["orig_dst_by_sock", "sock_hash"]
    assert plan.added == ["extra"] and plan.dropped == ["fell_back"]
    text = plan.describe()
    assert "flags 0x1" in text and "extra: new" in text and "fell_back: gone" in text


def test_userspace_agrees_with_its_own_layouts():
    assert version.userspace_mismatches(current_layouts()) == []


def test_userspace_serves_a_build_with_more_or_fewer_counters():
    """Userspace only reads counters: 998e13c's 21 (the 22nd reads 0) or one more (not
    shown) are no reason to refuse."""
    for n in (len(structs.COUNTERS) - 1, len(structs.COUNTERS) + 1):
        layouts = current_layouts()
        layouts["counters"] = MapLayout(PERCPU, 4, 8, n)
        assert version.userspace_mismatches(layouts) == []


def test_userspace_refuses_maps_it_would_misread():
    other = current_layouts()
    other["config_map"] = MapLayout(ARRAY, 4, 8, 1)
    assert version.userspace_mismatches(other) == ["config_map: 4->8 bytes, this release uses 4->4"]
    other = current_layouts()
    other["pod_config"] = MapLayout(HASH, 16, 5000, 1024)
    del other["pod_by_netns"]
    bad = version.userspace_mismatches(other)
    assert any(b.startswith("pod_config: 16->5000 bytes") for b in bad), bad
    assert "pod_by_netns: missing" in bad


def _status(matches: bool, running: Build | None) -> dict:
    cli = version.cli_build("int x;")
    return {
        "running": {
            "release": running.release if running else None,
            "source": running.source if running else None,
            "version": version.describe(running),
            "note": None if running else "no version record (pinned by a release before records)",
        },
        "cli": {"release": cli.release, "source": cli.source, "version": cli.short()},
        "matches": matches,
    }


def test_status_text_says_when_they_differ():
    same = Build(__version__, version.source_hash("int x;"))
    lines = format_datapath_version(_status(True, same))
    assert lines == [f"version:  running {same.short()}, this meshaccel {same.short()}"]
    lines = format_datapath_version(_status(False, None))
    assert lines[0].startswith("version:  running unknown version, this meshaccel")
    assert "DIFFERS (no version record" in lines[1]
    assert format_datapath_version(None) == []


def test_info_metric():
    st = {"attached": True, "programs": [], "datapath": _status(False, None)}
    text = Metrics(lambda: st, pod_sockets=lambda _st: {}).exposition().decode()
    [line] = [x for x in text.splitlines() if x.startswith("meshaccel_datapath_info{")]
    assert 'release=""' in line and 'running_matches_cli="false"' in line, line
    assert f'cli_release="{__version__}"' in line and line.endswith(" 1.0"), line
    running = Build(__version__, version.source_hash("int x;"))
    st["datapath"] = _status(True, running)
    text = Metrics(lambda: st, pod_sockets=lambda _st: {}).exposition().decode()
    [line] = [x for x in text.splitlines() if x.startswith("meshaccel_datapath_info{")]
    assert f'source="{running.source[:12]}"' in line, line
    assert 'running_matches_cli="true"' in line, line


def test_userspace_works_without_the_optional_maps():
    """998e13c's source has no pod_shortcut: pods then read as shortcut on."""
    older = {n: layout for n, layout in current_layouts().items() if n not in version.OPTIONAL}
    assert version.userspace_mismatches(older) == []


def test_a_datapath_from_before_tags_is_served_and_a_misread_tag_refused():
    """sk_lookup_netns is new in this release: a build without it is served (its pods are
    linked without a tag program); one whose tag has another size is not (the tag programs
    userspace assembles would write what its sk_lookup misreads)."""
    assert "sk_lookup_netns" in version.OPTIONAL
    older = current_layouts()
    del older["sk_lookup_netns"]
    assert version.userspace_mismatches(older) == []
    other = current_layouts()
    other["sk_lookup_netns"] = MapLayout(PERCPU, 4, 48, 1)
    size = ctypes.sizeof(structs.LookupTag)
    assert version.userspace_mismatches(other) == [
        f"sk_lookup_netns: 4->48 bytes, this release uses 4->{size}"
    ]


def test_pods_own_settings_are_copied_learned_or_refused(monkeypatch):
    """A new pod_shortcut or pod_local_routes of the same entry layout gets every entry
    copied; pod_local_routes that is new or of another layout is learned from the pods'
    netns; pod_shortcut entries of another layout refuse the replace (a pod that opted out
    of the shortcut would be back on it), unless there are none."""
    held = {"pod_shortcut": 2}
    monkeypatch.setattr(upgrade, "_entries", lambda _fds, _layouts, name: held.get(name, 0))
    new = current_layouts()

    def carry(**old_layouts: MapLayout | None) -> tuple[list[str], bool]:
        old = {**current_layouts(), **old_layouts}
        old = {name: layout for name, layout in old.items() if layout is not None}
        return upgrade._carry_plan(version.compare_maps(old, new), {}, old)

    assert carry() == ([], False)
    smaller = {n: dataclasses.replace(new[n], max_entries=1000) for n in upgrade.CARRIED}
    assert carry(**smaller) == (["pod_shortcut", "pod_local_routes"], False)
    assert carry(pod_local_routes=None) == ([], True)
    assert carry(pod_local_routes=MapLayout(LPM_TRIE, 20, 1, 1024)) == ([], True)
    old_shortcut = MapLayout(HASH, 8, 12, 1024)
    with pytest.raises(MeshaccelError, match=r"pod_shortcut changes entry layout .* 2 pod\(s\)"):
        carry(pod_shortcut=old_shortcut)
    held.clear()
    assert carry(pod_shortcut=old_shortcut) == ([], False)
