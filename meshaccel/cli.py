"""The `meshaccel` command: parses options and delegates to the package.

Every option can also be given as an environment variable: MESHACCEL_<COMMAND>_<OPTION>,
e.g. MESHACCEL_ATTACH_PROXY_PORT=15001 (click's auto_envvar_prefix).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from meshaccel.datapath import doctor as doctor_mod
from meshaccel.datapath import iptables_mode, loader, neighbors, pods
from meshaccel.datapath.capture import (
    ISTIO_INJECTION_DEFAULT_ARGS,
    apply_annotations,
    parse_istio_args,
)
from meshaccel.datapath.host import check_root
from meshaccel.errors import MeshaccelError, one_line

CONTEXT = {"auto_envvar_prefix": "MESHACCEL", "help_option_names": ["-h", "--help"]}

cgroup_option = click.option(
    "--cgroup",
    type=click.Path(file_okay=False),
    help="cgroup v2 directory whose processes (and descendants) are covered "
    "[default: the root of the cgroup v2 mount, i.e. every process]",
)
bpffs_option = click.option(
    "--bpffs",
    default=loader.DEFAULT_BPFFS,
    show_default=True,
    help="bpffs directory where the datapath's maps and programs are pinned; "
    "one directory per attached datapath",
)
json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


# meshaccel.lab.topology.MODES, written out so that the CLI imports no lab code (the node
# agent's image ships without meshaccel/lab; a unit test checks the two agree)
LAB_MODES = ("nomesh", "iptables", "ebpf", "ebpf-apps")


def _progress(msg: str) -> None:
    click.echo(f"meshaccel: {msg}", err=True)


def _lab_module(name: str = "lifecycle") -> Any:
    """meshaccel.lab.NAME, or a one-line error where the lab is not installed."""
    try:
        return importlib.import_module(f"meshaccel.lab.{name}")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("meshaccel.lab"):
            raise
        raise click.ClickException(
            "the lab is not part of this installation (the node agent's image ships the "
            "datapath and the agent only): run it from a checkout (scripts/setup.sh)"
        ) from None


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="meshaccel")
def cli() -> None:
    """meshaccel: eBPF acceleration for Istio-style sidecar meshes.

    Replaces the sidecar's iptables REDIRECT with cgroup connect/getsockopt hooks and
    shortcuts app<->sidecar socket hops with sockops + sk_msg. Envoy keeps doing policy.

    \b
    Typical use (as root):
      meshaccel doctor          check kernel, bcc, headers, mounts
      meshaccel attach          start capturing (every process, proxy port 15001, uid 1337)
      meshaccel status          what is attached where, and what it did
      meshaccel detach          remove every program and pin
    """


@cli.command()
@json_option
@click.option("--bpffs-root", default="/sys/fs/bpf", show_default=True, help="bpffs mount to check")
@bpffs_option
@click.option(
    "--selftest",
    "with_selftest",
    is_flag=True,
    help="also run the kernel self-test (10-30 s; see meshaccel selftest)",
)
def doctor(as_json: bool, bpffs_root: str, bpffs: str, with_selftest: bool) -> None:
    """Check that this machine can run the datapath; say how to fix what is missing.

    Exits 1 if a required check fails. Warns (without failing) when another BPF program
    on meshaccel's hooks runs in an order that breaks capture, and, with --selftest,
    when a TCP semantic differs on the shortcut on this kernel.
    """
    checks = doctor_mod.run_checks(bpffs_root, bpffs, selftest=with_selftest, log=_progress)
    code = doctor_mod.exit_code(checks)
    if as_json:
        click.echo(json.dumps({"ok": code == 0, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        click.echo(doctor_mod.format_text(checks))
    sys.exit(code)


@cli.command()
@json_option
def selftest(as_json: bool) -> None:
    """Measure which TCP semantics the running kernel keeps on the shortcut.

    In a throw-away network namespace, cgroup and bpffs directory of its own (named
    ma-selftest-<pid>, removed afterwards), attaches the datapath and runs small socket
    patterns twice, with the shortcut on and off: SO_RCVLOWAT, splice, blocking recv
    after shutdown, FIONREAD, MSG_PEEK, MSG_WAITALL, edge-triggered epoll. Says per
    semantic whether it holds, differs or could not be measured, and which mitigations
    (app sockets off the shortcut by default, the verdict program for bytes over TCP) the
    runs proved on. Takes 10-30 s; needs root.
    """
    from meshaccel.datapath import selftest as selftest_mod

    _emit(selftest_mod.run(log=_progress), as_json, selftest_mod.format_text)


app_shortcut_option = click.option(
    "--app-shortcut/--no-app-shortcut",
    default=False,
    show_default=True,
    envvar="MESHACCEL_APP_SHORTCUT",
    help="also pass app<->sidecar bytes socket to socket (faster still). The app's socket "
    "then has the kernel's sockmap semantics: SO_RCVLOWAT, splice, MSG_WAITALL, FIONREAD "
    "and blocking reads after a half-close differ from TCP (meshaccel selftest lists them "
    "for this kernel). Off by default; a pod opts its app in with the annotation "
    'meshaccel.io/shortcut: "true"',
)

istio_args_help = (
    "capture settings as istio-iptables arguments, e.g. an istio-init container's args "
    "verbatim (-p -z -u -g -m -i -x -b -d -q -o)"
)


@cli.command()
@cgroup_option
@click.option(
    "--istio-iptables-args",
    "istio_args",
    default=ISTIO_INJECTION_DEFAULT_ARGS,
    show_default=True,
    help=istio_args_help + "; what pods get when added without their own",
)
@click.option("--proxy-port", type=int, help="override -p: the sidecar's outbound port")
@click.option("--proxy-uid", type=int, help="override -u and -g: the uid the sidecar runs as")
@click.option(
    "--shortcut/--no-shortcut",
    default=True,
    show_default=True,
    help="pass the bytes of sidecar<->sidecar connections on this node socket to socket "
    "with sk_msg (app<->sidecar ones too where --app-shortcut or the pod says so); "
    "--no-shortcut keeps capture and SO_ORIGINAL_DST but leaves every byte on TCP",
)
@app_shortcut_option
@click.option(
    "--selftest/--no-selftest",
    default=True,
    show_default=True,
    help="before enabling the shortcut for apps (--app-shortcut), run the kernel self-test "
    "(about 10 s, in a throw-away netns; see meshaccel selftest) and warn about the TCP "
    "semantics that differ on the shortcut on this kernel",
)
@bpffs_option
def attach(
    cgroup: str | None,
    istio_args: str,
    proxy_port: int | None,
    proxy_uid: int | None,
    shortcut: bool,
    app_shortcut: bool,
    selftest: bool,
    bpffs: str,
) -> None:
    """Load and attach the datapath; then register pods with `meshaccel pod add`.

    For a registered pod, a TCP connect() that istio-iptables would REDIRECT goes to the
    sidecar on loopback instead (127.0.0.1 or ::1, its outbound port; its inbound port
    when the sidecar calls its own pod), and the sidecar reads the original destination
    with getsockopt(SO_ORIGINAL_DST), as after iptables REDIRECT. Pods not registered
    are not captured at all.

    Idempotent: attaching again updates the settings. Over a datapath built by another
    release or source, each program is replaced in place under traffic (or the attach is
    refused with nothing changed). All-or-nothing: a failure leaves nothing attached.
    Attachments outlive this command; remove them with `detach`.
    """
    check = _selftest_before_shortcut if selftest else None
    click.echo(
        loader.attach(
            cgroup, bpffs, istio_args, proxy_port, proxy_uid, log=_progress, shortcut=shortcut,
            before_shortcut=check, app_shortcut=app_shortcut,
        )
    )  # fmt: skip


def _selftest_before_shortcut() -> None:
    """attach's kernel self-test: says which TCP semantics differ on the shortcut here.
    It warns and never stops the attach: the operator decides which pods stay off."""
    from meshaccel.datapath import selftest as selftest_mod

    _progress("running the kernel self-test before enabling the shortcut (--no-selftest skips it)")
    try:
        report = selftest_mod.run(log=_progress)
    except Exception as e:  # MeshaccelError, OSError, a bcc compile error: say so, go on
        _progress(
            f"warning: the kernel self-test could not run ({one_line(str(e))}); the shortcut is "
            "enabled without it: run meshaccel selftest"
        )
        return
    _progress(f"self-test: {selftest_mod.summary(report)}")
    if report["differs"]:
        _progress(f"warning: {selftest_mod.ADVICE} (details: meshaccel selftest)")


@cli.command()
@cgroup_option
@bpffs_option
def detach(cgroup: str | None, bpffs: str) -> None:
    """Detach every program and remove every pin of the datapath. Idempotent.

    The cgroup is read from the pins; --cgroup is only needed when the pins are gone, to
    find meshaccel's programs on that cgroup by name.
    """
    click.echo(loader.detach(cgroup, bpffs, log=_progress))


@cli.command()
@json_option
@bpffs_option
def status(as_json: bool, bpffs: str) -> None:
    """Show what is attached where, map occupancy and every datapath counter."""
    _emit(loader.status(bpffs), as_json, format_status)


@cli.group()
def pod() -> None:
    """Register the pods to capture for (only these are captured)."""


@pod.command("add")
@click.option("--name", required=True, help="the pod, e.g. default/productpage-v1")
@click.option("--ip", "ips", multiple=True, required=True, help="pod address; once per family")
@click.option("--netns", type=click.Path(dir_okay=False), help="its network namespace file")
@click.option("--pid", type=int, help="or any process in the pod")
@click.option("--istio-iptables-args", "istio_args", help=istio_args_help + " [default: attach's]")
@click.option(
    "--annotation",
    "annotations",
    multiple=True,
    metavar="KEY=VALUE",
    help="an Istio pod annotation, e.g. traffic.sidecar.istio.io/excludeInboundPorts=15020",
)
@bpffs_option
def pod_add(
    name: str,
    ips: tuple[str, ...],
    netns: str | None,
    pid: int | None,
    istio_args: str | None,
    annotations: tuple[str, ...],
    bpffs: str,
) -> None:
    """Capture for a pod (or update its settings): by address, with its netns."""
    parsed = _annotations(annotations)
    click.echo(pods.add(bpffs, name, list(ips), netns, pid, istio_args, parsed))


def _annotations(items: tuple[str, ...]) -> dict[str, str]:
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MeshaccelError(f"--annotation {one_line(item)}: expected KEY=VALUE")
        parsed[key] = value
    return parsed


@pod.command("remove")
@click.option("--ip", required=True, help="any address of the pod")
@bpffs_option
def pod_remove(ip: str, bpffs: str) -> None:
    """Stop capturing for a pod. Idempotent."""
    click.echo(pods.remove(bpffs, ip))


@pod.command("list")
@json_option
@bpffs_option
def pod_list(as_json: bool, bpffs: str) -> None:
    """The registered pods and their capture settings."""
    _emit(pods.list_pods(bpffs), as_json, format_pods)


@cli.group()
def iptables() -> None:
    """The baseline: Istio's own iptables capture rules in a pod netns (no eBPF)."""


@iptables.command("install")
@click.option("--netns", required=True, help="name of the pod's netns under /var/run/netns")
@click.option(
    "--istio-iptables-args",
    "istio_args",
    default=ISTIO_INJECTION_DEFAULT_ARGS,
    show_default=True,
    help=istio_args_help,
)
@click.option("--annotation", "annotations", multiple=True, metavar="KEY=VALUE")
def iptables_install(netns: str, istio_args: str, annotations: tuple[str, ...]) -> None:
    """Install the nat rules istio-iptables would install (IPv4 and IPv6); replaces ours."""
    cfg = apply_annotations(parse_istio_args(istio_args), _annotations(annotations))
    iptables_mode.install(netns, cfg)
    click.echo(f"istio-iptables rules installed in netns {netns}")


@iptables.command("remove")
@click.option("--netns", required=True, help="name of the pod's netns under /var/run/netns")
def iptables_remove(netns: str) -> None:
    """Remove the ISTIO_* chains and the jumps to them. Idempotent."""
    iptables_mode.remove(netns)
    click.echo(f"istio-iptables rules removed from netns {netns}")


@cli.command()
@click.option(
    "--source",
    "source_kind",
    type=click.Choice(["kubernetes", "file"]),
    required=True,
    help="where the pods come from: the Kubernetes API (pods on --node-name) or a pods file",
)
@click.option(
    "--pods-file",
    type=click.Path(dir_okay=False),
    help="with --source file: YAML/JSON file of pods ('pods:' list), re-read when it changes",
)
@click.option(
    "--node-name",
    envvar=["NODE_NAME", "MESHACCEL_RUN_NODE_NAME"],
    help="with --source kubernetes: this node's name [env NODE_NAME, from the downward API]",
)
@click.option(
    "--metrics-address",
    default="127.0.0.1:15080",  # = daemon.DEFAULT_METRICS_ADDRESS (node-local: see there)
    show_default=True,
    metavar="HOST:PORT",
    help="where /metrics, /healthz and /readyz are served",
)
@bpffs_option
@cgroup_option
@click.option(
    "--istio-iptables-args",
    "istio_args",
    default=ISTIO_INJECTION_DEFAULT_ARGS,
    show_default=True,
    help=istio_args_help + "; what pods get before their annotations",
)
@click.option(
    "--shortcut/--no-shortcut",
    default=True,
    show_default=True,
    help="pass sidecar<->sidecar bytes socket to socket with sk_msg (see attach --help)",
)
@app_shortcut_option
@click.option(
    "--selftest/--no-selftest",
    default=True,
    show_default=True,
    help="when it attaches a datapath with the shortcut for apps, run the kernel self-test "
    "first (see attach --help)",
)
@click.option(
    "--detach-on-exit",
    is_flag=True,
    help="detach the datapath when stopping [default: leave it attached, so traffic keeps "
    "flowing while the agent restarts or is upgraded]",
)
def run(
    source_kind: str,
    pods_file: str | None,
    node_name: str | None,
    metrics_address: str,
    bpffs: str,
    cgroup: str | None,
    istio_args: str,
    shortcut: bool,
    app_shortcut: bool,
    selftest: bool,
    detach_on_exit: bool,
) -> None:
    """Run the node agent until SIGTERM: attach (or adopt) the datapath, keep the pods
    registered in step with the source, serve metrics and health.

    An already attached datapath is adopted without disturbing live connections (or,
    built by another release or source, replaced in place as by `attach`). On
    SIGTERM/SIGINT the agent stops and leaves the datapath attached, with its pods;
    `meshaccel detach` removes it.
    """
    from meshaccel.agent import daemon

    daemon.run(
        source_kind, pods_file, node_name, metrics_address, bpffs, cgroup, istio_args, shortcut,
        detach_on_exit, selftest=selftest, app_shortcut=app_shortcut,
    )  # fmt: skip


@cli.group()
@click.option(
    "--prefix",
    envvar="MESHACCEL_LAB_PREFIX",
    default="ma-",
    show_default=True,
    help="name prefix of everything the lab creates (netns, cgroup, bpffs, state)",
)
@click.pass_context
def lab(ctx: click.Context, prefix: str) -> None:
    """An Istio-shaped mesh on this machine: bookinfo, client and echo pods in netns, real
    Envoy sidecars, in one of its modes (nomesh, iptables, ebpf, ebpf-apps)."""
    ctx.obj = prefix


def _ready_timeout_option(f: Callable) -> Callable:
    return click.option(
        "--ready-timeout", type=click.FloatRange(1), default=30, show_default=True,
        envvar="MESHACCEL_LAB_READY_TIMEOUT",
        help="seconds each app, sidecar and the agent get to become ready (raise it on "
        "slow or emulated machines, where compiling the eBPF programs takes minutes)",
    )(f)  # fmt: skip


@lab.command("up")
@click.option(
    "--mode",
    type=click.Choice(LAB_MODES),
    default="ebpf",
    show_default=True,
    help="no sidecars / istio-iptables capture / meshaccel (sidecar<->sidecar sockets on "
    "the shortcut) / meshaccel with app sockets on the shortcut too (--app-shortcut)",
)
@click.option(
    "--concurrency",
    type=int,
    default=1,
    show_default=True,
    help="Envoy --concurrency of every sidecar",
)
@click.option(
    "--rbac/--no-rbac",
    default=False,
    show_default=True,
    help="sidecars deny GET /denied (403) with an RBAC filter",
)
@click.option(
    "--nodes",
    type=click.IntRange(1, 2),
    default=2,
    show_default=True,
    help="lab nodes: with 2, some calls cross nodes",
)
@_ready_timeout_option
@click.pass_obj
def lab_up(
    prefix: str, mode: str, concurrency: int, rbac: bool, nodes: int, ready_timeout: float
) -> None:
    """Bring the lab up; returns once every sidecar is ready and client -> productpage
    answers 200. A failure removes what was created."""

    lab_mod = _lab_module()
    lab_mod.up(mode, concurrency, rbac, nodes, prefix, log=_progress, timeout=ready_timeout)
    click.echo(f"lab {prefix!r} up: mode {mode}, {nodes} node(s); meshaccel lab status")


@lab.command("down")
@click.pass_obj
def lab_down(prefix: str) -> None:
    """Remove everything the lab created, also after a crash (found by name). Idempotent."""

    lab_mod = _lab_module()
    click.echo(lab_mod.down(prefix, log=_progress))


@lab.command("status")
@json_option
@click.pass_obj
def lab_status(prefix: str, as_json: bool) -> None:
    """The lab's mode, pods, processes, sidecar readiness and (ebpf) counters."""

    lab_mod = _lab_module()
    _emit(lab_mod.status(prefix), as_json, lab_mod.format_status)


def _int_list(_ctx: object, _param: object, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: comma-separated integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: at least one positive integer")
    return out


def _name_list(_ctx: object, _param: object, value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@cli.command()
@click.option(
    "--modes", default="nomesh,iptables,ebpf", show_default=True, callback=_name_list,
    help="lab modes, comma-separated, run in this order every round: nomesh, iptables, "
    "ebpf (meshaccel's default: sidecar<->sidecar sockets on the shortcut) and ebpf-apps "
    "(meshaccel with --app-shortcut: app sockets on the shortcut too)",
)  # fmt: skip
@click.option(
    "--scenarios", default="bookinfo,echo", show_default=True, callback=_name_list,
    help="bookinfo (client -> productpage), echo (same node), echo-cross-node (--nodes 2)",
)  # fmt: skip
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option(
    "--duration", type=click.IntRange(1), default=5, show_default=True,
    help="seconds per measurement",
)  # fmt: skip
@click.option(
    "--connections", default="1,16,64", show_default=True, callback=_int_list,
    help="closed loop: wrk connection counts, comma-separated",
)  # fmt: skip
@click.option(
    "--rate", type=click.IntRange(0), default=1000, show_default=True,
    help="open loop: requests/s (0: no open-loop run)",
)  # fmt: skip
@click.option(
    "--open-connections", type=click.IntRange(1), default=64, show_default=True,
    help="open loop: connections; a request due while all are busy is dropped",
)  # fmt: skip
@click.option("--nodes", type=click.IntRange(1, 2), default=1, show_default=True)
@click.option(
    "--concurrency", type=click.IntRange(1), default=1, show_default=True,
    help="Envoy --concurrency",
)  # fmt: skip
@click.option(
    "--prefix", envvar="MESHACCEL_LAB_PREFIX", default="ma-", show_default=True,
    help="name prefix of the lab the bench brings up and down",
)  # fmt: skip
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False),
    help="write results.json, report.md and PNG plots into this directory",
)  # fmt: skip
@_ready_timeout_option
def bench(
    modes: list[str], scenarios: list[str], rounds: int, duration: int, connections: list[int],
    rate: int, open_connections: int, nodes: int, concurrency: int, prefix: str,
    out_dir: str | None, ready_timeout: float,
) -> None:  # fmt: skip
    """Run the lab's modes side by side, interleaved over rounds (A B C A B C ...): per
    scenario, wrk closed loop at each connection count and an open loop at --rate
    requests/s; requests/s, p50..p99.9, dropped requests, CPU per 1,000 requests
    (sidecars, apps, whole lab, kernel) and the eBPF datapath counters. Prints a table per
    metric (medians across rounds, mesh-added latency = mode - nomesh, each eBPF mode /
    iptables) and the performance targets. Needs root; the lab (--prefix) must be down.

    \b
    Quick look (about 2 minutes):
      meshaccel bench --scenarios bookinfo --connections 1 --rounds 2 --out /tmp/bench
    """
    bench_mod = _lab_module("bench")
    report = _lab_module("report")

    bench_mod.check_args(modes, scenarios, nodes)
    check_root()
    if out_dir:
        report.prepare(Path(out_dir))
    load_list = bench_mod.loads(connections, rate, open_connections)
    records = bench_mod.run(
        modes, scenarios, load_list, rounds, duration, nodes, prefix, _progress, concurrency,
        ready_timeout=ready_timeout,
    )  # fmt: skip
    settings = {"rounds": rounds, "duration": duration, "nodes": nodes}
    meta = bench_mod.meta(["meshaccel", *sys.argv[1:]], concurrency=concurrency, **settings)
    result = bench_mod.to_json(records, meta)
    click.echo(bench_mod.format_tables(result["medians"]))
    for line in report.warnings(result):
        click.echo(f"WARNING: {line}")
    if result["targets"]:
        click.echo("\n" + bench_mod.format_targets(result["targets"]))
    if out_dir:
        for path in report.write(result, Path(out_dir)):
            _progress(f"wrote {path}")


def format_pods(found: list[dict]) -> str:
    """One line per pod; SHORTCUT: its sockets on the sk_msg shortcut now (app and sidecar
    ends of its captured connections, its sidecar's ends of sidecar-to-sidecar ones)."""
    if not found:
        return "no pods registered (meshaccel pod add)"
    rows = [("POD", "ADDRESSES", "SHORTCUT", "CAPTURE (istio-iptables args)")]
    for p in found:
        sockets = p.get("shortcut_sockets")
        rows.append(
            (
                p["name"],
                ", ".join([*(p.get("addresses") or p["ips"]), *p.get("local_routes", [])]),
                ("-" if sockets is None else str(sockets))
                + ("" if p.get("shortcut", "default") == "default" else f" ({p['shortcut']})"),
                p["istio_iptables_args"],
            )
        )
    return "\n".join(f"{n:<30} {ips:<32} {s:>8}  {args}" for n, ips, s, args in rows)


def _emit(data: object, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text(data))


def format_datapath_version(dp: dict | None) -> list[str]:
    """The running datapath's version next to this CLI's (status's "datapath" key)."""
    if not dp:
        return []
    running, cli = dp["running"], dp["cli"]
    lines = [f"version:  running {running['version']}, this meshaccel {cli['version']}"]
    if not dp["matches"]:
        why = f" ({running['note']})" if running.get("note") else ""
        lines.append(f"          DIFFERS{why}: meshaccel attach (or the agent's start) replaces it")
    return lines


def format_status(st: dict) -> str:
    if not st["programs"]:
        return f"not attached (no pins in {st['bpffs']})"
    state = "attached" if st["attached"] else "INCOMPLETE (run meshaccel attach to repair)"
    lines = [f"datapath: {state} to {st['cgroup']} (pins in {st['bpffs']})"]
    lines += format_datapath_version(st.get("datapath"))
    if st["config"]:
        cfg = st["config"]
        lines.append(f"config:   shortcut {loader.SHORTCUT_MODE_TEXT[cfg['shortcut_mode']]}")
        lines.append(f"          pods get: {cfg['default_istio_iptables_args']}")
    lines.append("programs:")
    for p in st["programs"]:
        where = "cgroup" if p["hook"] == "cgroup" else f"map {p['hook']}"
        mark = "attached" if p["attached"] else "NOT ATTACHED"
        lines.append(f"  {p['name']:<12} id {p['id'] or '-':<7} on {where:<14} {mark}")
    lines.append("maps:")
    for name, m in st["maps"].items():
        used = "-" if m["entries"] is None else m["entries"]
        lines.append(f"  {name:<20} {used:>7} / {m['capacity']}")
    lines.append("counters:")
    for name, value in st["counters"].items():
        lines.append(f"  {name:<28} {value}")
    lines += neighbors.format_text(st.get("other_programs", []))
    return "\n".join(lines)


def main() -> None:
    try:
        cli.main(standalone_mode=False, **CONTEXT)
    except click.exceptions.Abort:
        click.echo("meshaccel: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MeshaccelError as e:
        click.echo(f"meshaccel: error: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        click.echo(f"meshaccel: error: {e}", err=True)
        sys.exit(1)
