"""Prometheus metrics of the node agent, and the HTTP endpoint that serves them.

Two kinds of metrics, in one registry of their own (not prometheus_client's global one):

- the datapath's, read from the pins on every scrape (so they are right even when the
  datapath outlived an earlier agent): every counter of `meshaccel status` as
  meshaccel_datapath_<counter>_total, map occupancy and capacity, attached 0/1, and each
  registered pod's sockets on the shortcut now (`meshaccel pod list`'s SHORTCUT column)
  as meshaccel_pod_shortcut_sockets{pod="namespace/name"};
- the agent's own: pods tracked, reconcile duration and results, the pod source's watch
  restarts and relists, errors by kind.

The endpoint serves /metrics, /healthz (the process answers: 200) and /readyz (200 once
the daemon says it is ready, else 503 with the reason as the body).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshaccel.datapath import pods

log = logging.getLogger("meshaccel.agent.metrics")

StatusProvider = Callable[[], Mapping[str, Any]]  # shaped like loader.status(bpffs)
Readiness = Callable[[], tuple[bool, str]]  # (ready, reason)
# Each registered pod's sockets on the shortcut, by pod name, given the status just read.
PodSockets = Callable[[Mapping[str, Any]], Mapping[str, int]]

RESULTS = ("added", "updated", "removed", "failed")
# The agent's own error kinds (exported from the start, at 0): reading the datapath for a
# scrape, a whole sync, registering one pod, the pod source (bad pods file, source gave up).
ERROR_KINDS = ("datapath_read", "sync", "pod_register", "source")
# A sync of a node's pods takes milliseconds; seconds mean something is wrong.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def counter_metric(counter: str) -> str:
    """The metric family of a datapath counter (exposed with a _total suffix)."""
    return f"meshaccel_datapath_{counter}"


def pod_shortcut_sockets(st: Mapping[str, Any]) -> Mapping[str, int]:
    """Each registered pod's sockets in sock_hash, read from the pins the status names
    (one walk of pod_config and of sock_hash); nothing when no datapath is pinned."""
    bpffs = st.get("bpffs")
    return pods.shortcut_sockets(bpffs) if bpffs and st.get("programs") else {}


class DatapathCollector(Collector):
    """Reads the pinned datapath on every scrape. A read that fails is not a failed
    scrape: attached is 0 and errors_total{kind="datapath_read"} counts it."""

    def __init__(
        self,
        status: StatusProvider,
        on_error: Callable[[str], None],
        pod_sockets: PodSockets = pod_shortcut_sockets,
    ) -> None:
        self._status = status
        self._on_error = on_error
        self._pod_sockets = pod_sockets

    def collect(self) -> Iterator[Metric]:
        attached = GaugeMetricFamily(
            "meshaccel_datapath_attached",
            "1 when every program of the datapath is pinned and attached (meshaccel status)",
        )
        try:
            st = self._status()
        except Exception as e:  # noqa: BLE001 - report it, keep serving the agent's metrics
            log.warning("reading the datapath for /metrics failed: %s", e)
            self._on_error("datapath_read")
            attached.add_metric([], 0)
            yield attached
            return
        attached.add_metric([], 1 if st.get("attached") else 0)
        yield attached

        dp = st.get("datapath")
        if dp:
            # running_matches_cli="false": an upgrade (or downgrade) has not reached the kernel
            info = GaugeMetricFamily(
                "meshaccel_datapath_info",
                "the running datapath's release and source hash (empty: unknown version, "
                "pinned by a release before version records), and this agent's",
                labels=["release", "source", "cli_release", "cli_source", "running_matches_cli"],
            )
            running, cli = dp["running"], dp["cli"]
            info.add_metric(
                [
                    running.get("release") or "",
                    (running.get("source") or "")[:12],
                    cli["release"],
                    cli["source"][:12],
                    "true" if dp["matches"] else "false",
                ],
                1,
            )
            yield info

        programs = GaugeMetricFamily(
            "meshaccel_datapath_program_attached",
            "1 when the program is attached to its hook",
            labels=["program"],
        )
        for prog in st.get("programs") or []:
            programs.add_metric([prog["name"]], 1 if prog["attached"] else 0)
        yield programs

        for name, value in (st.get("counters") or {}).items():
            yield CounterMetricFamily(
                counter_metric(name),
                f"datapath counter {name}, summed over CPUs (as in meshaccel status)",
                value=value,
            )

        entries = GaugeMetricFamily(
            "meshaccel_map_entries", "entries in a BPF map (hash maps only)", labels=["map"]
        )
        capacity = GaugeMetricFamily(
            "meshaccel_map_capacity", "max_entries of a BPF map", labels=["map"]
        )
        for name, m in (st.get("maps") or {}).items():
            if m.get("entries") is not None:
                entries.add_metric([name], m["entries"])
            capacity.add_metric([name], m["capacity"])
        yield entries
        yield capacity

        shortcut = GaugeMetricFamily(
            "meshaccel_pod_shortcut_sockets",
            "a registered pod's sockets on the sk_msg shortcut now (meshaccel pod list)",
            labels=["pod"],
        )
        try:
            by_pod = self._pod_sockets(st)
        except Exception as e:  # noqa: BLE001 - the node-wide metrics are still right
            log.warning("reading the pods' shortcut sockets for /metrics failed: %s", e)
            self._on_error("datapath_read")
            by_pod = {}
        for name, n in sorted(by_pod.items()):
            shortcut.add_metric([name], n)
        yield shortcut


class _AgentCollector(Collector):
    """Errors by kind (the agent's and the source's) and the source's watch counters."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "meshaccel_errors", "errors of the agent and its pod source, by kind", labels=["kind"]
        )
        for kind, n in sorted(self._metrics.errors().items()):
            errors.add_metric([kind], n)
        yield errors
        source = self._metrics.source
        for attr, doc in (
            ("watch_restarts", "times the pod source's watch was restarted"),
            ("relists", "full relists of the pod source (e.g. after 410 Gone)"),
        ):
            value = getattr(source, attr, None)
            if isinstance(value, int | float):
                yield CounterMetricFamily(f"meshaccel_source_{attr}", doc, value=value)


class Metrics:
    """The agent's registry. datapath: reads the pinned datapath (loader.status); source:
    the pod source, whose watch_restarts, relists and errors are exported if it has them;
    pod_sockets: each pod's shortcut sockets (default: read from the status's pins)."""

    def __init__(
        self,
        datapath: StatusProvider,
        source: object | None = None,
        pod_sockets: PodSockets = pod_shortcut_sockets,
    ) -> None:
        self.source = source
        self.registry = CollectorRegistry()
        self.pods_tracked = Gauge(
            "meshaccel_pods_tracked",
            "pods registered in the datapath by the last sync",
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "meshaccel_reconcile_duration_seconds",
            "time to apply one desired pod list to the maps",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_pods = Counter(
            "meshaccel_reconcile_pods",
            "pods added, updated, removed or failed by reconciles",
            ["result"],
            registry=self.registry,
        )
        for result in RESULTS:
            self.reconcile_pods.labels(result)
        self._errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self._lock = threading.Lock()
        self.registry.register(DatapathCollector(datapath, self.error, pod_sockets))
        self.registry.register(_AgentCollector(self))

    def error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + n

    def errors(self) -> dict[str, int]:
        """The agent's error counts (ERROR_KINDS) plus the source's own (an int, counted
        as "source", or a mapping by kind, e.g. KubernetesSource's list/watch/expired/pod)."""
        with self._lock:
            out = dict(self._errors)
        theirs = getattr(self.source, "errors", None)
        if isinstance(theirs, int | float):
            theirs = {"source": theirs}
        if isinstance(theirs, Mapping):
            for kind, n in theirs.items():
                out[str(kind)] = out.get(str(kind), 0) + n
        return out

    def observe_sync(self, result: Any, seconds: float, tracked: int) -> None:
        """Record one reconcile (result: a controller.SyncResult)."""
        self.reconcile_duration.observe(seconds)
        self.count_pods(result)
        self.pods_tracked.set(tracked)

    def count_pods(self, result: Any) -> None:
        """The pods a reconcile added, updated, removed or failed to register."""
        for name in RESULTS:
            n = len(getattr(result, name))
            if n:
                self.reconcile_pods.labels(name).inc(n)
        if result.failed:
            self.error("pod_register", len(result.failed))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------- HTTP endpoint


class MetricsServer:
    """/metrics, /healthz and /readyz on address (host, port), served from a thread."""

    def __init__(self, address: tuple[str, int], metrics: Metrics, readiness: Readiness) -> None:
        host, port = address
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        self._server = server_class(sockaddr[:2], _handler(metrics, readiness))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def _handler(metrics: Metrics, readiness: Readiness) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                try:
                    ready, reason = readiness()
                except Exception as e:  # noqa: BLE001 - not ready, and say why
                    ready, reason = False, f"readiness check failed: {e}"
                self._reply(200 if ready else 503, f"{reason}\n".encode())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
