"""A pod's own shortcut setting: meshaccel's per-pod annotations (meshaccel.io/*, not
Istio's), which keep a pod's sockets, or some of its ports, off the sk_msg shortcut."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshaccel.datapath.capture import CaptureError, parse_bool, parse_ports
from meshaccel.datapath.structs import MAX_SHORTCUT_EXCLUDE

MESHACCEL_PREFIX = "meshaccel.io/"
SHORTCUT_ANNOTATION = MESHACCEL_PREFIX + "shortcut"
SHORTCUT_EXCLUDE_PORTS_ANNOTATION = MESHACCEL_PREFIX + "shortcut-exclude-ports"


@dataclass(frozen=True)
class ShortcutSetting:
    """A pod's own shortcut setting, from its meshaccel.io/* annotations. apps: whether
    its app<->sidecar sockets take the shortcut (None: as the node's attach says);
    sidecars: whether its sidecar<->sidecar ones do (False: "none")."""

    apps: bool | None = None
    exclude_ports: tuple[int, ...] = ()
    sidecars: bool = True

    @property
    def is_default(self) -> bool:
        return self.apps is None and not self.exclude_ports and self.sidecars


def shortcut_setting(annotations: Mapping[str, str]) -> ShortcutSetting:
    """meshaccel.io/shortcut ("true": the pod's app sockets take the shortcut, for apps
    that read as a sidecar does; "false": none of them does; "none": no socket of the pod
    does, its sidecar's connections to and from other pods neither, for apps that may
    stop reading; absent: as the node says, by default sidecars only) and
    meshaccel.io/shortcut-exclude-ports (ports kept off the shortcut on every hop: the
    destination port of the pod's outbound connections, its app's own inbound ports)."""
    for key in annotations:
        if key.startswith(MESHACCEL_PREFIX) and key not in (
            SHORTCUT_ANNOTATION,
            SHORTCUT_EXCLUDE_PORTS_ANNOTATION,
        ):
            raise CaptureError(
                f"{key}: unknown annotation (meshaccel knows {SHORTCUT_ANNOTATION}, "
                f"{SHORTCUT_EXCLUDE_PORTS_ANNOTATION})"
            )
    apps, sidecars = None, True
    if SHORTCUT_ANNOTATION in annotations:
        raw = annotations[SHORTCUT_ANNOTATION].strip()
        if raw == "none":
            apps, sidecars = False, False
        else:
            try:
                apps = parse_bool(SHORTCUT_ANNOTATION, raw)
            except CaptureError:
                why = f'{SHORTCUT_ANNOTATION} "{raw}": not true, false or none'
                raise CaptureError(why) from None
    ports: tuple[int, ...] = ()
    raw = annotations.get(SHORTCUT_EXCLUDE_PORTS_ANNOTATION)
    if raw is not None:
        hint = "list the ports"
        ports = parse_ports(SHORTCUT_EXCLUDE_PORTS_ANNOTATION, raw, wildcard=False, hint=hint)  # type: ignore[assignment]
        if len(ports) > MAX_SHORTCUT_EXCLUDE:
            raise CaptureError(
                f'{SHORTCUT_EXCLUDE_PORTS_ANNOTATION} "{raw}": at most '
                f'{MAX_SHORTCUT_EXCLUDE} ports (or set {SHORTCUT_ANNOTATION}: "false")'
            )
    return ShortcutSetting(apps, ports, sidecars)
