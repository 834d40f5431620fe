"""A pod's own shortcut setting from its meshaccel.io/* annotations."""

from __future__ import annotations

import pytest

from meshaccel.agent.kubernetes_source import capture_annotations
from meshaccel.datapath.capture import CaptureError
from meshaccel.datapath.shortcut import ShortcutSetting, shortcut_setting


@pytest.mark.parametrize(
    "annotations,expected",
    [
        ({}, ShortcutSetting()),
        ({"meshaccel.io/shortcut": "false"}, ShortcutSetting(apps=False)),
        ({"meshaccel.io/shortcut": " true "}, ShortcutSetting(apps=True)),
        ({"meshaccel.io/shortcut": "none"}, ShortcutSetting(apps=False, sidecars=False)),
        (
            {"meshaccel.io/shortcut-exclude-ports": "6379, 5432,6379"},
            ShortcutSetting(None, (6379, 5432)),
        ),
        (
            {"meshaccel.io/shortcut": "true", "meshaccel.io/shortcut-exclude-ports": "6379"},
            ShortcutSetting(True, (6379,)),
        ),
        ({"meshaccel.io/shortcut-exclude-ports": ""}, ShortcutSetting()),
        ({"traffic.sidecar.istio.io/excludeInboundPorts": "9080"}, ShortcutSetting()),
    ],
)
def test_setting(annotations, expected):
    assert shortcut_setting(annotations) == expected
    assert shortcut_setting(annotations).is_default == (expected == ShortcutSetting())


@pytest.mark.parametrize(
    "annotations,message",
    [
        ({"meshaccel.io/shortcut": "nope"}, '"nope": not true, false or none'),
        ({"meshaccel.io/shortcut-exclude-ports": "70000"}, '"70000": port must be 1-65535'),
        ({"meshaccel.io/shortcut-exclude-ports": "*"}, '"*" is not allowed here'),
        (
            {"meshaccel.io/shortcut-exclude-ports": ",".join(map(str, range(1, 18)))},
            "at most 16 ports",
        ),
        ({"meshaccel.io/shortcuts": "false"}, "meshaccel.io/shortcuts: unknown annotation"),
    ],
)
def test_bad_values_name_the_annotation_and_value(annotations, message):
    with pytest.raises(CaptureError) as e:
        shortcut_setting(annotations)
    assert message in str(e.value)


def test_kubernetes_source_passes_them_on():
    kept = capture_annotations({"meshaccel.io/shortcut": "false", "other.io/x": "1"})
    assert kept == {"meshaccel.io/shortcut": "false"}
