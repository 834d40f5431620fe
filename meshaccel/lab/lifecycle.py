"""`meshaccel lab up|down|status`: bring the lab (meshaccel.lab.topology) up, in order,
and take it down again, also after a crash; report its state.

up: the network, the lab cgroup, the mode's capture (istio-iptables rules, or the node
agent attaching the datapath), the apps, the Envoy sidecars, then a first request
client -> productpage. Any failure tears down what was created. down removes what the
state file lists and, after a crash, whatever carries the lab's names; processes only by
PID (checked against their start time), plus whatever is left in the lab's own cgroup.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from meshaccel.datapath import iptables_mode, loader
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS, parse_istio_args
from meshaccel.datapath.host import check_root, default_cgroup
from meshaccel.datapath.pins import read_counters
from meshaccel.errors import MeshaccelError
from meshaccel.lab import network
from meshaccel.lab.envoy import ADMIN_PORT, PROXY_UID, base_id, envoy_binary, sidecar_config
from meshaccel.lab.processes import (
    LabState,
    Log,
    alive,
    empty_cgroup,
    load,
    run_in_pod,
    save,
    spawn,
    terminate,
    track,
    wait_for,
)
from meshaccel.lab.sandbox import left_by_dead
from meshaccel.lab.topology import (
    APP_PORT,
    EBPF_MODES,
    MODES,
    STATE_DIR,
    LabPod,
    Names,
    default_prefix,
    is_ebpf,
    link_nodes,
    make_node,
    make_pod,
    plan,
)

AGENT_PORT = 15080  # the node agent's /metrics, /healthz, /readyz, in node1's netns
DENIED_PATH = "/denied"  # what the sidecars' RBAC denies with --rbac


def admin_get(ns: str, path: str, port: int = ADMIN_PORT) -> tuple[int, str]:
    """GET 127.0.0.1:port/path inside netns ns (from this process, in no lab cgroup)."""

    def get() -> tuple[int, str]:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            c.close()

    try:
        return netns_mod.in_netns(netns_mod.path_of(ns), get)
    except (OSError, http.client.HTTPException):
        return 0, ""


def request(
    pod: str, urls: list[str], prefix: str | None = None, timeout: float = 10
) -> list[dict]:
    """GET each URL from an app process in pod's netns (and the lab cgroup, so that it is
    captured like any app); [{"url", "status", "body"} or {"url", "error"}]."""
    argv = [sys.executable, "-m", "meshaccel.lab.apps", "get", "--timeout", str(timeout), *urls]
    names = Names(prefix or default_prefix())
    p = run_in_pod(names, pod, argv, timeout * len(urls) + 10)
    if p.returncode or not p.stdout.strip():
        raise MeshaccelError(f"request from {pod} failed (rc {p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _quiet(_msg: str) -> None:
    pass


def up(
    mode: str = "nomesh",
    concurrency: int = 1,
    rbac: bool = False,
    nodes: int = 1,
    prefix: str | None = None,
    log: Log = _quiet,
    timeout: float = 30,
) -> LabState:
    """Bring the lab up; on any failure tear down what was created and raise."""
    if mode not in MODES:
        raise MeshaccelError(f"--mode {mode}: one of {', '.join(MODES)}")
    if concurrency < 1:
        raise MeshaccelError(f"--concurrency {concurrency}: at least 1")
    specs = plan(nodes)
    check_root()
    prefix = prefix or default_prefix()
    left = leftovers(prefix)
    if left:
        raise MeshaccelError(
            f"a lab with prefix {prefix!r} exists ({', '.join(left)}): meshaccel lab down first"
        )
    envoy = envoy_binary() if mode != "nomesh" else ""
    state = LabState(prefix, mode, nodes, concurrency, rbac)
    save(state)
    try:
        _up(state, specs, envoy, log, timeout)
    except BaseException as e:
        log(f"bring-up failed ({e}): tearing down")
        try:
            down(prefix)
        except MeshaccelError as e2:
            log(f"teardown incomplete: {e2}")
        if isinstance(e, (MeshaccelError, KeyboardInterrupt)):
            raise
        raise MeshaccelError(f"lab up failed: {type(e).__name__}: {e}") from e
    return state


def _up(state: LabState, specs: list[LabPod], envoy: str, log: Log, timeout: float) -> None:
    names, t0 = state.names, time.monotonic()
    names.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    names.workdir.chmod(0o755)  # Envoy (uid 1337) reads its config and writes its log here
    for n in range(1, state.nodes + 1):
        make_node(names, n)
    if state.nodes == 2:
        link_nodes(names)
    for spec in specs:
        make_pod(names, spec)
    log(f"network: {state.nodes} node(s), {len(specs)} pods ({time.monotonic() - t0:.1f}s)")
    os.mkdir(names.cgroup)
    ips = {s.name: s.ip for s in specs}

    if state.mode == "iptables":
        cfg = parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS)
        for spec in specs:
            iptables_mode.install(names.pod(spec.name), cfg)
        log(f"iptables: istio-iptables rules in {len(specs)} pods")
    elif is_ebpf(state.mode):
        _start_agent(state, specs, timeout)
        log(
            f"{state.mode}: agent attached the datapath to {names.cgroup}, {len(specs)} pods synced"
        )

    apps: dict[str, subprocess.Popen] = {}
    for spec in specs:
        if spec.name == "client":
            continue  # the client pod runs requests on demand (request())
        urls = [f"http://{ips[c]}:{APP_PORT}/" for c in spec.calls]
        argv = [sys.executable, "-m", "meshaccel.lab.apps", "serve", "--name", spec.name]
        argv += ["--port", str(APP_PORT), "--size", str(spec.size), "--calls", *urls]
        log_path = names.workdir / f"{spec.name}.app.log"
        p = spawn(argv, names.pod(spec.name), names.cgroup, log_path)
        apps[spec.name] = track(state, p, "app", spec.name)
    for name, p in apps.items():
        log_path = names.workdir / f"{name}.app.log"

        def serving(path: Path = log_path) -> bool:
            return b'"ready"' in path.read_bytes()

        wait_for(f"app {name}", serving, timeout, log_path, p)
    log(f"apps: {len(apps)} serving on :{APP_PORT} ({time.monotonic() - t0:.1f}s)")

    if state.mode != "nomesh":
        config = sidecar_config((DENIED_PATH,) if state.rbac else ())
        cfg_path = names.workdir / "envoy.json"
        cfg_path.write_text(json.dumps(config, indent=1))
        cfg_path.chmod(0o644)
        envoys: dict[str, subprocess.Popen] = {}
        for i, spec in enumerate(specs):
            log_path = names.workdir / f"{spec.name}.envoy.log"
            log_path.touch()
            os.chown(log_path, PROXY_UID, PROXY_UID)
            argv = [
                envoy, "-c", str(cfg_path), "--concurrency", str(state.concurrency),
                "--base-id", str(base_id(state.prefix, i)), "--disable-hot-restart",
                "-l", "warning", "--log-path", str(log_path),
                "--service-node", spec.name, "--service-cluster", spec.name,
            ]  # fmt: skip
            p = spawn(argv, names.pod(spec.name), names.cgroup, log_path, uid=PROXY_UID)
            envoys[spec.name] = track(state, p, "envoy", spec.name)
        for name, p in envoys.items():

            def ready(ns: str = names.pod(name)) -> bool:
                return admin_get(ns, "/ready")[0] == 200

            log_path = names.workdir / f"{name}.envoy.log"
            wait_for(f"envoy of {name}", ready, timeout, log_path, p)
        log(f"envoy: {len(specs)} sidecars ready ({time.monotonic() - t0:.1f}s)")

    url = f"http://{ips['productpage']}:{APP_PORT}/"
    deadline, last = time.monotonic() + timeout, {}
    while True:
        [last] = request("client", [url], state.prefix, timeout=5)
        if last.get("status") == 200:
            break
        if time.monotonic() > deadline:
            raise MeshaccelError(f"client -> productpage did not return 200: {last}")
        time.sleep(0.2)
    state.phase = "up"
    save(state)
    log(f"ready: client -> productpage 200 ({time.monotonic() - t0:.1f}s)")


def _start_agent(state: LabState, specs: list[LabPod], timeout: float) -> None:
    """The node agent as the DaemonSet runs it, `meshaccel run --source file`: in node1's
    netns (like hostNetwork) and in the lab cgroup (its CPU counts as the lab's); it
    attaches the datapath to the lab cgroup and registers the pods listed in a pods file,
    with app sockets on the shortcut too in ebpf-apps mode (--app-shortcut; said either
    way, so that a MESHACCEL_APP_SHORTCUT in the environment does not change the mode).
    Ready when its /readyz says the datapath is attached and the pods are synced."""
    names = state.names
    pods_file = names.workdir / "pods.json"
    listed = [
        {
            "name": s.name,
            "namespace": "lab",
            "ips": [s.ip],
            "netns": netns_mod.path_of(names.pod(s.name)),
        }
        for s in specs
    ]
    pods_file.write_text(json.dumps({"pods": listed}, indent=1))
    argv = [sys.executable, "-c", "from meshaccel.cli import main; main()", "run"]
    argv += ["--source", "file", "--pods-file", str(pods_file), "--cgroup", names.cgroup]
    argv += ["--bpffs", names.bpffs, "--metrics-address", f"127.0.0.1:{AGENT_PORT}"]
    argv += ["--app-shortcut" if EBPF_MODES[state.mode] else "--no-app-shortcut"]
    log_path = names.workdir / "agent.log"
    p = track(state, spawn(argv, names.node(1), names.cgroup, log_path), "agent", "node1")

    def ready() -> bool:
        return admin_get(names.node(1), "/readyz", AGENT_PORT)[0] == 200

    wait_for("meshaccel agent", ready, timeout, log_path, p)


def leftovers(prefix: str) -> list[str]:
    """What of a lab with this prefix exists now (state file, netns, cgroup, bpffs)."""
    names = Names(prefix)
    found = [str(names.state_file)] if names.state_file.exists() else []
    found += [ns for ns in names.all_netns() if network.exists(ns)]
    found += [p for p in (names.cgroup, names.bpffs) if os.path.exists(p)]
    return found


def sweep_dead(owned: str, log: Log = _quiet) -> list[str]:
    """Take down the labs whose prefix owned matches (a regex, group 1 the PID of the
    process that brought the lab up) while that process is gone: what a test run killed
    mid-test left (its cleanup never ran). A lab whose process still runs is left alone.
    Returns the prefixes taken down."""
    dirs = [str(STATE_DIR), netns_mod.NETNS_DIR, default_cgroup(), "/sys/fs/bpf"]
    dead = left_by_dead(owned, dirs)
    for prefix in sorted(dead):
        log(f"taking down lab {prefix}: left by a run that died")
        try:
            down(prefix, log)
        except MeshaccelError as e:  # (what is left is the next sweep's)
            log(str(e))
    return sorted(dead)


def down(prefix: str | None = None, log: Log = _quiet) -> str:
    """Remove the lab: its processes (by PID), datapath, cgroup, netns, state. Idempotent;
    also works without a state file (after a crash) by the lab's names."""
    prefix = prefix or default_prefix()
    names = Names(prefix)
    state = load(prefix)
    found = leftovers(prefix)
    errors: list[str] = []

    def step(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (OSError, MeshaccelError) as e:
            errors.append(f"{what}: {e}")

    if state:
        step("processes", lambda: terminate(state.procs, log))
    cg = names.cgroup if os.path.isdir(names.cgroup) else None
    if os.path.exists(names.bpffs) or cg:  # pins gone after a crash: by name on the cgroup
        step("datapath", lambda: loader.detach(cg, names.bpffs))
    if os.path.isdir(names.cgroup):
        step("cgroup", lambda: empty_cgroup(names.cgroup))
    for ns in names.all_netns():
        if network.exists(ns):
            step(f"netns {ns}", lambda ns=ns: network.remove_netns(ns))  # type: ignore[misc]
    step("workdir", lambda: shutil.rmtree(names.workdir) if names.workdir.exists() else None)
    if errors:
        raise MeshaccelError(f"lab down incomplete: {'; '.join(errors)}")
    with contextlib.suppress(FileNotFoundError):
        names.state_file.unlink()
    if not found:
        return f"no lab with prefix {prefix!r}"
    return f"lab {prefix!r} removed ({len(found)} item(s))"


def status(prefix: str | None = None) -> dict:
    """The lab's mode, pods (address, node, processes alive, sidecar ready) and, in the
    eBPF modes, the datapath counters."""
    prefix = prefix or default_prefix()
    names = Names(prefix)
    state = load(prefix)
    if state is None:
        return {"prefix": prefix, "up": False, "leftovers": leftovers(prefix)}
    out: dict = {
        "prefix": prefix,
        "up": state.phase == "up",
        "mode": state.mode,
        "nodes": state.nodes,
        "concurrency": state.concurrency,
        "rbac": state.rbac,
        "cgroup": names.cgroup,
        "pods": [],
    }
    for p in state.procs:
        if p.role == "agent":
            ready = admin_get(names.node(1), "/readyz", AGENT_PORT)[0] == 200
            out["agent"] = {"pid": p.pid, "alive": alive(p), "ready": ready}
    for spec in plan(state.nodes):
        procs = {p.role: p for p in state.procs if p.pod == spec.name}
        pod = {"name": spec.name, "netns": names.pod(spec.name), "ip": spec.ip, "node": spec.node}
        for role, p in procs.items():
            pod[role] = {"pid": p.pid, "alive": alive(p)}
        if "envoy" in procs:
            pod["envoy"]["ready"] = admin_get(names.pod(spec.name), "/ready")[0] == 200
        out["pods"].append(pod)
    if is_ebpf(state.mode) and os.path.exists(names.bpffs):
        out["bpffs"] = names.bpffs
        out["counters"] = read_counters(names.bpffs)
    return out


def format_status(st: dict) -> str:
    if "mode" not in st:
        left = st["leftovers"]
        return f"no lab {st['prefix']!r}" + (f" (leftovers: {', '.join(left)})" if left else "")
    lines = [
        f"lab {st['prefix']!r}: {'up' if st['up'] else 'NOT READY'}, mode {st['mode']}, "
        f"{st['nodes']} node(s), envoy --concurrency {st['concurrency']}, "
        f"rbac {'on' if st['rbac'] else 'off'}"
    ]
    for p in st["pods"]:
        procs = []
        for role in ("app", "envoy"):
            if role in p:
                ok = p[role]["alive"] and p[role].get("ready", True)
                procs.append(f"{role} {p[role]['pid']} {'ok' if ok else 'DOWN'}")
        what = ", ".join(procs) if "app" in p else ", ".join([*procs, "no app (requests)"])
        lines.append(f"  {p['name']:<12} {p['ip']:<12} node{p['node']}  {what}")
    if "agent" in st:
        a = st["agent"]
        ok = "ok" if a["alive"] and a["ready"] else "NOT READY"
        where = f"127.0.0.1:{AGENT_PORT}/metrics in netns {st['prefix']}node1"
        lines.append(f"  meshaccel agent pid {a['pid']} {ok} ({where})")
    for name, value in st.get("counters", {}).items():
        if value:
            lines.append(f"  {name:<28} {value}")
    return "\n".join(lines)
