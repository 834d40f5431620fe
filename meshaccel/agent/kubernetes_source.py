"""The Kubernetes pod source: the meshed pods on this node, from the API server.

A pod is meshed when Istio injected its sidecar and it has not opted out; its capture
config is its `traffic.sidecar.istio.io/*` annotations (meshaccel.datapath.capture reads them).
KubernetesSource lists the node's pods (`spec.nodeName` field selector: other nodes' pods
are never even sent), then watches from the list's resourceVersion, and hands the
Reconciler the full desired list after the first list and after every change. It relists
after `410 Gone` and every resync_seconds, and resumes dropped watches from the last
resourceVersion it saw (bookmarks included), with bounded, jittered backoff.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from meshaccel.agent.reconciler import PodSpec
from meshaccel.datapath.capture import (
    INTERCEPTION_MODE_ANNOTATION,
    STATUS_PORT_ANNOTATION,
    TRAFFIC_PREFIX,
)
from meshaccel.datapath.pods import pod_address
from meshaccel.datapath.shortcut import MESHACCEL_PREFIX
from meshaccel.errors import MeshaccelError, one_line

log = logging.getLogger("meshaccel.agent.kubernetes_source")

Pod = Mapping[str, Any]  # a pod as the API serves it (camelCase JSON), or a client.V1Pod
NetnsOf = Callable[[Pod], str | None]

PROXY_CONTAINER = "istio-proxy"
STATUS_ANNOTATION = "sidecar.istio.io/status"  # the injector's record of what it injected
INJECT_KEY = "sidecar.istio.io/inject"  # label or annotation; the label wins, as in Istio
_NOT_INJECT = {"false", "n", "no", "off"}
# The annotations meshaccel.datapath.capture.apply_annotations reads (it rejects the last if set).
_CAPTURE_KEYS = (
    STATUS_PORT_ANNOTATION, INTERCEPTION_MODE_ANNOTATION, "istio.io/reroute-virtual-interfaces"
)  # fmt: skip
_LIVE_PHASES = ("Pending", "Running")  # Succeeded/Failed pods have given their IPs back

ERROR_KINDS = ("list", "watch", "expired", "pod")  # keys of KubernetesSource.errors


# ---------------------------------------------------------------- pods


@functools.cache
def _api_client() -> client.ApiClient:
    return client.ApiClient()


def _as_dict(pod: Any) -> dict[str, Any]:
    if isinstance(pod, Mapping):
        return dict(pod)
    # a client model (V1Pod): back to the API's own JSON shape, camelCase keys
    return _api_client().sanitize_for_serialization(pod)


def is_meshed(pod: Pod) -> bool:
    """Istio injected the pod (an istio-proxy container, also as a native sidecar, or the
    injector's status annotation) and it has not opted out."""
    p = _as_dict(pod)
    meta = p.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    spec = p.get("spec") or {}
    containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    injected = STATUS_ANNOTATION in annotations or any(
        c.get("name") == PROXY_CONTAINER for c in containers
    )
    inject = labels.get(INJECT_KEY, annotations.get(INJECT_KEY, ""))
    return injected and str(inject).strip().lower() not in _NOT_INJECT


def pod_ips(pod: Pod) -> tuple[str, ...]:
    """The pod's addresses, the first one of each family (status.podIPs, else podIP)."""
    status = _as_dict(pod).get("status") or {}
    ips = [e.get("ip") for e in status.get("podIPs") or [] if isinstance(e, Mapping)]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    by_family: dict[bool, str] = {}
    for ip in ips:
        if ip:
            try:
                ip = str(ipaddress.ip_address(ip))  # as the datapath records it
            except ValueError:
                pass  # (pod_spec refuses it, naming the field)
            by_family.setdefault(":" in ip, ip)
    return tuple(by_family.values())


def capture_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """Only the annotations that change what is captured (or shortcut) for the pod."""
    return {
        k: str(v)
        for k, v in annotations.items()
        if k in _CAPTURE_KEYS or k.startswith((TRAFFIC_PREFIX, MESHACCEL_PREFIX))
    }


def pod_spec(pod: Pod, netns_of: NetnsOf) -> PodSpec | None:
    """The PodSpec for a pod, or None when there is nothing to capture for it (yet): not
    meshed, Istio told to capture nothing, host network, finished, no IP or no netns yet.
    Pending pods with an IP count (istio-init would have set up capture by then), and so do
    terminating ones (their sidecar still drains connections). netns_of(pod) gets the
    pod's JSON form and is only asked about pods that pass every other check."""
    p = _as_dict(pod)
    check_pod(p)
    meta = p.get("metadata") or {}
    annotations = capture_annotations(meta.get("annotations") or {})
    if not is_meshed(p) or (p.get("spec") or {}).get("hostNetwork"):
        return None
    if annotations.get(INTERCEPTION_MODE_ANNOTATION, "").strip() == "NONE":
        return None  # Istio captures nothing for it
    if (p.get("status") or {}).get("phase") not in _LIVE_PHASES:
        return None
    ips = pod_ips(p)
    if not ips:
        return None  # no sandbox yet: it comes back with a MODIFIED event
    netns = netns_of(p)
    if not netns:
        return None
    name = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"
    return PodSpec(name=name, ips=ips, netns=netns, annotations=annotations)


def check_pod(p: Mapping[str, Any]) -> None:
    """Raises MeshaccelError naming the pod and the field when a field pod_spec reads does
    not have its API type, or an address is not one (one line: a pod whose object cannot be
    read is reported and skipped; the other pods are still served)."""
    meta = p.get("metadata") or {}
    name = "?"
    if isinstance(meta, Mapping):
        name = f"{meta.get('namespace') or 'default'}/{meta.get('name')}"

    def bad(field: str, why: str) -> MeshaccelError:
        return MeshaccelError(one_line(f"pod {name}: {field}: {why}"))

    def strings(obj: Any) -> bool:
        return isinstance(obj, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
        )

    def objects(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, Mapping) for v in value)

    parts = {}
    for part in ("metadata", "spec", "status"):
        parts[part] = p.get(part) or {}
        if not isinstance(parts[part], Mapping):
            raise bad(part, "not an object")
    meta, spec, status = parts["metadata"], parts["spec"], parts["status"]
    for key in ("name", "namespace", "uid"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"metadata.{key}", "not a string")
    for key in ("annotations", "labels"):
        if meta.get(key) is not None and not strings(meta[key]):
            raise bad(f"metadata.{key}", "not a map of strings")
    for key in ("containers", "initContainers"):
        if spec.get(key) is not None and not objects(spec[key]):
            raise bad(f"spec.{key}", "not a list of containers")
    for key in ("phase", "podIP"):
        if status.get(key) is not None and not isinstance(status[key], str):
            raise bad(f"status.{key}", "not a string")
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        value = status.get(key)
        if value is not None and not (
            objects(value) and all(isinstance(c.get("containerID") or "", str) for c in value)
        ):
            raise bad(f"status.{key}", "not a list of container statuses")
    ips = status.get("podIPs")
    if ips is not None and not (objects(ips) and all(isinstance(e.get("ip"), str) for e in ips)):
        raise bad("status.podIPs", "not a list of {ip: ADDRESS}")
    given = [("status.podIPs", e["ip"]) for e in ips or []]
    for field, text in [*given, ("status.podIP", status.get("podIP"))]:
        if text:
            try:
                pod_address(text)
            except ValueError as e:
                raise MeshaccelError(one_line(f'pod {name}: {field} "{text}": {e}')) from None


# ---------------------------------------------------------------- netns


def container_ids(pod: Pod) -> list[str]:
    """The runtime's IDs of the pod's containers (`containerd://ID` -> ID)."""
    status = _as_dict(pod).get("status") or {}
    out = []
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or []:
            cid = (cs.get("containerID") or "").rpartition("://")[2]
            if cid:
                out.append(cid)
    return out


def _start_time(proc: str, pid: str) -> int:
    """Process start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(os.path.join(proc, pid, "stat"), "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])  # fields after "(comm)"
    except (OSError, ValueError, IndexError):
        return 1 << 62


def netns_from_proc(pod_uid: str, container_ids: Iterable[str], proc: str = "/proc") -> str | None:
    """`PROC/PID/ns/net` of a process of the pod, found by its cgroup: the pod UID appears in
    the cgroup path (`pod<uid>` under the cgroupfs driver, `pod<uid with _>` under systemd),
    as do its containers' IDs. The oldest such process is taken (the sandbox's pause
    process, which lives as long as the pod's netns), None if there is none (yet)."""
    needles = [n for n in (pod_uid, pod_uid.replace("-", "_"), *container_ids) if n]
    if not needles:
        return None
    best: tuple[int, int, str] | None = None
    try:
        entries = os.listdir(proc)
    except OSError:
        return None
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            with open(os.path.join(proc, pid, "cgroup")) as f:
                cgroup = f.read()
        except OSError:
            continue  # gone, or not ours to read
        if any(n in cgroup for n in needles):
            cand = (_start_time(proc, pid), int(pid), pid)
            best = cand if best is None or cand < best else best
    return None if best is None else os.path.join(proc, best[2], "ns", "net")


def netns_of_pod(pod: Pod, proc: str = "/proc") -> str | None:
    """netns_from_proc for a pod object."""
    p = _as_dict(pod)
    uid = (p.get("metadata") or {}).get("uid") or ""
    return netns_from_proc(uid, container_ids(p), proc)


class CachedNetnsOf:
    """netns_of_pod with a memory per pod UID (the default netns_of of KubernetesSource):
    a pod's events repeat, and a scan of every /proc/*/cgroup costs a millisecond or more
    per event. A remembered /proc/PID/ns/net is used while that PID still belongs to the
    pod (its cgroup names the pod UID: a reused PID does not), else scanned anew."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._known: dict[str, str] = {}

    def __call__(self, pod: Pod) -> str | None:
        p = _as_dict(pod)
        uid = (p.get("metadata") or {}).get("uid") or ""
        path = self._known.get(uid)
        if path and self._still_the_pods(path, [uid, uid.replace("-", "_"), *container_ids(p)]):
            return path
        path = netns_of_pod(p, self.proc)
        if path:
            self._known[uid] = path
        else:
            self._known.pop(uid, None)
        return path

    @staticmethod
    def _still_the_pods(path: str, marks: list[str]) -> bool:
        cgroup = path.rsplit("/ns/net", 1)[0] + "/cgroup"
        try:
            with open(cgroup) as f:
                text = f.read()
        except OSError:
            return False
        return any(mark and mark in text for mark in marks)


# ---------------------------------------------------------------- source


class _Expired(Exception):
    """The watch's resourceVersion is gone from the server's history: relist."""


class _CallbackFailed(Exception):
    """on_desired raised: the caller's error, not the API's; run() raises it unchanged."""


class _RawWatch(watch.Watch):
    """Watch events with plain dict objects: the client's model deserialization costs about
    a millisecond per pod, and pod_spec reads the API's JSON shape anyway."""

    def get_return_type(self, func: Any) -> Any:
        return None


def default_api() -> client.CoreV1Api:
    """CoreV1Api from the in-cluster service account, else from the kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as e:
            raise MeshaccelError(
                f"no Kubernetes API credentials (in-cluster service account or kubeconfig): {e}"
            ) from None
    return client.CoreV1Api()


class KubernetesSource:
    """The meshed pods of one node (see the module docstring); a controller.PodSource.

    Counters for metrics: watch_restarts (watches opened after the first), relists
    (successful lists after the first: 410 Gone, resync), errors by kind (ERROR_KINDS).
    resource_version is the last one seen.
    """

    def __init__(
        self,
        node_name: str,
        api: client.CoreV1Api | None = None,
        resync_seconds: float = 300.0,
        netns_of: NetnsOf | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        request_timeout: float = 30.0,
    ) -> None:
        if not node_name:
            raise MeshaccelError("the Kubernetes source needs the node name (NODE_NAME)")
        self.node_name = node_name
        self.api = api
        self.resync_seconds = resync_seconds
        self.netns_of = netns_of or CachedNetnsOf()
        self.backoff = backoff
        self.request_timeout = request_timeout
        self.watch_restarts = 0
        self.relists = 0
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.resource_version: str | None = None
        self._pods: dict[str, PodSpec] = {}  # uid -> spec, meshed pods only
        self._watch: _RawWatch | None = None
        self._progress = False  # the current watch has delivered an event
        self._listed = False
        self._watches = 0

    @property
    def selector(self) -> str:
        return f"spec.nodeName={self.node_name}"

    # -------------------------------------------------------------- run

    def run(self, on_desired: Callable[[list[PodSpec]], None], stop: threading.Event) -> None:
        """List, then watch, until stop is set. Every run starts with a full list, so pods
        deleted while nobody watched are absent from the first on_desired call. API and
        network errors are retried; what on_desired raises ends run() unchanged."""
        if self.api is None:
            self.api = default_api()
        done = threading.Event()
        stopper = threading.Thread(target=self._stopper, args=(stop, done), daemon=True)
        stopper.start()
        try:
            self._loop(on_desired, stop)
        finally:
            done.set()
            stopper.join()

    def _stopper(self, stop: threading.Event, done: threading.Event) -> None:
        """Unblocks a watch read once stop is set (the watch is idle between events)."""
        while not done.is_set():
            if stop.wait(0.2):
                w = self._watch
                if w is not None:
                    w.stop()
                done.wait(0.05)

    def _loop(self, on_desired: Callable[[list[PodSpec]], None], stop: threading.Event) -> None:
        failures = 0  # in a row, without a watch making progress in between
        need_list = True
        next_resync = math.inf
        expired = False  # the last watch ended in 410 Gone
        while not stop.is_set():
            self._progress = False
            try:
                if need_list:
                    self._list(consistent=expired)
                    self._deliver(on_desired)
                    need_list = False
                    next_resync = time.monotonic() + (self.resync_seconds or math.inf)
                expired = False
                self._watch_once(on_desired, stop, next_resync)
                failures = 0  # ended cleanly (server timeout, resync due, stop)
                need_list = time.monotonic() >= next_resync
                continue
            except _CallbackFailed as e:
                raise e.__cause__ from None  # type: ignore[misc]
            except _Expired as e:
                self.errors["expired"] += 1
                log.info("watch from resourceVersion %s: %s; relisting", self.resource_version, e)
                need_list = expired = True
            except Exception as e:  # noqa: BLE001 - the API, the network: retry them all
                if stop.is_set():
                    break
                kind = "list" if need_list else "watch"
                self.errors[kind] += 1
                log.warning("%s of pods on %s failed: %s", kind, self.node_name, _one_line(e))
            failures = 1 if self._progress else failures + 1
            if not (expired and failures == 1):  # the first relist after 410 goes right away
                lo, hi = self.backoff
                stop.wait(min(hi, lo * 2 ** (failures - 1)) * random.uniform(0.5, 1.0))

    def desired(self) -> list[PodSpec]:
        """The meshed pods known now, by name."""
        return sorted(self._pods.values(), key=lambda p: p.name)

    def _deliver(self, on_desired: Callable[[list[PodSpec]], None]) -> None:
        try:
            on_desired(self.desired())
        except Exception as e:
            raise _CallbackFailed() from e

    def _spec(self, pod: dict[str, Any], before: PodSpec | None) -> PodSpec | None:
        """pod_spec(pod); a pod that cannot be read is counted and logged, and keeps what
        it had before (its capture stays on)."""
        try:
            return pod_spec(pod, self.netns_of)
        except MeshaccelError as e:
            self.errors["pod"] += 1
            log.error("%s%s", e, "; it keeps its last settings" if before else "")
        except Exception:  # noqa: BLE001 - one odd pod (or netns_of) must not stop the rest
            self.errors["pod"] += 1
            log.exception("pod %s", (pod.get("metadata") or {}).get("name"))
        return before

    def _list(self, consistent: bool) -> None:
        """All the node's pods. Served from the API server's watch cache (resourceVersion
        "0", as client-go's first list and kubelet's: cheap when every node lists), but
        after 410 Gone a consistent read, so that it cannot go back in time."""
        assert self.api is not None
        resp = self.api.list_pod_for_all_namespaces(
            field_selector=self.selector,
            resource_version=None if consistent else "0",
            _preload_content=False,
            _request_timeout=self.request_timeout,
        )
        try:
            doc = json.loads(resp.data)
        finally:
            resp.release_conn()
        pods: dict[str, PodSpec] = {}
        for item in doc.get("items") or []:
            uid = (item.get("metadata") or {}).get("uid")
            if uid and (spec := self._spec(item, self._pods.get(uid))) is not None:
                pods[uid] = spec
        self._pods = pods
        self.resource_version = (doc.get("metadata") or {}).get("resourceVersion")
        if self._listed:
            self.relists += 1
        self._listed = True
        log.info(
            "listed %d meshed pods on %s at resourceVersion %s",
            len(pods), self.node_name, self.resource_version,
        )  # fmt: skip

    def _watch_once(
        self, on_desired: Callable[[list[PodSpec]], None], stop: threading.Event, until: float
    ) -> None:
        """One watch request from self.resource_version, until the server ends it (its
        timeout, which is set to end it at `until`) or stop; raises on errors."""
        if self._watches:
            self.watch_restarts += 1
        self._watches += 1
        if until == math.inf:
            timeout = random.randint(300, 600)  # as client-go's reflector does
        else:
            timeout = max(1, math.ceil(until - time.monotonic()))
        w = self._watch = _RawWatch()
        if stop.is_set():
            return
        assert self.api is not None
        try:
            for event in w.stream(
                self.api.list_pod_for_all_namespaces,
                field_selector=self.selector,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,  # also turns off Watch's own hidden retries
                _request_timeout=(self.request_timeout, timeout + self.request_timeout),
            ):
                if stop.is_set():
                    break
                self._progress = True
                self._event(event, on_desired)
        except ApiException as e:
            if e.status == 410:
                raise _Expired(e.reason) from None
            raise
        finally:
            self._watch = None

    def _event(self, event: dict[str, Any], on_desired: Callable[[list[PodSpec]], None]) -> None:
        kind = event.get("type")
        obj = event.get("raw_object") or {}
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        uid = meta.get("uid")
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not uid:
            return  # BOOKMARK: only its resourceVersion matters
        before = self._pods.get(uid)
        spec = self._spec(obj, before) if kind != "DELETED" else None
        if spec is None:
            self._pods.pop(uid, None)
        else:
            self._pods[uid] = spec
        if spec != before:
            self._deliver(on_desired)


def _one_line(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
