"""An in-process double of the Kubernetes API server, for the pods the agent watches (the
agent's tests and the churn benchmark drive it).

aiohttp on 127.0.0.1 (a random port) in a background thread, serving what the official
client's list and watch of pods send and expect:

- GET /api/v1/pods and /api/v1/namespaces/NS/pods: a PodList with metadata.resourceVersion;
  fieldSelector (=, ==, != on the pod fields the real server supports; others are 400) and
  simple labelSelector (k=v, k!=v, k, !k) honoured; limit ignored (servers may); a list
  is always served at the latest resourceVersion (what "0" and unset both allow).
- ...?watch=true: JSON lines of ADDED / MODIFIED / DELETED events after resourceVersion,
  filtered by the selectors the way the watch cache does (a pod that starts matching is
  ADDED, one that stops is DELETED); no resourceVersion (or "0") starts with the current
  pods as ADDED; timeoutSeconds ends the stream cleanly; BOOKMARKs only if
  allowWatchBookmarks. A resourceVersion older than the retained history gets 410 Gone, as
  an ERROR event (the real server's way) or, with gone_as="http", as an HTTP 410.
- Injections: bookmark(), drop_watches() (connections cut mid-stream), expire_watches()
  (410 to open watches), compact(), fail_next(n, status), hold_watches() (new watches wait),
  record=False on changes (a change no watcher ever hears of: drift for resyncs to repair).

Every change happens on the server's event loop, so events keep a total order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")
Pod = dict[str, Any]

# Pod fields the real API server accepts in a fieldSelector (pkg/registry/core/pod/strategy.go)
_FIELDS: dict[str, Callable[[Pod], str]] = {
    "metadata.name": lambda p: p["metadata"].get("name", ""),
    "metadata.namespace": lambda p: p["metadata"].get("namespace", ""),
    "spec.nodeName": lambda p: p.get("spec", {}).get("nodeName", ""),
    "spec.restartPolicy": lambda p: p.get("spec", {}).get("restartPolicy", ""),
    "spec.schedulerName": lambda p: p.get("spec", {}).get("schedulerName", ""),
    "spec.serviceAccountName": lambda p: p.get("spec", {}).get("serviceAccountName", ""),
    "spec.hostNetwork": lambda p: str(bool(p.get("spec", {}).get("hostNetwork"))).lower(),
    "status.phase": lambda p: p.get("status", {}).get("phase", ""),
    "status.podIP": lambda p: p.get("status", {}).get("podIP", ""),
    "status.nominatedNodeName": lambda p: p.get("status", {}).get("nominatedNodeName", ""),
}

_DROP, _CLOSE = object(), object()


class BadRequest(Exception):
    pass


def _selector(text: str, kind: str) -> Callable[[Pod], bool]:
    """A predicate for a fieldSelector or labelSelector (equality-based terms, ANDed)."""
    tests: list[Callable[[Pod], bool]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        for op in ("!=", "==", "="):
            key, found, value = term.partition(op)
            if found:
                break
        else:
            op, key, value = ("!" if term.startswith("!") else "exists"), term.lstrip("!"), ""
        key = key.strip()
        if kind == "field":
            if key not in _FIELDS or op not in ("=", "==", "!="):
                raise BadRequest(f"field label not supported: {key}")
            get = _FIELDS[key]
        else:
            get = lambda p, k=key: (p["metadata"].get("labels") or {}).get(k)  # noqa: E731
        if op == "!=":
            tests.append(lambda p, g=get, v=value: g(p) != v)
        elif op == "exists":
            tests.append(lambda p, g=get: g(p) is not None)
        elif op == "!":
            tests.append(lambda p, g=get: g(p) is None)
        else:
            tests.append(lambda p, g=get, v=value: g(p) == v)
    return lambda p: all(t(p) for t in tests)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }  # fmt: skip


@dataclass
class Served:
    """One request, as the double saw and answered it."""

    kind: str  # "list" or "watch"
    query: dict[str, str]
    status: int = 200
    names: list[str] = field(default_factory=list)  # namespace/name of every pod sent


@dataclass
class _Change:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    old: Pod | None
    new: Pod


@dataclass
class _Watcher:
    matches: Callable[[Pod], bool]
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class FakeApiServer:
    """See the module docstring. Use as a context manager, or start() / stop()."""

    def __init__(self, gone_as: str = "event") -> None:
        assert gone_as in ("event", "http")
        self.gone_as = gone_as
        self.served: list[Served] = []
        self._rv = 1
        self._pods: dict[tuple[str, str], Pod] = {}
        self._history: list[_Change] = []
        self._compacted = 1  # watches from an older resourceVersion get 410 Gone
        self._watchers: list[_Watcher] = []
        self._failures: list[tuple[int, str]] = []
        self._held: asyncio.Event | None = None
        self._waiting = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -------------------------------------------------------------- lifecycle

    def start(self) -> FakeApiServer:
        self._thread.start()
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._pods_handler)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods", self._pods_handler)

        async def up() -> int:
            self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        port = asyncio.run_coroutine_threadsafe(up(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._runner is None:
            return

        async def down() -> None:
            for w in self._watchers:
                w.queue.put_nowait(_CLOSE)
            if self._held is not None:
                self._held.set()
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], T]) -> T:
        """fn() on the server's loop (where every change and every watch registration runs)."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self._loop.call_soon_threadsafe(run)
        return fut.result(10)

    # -------------------------------------------------------------- state

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def pods(self) -> list[Pod]:
        return self._call(lambda: [copy.deepcopy(p) for p in self._pods.values()])

    def get(self, namespace: str, name: str) -> Pod:
        return self._call(lambda: copy.deepcopy(self._pods[(namespace, name)]))

    def create(self, pod: Pod, record: bool = True) -> Pod:
        """Add a pod (uid and creationTimestamp filled in); returns it as stored."""
        pod = copy.deepcopy(pod)
        meta = pod.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        pod.setdefault("apiVersion", "v1")
        pod.setdefault("kind", "Pod")

        def do() -> Pod:
            key = (meta["namespace"], meta["name"])
            if key in self._pods:
                raise ValueError(f"pod {key} exists")
            return self._change("ADDED", key, pod, record)

        return self._call(do)

    def update(self, pod: Pod, record: bool = True) -> Pod:
        """Replace a pod (its uid is kept)."""
        pod = copy.deepcopy(pod)
        meta = pod["metadata"]
        key = (meta.get("namespace", "default"), meta["name"])

        def do() -> Pod:
            meta["uid"] = self._pods[key]["metadata"]["uid"]
            return self._change("MODIFIED", key, pod, record)

        return self._call(do)

    def modify(
        self, namespace: str, name: str, fn: Callable[[Pod], None], record: bool = True
    ) -> Pod:
        """fn(pod) changes the stored pod in place; the result is one MODIFIED event."""

        def do() -> Pod:
            pod = copy.deepcopy(self._pods[(namespace, name)])
            fn(pod)
            return self._change("MODIFIED", (namespace, name), pod, record)

        return self._call(do)

    def delete(self, namespace: str, name: str, record: bool = True) -> None:
        def do() -> None:
            self._change("DELETED", (namespace, name), self._pods[(namespace, name)], record)

        self._call(do)

    def _change(self, kind: str, key: tuple[str, str], pod: Pod, record: bool) -> Pod:
        self._rv += 1
        old = self._pods.get(key)
        new = copy.deepcopy(pod)
        new["metadata"]["resourceVersion"] = str(self._rv)
        if kind == "DELETED":
            del self._pods[key]
        else:
            self._pods[key] = new
        if record:
            change = _Change(self._rv, kind, old, new)
            self._history.append(change)
            for w in self._watchers:
                if (event := self._event_for(w, change)) is not None:
                    w.queue.put_nowait(event)
        return copy.deepcopy(new)

    @staticmethod
    def _event_for(w: _Watcher, c: _Change) -> dict[str, Any] | None:
        """The event a watcher with this selector sees, as the watch cache filters it."""
        was = c.old is not None and c.type != "ADDED" and w.matches(c.old)
        now = c.type != "DELETED" and w.matches(c.new)
        if c.type == "DELETED":
            kind = "DELETED" if was else None
        else:
            kind = {(True, True): "MODIFIED", (False, True): "ADDED", (True, False): "DELETED"}
            kind = kind.get((was, now))  # type: ignore[assignment]
        return None if kind is None else {"type": kind, "object": c.new}

    # -------------------------------------------------------------- injections

    def bookmark(self) -> None:
        """A BOOKMARK at the current resourceVersion to every watch that allows them."""

        def do() -> None:
            obj = {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)},
            }
            for w in self._watchers:
                if w.bookmarks:
                    w.queue.put_nowait({"type": "BOOKMARK", "object": obj})

        self._call(do)

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no end of the chunked body)."""
        self._call(lambda: [w.queue.put_nowait(_DROP) for w in self._watchers])

    def compact(self) -> None:
        """Forget the history so far: watches from an older resourceVersion get 410 Gone."""

        def do() -> None:
            self._history.clear()
            self._compacted = self._rv

        self._call(do)

    def expire_watches(self) -> None:
        """Compact, and end every open watch with a 410 Gone ERROR event."""
        self.compact()
        gone = _status(410, "Expired", "too old resource version")
        self._call(
            lambda: [
                (w.queue.put_nowait({"type": "ERROR", "object": gone}), w.queue.put_nowait(_CLOSE))
                for w in self._watchers
            ]
        )

    def fail_next(self, count: int = 1, status: int = 500, reason: str = "InternalError") -> None:
        """The next count requests (list or watch) fail with this HTTP status."""
        self._call(lambda: self._failures.extend([(status, reason)] * count))

    @contextmanager
    def hold_watches(self) -> Iterator[None]:
        """Watch requests made inside wait (before reading history) until the block ends."""
        self._call(lambda: setattr(self, "_held", asyncio.Event()))
        try:
            yield
        finally:

            def release() -> None:
                assert self._held is not None
                self._held.set()
                self._held = None

            self._call(release)

    @property
    def open_watches(self) -> int:
        return self._call(lambda: len(self._watchers))

    @property
    def held_watches(self) -> int:
        return self._call(lambda: self._waiting)

    def wait(self, predicate: Callable[[FakeApiServer], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise TimeoutError("the API double did not get there in time")
            time.sleep(0.01)

    # -------------------------------------------------------------- HTTP

    async def _pods_handler(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        watching = q.get("watch", "").lower() in ("true", "1")
        served = Served("watch" if watching else "list", q)
        self.served.append(served)
        if self._failures:
            served.status, reason = self._failures.pop(0)
            return web.json_response(
                _status(served.status, reason, "injected"), status=served.status
            )
        try:
            matches = _selector(q.get("fieldSelector", ""), "field")
            labels = _selector(q.get("labelSelector", ""), "label")
        except BadRequest as e:
            served.status = 400
            return web.json_response(_status(400, "BadRequest", str(e)), status=400)
        namespace = request.match_info.get("namespace")

        def selected(p: Pod) -> bool:
            ns_ok = namespace is None or p["metadata"]["namespace"] == namespace
            return ns_ok and matches(p) and labels(p)

        if not watching:
            items = [copy.deepcopy(p) for p in self._pods.values() if selected(p)]
            served.names = [_name(p) for p in items]
            body = {
                "kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items,
            }  # fmt: skip
            return web.json_response(body)
        return await self._watch(request, q, served, selected)

    async def _watch(
        self, request: web.Request, q: dict[str, str], served: Served, selected: Callable
    ) -> web.StreamResponse:
        if self._held is not None:
            self._waiting += 1
            await self._held.wait()
            self._waiting -= 1
        # From here to the registration nothing awaits: no change can slip in between.
        rv_text = q.get("resourceVersion", "")
        w = _Watcher(selected, q.get("allowWatchBookmarks", "").lower() in ("true", "1"))
        backlog: list[Any] = []
        if rv_text in ("", "0"):
            backlog = [{"type": "ADDED", "object": p} for p in self._pods.values() if selected(p)]
        elif int(rv_text) < self._compacted:
            gone = _status(410, "Expired", f"too old resource version: {rv_text} ({self._rv})")
            if self.gone_as == "http":
                served.status = 410
                return web.json_response(gone, status=410)
            backlog = [{"type": "ERROR", "object": gone}, _CLOSE]
        else:
            for c in self._history:
                if c.rv > int(rv_text) and (event := self._event_for(w, c)) is not None:
                    backlog.append(event)
        for item in backlog:
            w.queue.put_nowait(item)
        self._watchers.append(w)
        try:
            return await self._stream(request, w, served, float(q.get("timeoutSeconds") or 1800))
        finally:
            self._watchers.remove(w)

    async def _stream(
        self, request: web.Request, w: _Watcher, served: Served, timeout: float
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        deadline = self._loop.time() + timeout
        while True:
            left = deadline - self._loop.time()
            if left <= 0:
                break  # timeoutSeconds: the server ends the watch cleanly
            try:
                item = await asyncio.wait_for(w.queue.get(), min(left, 0.1))
            except TimeoutError:
                if request.transport is None or request.transport.is_closing():
                    return resp  # the client went away
                continue
            if item is _CLOSE:
                break
            if item is _DROP:
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if item["object"].get("kind") == "Pod" and item["type"] != "BOOKMARK":
                served.names.append(_name(item["object"]))
            try:
                await resp.write(json.dumps(item).encode() + b"\n")
            except ConnectionResetError:
                return resp  # the client went away
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp


def _name(p: Pod) -> str:
    return f"{p['metadata'].get('namespace', 'default')}/{p['metadata']['name']}"


# ------------------------------------------------------------------ pods

_ids = itertools.count(1)


def make_pod(
    name: str,
    *,
    namespace: str = "default",
    node: str = "node-a",
    ips: tuple[str, ...] | list[str] = ("10.244.1.5",),
    injected: bool = True,
    native_sidecar: bool = False,
    status_annotation: bool = True,
    phase: str = "Running",
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    host_network: bool = False,
    uid: str | None = None,
) -> Pod:
    """A pod as the API serves it; injected pods look like Istio's injector made them."""
    containers: list[dict[str, Any]] = [{"name": "app", "image": "app:1"}]
    init: list[dict[str, Any]] = []
    ann = dict(annotations or {})
    if injected:
        proxy = {"name": "istio-proxy", "image": "proxyv2:1.22", "args": ["proxy", "sidecar"]}
        if native_sidecar:
            init.append({**proxy, "restartPolicy": "Always"})
        else:
            containers.append(proxy)
        init.insert(0, {"name": "istio-init", "image": "proxyv2:1.22"})
        if status_annotation:
            ann.setdefault("sidecar.istio.io/status", '{"containers":["istio-proxy"]}')
    spec: dict[str, Any] = {"nodeName": node, "containers": containers}
    if init:
        spec["initContainers"] = init
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": phase}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
        status["containerStatuses"] = [
            {
                "name": c["name"], "image": c["image"], "imageID": c["image"],
                "containerID": f"containerd://{next(_ids):064x}", "ready": phase == "Running",
                "restartCount": 0, "started": phase == "Running",
                "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}}
                if phase == "Running" else {"waiting": {"reason": "PodInitializing"}},
            }
            for c in containers
        ]  # fmt: skip
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "annotations": ann}
    if labels:
        meta["labels"] = dict(labels)
    if uid:
        meta["uid"] = uid
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}
