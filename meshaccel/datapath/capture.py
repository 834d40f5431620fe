"""What to capture, in istio-iptables' terms: the flags of `istio-iptables` (REDIRECT
mode) and Istio's per-pod `traffic.sidecar.istio.io/*` annotations, parsed into one
CaptureConfig that both the eBPF datapath and the iptables mode implement."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from meshaccel.errors import MeshaccelError, one_line

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


# ======================================================================================
# istio-iptables flags and Istio's per-pod annotations -> CaptureConfig
#
# Sources (istio/istio, paths as in the repository):
#   tools/istio-iptables/pkg/cmd/root.go           flag names, short forms, which are bool
#   tools/istio-iptables/pkg/constants/constants.go long flag names
#   tools/common/config/config.go                  DefaultConfig, FillConfigFromEnvironment
#   tools/common/config/types.go                   Split: "," separated, empty items dropped
#   tools/istio-iptables/pkg/capture/run.go        what each value means (rules)
#   manifests/.../files/injection-template.yaml    annotations -> istio-init args
#   pkg/kube/inject/template.go (excludeInboundPort), pkg/kube/inject/validate.go
#   cni/pkg/plugin/sidecar_redirect.go             the same annotations under CNI
# ======================================================================================

# The args the sidecar injector gives istio-init when a pod has no traffic annotations
# (injection-template.yaml: -d is "15090,15021," + the status port 15020).
ISTIO_INJECTION_DEFAULT_ARGS = (
    "-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x \"\" -b '*' -d 15090,15021,15020"
)

DEFAULT_PROXY_UID = 1337  # root.go: uid of user $ENVOY_USER (istio-proxy), else 1337
INBOUND_TUNNEL_PORT = 15008  # -e: never captured inbound, nor in the proxy's own-pod-IP rule
STATUS_PORT = 15020  # pilot-agent status port (values.global.proxy.statusPort)
# Ports the injector always adds to -d: Envoy's Prometheus port and the health port.
INJECTOR_EXCLUDED_INBOUND_PORTS = (15090, 15021)

TRAFFIC_PREFIX = "traffic.sidecar.istio.io/"
STATUS_PORT_ANNOTATION = "status.sidecar.istio.io/port"
INTERCEPTION_MODE_ANNOTATION = "sidecar.istio.io/interceptionMode"

_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel; not a real owner


class CaptureError(MeshaccelError):
    """An istio-iptables flag or Istio annotation meshaccel cannot accept; the message
    names the flag or annotation and the value (on one line: a line break or other control
    character in the value is shown escaped)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


# --------------------------------------------------------------------------------------
# The flags of istio-iptables and what meshaccel does with each.
#
#  flag (long / short)                      meshaccel  why
#  ---------------------------------------  ---------  ------------------------------------
#  --envoy-port -p                          field      proxy_port (default 15001)
#  --inbound-capture-port -z                field      inbound_port (default 15006)
#  --proxy-uid -u                           field      proxy_uids (default 1337, see below)
#  --proxy-gid -g                           field      proxy_gids (default: same as -u)
#  --istio-inbound-interception-mode -m     field      REDIRECT (default); TPROXY -> error
#  --istio-service-cidr -i                  field      include_outbound_cidrs ('*' allowed)
#  --istio-service-exclude-cidr -x          field      exclude_outbound_cidrs
#  --istio-inbound-ports -b                 field      include_inbound_ports ('*' allowed)
#  --istio-local-exclude-ports -d           field      exclude_inbound_ports
#  --istio-outbound-ports -q                field      include_outbound_ports
#  --istio-local-outbound-ports-exclude -o  field      exclude_outbound_ports
#  --inbound-tunnel-port -e                 15008 only INBOUND_TUNNEL_PORT is fixed; other
#                                                      values would move the exemption
#  --istio-inbound-tproxy-mark -t           ignored    used by TPROXY mode only
#  --istio-inbound-tproxy-route-table -r    ignored    used by TPROXY mode only
#  --run-validation                         ignored    probes the installed rules afterwards
#  --iptables-probe-port, --probe-timeout   ignored    settings of that probe
#  --drop-invalid                           ignored    drops conntrack-INVALID packets of
#                                                      NATed flows; meshaccel does not NAT
#  --dual-stack                             ignored    meshaccel always captures v4 and v6
#  --capture-all-dns                        ignored    no effect without --redirect-dns
#  --network-namespace                      ignored    meshaccel gets the netns from pod add
#  --cni-mode, --host-nsenter-exec,         ignored    how istio-iptables enters the netns,
#  --reconcile, --force-apply,                         locks, reconciles, which backend or
#  --native-nftables, --force-iptables-binary,         binary it uses: same rules either way
#  --force-legacy-iptables, --restore-format -f,
#  --iptables-trace-logging                            (adds LOG rules only)
#  --log_output_level, --log_as_json, ...   ignored    istio-iptables' own logging (the
#                                                      injector adds --log_output_level)
#  --redirect-dns                           error      DNS capture to istio-agent :15053 is
#                                                      not implemented (ok if =false)
#  --kube-virt-interfaces -k                error      not implemented (ok if empty)
#  --istio-exclude-interfaces -c            error      not implemented (ok if empty)
#  --dry-run -n, --skip-rule-apply,         error      istio-iptables would install no
#  --cleanup-only, --help -h                           capture at all (ok if =false)
#  anything else                            error      unknown flag
#
# Parsing follows spf13/pflag (what istio-iptables uses): -p 1, -p1, -p=1, --envoy-port 1,
# --envoy-port=1; a value flag takes the next argument whatever it looks like; bool flags
# take no separate argument (--dry-run=false only); the last occurrence of a flag wins;
# "--" ends the flags. Environment variables istio-iptables also reads (ENVOY_PORT-style
# BindEnv names, ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR, ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE])
# are not modelled: their defaults are assumed.
# Stricter than istio-iptables on purpose: it skips an unparsable CIDR with a warning and
# passes ports to iptables unchecked; here both are errors.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Flag:
    long: str
    short: str | None
    takes_value: bool
    action: Literal["field", "ignore", "reject", "tunnel"]
    field: str = ""  # for action "field"
    why: str = ""  # for action "reject"


_FLAGS: tuple[_Flag, ...] = (
    _Flag("envoy-port", "p", True, "field", "proxy_port"),
    _Flag("inbound-capture-port", "z", True, "field", "inbound_port"),
    _Flag("proxy-uid", "u", True, "field", "proxy_uids"),
    _Flag("proxy-gid", "g", True, "field", "proxy_gids"),
    _Flag("istio-inbound-interception-mode", "m", True, "field", "mode"),
    _Flag("istio-service-cidr", "i", True, "field", "include_outbound_cidrs"),
    _Flag("istio-service-exclude-cidr", "x", True, "field", "exclude_outbound_cidrs"),
    _Flag("istio-inbound-ports", "b", True, "field", "include_inbound_ports"),
    _Flag("istio-local-exclude-ports", "d", True, "field", "exclude_inbound_ports"),
    _Flag("istio-outbound-ports", "q", True, "field", "include_outbound_ports"),
    _Flag("istio-local-outbound-ports-exclude", "o", True, "field", "exclude_outbound_ports"),
    _Flag("inbound-tunnel-port", "e", True, "tunnel"),
    _Flag("istio-inbound-tproxy-mark", "t", True, "ignore"),
    _Flag("istio-inbound-tproxy-route-table", "r", True, "ignore"),
    _Flag("run-validation", None, False, "ignore"),
    _Flag("iptables-probe-port", None, True, "ignore"),
    _Flag("probe-timeout", None, True, "ignore"),
    _Flag("drop-invalid", None, False, "ignore"),
    _Flag("dual-stack", None, False, "ignore"),
    _Flag("capture-all-dns", None, False, "ignore"),
    _Flag("network-namespace", None, True, "ignore"),
    _Flag("cni-mode", None, False, "ignore"),
    _Flag("host-nsenter-exec", None, False, "ignore"),
    _Flag("reconcile", None, False, "ignore"),
    _Flag("force-apply", None, False, "ignore"),
    _Flag("native-nftables", None, False, "ignore"),
    _Flag("force-iptables-binary", None, True, "ignore"),
    _Flag("force-legacy-iptables", None, False, "ignore"),
    _Flag("restore-format", "f", False, "ignore"),
    _Flag("iptables-trace-logging", None, False, "ignore"),
    _Flag("log_as_json", None, False, "ignore"),
    *(
        _Flag(f"log_{name}", None, True, "ignore")
        for name in (
            "output_level", "caller", "stacktrace_level", "target",
            "rotate", "rotate_max_age", "rotate_max_backups", "rotate_max_size",
        )
    ),  # fmt: skip
    _Flag("redirect-dns", None, False, "reject",
          why="DNS capture to istio-agent :15053 is not implemented"),
    _Flag("kube-virt-interfaces", "k", True, "reject",
          why="rerouting virtual interfaces' inbound traffic is not implemented"),
    _Flag("istio-exclude-interfaces", "c", True, "reject",
          why="excluding interfaces is not implemented"),
    _Flag("dry-run", "n", False, "reject", why="istio-iptables would install nothing"),
    _Flag("skip-rule-apply", None, False, "reject",
          why="istio-iptables would install nothing (istio-validation args under Istio CNI)"),
    _Flag("cleanup-only", None, False, "reject", why="istio-iptables would only remove rules"),
    _Flag("help", "h", False, "reject", why="istio-iptables would only print its usage"),
)  # fmt: skip
_BY_LONG = {f.long: f for f in _FLAGS}
_BY_SHORT = {f.short: f for f in _FLAGS if f.short}
_FIELD_FLAG = {f.field: f for f in _FLAGS if f.action == "field"}

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # Go's strconv.ParseBool
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_istio_args(args: str | list[str]) -> CaptureConfig:
    """The CaptureConfig for istio-iptables' arguments: the shell-quoted string from an
    istio-init container (optionally starting with `istio-iptables` or `pilot-agent
    istio-iptables`) or an argv list. Absent flags take istio-iptables' defaults."""
    argv = _split_args(args)
    values = _parse_flags(argv)  # flag -> (spelling used, raw value); last one wins

    for flag, (shown, raw) in values.items():
        # a list flag is "on" when non-empty; a bool is checked even if ignored (pflag is)
        on = bool(raw.strip()) if flag.takes_value else parse_bool(shown, raw)
        if flag.action == "reject" and on:
            value = f' "{raw}"' if flag.takes_value else ""
            raise CaptureError(f"{shown}{value}: not supported ({flag.why})")
        if flag.action == "tunnel" and _port(shown, raw) != INBOUND_TUNNEL_PORT:
            raise CaptureError(
                f'{shown} "{raw}": only the default tunnel port {INBOUND_TUNNEL_PORT} is supported'
            )

    def get(field: str) -> tuple[str, str] | None:
        return values.get(_FIELD_FLAG[field])

    kwargs: dict[str, object] = {}
    for field in ("proxy_port", "inbound_port"):
        if (given := get(field)) is not None:
            kwargs[field] = _port(*given)
    uids = (DEFAULT_PROXY_UID,)
    if (given := get("proxy_uids")) is not None and given[1].strip():
        uids = _ids(*given, kind="uid")  # -u "" means "not given" (root.go: ProxyUID == "")
    gids = uids  # -g defaults to -u (FillConfigFromEnvironment)
    if (given := get("proxy_gids")) is not None and given[1].strip():
        gids = _ids(*given, kind="gid")
    kwargs.update(proxy_uids=uids, proxy_gids=gids)
    if (given := get("mode")) is not None:
        kwargs["mode"] = _mode(*given)
    wildcard_hint = "only -i and -b accept it"
    for field, kind, wildcard in (
        ("include_outbound_cidrs", "cidr", True),
        ("exclude_outbound_cidrs", "cidr", False),
        ("include_inbound_ports", "port", True),
        ("exclude_inbound_ports", "port", False),
        ("include_outbound_ports", "port", False),
        ("exclude_outbound_ports", "port", False),
    ):
        if (given := get(field)) is not None:
            parse = _cidrs if kind == "cidr" else parse_ports
            kwargs[field] = parse(*given, wildcard=wildcard, hint=wildcard_hint)
    return CaptureConfig(**kwargs)  # type: ignore[arg-type]


def to_istio_args(cfg: CaptureConfig) -> list[str]:
    """istio-iptables arguments for cfg (all flags explicit); parse_istio_args() of them
    gives cfg back, and istio-iptables itself accepts them."""
    if cfg.mode != "REDIRECT":
        raise CaptureError(f"-m {cfg.mode}: only REDIRECT mode is supported (TPROXY is not yet)")
    for flag, ids in (("-u", cfg.proxy_uids), ("-g", cfg.proxy_gids)):
        if not ids:  # istio-iptables reads -u "" as "use the default"
            raise CaptureError(f'{flag} "": istio-iptables cannot express an empty list')
    return [
        "-p", str(cfg.proxy_port),
        "-z", str(cfg.inbound_port),
        "-u", _join(cfg.proxy_uids),
        "-g", _join(cfg.proxy_gids),
        "-m", cfg.mode,
        "-i", _join(cfg.include_outbound_cidrs),
        "-x", _join(cfg.exclude_outbound_cidrs),
        "-b", _join(cfg.include_inbound_ports),
        "-d", _join(cfg.exclude_inbound_ports),
        "-q", _join(cfg.include_outbound_ports),
        "-o", _join(cfg.exclude_outbound_ports),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------
# Per-pod annotations.
#
# Under sidecar injection (istio-init) the injector renders them into istio-iptables args
# (injection-template.yaml); under Istio CNI the plugin reads them from the pod
# (cni/pkg/plugin/sidecar_redirect.go). Either way an annotation *replaces* the cluster
# value of its flag, except excludeInboundPorts, which Istio always extends:
#   injector: -d "15090,15021," + excludeInboundPort(statusPort, annotation)
#             (statusPort = status.sidecar.istio.io/port or 15020; "0" adds nothing)
#   CNI:      annotation + ",15020,15021,15090", deduplicated
# so the result is annotation + {15090, 15021, status port}. An empty annotation value
# is an empty list: includeOutboundIPRanges "" and includeInboundPorts "" capture nothing.
#   annotation (traffic.sidecar.istio.io/...)  flag  field
#   includeOutboundIPRanges                    -i    include_outbound_cidrs ('*' allowed)
#   excludeOutboundIPRanges                    -x    exclude_outbound_cidrs
#   includeInboundPorts                        -b    include_inbound_ports ('*' allowed)
#   excludeInboundPorts                        -d    exclude_inbound_ports (+15090,15021,15020)
#   includeOutboundPorts                       -q    include_outbound_ports
#   excludeOutboundPorts                       -o    exclude_outbound_ports
#   kubevirtInterfaces, excludeInterfaces      -k/-c error unless empty (not implemented)
#   any other traffic.sidecar.istio.io/* key         error (unknown)
# Also read, because Istio derives capture from them: status.sidecar.istio.io/port (see
# above), sidecar.istio.io/interceptionMode (REDIRECT ok; TPROXY and NONE are errors: NONE
# means Istio captures nothing for the pod), istio.io/reroute-virtual-interfaces (as -k).
# Everything else is ignored.
# --------------------------------------------------------------------------------------

_ANNOTATION_FIELDS: dict[str, tuple[str, str, bool]] = {  # key -> (field, kind, wildcard)
    TRAFFIC_PREFIX + "includeOutboundIPRanges": ("include_outbound_cidrs", "cidr", True),
    TRAFFIC_PREFIX + "excludeOutboundIPRanges": ("exclude_outbound_cidrs", "cidr", False),
    TRAFFIC_PREFIX + "includeInboundPorts": ("include_inbound_ports", "port", True),
    TRAFFIC_PREFIX + "excludeInboundPorts": ("exclude_inbound_ports", "port", False),
    TRAFFIC_PREFIX + "includeOutboundPorts": ("include_outbound_ports", "port", False),
    TRAFFIC_PREFIX + "excludeOutboundPorts": ("exclude_outbound_ports", "port", False),
}
_UNSUPPORTED_ANNOTATIONS = {
    TRAFFIC_PREFIX + "kubevirtInterfaces": "rerouting virtual interfaces is not implemented",
    "istio.io/reroute-virtual-interfaces": "rerouting virtual interfaces is not implemented",
    TRAFFIC_PREFIX + "excludeInterfaces": "excluding interfaces is not implemented",
}
_EXCLUDE_INBOUND = TRAFFIC_PREFIX + "excludeInboundPorts"


def apply_annotations(base: CaptureConfig, annotations: Mapping[str, str]) -> CaptureConfig:
    """base (the cluster-wide args, e.g. the seed's) with a pod's Istio annotations
    applied the way Istio's injector and CNI plugin apply them."""
    changes: dict[str, object] = {}
    hint = "only includeOutboundIPRanges and includeInboundPorts accept it"
    for key in sorted(annotations):
        value = annotations[key]
        if key in _ANNOTATION_FIELDS:
            field, kind, wildcard = _ANNOTATION_FIELDS[key]
            parse = _cidrs if kind == "cidr" else parse_ports
            changes[field] = parse(key, value, wildcard=wildcard, hint=hint)
        elif key in _UNSUPPORTED_ANNOTATIONS:
            if value.strip():
                raise CaptureError(
                    f'{key} "{value}": not supported ({_UNSUPPORTED_ANNOTATIONS[key]})'
                )
        elif key.startswith(TRAFFIC_PREFIX):
            known = ", ".join(k.removeprefix(TRAFFIC_PREFIX) for k in _ANNOTATION_FIELDS)
            raise CaptureError(f"{key}: unknown annotation (meshaccel knows {known})")
        elif key == INTERCEPTION_MODE_ANNOTATION:
            if value.strip() == "NONE":
                raise CaptureError(
                    f'{key} "{value}": Istio captures nothing for this pod; do not add it'
                )
            changes["mode"] = _mode(key, value)

    status_raw = annotations.get(STATUS_PORT_ANNOTATION)
    if _EXCLUDE_INBOUND in annotations or status_raw is not None:
        status = STATUS_PORT
        if status_raw is not None:
            status = _port(STATUS_PORT_ANNOTATION, status_raw, allow_zero=True)
        if _EXCLUDE_INBOUND in annotations:
            own = changes["exclude_inbound_ports"]
        else:  # only the status port moved: keep base's own ports, drop its default status
            own = tuple(p for p in base.exclude_inbound_ports if p != STATUS_PORT)
        extra = (status,) if status else ()
        merged = (*INJECTOR_EXCLUDED_INBOUND_PORTS, *own, *extra)  # type: ignore[misc]
        changes["exclude_inbound_ports"] = _unique(merged)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _split_args(args: str | list[str]) -> list[str]:
    if isinstance(args, str):
        try:
            argv = shlex.split(args)
        except ValueError as e:
            raise CaptureError(f"cannot split the istio-iptables arguments {args!r}: {e}") from e
    else:
        argv = list(args)
    # The container's args start with the (sub)command: [pilot-agent] istio-iptables ...
    if argv and os.path.basename(argv[0]) == "pilot-agent":
        argv = argv[1:]
    if argv and os.path.basename(argv[0]) == "istio-iptables":
        argv = argv[1:]
    return argv


def _parse_flags(argv: list[str]) -> dict[_Flag, tuple[str, str]]:
    """pflag's parsing: flag -> (the spelling used, raw value), the last occurrence winning."""
    values: dict[_Flag, tuple[str, str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            if i < len(argv):
                raise CaptureError(f'unexpected argument "{argv[i]}" (istio-iptables takes flags)')
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            flag = _BY_LONG.get(name)
            shown = "--" + name
            if flag is None:
                raise CaptureError(f"unknown flag {shown}")
            if not eq:
                if not flag.takes_value:
                    value = "true"
                elif i < len(argv):
                    value, i = argv[i], i + 1
                else:
                    raise CaptureError(f"{shown}: missing value")
            values.pop(flag, None)  # keep "last wins" visible in iteration order too
            values[flag] = (shown, value)
        elif arg.startswith("-") and len(arg) > 1:
            shorts = arg[1:]
            while shorts:
                flag = _BY_SHORT.get(shorts[0])
                shown = "-" + shorts[0]
                if flag is None:
                    raise CaptureError(f"unknown flag {shown}")
                if len(shorts) > 2 and shorts[1] == "=":
                    value, shorts = shorts[2:], ""
                elif not flag.takes_value:
                    value, shorts = "true", shorts[1:]
                elif len(shorts) > 1:
                    value, shorts = shorts[1:], ""
                elif i < len(argv):
                    value, shorts, i = argv[i], "", i + 1
                else:
                    raise CaptureError(f"{shown}: missing value")
                values.pop(flag, None)
                values[flag] = (shown, value)
        else:
            raise CaptureError(f'unexpected argument "{arg}" (istio-iptables takes flags)')
    return values


def parse_bool(shown: str, raw: str) -> bool:
    """A bool flag's value as Go's strconv.ParseBool reads it."""
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise CaptureError(f'{shown} "{raw}": not a boolean (true or false)')


def _items(raw: str) -> list[str]:
    """Comma-separated items; spaces around items allowed; empty items dropped (like
    istio-iptables' config.Split, which however keeps the spaces)."""
    return [item.strip() for item in raw.split(",") if item.strip()]


def _port(where: str, text: str, *, allow_zero: bool = False) -> int:
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise CaptureError(f'{where} "{text}": not a port number')
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        allowed = "0-65535" if allow_zero else "1-65535"
        raise CaptureError(f'{where} "{text}": port must be {allowed}')
    return port


def _wild(where: str, raw: str, items: list[str], *, wildcard: bool, hint: str) -> bool:
    if "*" not in items:
        return False
    if not wildcard:
        raise CaptureError(f'{where} "{raw}": "*" is not allowed here ({hint})')
    if len(items) > 1:
        raise CaptureError(f'{where} "{raw}": "*" must be the whole value, not a list item')
    return True


def parse_ports(
    where: str, raw: str, *, wildcard: bool, hint: str
) -> tuple[int, ...] | Literal["*"]:
    """A comma-separated port list (where: the flag or annotation, named in errors); "*"
    only if wildcard (else the error says hint)."""
    items = _items(raw)
    if _wild(where, raw, items, wildcard=wildcard, hint=hint):
        return ALL
    return _unique(_port(where, item) for item in items)


_PREFIX_LEN = re.compile(r"0|[1-9][0-9]{0,2}")


def _cidr(where: str, text: str) -> IPNetwork:
    """A CIDR as Go's netip.ParsePrefix takes it: ADDRESS/BITS, host bits allowed
    (iptables masks them, so 10.0.0.1/8 is 10.0.0.0/8), no zone, no bare address."""
    _, slash, bits = text.partition("/")
    if not slash or "%" in text or not _PREFIX_LEN.fullmatch(bits):
        raise CaptureError(f'{where} "{text}": not a CIDR')
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise CaptureError(f'{where} "{text}": not a CIDR') from None


def _cidrs(
    where: str, raw: str, *, wildcard: bool, hint: str
) -> tuple[IPNetwork, ...] | Literal["*"]:
    items = _items(raw)
    if _wild(where, raw, items, wildcard=wildcard, hint=hint):
        return ALL
    return _unique(_cidr(where, item) for item in items)


def _ids(where: str, raw: str, *, kind: str) -> tuple[int, ...]:
    items = _items(raw)
    if not items:
        raise CaptureError(f'{where} "{raw}": no {kind} given')
    out = []
    for item in items:
        if not item.isascii() or not item.isdigit() or int(item) > _MAX_ID:
            raise CaptureError(f'{where} "{item}": not a numeric {kind} (names are not supported)')
        out.append(int(item))
    return _unique(out)


def _mode(where: str, raw: str) -> str:
    mode = raw.strip()
    if mode in ("", "REDIRECT"):  # istio-iptables treats an empty mode as REDIRECT
        return "REDIRECT"
    if mode == "TPROXY":
        raise CaptureError(f"{where} TPROXY: only REDIRECT mode is supported (TPROXY is not yet)")
    raise CaptureError(f'{where} "{raw}": must be REDIRECT or TPROXY')


def _unique(items: Iterable) -> tuple:  # type: ignore[type-arg]
    return tuple(dict.fromkeys(items))


def _join(value: tuple[object, ...] | Literal["*"]) -> str:
    return ALL if value == ALL else ",".join(map(str, value))
