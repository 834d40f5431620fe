"""meshaccel/datapath/structs.py mirrors bpf/include/types.h: check sizes, offsets and counter
indices against what bcc compiled (as Cilium's alignchecker does for its structs)."""

from __future__ import annotations

import ctypes
import re

import pytest

from meshaccel.datapath import loader, structs


@pytest.fixture(scope="module")
def compiled():
    b = loader.compile_bpf()
    yield b
    b.cleanup()


def _layout(struct: type[ctypes.Structure]) -> tuple[int, list[tuple[str, int, int]]]:
    fields = [
        (name, getattr(struct, name).offset, getattr(struct, name).size)
        for name, *_ in struct._fields_
        if not name.startswith("_")
    ]
    return ctypes.sizeof(struct), fields


@pytest.mark.parametrize(
    "table,side,mirror",
    [
        ("orig_dst_by_sock", "Key", structs.SockKey),
        ("orig_dst_by_sock", "Leaf", structs.OrigDst),
        ("config_map", "Leaf", structs.MaConfig),
        ("attach_info_map", "Leaf", structs.AttachInfo),
        ("pod_config", "Key", structs.IpKey),
        ("pod_config", "Leaf", structs.PodConfig),
        ("pod_shortcut", "Leaf", structs.ShortcutPolicy),
        ("pod_local_routes", "Key", structs.LocalRouteKey),
        ("sk_lookup_netns", "Leaf", structs.LookupTag),
    ],
)
def test_struct_matches_compiled_c(compiled, table, side, mirror):
    compiled_type = getattr(compiled[table.encode()], side)
    if issubclass(compiled_type, ctypes.Array):  # a per-CPU map's value: one per CPU
        compiled_type = compiled_type._type_
    assert _layout(compiled_type) == _layout(mirror)


def test_counter_names_match_enum():
    """Each CNT_<NAME> has the index of <name> in structs.COUNTERS, and CNT__MAX their count."""
    from bcc import BPF

    probes = "\n".join(
        f"BPF_ARRAY(probe_{i}, u8, CNT_{name.upper()} + 1);"
        for i, name in enumerate(structs.COUNTERS)
    )
    types_h = (loader.BPF_DIR / "include" / "types.h").read_text()
    b = BPF(text=(types_h + "\nBPF_ARRAY(probe_max, u8, CNT__MAX);\n" + probes).encode())
    try:
        assert b[b"probe_max"].max_entries == len(structs.COUNTERS)
        for i in range(len(structs.COUNTERS)):
            assert b[f"probe_{i}".encode()].max_entries == i + 1, structs.COUNTERS[i]
    finally:
        b.cleanup()


def test_rule_struct_and_constants_match():
    """struct capture_rule, and every RM_*/RA_* bit and MA_MAX_RULES, as C has them."""
    from bcc import BPF

    consts = {n: getattr(structs, n) for n in dir(structs) if n.startswith(("RM_", "RA_"))}
    consts["MA_MAX_RULES"] = structs.MAX_RULES
    consts["MA_MAX_SHORTCUT_EXCLUDE"] = structs.MAX_SHORTCUT_EXCLUDE
    probes = "\n".join(f"BPF_ARRAY(probe_{n.lower()}, u8, {n});" for n in consts)
    types_h = (loader.BPF_DIR / "include" / "types.h").read_text()
    text = types_h + "\nBPF_ARRAY(rules, struct capture_rule, 1);\n" + probes
    b = BPF(text=text.encode())
    try:
        assert _layout(b[b"rules"].Leaf) == _layout(structs.CaptureRule)
        for name, value in consts.items():
            assert b[f"probe_{name.lower()}".encode()].max_entries == value, name
    finally:
        b.cleanup()


def test_every_map_in_maps_h_is_pinned(compiled):
    """structs.MAPS (what the loader pins) names exactly the maps the C declares."""
    text = loader.bpf_source()
    declared = set(re.findall(r"^BPF_\w+\((?:\"\w+\", [^,]+, [^,]+, )?(\w+)", text, re.M))
    assert declared == set(structs.MAPS)
