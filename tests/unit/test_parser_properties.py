"""Property-based tests (hypothesis) of every parser of user input: istio-iptables args,
Istio annotations, CIDRs and ports, pods files, Kubernetes pod objects, CLI options.

What holds for any input: a parser returns a value or raises MeshaccelError with a one-line
message naming the flag, annotation or field; what the parsers accept, both capture modes
accept (the iptables rules and the eBPF datapath's compiled rules come from the same
CaptureConfig), and to_istio_args() spells it so that parsing gives it back. Each bug the
properties found has a plain regression test next to them."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shlex
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshaccel.agent.daemon import parse_address
from meshaccel.agent.file_source import read_pods_file
from meshaccel.agent.kubernetes_source import pod_spec
from meshaccel.agent.reconciler import PodSpec
from meshaccel.cli import _annotations as cli_annotations
from meshaccel.datapath import compiler, iptables_mode, pods, rules, structs
from meshaccel.datapath.capture import (
    ISTIO_INJECTION_DEFAULT_ARGS,
    CaptureConfig,
    apply_annotations,
    parse_istio_args,
    to_istio_args,
)
from meshaccel.datapath.loader import check_port, default_capture
from meshaccel.datapath.shortcut import shortcut_setting
from meshaccel.errors import MeshaccelError
from meshaccel.errors import one_line as escaped
from meshaccel.lab.fake_apiserver import make_pod

# Modest counts keep the unit suite fast; CI runs the same examples every time.
PROPS = settings(
    max_examples=200,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    database=None,  # leaves no .hypothesis/ behind
    suppress_health_check=[HealthCheck.too_slow],
)
FEW = settings(PROPS, max_examples=60)

T = "traffic.sidecar.istio.io/"
SEED = parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS)


def one_line(e: BaseException) -> str:
    text = str(e)
    assert len(text.splitlines()) == 1 and text.isprintable(), repr(text)
    return text


# ---------------------------------------------------------------- strategies

_unicode_digits = st.sampled_from(["\u0661", "\uff11", "\u00b2", "\u2460", "\u0967"])


@st.composite
def port_texts(draw: st.DrawFn) -> str:
    """A port as someone might write it: fine, out of range, padded, signed, unicode."""
    n = draw(st.integers(-3, 70000) | st.sampled_from([0, 1, 65535, 65536, 15020, 2**32]))
    text = draw(
        st.sampled_from(
            [str(n), f" {n} ", f"0{n}", f"+{n}", f"{n}.0", hex(max(n, 0)), f"{n}\t", f"\n{n}"]
        )
        | _unicode_digits
        | st.sampled_from(["*", "", " ", "http", "80-90", "1e3", "\x00"])
    )
    return text


@st.composite
def cidr_texts(draw: st.DrawFn) -> str:
    """A CIDR in the forms people write: v4, v6 (compressed, exploded, upper case,
    v4-mapped), host bits set, bad prefix lengths, zones, bare addresses, '*'."""
    v6 = draw(st.booleans())
    addr = draw(st.ip_addresses(v=6 if v6 else 4))
    bits = draw(st.integers(-1, 140) | st.sampled_from([0, 8, 32, 64, 128]))
    form = draw(
        st.sampled_from(["plain", "exploded", "upper", "mapped", "zone", "bare", "pad", "lead0"])
    )
    text = str(addr)
    if v6 and form == "exploded":
        text = addr.exploded
    elif v6 and form == "upper":
        text = str(addr).upper()
    elif not v6 and form == "mapped":
        text, bits = f"::ffff:{addr}", bits + 96
    if form == "zone":
        text += "%eth0"
    if form == "bare":
        return text
    prefix = f"0{bits}" if form == "lead0" else str(bits)
    text = f"{text}/{prefix}"
    return f" {text} " if form == "pad" else text


def joined(item: st.SearchStrategy[str], max_size: int = 8) -> st.SearchStrategy[str]:
    """Comma-separated lists of items: empty, duplicated, with blanks and empty items."""
    return st.lists(item, max_size=max_size).flatmap(
        lambda items: st.sampled_from([",", ", ", " ,", ",,"]).map(lambda sep: sep.join(items))
    ) | st.sampled_from(["", " ", ",", "*", " * ", "*,*"])


valid_ports = st.integers(1, 65535)
ip_networks = st.builds(
    lambda a, bits: ipaddress.ip_network(f"{a}/{bits % (a.max_prefixlen + 1)}", strict=False),
    st.ip_addresses(),
    st.integers(0, 128),
)
port_lists = joined(port_texts()) | st.lists(valid_ports, max_size=70).map(
    lambda ps: ",".join(map(str, ps))
)
cidr_lists = joined(cidr_texts()) | st.lists(
    st.ip_addresses().map(lambda a: f"{a}/{a.max_prefixlen}"), max_size=60
).map(",".join)
id_lists = joined(
    st.integers(-1, 2**33).map(str) | st.sampled_from(["istio-proxy", "", " 0 ", "\uff11"])
)
modes = st.sampled_from(["REDIRECT", "TPROXY", "", " REDIRECT ", "NONE", "redirect"])

FLAG_VALUES: dict[str, st.SearchStrategy[str]] = {
    "-p": port_texts(), "-z": port_texts(), "-u": id_lists, "-g": id_lists, "-m": modes,
    "-i": cidr_lists, "-x": cidr_lists, "-b": port_lists, "-d": port_lists,
    "-q": port_lists, "-o": port_lists, "-e": port_texts(), "-k": st.sampled_from(["", "eth1"]),
    "-c": st.sampled_from(["", "eth1"]), "-t": st.text(max_size=4),
    "--redirect-dns": st.sampled_from(["", "=false", "=true", "=maybe"]),
    "--dry-run": st.sampled_from(["", "=false", "=0", "=T"]),
    "--dual-stack": st.sampled_from(["", "=false", "=yes"]),
    "--log_output_level": st.text(max_size=8),
}  # fmt: skip


@st.composite
def argv(draw: st.DrawFn) -> list[str]:
    """istio-iptables argv: known flags in their spellings, with odd values, plus noise."""
    out: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        flag = draw(st.sampled_from(sorted(FLAG_VALUES)))
        value = draw(FLAG_VALUES[flag])
        if flag.startswith("--"):
            out.append(flag + value)  # bools: bare or =value
            continue
        spelling = draw(st.sampled_from(["sep", "glued", "eq"]))
        if spelling == "sep":
            out += [flag, value]
        elif spelling == "glued" and value:
            out.append(flag + value)
        else:
            out.append(f"{flag}={value}")
    if draw(st.booleans()):
        noise = st.text(max_size=12) | st.sampled_from(["--", "-", "--bogus", "-Z", "-pz"])
        out.insert(draw(st.integers(0, len(out))), draw(noise))
    return out


def accepted(args: list[str]) -> CaptureConfig | None:
    try:
        return parse_istio_args(args)
    except MeshaccelError as e:
        one_line(e)
        return None


# ---------------------------------------------------------------- istio-iptables args


RULE_ACTIONS = {  # the typed actions as the datapath's enum rule_action
    rules.RETURN: structs.RA_RETURN,
    rules.Jump(rules.Chain.REDIRECT): structs.RA_REDIRECT,
    rules.Jump(rules.Chain.IN_REDIRECT): structs.RA_IN_REDIRECT,
}


def check_both_modes(cfg: CaptureConfig) -> None:
    """What parses is spelled back the same way and both capture modes take it: the
    iptables rules render for both families, and the eBPF compiler compiles the same rule
    list (or says clearly that it holds too many rules for the datapath)."""
    args = to_istio_args(cfg)
    assert parse_istio_args(args) == cfg
    assert parse_istio_args(shlex.join(args)) == cfg
    by_family = {f: rules.capture_rules(cfg, f) for f in (4, 6)}
    for family in (4, 6):
        text = iptables_mode.rules(cfg, family)
        assert all(line.isprintable() for line in text.splitlines())
    chains = {"ISTIO_OUTPUT": [], "ISTIO_INBOUND": []}
    for family, listed in by_family.items():
        for rule in listed:
            if rule.chain in chains:
                chains[rule.chain].append((family, rule))
    try:
        pod = compiler.compile_config(cfg, "ns/pod", 1)
    except MeshaccelError as e:
        msg = one_line(e)
        assert any(len(v) > structs.MAX_RULES for v in chains.values()), msg
        assert f"holds {structs.MAX_RULES}" in msg
        return
    assert (pod.n_output, pod.n_inbound) == tuple(len(v) for v in chains.values())
    # the sidecar's ports come from the rules too: where ISTIO_(IN_)REDIRECT redirect to
    for listed in by_family.values():
        assert (pod.proxy_port, pod.inbound_port) == (listed.proxy_port, listed.inbound_port)
    assert (pod.proxy_port, pod.inbound_port) == (cfg.proxy_port, cfg.inbound_port)
    for compiled, (family, rule) in zip(
        [*pod.output[: pod.n_output], *pod.inbound[: pod.n_inbound]],
        [*chains["ISTIO_OUTPUT"], *chains["ISTIO_INBOUND"]],
        strict=True,
    ):
        assert compiled.family == family
        assert compiled.action == RULE_ACTIONS[rule.action]
        assert compiled.port == (rule.dport or 0)  # (no silent u16 wrap)
        assert compiled.owner == (rule.owner[1] if rule.owner else 0)
        if rule.dst or rule.src:
            net = ipaddress.ip_network(rule.dst or rule.src)
            assert bin(int.from_bytes(bytes(compiled.mask), "big")).count("1") == (
                net.prefixlen + (96 if net.version == 4 else 0)
            )


@PROPS
@given(argv())
def test_args_parse_or_fail_in_one_line(args):
    cfg = accepted(args)
    if cfg is not None:
        check_both_modes(cfg)


@PROPS
@given(st.text(max_size=80))
@example("-p '1\n2'")
@example("-i '10.0.0.0/8\n-x 1'")
@example('-p "')
def test_any_text_parses_or_fails_in_one_line(text):
    try:
        cfg = parse_istio_args(text)
    except MeshaccelError as e:
        one_line(e)
    else:
        check_both_modes(cfg)


@PROPS
@given(st.sampled_from(["-i", "-x", "-b", "-d", "-q", "-o"]), port_lists | cidr_lists)
def test_errors_name_the_flag_and_the_value(flag, value):
    try:
        parse_istio_args([flag, value])
    except MeshaccelError as e:
        msg = one_line(e)
        assert msg.startswith(f"{flag} "), msg
        assert any(escaped(item.strip()) in msg for item in value.split(",")), msg


@PROPS
@given(st.lists(valid_ports, max_size=60), st.lists(valid_ports, max_size=60))
def test_port_lists_keep_order_and_drop_duplicates(include, exclude):
    cfg = parse_istio_args(["-q", ",".join(map(str, include)), "-o", " , ".join(map(str, exclude))])
    assert cfg.include_outbound_ports == tuple(dict.fromkeys(include))
    assert cfg.exclude_outbound_ports == tuple(dict.fromkeys(exclude))
    check_both_modes(cfg)


@PROPS
@given(st.lists(ip_networks, max_size=60), st.booleans())
def test_any_network_is_taken_and_compiled_for_its_family(nets, exclude):
    cfg = parse_istio_args([("-x" if exclude else "-i"), ",".join(map(str, nets))])
    got = cfg.exclude_outbound_cidrs if exclude else cfg.include_outbound_cidrs
    assert got == tuple(dict.fromkeys(nets))
    check_both_modes(cfg)


def test_a_value_with_a_line_break_is_shown_escaped():
    with pytest.raises(MeshaccelError) as e:
        parse_istio_args(["-p", "1\n2"])
    assert str(e.value) == '-p "1\\n2": not a port number'
    with pytest.raises(MeshaccelError) as e:
        apply_annotations(SEED, {T + "excludeOutboundPorts": "80,\x1b[31m"})
    assert str(e.value) == f'{T}excludeOutboundPorts "\\x1b[31m": not a port number'


def test_too_many_rules_for_the_datapath_is_a_clear_error():
    # 48 ISTIO_OUTPUT rules fit; one -x CIDR more is an error, not a truncated rule list
    base = parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS)
    fixed = len([r for r in rules.capture_rules(base, 4) if r.chain == "ISTIO_OUTPUT"])
    fixed += len([r for r in rules.capture_rules(base, 6) if r.chain == "ISTIO_OUTPUT"])
    room = structs.MAX_RULES - fixed
    fits = [ipaddress.ip_network(f"10.{i}.0.0/16") for i in range(room)]
    pod = compiler.compile_config(dataclasses.replace(base, exclude_outbound_cidrs=tuple(fits)))
    assert pod.n_output == structs.MAX_RULES
    over = (*fits, ipaddress.ip_network("10.250.0.0/16"))
    with pytest.raises(MeshaccelError, match=rf"{structs.MAX_RULES + 1} ISTIO_OUTPUT rules: the "):
        compiler.compile_config(dataclasses.replace(base, exclude_outbound_cidrs=over))


# ---------------------------------------------------------------- annotations

LIST_ANNOTATIONS = {
    T + "includeOutboundIPRanges": ("-i", cidr_lists),
    T + "excludeOutboundIPRanges": ("-x", cidr_lists),
    T + "includeInboundPorts": ("-b", port_lists),
    T + "includeOutboundPorts": ("-q", port_lists),
    T + "excludeOutboundPorts": ("-o", port_lists),
}


@st.composite
def annotation_and_flag(draw: st.DrawFn) -> tuple[str, str, str]:
    key = draw(st.sampled_from(sorted(LIST_ANNOTATIONS)))
    flag, values = LIST_ANNOTATIONS[key]
    return key, flag, draw(values)


@PROPS
@given(annotation_and_flag())
def test_an_annotation_is_accepted_iff_its_flag_is(case):
    # an annotation replaces its flag's cluster value (the injector renders it into the
    # istio-init args): the same value is taken, or refused, both ways
    key, flag, value = case
    try:
        by_annotation: CaptureConfig | None = apply_annotations(SEED, {key: value})
    except MeshaccelError as e:
        msg = one_line(e)
        assert msg.startswith(key), msg
        by_annotation = None
    by_flag = accepted([*to_istio_args(SEED), flag, value])
    assert by_annotation == by_flag
    if by_flag is not None:
        check_both_modes(by_flag)


ANNOTATION_KEYS = [
    *LIST_ANNOTATIONS,
    T + "excludeInboundPorts",
    T + "kubevirtInterfaces",
    T + "excludeInterfaces",
    T + "unknownThing",
    "status.sidecar.istio.io/port",
    "sidecar.istio.io/interceptionMode",
    "istio.io/reroute-virtual-interfaces",
    "sidecar.istio.io/proxyCPU",
]
annotation_values = (
    port_lists | cidr_lists | port_texts() | modes | st.text(max_size=20) | st.sampled_from(["*"])
)


@PROPS
@given(st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_values, max_size=6))
def test_annotations_apply_or_fail_in_one_line_naming_the_annotation(annotations):
    try:
        cfg = apply_annotations(SEED, annotations)
    except MeshaccelError as e:
        msg = one_line(e)
        assert any(msg.startswith(k) for k in annotations), msg
        return
    check_both_modes(cfg)
    if T + "excludeInboundPorts" in annotations or "status.sidecar.istio.io/port" in annotations:
        assert {15090, 15021} <= set(cfg.exclude_inbound_ports)  # Istio always adds them


@PROPS
@given(
    st.dictionaries(
        st.sampled_from(["meshaccel.io/shortcut", "meshaccel.io/shortcut-exclude-ports"]),
        st.sampled_from(["true", "false", " false ", "no", ""]) | port_lists,
    )
)
def test_shortcut_annotations_parse_or_fail_in_one_line(annotations):
    try:
        setting = shortcut_setting(annotations)
    except MeshaccelError as e:
        msg = one_line(e)
        assert any(msg.startswith(k) for k in annotations), msg
    else:
        assert len(setting.exclude_ports) <= structs.MAX_SHORTCUT_EXCLUDE
        assert all(1 <= p <= 65535 for p in setting.exclude_ports)


# ---------------------------------------------------------------- records of the settings


@FEW
@given(st.lists(ip_networks, max_size=30), st.lists(valid_ports, max_size=30))
@example([ipaddress.ip_network(f"10.{i}.0.0/16") for i in range(40)], [])
def test_default_args_are_recorded_whole_or_refused(nets, ports):
    # attach records the default args in a 512-byte field: a longer spelling must be an
    # error, never cut short (a cut "10.0.0.0/16" reads back as "10.0.0.0/1")
    args = shlex.join(["-x", ",".join(map(str, nets)), "-o", ",".join(map(str, ports))])
    try:
        defaults = default_capture(args, None, None)
    except MeshaccelError as e:
        assert one_line(e).startswith("--istio-iptables-args: ") and "at most 511" in str(e)
        return
    assert len(defaults.encode()) < 512
    structs.AttachInfo(default_args=defaults.encode())  # fits
    assert parse_istio_args(defaults) == parse_istio_args(args)


@FEW
@given(st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40))
def test_attach_port_and_uid_overrides(port, uid):
    try:
        defaults = default_capture(ISTIO_INJECTION_DEFAULT_ARGS, port, uid)
    except MeshaccelError as e:
        one_line(e)
        assert not (1 <= port <= 65535 and 0 <= uid < 2**32 - 1)
    else:
        cfg = parse_istio_args(defaults)
        assert cfg.proxy_port == port and cfg.proxy_uids == cfg.proxy_gids == (uid,)


@FEW
@given(st.integers(-(2**20), 2**20))
def test_check_port(port):
    try:
        check_port("--x", port)
    except MeshaccelError as e:
        assert one_line(e).startswith(f"--x {port}:")
        assert not 1 <= port <= 65535
    else:
        assert 1 <= port <= 65535


@FEW
@given(st.text(min_size=1, max_size=100))
@example("a" * 40 + "/" + "b" * 40)
@example("é" * 40)
def test_pod_names_are_recorded_so_that_they_read_back(name):
    pod = compiler.compile_config(SEED, name, 1)
    recorded = pod.name.decode()  # (list_pods decodes it: no cut UTF-8 sequence)
    assert recorded == compiler.recorded_name(name)
    assert len(recorded.encode()) < 64


def test_long_pod_names_stay_apart_when_recorded():
    a, b = "istio-system/" + "x" * 60 + "-a", "istio-system/" + "x" * 60 + "-b"
    assert compiler.recorded_name(a) != compiler.recorded_name(b)
    assert compiler.recorded_name("default/short") == "default/short"


# ---------------------------------------------------------------- addresses and ports


@PROPS
@given(
    st.text(max_size=40)
    | st.builds(lambda h, p: f"{h}:{p}", st.ip_addresses().map(str), port_texts())
    | st.builds(lambda h, p: f"[{h}]:{p}", st.ip_addresses().map(str), port_texts())
)
@example("127.0.0.1:\u00b2")
@example("[::1]:\uff11")
def test_metrics_address_parses_or_fails_in_one_line(text):
    try:
        host, port = parse_address(text)
    except MeshaccelError as e:
        assert one_line(e).startswith(f"--metrics-address {escaped(text)}")
    else:
        assert 1 <= port <= 65535 and host
        assert text.endswith(str(port))


def test_metrics_address_port_must_be_ascii_digits():
    for text in ("127.0.0.1:\u00b2", "127.0.0.1:\u0661\u0665\u0660\u0668\u0660"):
        with pytest.raises(MeshaccelError, match="expected HOST:PORT"):
            parse_address(text)


@PROPS
@given(st.lists(st.ip_addresses().map(str) | cidr_texts() | st.text(max_size=12), max_size=3))
def test_pod_ip_options_parse_or_fail_in_one_line(ips):
    try:
        addrs = pods._ips(ips)
    except MeshaccelError as e:
        assert one_line(e).startswith("--ip")
    else:
        assert 1 <= len(addrs) <= 2 and len({a.version for a in addrs}) == len(addrs)
        for a in addrs:
            assert structs.words_ip(structs.ip_words(str(a))) == str(a)  # recorded as given


@PROPS
@given(
    st.integers(0, 2**64 - 1),
    st.ip_addresses(v=4).flatmap(lambda a: st.integers(0, 32).map(lambda n: (a, n)))
    | st.ip_addresses(v=6)
    .filter(lambda a: a.ipv4_mapped is None)
    .flatmap(lambda a: st.integers(0, 128).map(lambda n: (a, n))),
)
def test_local_route_keys_round_trip(cookie, addr_len):
    """A pod's local-route prefix as pod_local_routes keys it (netns cookie, then the
    v4-mapped address: 64 + 96 + n bits for IPv4) reads back as the same prefix."""
    addr, n = addr_len
    prefix = str(ipaddress.ip_network(f"{addr}/{n}", strict=False))
    key = structs.local_route_key(cookie, prefix)
    assert key.prefixlen == 64 + n + (96 if addr.version == 4 else 0)
    assert structs.local_route_prefix(key) == (cookie, prefix)


def test_cli_annotation_needs_a_key():
    for item in ("=15020", " =1", "a\nb"):
        with pytest.raises(MeshaccelError, match="expected KEY=VALUE"):
            cli_annotations((item,))


@FEW
@given(st.lists(st.text(max_size=20), max_size=5))
def test_cli_annotations(items):
    try:
        parsed = cli_annotations(tuple(items))
    except MeshaccelError as e:
        assert one_line(e).startswith("--annotation ")
    else:
        assert set(parsed) == {i.partition("=")[0] for i in items}
        assert all(key.strip() for key in parsed)


# ---------------------------------------------------------------- pods files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
good_item = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "c"]), "ips": st.just(["10.244.1.5"]),
     "netns": st.just("/run/netns/x")},
    optional={"namespace": st.sampled_from(["default", "shop"]),
              "annotations": st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_values,
                                             max_size=2)},
)  # fmt: skip


@st.composite
def pod_items(draw: st.DrawFn) -> Any:
    """An entry of a pods file: a good one, or one with a field replaced by anything."""
    item = dict(draw(good_item))
    if draw(st.booleans()):
        field = draw(st.sampled_from(["name", "namespace", "ips", "netns", "pid", "annotations"]))
        item[field] = draw(json_values | port_texts() | cidr_texts())
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    return item


def write_and_read(tmp_path, doc_text: str | bytes, suffix: str = ".yaml"):
    path = tmp_path / f"pods{suffix}"
    if isinstance(doc_text, bytes):
        path.write_bytes(doc_text)
    else:
        path.write_text(doc_text)
    errors: list[MeshaccelError] = []
    specs = read_pods_file(str(path), errors)
    return str(path), specs, errors


@PROPS
@given(st.lists(pod_items(), max_size=5), st.sampled_from([".yaml", ".json"]))
def test_pods_file_entries_are_taken_or_reported_one_by_one(tmp_path_factory, items, suffix):
    tmp = tmp_path_factory.mktemp("pods")
    text = json.dumps({"pods": items}) if suffix == ".json" else yaml.safe_dump({"pods": items})
    path, specs, errors = write_and_read(tmp, text, suffix)
    assert len(specs) + len(errors) == len(items)
    for spec in specs:
        assert isinstance(spec, PodSpec) and spec.ips and spec.netns
        assert all(isinstance(ip, str) for ip in spec.ips)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in spec.annotations.items())
        for ip in spec.ips:
            assert str(ipaddress.ip_address(ip)) == ip  # normalized, checked
    for error in errors:
        msg = one_line(error)
        assert msg.startswith(f"--pods-file {path}: pods[")


@PROPS
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
@example(b"pods: [{name: a, ips: [10.0.0.1], netns: /x}]\xff")
@example(b"[" * 5000)
@example(b'{"pods": ' + b"[" * 5000 + b"]" * 5000 + b"}")
def test_any_file_content_is_read_or_refused_in_one_line(tmp_path_factory, data):
    for suffix in (".yaml", ".json"):
        path = tmp_path_factory.mktemp("pods") / f"p{suffix}"
        path.write_bytes(data)
        try:
            read_pods_file(str(path))
        except MeshaccelError as e:
            assert one_line(e).startswith(f"--pods-file {path}")


def test_pods_file_with_one_bad_entry_serves_the_others(tmp_path):
    text = yaml.safe_dump(
        {
            "pods": [
                {"name": "good-1", "ips": ["10.244.1.5"], "netns": "/run/netns/a"},
                {"name": "broken", "ips": "10.244.1.6", "netns": "/run/netns/b"},
                {"name": "good-2", "ips": ["FD00::7"], "pid": 7},
                {"name": "bad-ip", "ips": ["10.244.1.300"], "pid": 8},
            ]
        }
    )
    path, specs, errors = write_and_read(tmp_path, text)
    assert [s.name for s in specs] == ["default/good-1", "default/good-2"]
    assert specs[1].ips == ("fd00::7",)  # as the datapath records it
    assert [str(e) for e in errors] == [
        f"--pods-file {path}: pods[1] (default/broken): ips must be a list of addresses",
        f'--pods-file {path}: pods[3] (default/bad-ip): ips "10.244.1.300": not an IP address',
    ]
    with pytest.raises(MeshaccelError, match=r"pods\[1\] \(default/broken\): ips"):
        read_pods_file(path)  # without an errors list: the first bad entry is raised


@pytest.mark.parametrize(
    "ip,why",
    [
        ("fe80::1%eth0", "not a pod address (an address with a zone)"),
        ("127.0.0.1", "not a pod address (loopback/unspecified/multicast)"),
        ("::", "not a pod address (loopback/unspecified/multicast)"),
        ("10.0.0.1/32", "not an IP address"),
        # stored as 10.0.0.1 (the datapath's form of IPv4): a second IPv4 address in the
        # pod's IPv6 slot, and ::ffff:0:0 slipped past the check for 0.0.0.0
        ("::ffff:10.0.0.1", "not a pod address (an IPv4-mapped IPv6 address: give the IPv4 one)"),
        ("::ffff:0:0", "not a pod address (an IPv4-mapped IPv6 address: give the IPv4 one)"),
    ],
)
def test_pod_addresses_that_are_not_a_pods(tmp_path, ip, why):
    # a zone was dropped when the address was registered, so the registered pod never
    # matched its spec: the reconciler removed and re-added it at every relist
    with pytest.raises(MeshaccelError) as e:
        pods._ips([ip])
    assert str(e.value) == f"--ip {ip}: {why}"
    item = {"name": "p", "ips": [ip], "pid": 1}
    path, specs, errors = write_and_read(tmp_path, yaml.safe_dump({"pods": [item]}))
    assert [str(e) for e in errors] == [
        f'--pods-file {path}: pods[0] (default/p): ips "{ip}": {why}'
    ]
    with pytest.raises(MeshaccelError) as e:
        pod_spec(make_pod("web", ips=[ip]), lambda p: "/run/netns/x")
    assert str(e.value) == f'pod default/web: status.podIPs "{ip}": {why}'


def test_pods_file_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    path = tmp_path / "pods.yaml"
    path.write_bytes(b"pods: []\n# \xff\n")
    with pytest.raises(MeshaccelError, match="not valid YAML/JSON"):
        read_pods_file(str(path))


def test_pods_file_nested_too_deep_is_refused_in_one_line(tmp_path):
    path = tmp_path / "pods.json"
    path.write_text('{"pods": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(MeshaccelError, match="not valid YAML/JSON"):
        read_pods_file(str(path))


# ---------------------------------------------------------------- Kubernetes pod objects

POD_FIELDS = [
    ("metadata",),
    ("metadata", "name"),
    ("metadata", "namespace"),
    ("metadata", "uid"),
    ("metadata", "annotations"),
    ("metadata", "labels"),
    ("spec",),
    ("spec", "containers"),
    ("spec", "initContainers"),
    ("spec", "hostNetwork"),
    ("status",),
    ("status", "phase"),
    ("status", "podIP"),
    ("status", "podIPs"),
]


@st.composite
def pod_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A pod as the API would serve it, with some fields replaced by anything at all."""
    ips = draw(st.sampled_from([["10.244.1.5"], ["10.244.1.5", "fd00::5"], ["FD00::5"]]))
    annotations = draw(st.dictionaries(st.sampled_from(ANNOTATION_KEYS), annotation_values))
    pod = json.loads(json.dumps(make_pod("web", ips=ips, annotations=annotations)))
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(POD_FIELDS))
        where = pod
        for key in path[:-1]:
            where = where.get(key) if isinstance(where, dict) else None
        if isinstance(where, dict):
            value = json_values | st.lists(
                st.fixed_dictionaries({"ip": json_values | cidr_texts()}), max_size=3
            )
            where[path[-1]] = draw(value)
    return pod


@PROPS
@given(pod_objects())
def test_pod_objects_give_a_spec_none_or_a_one_line_error(pod):
    try:
        spec = pod_spec(pod, lambda p: "/run/netns/x")
    except MeshaccelError as e:
        msg = one_line(e)
        assert msg.startswith("pod "), msg
        return
    if spec is not None:
        assert spec.ips and all(str(ipaddress.ip_address(ip)) == ip for ip in spec.ips)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in spec.annotations.items())


def test_broken_pod_object_is_named_with_its_field():
    pod = make_pod("web", namespace="shop")
    pod["metadata"]["annotations"] = ["not", "a", "mapping"]
    with pytest.raises(MeshaccelError, match=r"^pod shop/web: metadata.annotations: "):
        pod_spec(pod, lambda p: "/run/netns/x")
    pod = make_pod("web", namespace="shop")
    pod["status"]["podIPs"] = [{"ip": 10}]
    with pytest.raises(MeshaccelError, match=r"^pod shop/web: status.podIPs: "):
        pod_spec(pod, lambda p: "/run/netns/x")
    pod = make_pod("web", namespace="shop", ips=["10.244.1.300"])
    with pytest.raises(MeshaccelError, match=r'^pod shop/web: status.podIPs "10.244.1.300": '):
        pod_spec(pod, lambda p: "/run/netns/x")


def test_pod_addresses_are_normalized():
    spec = pod_spec(make_pod("web", ips=["FD00:0::5"]), lambda p: "/run/netns/x")
    assert spec is not None and spec.ips == ("fd00::5",)
