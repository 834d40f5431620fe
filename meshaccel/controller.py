"""Keeps the datapath's pod registry in step with the pods on this node.

Pod sources (a watched file, the Kubernetes API) produce the full list of meshed pods on
the node; the Reconciler turns that desired list into pod add/update/remove calls
against the pinned maps (meshaccel.pods), entry by entry: it never flushes the maps, is
safe to run again with the same list, and also removes pods that vanished while the
agent was down (they are still in the maps, not in the list).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from meshaccel import pods
from meshaccel.errors import MeshaccelError, one_line

log = logging.getLogger("meshaccel.controller")


@dataclass(frozen=True)
class PodSpec:
    """One meshed pod as the datapath needs it."""

    name: str  # namespace/name
    ips: tuple[str, ...]  # one per family
    netns: str  # path of its network namespace (e.g. /proc/PID/ns/net)
    annotations: Mapping[str, str] = field(default_factory=dict)

    def key(self) -> tuple:
        return (
            self.name,
            tuple(sorted(self.ips)),
            self.netns,
            tuple(sorted(self.annotations.items())),
        )


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # pod -> error, one line


class Reconciler:
    """Applies desired pod lists to the maps of the datapath pinned at bpffs.

    What is registered is read from the maps on the first sync and again every
    relist_seconds (so drift, e.g. a `meshaccel pod remove` by hand, is repaired); in
    between, the reconciler's own writes keep its view current, so a watch event costs
    the changed pod's update only, not a read of the whole registry.
    """

    def __init__(self, bpffs: str, relist_seconds: float = 30.0) -> None:
        self.bpffs = bpffs
        self.relist_seconds = relist_seconds
        self._applied: dict[str, tuple] = {}  # pod name -> PodSpec.key() last written
        self._registered: dict[str, dict] | None = None  # pod name -> pods.list_pods() entry
        self._listed_at = 0.0
        self._relisted = False  # this sync read the registry from the maps
        self._lock = threading.Lock()

    def _current(self) -> dict[str, dict]:
        stale = time.monotonic() - self._listed_at > self.relist_seconds
        if self._registered is None or stale:
            self._registered = {p["name"]: p for p in pods.list_pods(self.bpffs)}
            self._listed_at = time.monotonic()
            self._relisted = True
        return self._registered

    def sync(self, desired: list[PodSpec]) -> SyncResult:
        """Make the registry hold exactly `desired` (by pod name and address)."""
        with self._lock:
            result = SyncResult()
            # by the name as the maps record it (a long one is cut and hashed)
            wanted = {pods.recorded_name(p.name): p for p in desired}
            self._relisted = False
            registered = self._current()
            for name, reg in list(registered.items()):
                spec = wanted.get(name)
                if spec is None or not self._same_pod(reg, spec):
                    # gone, or a new incarnation (other addresses or netns): drop the old
                    # entries first, or pod add would refuse the addresses as taken
                    if spec is None:
                        result.removed.append(name)
                    pods.remove(self.bpffs, reg["ips"][0])
                    self._applied.pop(name, None)
                    del registered[name]
            for name, spec in wanted.items():
                present = name in registered
                if present and self._up_to_date(registered[name], spec):
                    self._applied[name] = spec.key()
                    continue
                try:
                    pods.add(
                        self.bpffs, name, list(spec.ips), netns=spec.netns,
                        annotations=spec.annotations,
                    )  # fmt: skip
                except MeshaccelError as e:
                    result.failed[spec.name] = str(e)
                    log.warning("pod %s: %s", spec.name, e)
                    continue
                (result.updated if present else result.added).append(name)
                self._applied[name] = spec.key()
                registered[name] = {"name": name, "ips": list(spec.ips), "netns_cookie": None,
                                    "istio_iptables_args": None}  # fmt: skip
            return result

    def _up_to_date(self, registered: dict, spec: PodSpec) -> bool:
        """Already written as wanted: by this reconciler, or (after an agent restart) the
        registered entry carries the very settings spec would give."""
        if self._applied.get(pods.recorded_name(spec.name)) == spec.key():
            return True
        try:
            wanted = pods.capture_args(self.bpffs, None, spec.annotations)
        except MeshaccelError:
            return False  # let pod add report it
        # (a record of 511 bytes may be cut short: then it cannot tell, so write it again)
        return registered["istio_iptables_args"] == wanted and len(wanted.encode()) < 511

    def _same_pod(self, registered: dict, spec: PodSpec) -> bool:
        """The registered pod is this one (maybe with other settings), not an earlier pod
        of that name: the same addresses, and the same netns as written (or, after an
        agent restart, the same netns cookie). A pod created again with the same name,
        addresses and netns path (but a new netns) looks written already: on a relist the
        netns cookie tells them apart."""
        if set(registered["ips"]) != set(spec.ips):
            return False
        applied = self._applied.get(pods.recorded_name(spec.name))
        if applied is not None and applied[1:3] != spec.key()[1:3]:
            return False  # (addresses, netns) other than written
        if applied is not None and not (self._relisted and os.path.exists(spec.netns)):
            return True
        try:
            return pods.netns_cookie(spec.netns) == registered["netns_cookie"]
        except MeshaccelError:
            return False  # its netns is gone: the pod is


class PodSource(Protocol):
    """Calls on_desired(full list of meshed pods on this node) whenever it changes, until
    stop is set. Raises only for errors that retrying cannot fix."""

    def run(self, on_desired: Callable[[list[PodSpec]], None], stop: threading.Event) -> None: ...


# ---------------------------------------------------------------- file source


class PodEntryError(MeshaccelError):
    """One entry of a pods file cannot be used; pod is its name when it has one."""

    def __init__(self, message: str, pod: str | None = None) -> None:
        super().__init__(one_line(message))
        self.pod = pod


def read_pods_file(path: str, errors: list[PodEntryError] | None = None) -> list[PodSpec]:
    """The pods of a YAML or JSON file shaped like:

    pods:
      - name: productpage-v1
        namespace: default
        ips: [10.244.1.5]
        netns: /var/run/netns/ma-productpage     # or pid: 1234
        annotations: {traffic.sidecar.istio.io/excludeInboundPorts: "15020"}

    An entry that cannot be used raises its PodEntryError, or, given an errors list, is
    left out and its error added to the list (the other entries are still returned).
    """
    where = f"--pods-file {path}"
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except OSError as e:
        raise MeshaccelError(f"{where}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise MeshaccelError(f"{where}: not valid YAML/JSON (not UTF-8: {e.reason})") from None
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster
        doc = json.loads(text) if path.endswith(".json") else yaml.load(text, Loader=loader)
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise MeshaccelError(one_line(f"{where}: not valid YAML/JSON ({why})")) from None
    items = (doc or {}).get("pods") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise MeshaccelError(f"{where}: expected a top-level 'pods:' list")
    specs: list[PodSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        try:
            spec = _pod_from_item(where, i, item)
            if spec.name in seen:
                raise PodEntryError(
                    f"{where}: pods[{i}] ({spec.name}): name also used by pods[{seen[spec.name]}]",
                    spec.name,
                )
        except PodEntryError as e:
            if errors is None:
                raise
            errors.append(e)
            continue
        seen[spec.name] = i
        specs.append(spec)
    return specs


def _pod_from_item(where: str, i: int, item: Any) -> PodSpec:
    at = f"{where}: pods[{i}]"
    if (
        not isinstance(item, dict)
        or not isinstance(item.get("name"), str | int)
        or not (str(item["name"]).strip())
    ):
        raise PodEntryError(f"{at}: needs a name")
    namespace = item.get("namespace", "default")
    if not isinstance(namespace, str | int) or not str(namespace).strip():
        raise PodEntryError(f"{at}: namespace must be a name")
    name = f"{namespace}/{item['name']}"
    at = f"{at} ({name})"

    def bad(message: str) -> PodEntryError:
        return PodEntryError(f"{at}: {message}", name)

    ips = item.get("ips")
    if not isinstance(ips, list) or not ips or not all(isinstance(ip, str) for ip in ips):
        raise bad("ips must be a list of addresses")
    addresses = []
    for text in ips:
        try:
            addresses.append(pods.pod_address(text.strip()))
        except ValueError as e:
            raise bad(f'ips "{text}": {e}') from None
    if len({a.version for a in addresses}) != len(addresses):
        raise bad(f'ips "{",".join(ips)}": at most one address per family')
    if ("netns" in item) == ("pid" in item):
        raise bad("give exactly one of netns or pid")
    if "netns" in item:
        netns = item["netns"]
        if not isinstance(netns, str) or not netns.strip():
            raise bad("netns must be the path of a network namespace")
    else:
        pid = item["pid"]
        if isinstance(pid, str) and pid.isascii() and pid.isdigit():
            pid = int(pid)
        if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
            raise bad(f'pid "{pid}": must be a process id')
        netns = f"/proc/{pid}/ns/net"
    annotations = item.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise bad("annotations must be a mapping")
    for key, value in annotations.items():
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise bad(f"annotations.{key}: must be a string")
    return PodSpec(
        name,
        tuple(str(a) for a in addresses),
        netns,
        {str(k): str(v) for k, v in annotations.items()},
    )


class FileSource:
    """A pods file, re-read when it changes (polled: works for edits, renames, ConfigMaps).

    An entry that cannot be used is logged and left out; the other pods are served. A pod
    whose entry breaks in an edit keeps its last good settings (its capture stays on), and
    a file that cannot be read at all keeps the last good list."""

    def __init__(self, path: str, interval: float = 0.01) -> None:
        self.path = path
        self.interval = interval

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def run(self, on_desired: Callable[[list[PodSpec]], None], stop: threading.Event) -> None:
        seen: tuple | None | bool = False
        last: dict[str, PodSpec] = {}  # pod name -> the spec last delivered
        while not stop.is_set():
            stamp = self._stamp()
            if stamp != seen:
                seen = stamp
                try:
                    last = self._read(last)
                    on_desired(list(last.values()))
                except MeshaccelError as e:
                    log.error("%s", e)  # keep the last good state; retry on next change
            stop.wait(self.interval)

    def _read(self, last: dict[str, PodSpec]) -> dict[str, PodSpec]:
        errors: list[PodEntryError] = []
        specs = {s.name: s for s in read_pods_file(self.path, errors)}
        for e in errors:
            if e.pod in last and e.pod not in specs:
                specs[e.pod] = last[e.pod]
                log.error("%s (the pod keeps its last good settings)", e)
            else:
                log.error("%s", e)
        return specs


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll predicate until true or timeout; for tests and start-up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
