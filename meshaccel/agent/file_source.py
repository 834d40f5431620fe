"""The pods-file pod source: the meshed pods listed in a YAML or JSON file, re-read when
it changes (for a node without the Kubernetes API, the lab and tests)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import yaml

from meshaccel.agent.reconciler import PodSpec
from meshaccel.datapath import pods
from meshaccel.errors import MeshaccelError, one_line

log = logging.getLogger(__name__)


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
