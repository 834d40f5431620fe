"""The `meshaccel` command: parses options and delegates to the package.

Every option can also be given as an environment variable: MESHACCEL_<COMMAND>_<OPTION>,
e.g. MESHACCEL_ATTACH_PROXY_PORT=15001 (click's auto_envvar_prefix).
"""

from __future__ import annotations

import json
import sys

import click

from meshaccel import doctor as doctor_mod
from meshaccel import loader
from meshaccel.errors import MeshaccelError

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


def _progress(msg: str) -> None:
    click.echo(f"meshaccel: {msg}", err=True)


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
def doctor(as_json: bool, bpffs_root: str) -> None:
    """Check that this machine can run the datapath; say how to fix what is missing.

    Exits 1 if a required check fails.
    """
    checks = doctor_mod.run_checks(bpffs_root)
    code = doctor_mod.exit_code(checks)
    if as_json:
        click.echo(json.dumps({"ok": code == 0, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        click.echo(doctor_mod.format_text(checks))
    sys.exit(code)


@cli.command()
@cgroup_option
@click.option(
    "--proxy-port",
    type=int,
    default=loader.DEFAULT_PROXY_PORT,
    show_default=True,
    help="port of the sidecar's outbound listener on loopback (istio-iptables -p)",
)
@click.option(
    "--proxy-uid",
    type=int,
    default=loader.DEFAULT_PROXY_UID,
    show_default=True,
    help="uid the sidecar runs as; its own connections are never captured (istio-iptables -u)",
)
@click.option(
    "--shortcut/--no-shortcut",
    default=True,
    show_default=True,
    help="pass app<->sidecar bytes socket to socket with sk_msg; --no-shortcut keeps "
    "capture and SO_ORIGINAL_DST but leaves those bytes on loopback TCP (for apps that "
    "read blocking sockets without retrying EAGAIN: see the README's known limitations)",
)
@bpffs_option
def attach(cgroup: str | None, proxy_port: int, proxy_uid: int, shortcut: bool, bpffs: str) -> None:
    """Load and attach the datapath.

    TCP connect()s from processes in the cgroup, not running as the proxy uid, to
    non-loopback destinations go to 127.0.0.1:PROXY_PORT (or [::1]); the sidecar reads the
    original destination with getsockopt(SO_ORIGINAL_DST), as after iptables REDIRECT.

    Idempotent: attaching again updates the settings. All-or-nothing: a failure leaves
    nothing attached. Attachments outlive this command; remove them with `detach`.
    """
    click.echo(
        loader.attach(cgroup, bpffs, proxy_port, proxy_uid, log=_progress, shortcut=shortcut)
    )


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
    st = loader.status(bpffs)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(format_status(st))


def format_status(st: dict) -> str:
    if not st["programs"]:
        return f"not attached (no pins in {st['bpffs']})"
    state = "attached" if st["attached"] else "INCOMPLETE (run meshaccel attach to repair)"
    lines = [f"datapath: {state} to {st['cgroup']} (pins in {st['bpffs']})"]
    if st["config"]:
        cfg = st["config"]
        shortcut = "on" if cfg["shortcut"] else "off"
        lines.append(
            f"config:   proxy port {cfg['proxy_port']}, proxy uid {cfg['proxy_uid']}, "
            f"shortcut {shortcut}"
        )
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
