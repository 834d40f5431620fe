"""The pods file: its shape, and errors that name the file and the entry."""

from __future__ import annotations

import pytest

from meshaccel.controller import read_pods_file
from meshaccel.errors import MeshaccelError


def test_pods_file_is_read(tmp_path):
    path = tmp_path / "pods.yaml"
    path.write_text(
        "pods:\n  - name: productpage-v1\n    namespace: shop\n    ips: [10.244.1.5]\n"
        "    pid: 42\n    annotations:\n      traffic.sidecar.istio.io/excludeInboundPorts: 15020\n"
    )
    [pod] = read_pods_file(str(path))
    assert pod.name == "shop/productpage-v1" and pod.ips == ("10.244.1.5",)
    assert pod.netns == "/proc/42/ns/net"
    assert pod.annotations == {"traffic.sidecar.istio.io/excludeInboundPorts": "15020"}


@pytest.mark.parametrize(
    "text,message",
    [
        ("pods: [", "not valid YAML/JSON"),
        ("{}", "expected a top-level 'pods:' list"),
        ("pods: [{ips: [1.2.3.4], netns: /x}]", "pods[0]: needs a name"),
        ("pods: [{name: p, netns: /x}]", "(default/p): ips must be a list"),
        ("pods: [{name: p, ips: [1.2.3.4]}]", "give exactly one of netns or pid"),
    ],
)
def test_pods_file_errors_name_the_entry(tmp_path, text, message):
    path = tmp_path / "pods.yaml"
    path.write_text(text)
    with pytest.raises(MeshaccelError) as e:
        read_pods_file(str(path))
    assert message in str(e.value) and str(path) in str(e.value)
