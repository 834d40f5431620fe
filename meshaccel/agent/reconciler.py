"""Keeps the datapath's pod registry in step with the pods on this node.

A pod source (file_source, kubernetes_source) produces the full list of meshed pods on
the node; the Reconciler turns that desired list into pod add/update/remove calls
against the pinned maps (meshaccel.datapath.pods), entry by entry: it never flushes the
maps, is safe to run again with the same list, and also removes pods that vanished while
the agent was down (they are still in the maps, not in the list).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meshaccel.datapath import compiler, pods
from meshaccel.datapath.netns import netns_cookie
from meshaccel.errors import MeshaccelError

log = logging.getLogger(__name__)


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
        self._registered: dict[str, pods.Registration] | None = None  # by pod name
        self._listed_at = 0.0
        self._relisted = False  # this sync read the registry from the maps
        self._lock = threading.Lock()

    def _current(self) -> dict[str, pods.Registration]:
        stale = time.monotonic() - self._listed_at > self.relist_seconds
        if self._registered is None or stale:
            self._registered = {p.name: p for p in pods.registrations(self.bpffs)}
            self._listed_at = time.monotonic()
            self._relisted = True
        return self._registered

    def sync(self, desired: list[PodSpec]) -> SyncResult:
        """Make the registry hold exactly `desired` (by pod name and address)."""
        with self._lock:
            result = SyncResult()
            # by the name as the maps record it (a long one is cut and hashed)
            wanted = {compiler.recorded_name(p.name): p for p in desired}
            self._relisted = False
            registered = self._current()
            for name, reg in list(registered.items()):
                spec = wanted.get(name)
                if spec is None or not self._same_pod(reg, spec):
                    # gone, or a new incarnation (other addresses or netns): drop the old
                    # entries first, or pod add would refuse the addresses as taken
                    if spec is None:
                        result.removed.append(name)
                    pods.remove(self.bpffs, reg.ips[0])
                    self._applied.pop(name, None)
                    del registered[name]
            for name, spec in wanted.items():
                present = name in registered
                if present and self._up_to_date(registered[name], spec):
                    self._applied[name] = spec.key()
                    continue
                if not self._add(name, spec, result):
                    continue
                (result.updated if present else result.added).append(name)
                self._applied[name] = spec.key()
                # (its cookie and settings are read back on the next relist; until then
                # _applied says it is written as wanted)
                registered[name] = pods.Registration(name, spec.ips, 0, "")
            return result

    def register_new_addresses(self, desired: list[PodSpec]) -> SyncResult:
        """Register again the pods of desired whose netns holds other addresses than those
        registered for them: one put on a pod later (a second interface's, say), which
        until then is captured inbound but not known as the pod's own (the app's call to
        it would go to its sidecar), or one taken off. Each pod's netns is read without
        the lock, so pod events do not wait for it; a pod that changed meanwhile was
        registered with its addresses of then, and is left to the next check."""
        registered = {p.name: p for p in pods.registrations(self.bpffs)}
        stale = []
        for spec in desired:
            reg = registered.get(compiler.recorded_name(spec.name))
            try:
                if reg and pods.addresses_now(self.bpffs, spec.netns, spec.ips) != reg.addresses:
                    stale.append(spec)
            except (OSError, MeshaccelError, ValueError):
                continue  # its netns is gone or bad: the next sync removes or reports it
        result = SyncResult()
        with self._lock:
            for spec in stale:
                name = compiler.recorded_name(spec.name)
                if self._applied.get(name) == spec.key() and self._add(name, spec, result):
                    result.updated.append(name)
        return result

    def _add(self, name: str, spec: PodSpec, result: SyncResult) -> bool:
        """pod add (or update) of spec under its recorded name; a failure goes to result."""
        try:
            pods.add(
                self.bpffs, name, list(spec.ips), netns=spec.netns, annotations=spec.annotations
            )
        except MeshaccelError as e:
            result.failed[spec.name] = str(e)
            log.warning("pod %s: %s", spec.name, e)
            return False
        return True

    def _up_to_date(self, registered: pods.Registration, spec: PodSpec) -> bool:
        """Already written as wanted: by this reconciler, or (after an agent restart) the
        registered entries hold what pod add would compile for spec (its rules, ports and
        shortcut setting, compared by digest)."""
        if self._applied.get(compiler.recorded_name(spec.name)) == spec.key():
            return True
        try:
            wanted = pods.desired_settings(self.bpffs, spec.name, spec.annotations)
        except MeshaccelError:
            return False  # let pod add report it
        return registered.settings == wanted

    def _same_pod(self, registered: pods.Registration, spec: PodSpec) -> bool:
        """The registered pod is this one (maybe with other settings), not an earlier pod
        of that name: the same addresses, and the same netns as written (or, after an
        agent restart, the same netns cookie). A pod created again with the same name,
        addresses and netns path (but a new netns) looks written already: on a relist the
        netns cookie tells them apart."""
        if set(registered.ips) != set(spec.ips):
            return False
        applied = self._applied.get(compiler.recorded_name(spec.name))
        if applied is not None and applied[1:3] != spec.key()[1:3]:
            return False  # (addresses, netns) other than written
        if applied is not None and not (self._relisted and os.path.exists(spec.netns)):
            return True
        try:
            return netns_cookie(spec.netns) == registered.netns_cookie
        except MeshaccelError:
            return False  # its netns is gone: the pod is


class PodSource(Protocol):
    """Calls on_desired(full list of meshed pods on this node) whenever it changes, until
    stop is set. Raises only for errors that retrying cannot fix."""

    def run(self, on_desired: Callable[[list[PodSpec]], None], stop: threading.Event) -> None: ...
