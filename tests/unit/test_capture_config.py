"""istio-iptables flags and Istio annotations -> CaptureConfig (meshaccel.datapath.capture)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shlex

import pytest

from meshaccel.datapath.capture import (
    ALL,
    ISTIO_INJECTION_DEFAULT_ARGS,
    CaptureConfig,
    CaptureError,
    apply_annotations,
    parse_istio_args,
    to_istio_args,
)
from meshaccel.errors import MeshaccelError
from tests.istio_golden import GOLDEN_DIR, GOLDEN_FLAGS, header_flags

T = "traffic.sidecar.istio.io/"


def net(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


SEED = CaptureConfig(
    proxy_port=15001,
    inbound_port=15006,
    proxy_uids=(1337,),
    proxy_gids=(1337,),
    mode="REDIRECT",
    include_outbound_cidrs=ALL,
    exclude_outbound_cidrs=(),
    include_inbound_ports=ALL,
    exclude_inbound_ports=(15090, 15021, 15020),
    include_outbound_ports=(),
    exclude_outbound_ports=(),
)


# --- defaults and the seed ------------------------------------------------------------


def test_no_flags_gives_istio_iptables_defaults():
    # root.go / DefaultConfig: -p 15001, -z 15006, -u 1337 (istio-proxy), -g = -u, mode ""
    # (REDIRECT); -i, -x, -b, -d, -q, -o default to "" = nothing captured either way.
    cfg = parse_istio_args("")
    assert cfg == CaptureConfig(
        proxy_port=15001,
        inbound_port=15006,
        proxy_uids=(1337,),
        proxy_gids=(1337,),
        mode="REDIRECT",
        include_outbound_cidrs=(),
        exclude_outbound_cidrs=(),
        include_inbound_ports=(),
        exclude_inbound_ports=(),
        include_outbound_ports=(),
        exclude_outbound_ports=(),
    )
    assert cfg == CaptureConfig()  # the dataclass defaults are istio-iptables' defaults
    assert parse_istio_args([]) == cfg


def test_seed_args():
    assert ISTIO_INJECTION_DEFAULT_ARGS == (
        "-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x \"\" -b '*' -d 15090,15021,15020"
    )
    assert parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS) == SEED
    assert parse_istio_args(shlex.split(ISTIO_INJECTION_DEFAULT_ARGS)) == SEED


@pytest.mark.parametrize(
    "prefix",
    ["istio-iptables", "/usr/local/bin/istio-iptables", "pilot-agent istio-iptables"],
)
def test_leading_command_name_is_skipped(prefix):
    assert parse_istio_args(f"{prefix} {ISTIO_INJECTION_DEFAULT_ARGS}") == SEED


def test_injected_container_args_list():
    # args as the injection template renders them (plus its --log_output_level flag)
    args = [
        "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
        "--log_output_level=default:info",
    ]  # fmt: skip
    assert parse_istio_args(args) == SEED


# --- every flag, short and long, in every pflag spelling --------------------------------

FLAG_CASES = [
    # short, long, value, field, expected
    ("p", "envoy-port", "15101", "proxy_port", 15101),
    ("z", "inbound-capture-port", "15106", "inbound_port", 15106),
    ("u", "proxy-uid", "1000", "proxy_uids", (1000,)),
    ("g", "proxy-gid", "2000", "proxy_gids", (2000,)),
    ("m", "istio-inbound-interception-mode", "REDIRECT", "mode", "REDIRECT"),
    ("i", "istio-service-cidr", "10.96.0.0/12", "include_outbound_cidrs", net("10.96.0.0/12")),
    ("x", "istio-service-exclude-cidr", "fd00::/8", "exclude_outbound_cidrs", net("fd00::/8")),
    ("b", "istio-inbound-ports", "9080,9443", "include_inbound_ports", (9080, 9443)),
    ("d", "istio-local-exclude-ports", "22", "exclude_inbound_ports", (22,)),
    ("q", "istio-outbound-ports", "5432", "include_outbound_ports", (5432,)),
    ("o", "istio-local-outbound-ports-exclude", "3306", "exclude_outbound_ports", (3306,)),
]
SPELLINGS = [
    ("-{s} {v}", "short"),
    ("-{s}{v}", "short-attached"),
    ("-{s}={v}", "short-equals"),
    ("--{l} {v}", "long"),
    ("--{l}={v}", "long-equals"),
]


@pytest.mark.parametrize("spelling", [s for s, _ in SPELLINGS], ids=[i for _, i in SPELLINGS])
@pytest.mark.parametrize(
    "short,long,value,field,expected", FLAG_CASES, ids=[c[1] for c in FLAG_CASES]
)
def test_flag_spellings(spelling, short, long, value, field, expected):
    cfg = parse_istio_args(spelling.format(s=short, l=long, v=value))
    assert getattr(cfg, field) == expected
    # nothing else moved (except -g, which follows -u)
    others = {f.name for f in dataclasses.fields(CaptureConfig)} - {field}
    if field == "proxy_uids":
        others.discard("proxy_gids")
    for name in others:
        assert getattr(cfg, name) == getattr(CaptureConfig(), name), name


def test_tunnel_port_flag_accepts_only_its_default():
    for args in ("-e 15008", "--inbound-tunnel-port=15008"):
        assert parse_istio_args(args) == CaptureConfig()
    with pytest.raises(CaptureError, match=r'^-e "15009": only the default tunnel port 15008'):
        parse_istio_args("-e 15009")


# --- -u / -g ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,uids,gids",
    [
        ("", (1337,), (1337,)),
        ("-u 1000", (1000,), (1000,)),  # -g defaults to -u
        ("-u 3,4", (3, 4), (3, 4)),  # ... the whole list (ip-range golden: uid 3,4)
        ("-u 3,4 -g 1,2", (3, 4), (1, 2)),
        ("-g 2000", (1337,), (2000,)),
        ("-u ''", (1337,), (1337,)),  # empty = not given (root.go: ProxyUID == "")
        ("-u 1000 -g ''", (1000,), (1000,)),
        ("-u 0", (0,), (0,)),
        ("-u ' 3 , 4 ,'", (3, 4), (3, 4)),
        ("-u 3,3,4", (3, 4), (3, 4)),
    ],
)
def test_owner_ids(args, uids, gids):
    cfg = parse_istio_args(args)
    assert (cfg.proxy_uids, cfg.proxy_gids) == (uids, gids)


# --- lists -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,field,expected",
    [
        ("-d 15090,15021,15020", "exclude_inbound_ports", (15090, 15021, 15020)),
        ("-d '15090, 15021 ,15020'", "exclude_inbound_ports", (15090, 15021, 15020)),
        ("-d 6000,7000,", "exclude_inbound_ports", (6000, 7000)),  # Istio's ipv6-ipnets case
        ("-d ''", "exclude_inbound_ports", ()),
        ("-d ' '", "exclude_inbound_ports", ()),
        ("-d 80,80", "exclude_inbound_ports", (80,)),
        ("-b 32000,31000", "include_inbound_ports", (32000, 31000)),  # order kept
        ("-b '*'", "include_inbound_ports", ALL),
        ("-b ' * '", "include_inbound_ports", ALL),
        ("-b ''", "include_inbound_ports", ()),
        ("-q 1,65535", "include_outbound_ports", (1, 65535)),
        ("-o 0080", "exclude_outbound_ports", (80,)),
        ("-i '*'", "include_outbound_cidrs", ALL),
        ("-i ''", "include_outbound_cidrs", ()),
        ("-i 10.0.0.0/8,fd00::/8", "include_outbound_cidrs", net("10.0.0.0/8", "fd00::/8")),
        ("-i '10.0.0.0/8, 192.168.0.0/16'", "include_outbound_cidrs",
         net("10.0.0.0/8", "192.168.0.0/16")),
        # host bits are accepted (netip.ParsePrefix) and masked (as iptables does)
        ("-i 10.1.2.3/8", "include_outbound_cidrs", net("10.0.0.0/8")),
        ("-i 127.1.2.3/32", "include_outbound_cidrs", net("127.1.2.3/32")),
        ("-x 2001:db8::1/32", "exclude_outbound_cidrs", net("2001:db8::/32")),
        ("-x 0.0.0.0/0,::/0", "exclude_outbound_cidrs", net("0.0.0.0/0", "::/0")),
        ("-x 10.0.0.0/8,10.0.0.0/8", "exclude_outbound_cidrs", net("10.0.0.0/8")),
    ],
)  # fmt: skip
def test_lists(args, field, expected):
    assert getattr(parse_istio_args(args), field) == expected


@pytest.mark.parametrize(
    "args,expected",
    [
        ("-p 1 -p 2", 2),  # pflag: the last occurrence wins
        ("--envoy-port=1 -p 3", 3),
        ("-p 3 --envoy-port 4", 4),
    ],
)
def test_last_flag_wins(args, expected):
    assert parse_istio_args(args).proxy_port == expected


def test_last_flag_wins_for_lists_too():
    assert parse_istio_args("-b 80 -b '*'").include_inbound_ports == ALL
    assert parse_istio_args("-i '*' -i ''").include_outbound_cidrs == ()


def test_double_dash_ends_flags():
    assert parse_istio_args("-p 1 --") == CaptureConfig(proxy_port=1)


# --- flags istio-iptables has that meshaccel ignores or rejects --------------------------


@pytest.mark.parametrize(
    "args",
    [
        "-t 1337", "--istio-inbound-tproxy-mark=1337",
        "-r 133", "--istio-inbound-tproxy-route-table 133",
        "--run-validation", "--run-validation=true",
        "--iptables-probe-port 15002", "--probe-timeout=5s",
        "--drop-invalid", "--dual-stack", "--capture-all-dns",
        "--network-namespace /var/run/netns/x", "--cni-mode", "--host-nsenter-exec",
        "--reconcile", "--force-apply", "--native-nftables",
        "--force-iptables-binary iptables-legacy", "--force-legacy-iptables",
        "-f", "--restore-format=false", "--iptables-trace-logging",
        "--log_output_level=default:info", "--log_output_level default:debug",
        "--log_as_json", "--log_caller=default", "--log_stacktrace_level none",
        "--log_target stdout", "--log_rotate x", "--log_rotate_max_age 1",
        "--log_rotate_max_backups=2", "--log_rotate_max_size 3",
        # unsupported features are fine where they are off
        "--redirect-dns=false", "--dry-run=false", "-n=false", "--skip-rule-apply=0",
        "--cleanup-only=F", "-k ''", "--kube-virt-interfaces=", "-c ''",
        "--redirect-dns --redirect-dns=false",  # last wins
    ],
)  # fmt: skip
def test_harmless_flags_are_ignored(args):
    assert parse_istio_args(args) == CaptureConfig()
    assert parse_istio_args(f"{ISTIO_INJECTION_DEFAULT_ARGS} {args}") == SEED


@pytest.mark.parametrize(
    "args,message",
    [
        ("--redirect-dns", "--redirect-dns: not supported (DNS capture"),
        ("--redirect-dns=true", "--redirect-dns: not supported (DNS capture"),
        ("--redirect-dns --capture-all-dns", "--redirect-dns: not supported"),
        ("-k eth1,eth2", '-k "eth1,eth2": not supported (rerouting virtual interfaces'),
        ("--kube-virt-interfaces=eth1", '--kube-virt-interfaces "eth1": not supported'),
        ("-c eth1", '-c "eth1": not supported (excluding interfaces'),
        ("--istio-exclude-interfaces eth1", '--istio-exclude-interfaces "eth1": not supported'),
        ("-n", "-n: not supported (istio-iptables would install nothing)"),
        ("--dry-run", "--dry-run: not supported"),
        ("--skip-rule-apply", "--skip-rule-apply: not supported (istio-iptables would install"),
        ("--cleanup-only", "--cleanup-only: not supported"),
        ("-h", "-h: not supported"),
        ("--help", "--help: not supported"),
    ],
)
def test_unsupported_flags_are_errors(args, message):
    with pytest.raises(CaptureError) as e:
        parse_istio_args(f"{ISTIO_INJECTION_DEFAULT_ARGS} {args}")
    assert str(e.value).startswith(message)


# --- error messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        # bad CIDRs
        ("-i 10.0.0.0/33", '-i "10.0.0.0/33": not a CIDR'),
        ("-x 10.0.0.0/33", '-x "10.0.0.0/33": not a CIDR'),
        ("--istio-service-cidr 10.0.0.0/33", '--istio-service-cidr "10.0.0.0/33": not a CIDR'),
        ("-i 10.0.0.0/8,10.0.0.300/8", '-i "10.0.0.300/8": not a CIDR'),
        ("-i 10.0.0.1", '-i "10.0.0.1": not a CIDR'),  # netip.ParsePrefix needs the /
        ("-i 10.0.0.0/255.0.0.0", '-i "10.0.0.0/255.0.0.0": not a CIDR'),
        ("-i 10.0.0.0/08", '-i "10.0.0.0/08": not a CIDR'),
        ("-x fe80::1%eth0/64", '-x "fe80::1%eth0/64": not a CIDR'),
        ("-x 2001:db8::/129", '-x "2001:db8::/129": not a CIDR'),
        ("-x nope", '-x "nope": not a CIDR'),
        # ports: 0, 65536, not numeric, every port flag
        ("-d 0", '-d "0": port must be 1-65535'),
        ("-d 65536", '-d "65536": port must be 1-65535'),
        ("-d 15090,0", '-d "0": port must be 1-65535'),
        ("-b 0", '-b "0": port must be 1-65535'),
        ("-q 65536", '-q "65536": port must be 1-65535'),
        ("-o 0", '-o "0": port must be 1-65535'),
        ("-p 0", '-p "0": port must be 1-65535'),
        ("-z 65536", '-z "65536": port must be 1-65535'),
        ("--envoy-port 99999", '--envoy-port "99999": port must be 1-65535'),
        ("-p abc", '-p "abc": not a port number'),
        ("-p ''", '-p "": not a port number'),
        ("-p -1", '-p "-1": not a port number'),
        ("-p +80", '-p "+80": not a port number'),
        ("-d http", '-d "http": not a port number'),
        ("-b 80-90", '-b "80-90": not a port number'),
        ("-o 1.5", '-o "1.5": not a port number'),
        # "*" only where Istio allows it (-i, -b), and only as the whole value
        ("-x '*'", '-x "*": "*" is not allowed here (only -i and -b accept it)'),
        ("-d '*'", '-d "*": "*" is not allowed here'),
        ("-q '*'", '-q "*": "*" is not allowed here'),
        ("-o '*'", '-o "*": "*" is not allowed here'),
        ("-i '*,10.0.0.0/8'", '-i "*,10.0.0.0/8": "*" must be the whole value'),
        ("-b '80,*'", '-b "80,*": "*" must be the whole value'),
        # mode
        ("-m TPROXY", "-m TPROXY: only REDIRECT mode is supported (TPROXY is not yet)"),
        ("--istio-inbound-interception-mode=TPROXY",
         "--istio-inbound-interception-mode TPROXY: only REDIRECT mode is supported"),
        ("-m redirect", '-m "redirect": must be REDIRECT or TPROXY'),
        ("-m NONE", '-m "NONE": must be REDIRECT or TPROXY'),
        # owners
        ("-u istio-proxy", '-u "istio-proxy": not a numeric uid (names are not supported)'),
        ("-g wheel", '-g "wheel": not a numeric gid'),
        ("-u 1000-2000", '-u "1000-2000": not a numeric uid'),
        ("-u 4294967295", '-u "4294967295": not a numeric uid'),
        ("-u ,", '-u ",": no uid given'),
        # unknown flags, missing values, stray arguments
        ("--foo", "unknown flag --foo"),
        ("--foo=bar", "unknown flag --foo"),
        ("-y 1", "unknown flag -y"),
        ("-py", '-p "y": not a port number'),  # pflag: the rest of the cluster is the value
        ("-nk eth1", "-n: not supported"),  # bool shorthands combine: -n, then -k eth1
        ("-p", "-p: missing value"),
        ("-p 15001 -i", "-i: missing value"),
        ("--envoy-port", "--envoy-port: missing value"),
        ("15001", 'unexpected argument "15001"'),
        ("-p 15001 15006", 'unexpected argument "15006"'),
        ("-p 1 -- -z 2", 'unexpected argument "-z"'),
        ("--dual-stack=maybe", '--dual-stack "maybe": not a boolean'),
        ("-p '15001", "cannot split the istio-iptables arguments"),
    ],
)  # fmt: skip
def test_errors(args, message):
    with pytest.raises(CaptureError) as e:
        parse_istio_args(args)
    assert str(e.value).startswith(message), str(e.value)


def test_a_value_flag_takes_the_next_argument_whatever_it_is():
    # pflag semantics: `-x -b` sets -x to "-b"; the error names that value
    with pytest.raises(CaptureError, match=r'^-x "-b": not a CIDR'):
        parse_istio_args("-i '*' -x -b")


def test_capture_error_is_the_project_error():
    assert issubclass(CaptureError, MeshaccelError)


def test_every_golden_file_has_a_flag_set():
    assert {p.name for p in GOLDEN_DIR.glob("*.rules")} == set(GOLDEN_FLAGS)


@pytest.mark.parametrize("name", sorted(GOLDEN_FLAGS))
def test_golden_header_flags(name):
    flags = header_flags(GOLDEN_DIR / name)
    if flags is not None:
        assert parse_istio_args(flags) == parse_istio_args(GOLDEN_FLAGS[name][0])


@pytest.mark.parametrize("name", sorted(GOLDEN_FLAGS))
def test_golden_flag_sets_parse_or_fail_clearly(name):
    flags, error = GOLDEN_FLAGS[name]
    if error is None:
        parse_istio_args(flags)
    else:
        with pytest.raises(CaptureError) as e:
            parse_istio_args(flags)
        assert str(e.value).startswith(error)


def observed(rules: str) -> dict[str, object]:
    """What the nat rules of a REDIRECT-mode golden file say about each CaptureConfig
    field (order as in the file)."""
    lines = [ln.strip() for ln in rules.splitlines() if ln.startswith("-A ")]

    def all_of(pattern: str) -> list[str]:
        return [m.group(1) for ln in lines if (m := re.fullmatch(pattern, ln))]

    def ports(pattern: str) -> tuple[int, ...]:
        return tuple(dict.fromkeys(int(p) for p in all_of(pattern)))

    out: dict[str, object] = {
        "proxy_port": int(all_of(r"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports (\d+)")[0]),
        "inbound_port": int(all_of(r"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports (\d+)")[0]),
        "proxy_uids": ports(r"-A ISTIO_OUTPUT -m owner --uid-owner (\d+) -j RETURN"),
        "proxy_gids": ports(r"-A ISTIO_OUTPUT -m owner --gid-owner (\d+) -j RETURN"),
        "exclude_outbound_ports": ports(r"-A ISTIO_OUTPUT -p tcp --dport (\d+) -j RETURN"),
        "include_outbound_ports": ports(r"-A ISTIO_OUTPUT -p tcp --dport (\d+) -j ISTIO_REDIRECT"),
    }
    # ISTIO_INBOUND: the tunnel-port RETURN comes first, -d RETURNs after the PREROUTING jump
    jump = "-A PREROUTING -p tcp -j ISTIO_INBOUND"
    after_jump = lines[lines.index(jump) + 1 :] if jump in lines else []
    in_return = r"-A ISTIO_INBOUND -p tcp --dport (\d+) -j RETURN"
    if jump not in lines:
        out["include_inbound_ports"] = ()
    elif "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" in lines:
        out["include_inbound_ports"] = ALL
        out["exclude_inbound_ports"] = tuple(
            int(m.group(1)) for ln in after_jump if (m := re.fullmatch(in_return, ln))
        )
    else:
        out["include_inbound_ports"] = ports(
            r"-A ISTIO_INBOUND -p tcp --dport (\d+) -j ISTIO_IN_REDIRECT"
        )
    # ISTIO_OUTPUT -d RETURNs: the first is the host loopback CIDR, the rest are -x
    out["exclude_outbound_cidrs"] = net(*all_of(r"-A ISTIO_OUTPUT -d (\S+) -j RETURN")[1:])
    if "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in lines:
        out["include_outbound_cidrs"] = ALL
    else:
        out["include_outbound_cidrs"] = net(*all_of(r"-A ISTIO_OUTPUT -d (\S+) -j ISTIO_REDIRECT"))
    out["app_to_own_pod_ip_returns"] = any("-o lo -m owner ! --uid-owner" in ln for ln in lines)
    return out


@pytest.mark.parametrize("name", sorted(n for n, (_, err) in GOLDEN_FLAGS.items() if not err))
def test_golden_rules_agree_with_parsed_flags(name):
    """Each supported golden file's rules are what its flags mean in CaptureConfig terms."""
    cfg = parse_istio_args(GOLDEN_FLAGS[name][0])
    seen = observed((GOLDEN_DIR / name).read_text())
    for field, value in seen.items():
        if field == "app_to_own_pod_ip_returns":
            # run.go: the "-o lo, not the proxy -> RETURN" rule is left out when an -i
            # CIDR's address is a loopback address
            include = cfg.include_outbound_cidrs
            loopback = include != ALL and any(n.network_address.is_loopback for n in include)
            assert value is not loopback
        else:
            assert getattr(cfg, field) == value, field


# --- annotations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "annotations,changes",
    [
        ({}, {}),
        # each annotation replaces its flag's value
        ({T + "includeOutboundIPRanges": "10.96.0.0/12,fd00::/8"},
         {"include_outbound_cidrs": net("10.96.0.0/12", "fd00::/8")}),
        ({T + "includeOutboundIPRanges": "*"}, {"include_outbound_cidrs": ALL}),
        ({T + "includeOutboundIPRanges": ""}, {"include_outbound_cidrs": ()}),  # no capture
        ({T + "excludeOutboundIPRanges": "169.254.169.254/32"},
         {"exclude_outbound_cidrs": net("169.254.169.254/32")}),
        ({T + "excludeOutboundIPRanges": ""}, {"exclude_outbound_cidrs": ()}),
        ({T + "includeInboundPorts": "9080, 9443"}, {"include_inbound_ports": (9080, 9443)}),
        ({T + "includeInboundPorts": "*"}, {"include_inbound_ports": ALL}),
        ({T + "includeInboundPorts": ""}, {"include_inbound_ports": ()}),  # no inbound capture
        ({T + "includeOutboundPorts": "5432"}, {"include_outbound_ports": (5432,)}),
        ({T + "excludeOutboundPorts": "3306,6379"}, {"exclude_outbound_ports": (3306, 6379)}),
        ({T + "excludeOutboundPorts": ""}, {"exclude_outbound_ports": ()}),
        # excludeInboundPorts: Istio always adds 15090, 15021 and the status port (15020)
        ({T + "excludeInboundPorts": "8080"},
         {"exclude_inbound_ports": (15090, 15021, 8080, 15020)}),
        ({T + "excludeInboundPorts": ""}, {"exclude_inbound_ports": (15090, 15021, 15020)}),
        ({T + "excludeInboundPorts": "15020,22"},
         {"exclude_inbound_ports": (15090, 15021, 15020, 22)}),
        ({T + "excludeInboundPorts": "8080", "status.sidecar.istio.io/port": "15555"},
         {"exclude_inbound_ports": (15090, 15021, 8080, 15555)}),
        ({T + "excludeInboundPorts": "8080", "status.sidecar.istio.io/port": "0"},
         {"exclude_inbound_ports": (15090, 15021, 8080)}),
        ({"status.sidecar.istio.io/port": "15555"},
         {"exclude_inbound_ports": (15090, 15021, 15555)}),
        # interception mode
        ({"sidecar.istio.io/interceptionMode": "REDIRECT"}, {}),
        # unrelated annotations are ignored; unsupported ones are fine when empty
        ({"sidecar.istio.io/inject": "true", "prometheus.io/scrape": "true",
          "sidecar.istio.io/proxyCPU": "100m"}, {}),
        ({T + "kubevirtInterfaces": "", T + "excludeInterfaces": " "}, {}),
        # several at once
        ({T + "includeOutboundIPRanges": "10.0.0.0/8", T + "excludeOutboundIPRanges": "10.1.0.0/16",
          T + "includeInboundPorts": "9080", T + "excludeOutboundPorts": "15020"},
         {"include_outbound_cidrs": net("10.0.0.0/8"), "exclude_outbound_cidrs": net("10.1.0.0/16"),
          "include_inbound_ports": (9080,), "exclude_outbound_ports": (15020,)}),
    ],
)  # fmt: skip
def test_annotations_on_the_seed(annotations, changes):
    assert apply_annotations(SEED, annotations) == dataclasses.replace(SEED, **changes)


def test_annotations_keep_base_settings_they_do_not_name():
    base = parse_istio_args("-p 15101 -z 15106 -u 3 -g 4 -i 10.0.0.0/8 -d 22,15020 -o 25")
    cfg = apply_annotations(base, {T + "includeInboundPorts": "80"})
    assert cfg == dataclasses.replace(base, include_inbound_ports=(80,))
    # a new status port replaces the default one and keeps base's own exclusions (22)
    cfg = apply_annotations(base, {"status.sidecar.istio.io/port": "15555"})
    assert cfg.exclude_inbound_ports == (15090, 15021, 22, 15555)


def test_annotations_reproduce_the_cni_golden_flags():
    # plugin_dryrun_test.go "include-exclude-ports": the CNI turns these annotations into
    # the settings recorded in GOLDEN_FLAGS (exclusion order aside)
    cfg = apply_annotations(
        parse_istio_args(f"{GOLDEN_FLAGS['cni-basic.rules'][0]}"),
        {
            "sidecar.istio.io/status": "true",
            T + "includeInboundPorts": "1111,2222",
            T + "excludeInboundPorts": "3333,4444",
            T + "excludeOutboundPorts": "5555,6666",
        },
    )
    want = parse_istio_args(GOLDEN_FLAGS["cni-include-exclude-ports.rules"][0])
    assert set(cfg.exclude_inbound_ports) == set(want.exclude_inbound_ports)
    assert cfg == dataclasses.replace(want, exclude_inbound_ports=cfg.exclude_inbound_ports)


@pytest.mark.parametrize(
    "annotations,message",
    [
        ({T + "includeOutboundIPRanges": "10.0.0.0/33"},
         f'{T}includeOutboundIPRanges "10.0.0.0/33": not a CIDR'),
        ({T + "excludeOutboundIPRanges": "*"},
         f'{T}excludeOutboundIPRanges "*": "*" is not allowed here (only '
         "includeOutboundIPRanges and includeInboundPorts accept it)"),
        ({T + "excludeInboundPorts": "0"}, f'{T}excludeInboundPorts "0": port must be 1-65535'),
        ({T + "excludeInboundPorts": "65536"},
         f'{T}excludeInboundPorts "65536": port must be 1-65535'),
        ({T + "excludeInboundPorts": "*"}, f'{T}excludeInboundPorts "*": "*" is not allowed'),
        ({T + "includeInboundPorts": "http"}, f'{T}includeInboundPorts "http": not a port'),
        ({T + "includeInboundPorts": "80,*"}, f'{T}includeInboundPorts "80,*": "*" must be'),
        ({T + "includeOutboundPorts": "0"}, f'{T}includeOutboundPorts "0": port must be'),
        ({T + "includeOutboundPorts": "*"}, f'{T}includeOutboundPorts "*": "*" is not allowed'),
        ({T + "excludeOutboundPorts": "99999"}, f'{T}excludeOutboundPorts "99999": port must'),
        ({T + "kubevirtInterfaces": "net1"},
         f'{T}kubevirtInterfaces "net1": not supported (rerouting virtual interfaces'),
        ({"istio.io/reroute-virtual-interfaces": "net1"},
         'istio.io/reroute-virtual-interfaces "net1": not supported'),
        ({T + "excludeInterfaces": "eth1"}, f'{T}excludeInterfaces "eth1": not supported'),
        ({T + "includeOutboundIPranges": "*"},
         f"{T}includeOutboundIPranges: unknown annotation (meshaccel knows "
         "includeOutboundIPRanges, "),
        ({"sidecar.istio.io/interceptionMode": "TPROXY"},
         "sidecar.istio.io/interceptionMode TPROXY: only REDIRECT mode is supported"),
        ({"sidecar.istio.io/interceptionMode": "NONE"},
         'sidecar.istio.io/interceptionMode "NONE": Istio captures nothing for this pod'),
        ({"sidecar.istio.io/interceptionMode": "foo"},
         'sidecar.istio.io/interceptionMode "foo": must be REDIRECT or TPROXY'),
        ({"status.sidecar.istio.io/port": "70000"},
         'status.sidecar.istio.io/port "70000": port must be 0-65535'),
        ({"status.sidecar.istio.io/port": "x"}, 'status.sidecar.istio.io/port "x": not a port'),
    ],
)  # fmt: skip
def test_annotation_errors(annotations, message):
    with pytest.raises(CaptureError) as e:
        apply_annotations(SEED, annotations)
    assert str(e.value).startswith(message), str(e.value)


# --- to_istio_args ---------------------------------------------------------------------


def test_to_istio_args_of_the_seed():
    assert to_istio_args(SEED) == [
        "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-m", "REDIRECT",
        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "-q", "", "-o", "",
    ]  # fmt: skip


ROUND_TRIP = [
    "",
    ISTIO_INJECTION_DEFAULT_ARGS,
    "-p 15101 -z 15106 -u 3,4 -g 1,2 -i 10.0.0.0/8,fd00::/8 -x 10.1.0.0/16,fd00:1::/32"
    " -b 9080,9443 -d 22 -q 5432 -o 3306,6379",
    "-i 127.1.2.3/32 -b '*' -d 15090,15021,15020 -o 15020",
    "-i 10.1.2.3/8 -x 0.0.0.0/0",
    *(flags for flags, error in GOLDEN_FLAGS.values() if error is None),
]


@pytest.mark.parametrize("args", ROUND_TRIP)
def test_round_trip(args):
    cfg = parse_istio_args(args)
    assert parse_istio_args(to_istio_args(cfg)) == cfg
    assert parse_istio_args(shlex.join(to_istio_args(cfg))) == cfg


def test_round_trip_after_annotations():
    cfg = apply_annotations(
        SEED, {T + "excludeInboundPorts": "8080", T + "includeOutboundPorts": "1"}
    )
    assert parse_istio_args(to_istio_args(cfg)) == cfg


@pytest.mark.parametrize(
    "cfg,message",
    [
        (CaptureConfig(mode="TPROXY"), "-m TPROXY: only REDIRECT mode is supported"),
        (CaptureConfig(proxy_uids=()), '-u "": istio-iptables cannot express an empty list'),
        (CaptureConfig(proxy_gids=()), '-g "": istio-iptables cannot express an empty list'),
    ],
)
def test_to_istio_args_refuses_what_the_flags_cannot_say(cfg, message):
    with pytest.raises(CaptureError) as e:
        to_istio_args(cfg)
    assert str(e.value).startswith(message)
