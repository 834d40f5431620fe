"""The pods file: its shape, and errors that name the file and the entry."""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from meshaccel.agent import daemon, reconciler
from meshaccel.agent.file_source import FileSource, read_pods_file
from meshaccel.agent.reconciler import PodSpec, Reconciler
from meshaccel.datapath import compiler, pods
from meshaccel.errors import MeshaccelError
from tests.wait import wait_for


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


def test_pods_file_with_a_bad_entry_serves_the_others_and_keeps_its_last_settings(tmp_path):
    path = tmp_path / "pods.yaml"
    a = {"name": "a", "ips": ["10.244.1.5"], "netns": "/run/netns/a"}
    b = {"name": "b", "ips": ["10.244.1.6"], "netns": "/run/netns/b"}
    path.write_text(yaml.safe_dump({"pods": [a, {"name": "bad", "ips": ["x"], "pid": 1}, b]}))
    calls: list[list] = []
    stop = threading.Event()
    t = threading.Thread(target=FileSource(str(path), 0.01).run, args=(calls.append, stop))
    t.start()
    try:
        assert wait_for(
            lambda: calls and [p.name for p in calls[-1]] == ["default/a", "default/b"], 5
        )
        # an edit breaks a's entry: a keeps its last good settings, c is added all the same
        c = {"name": "c", "ips": ["10.244.1.7"], "pid": 7}
        broken_a = {**a, "ips": "10.244.1.5"}
        path.write_text(yaml.safe_dump({"pods": [broken_a, b, c]}))
        assert wait_for(
            lambda: {p.name for p in calls[-1]} == {"default/a", "default/b", "default/c"}, 5
        )
        assert [p for p in calls[-1] if p.name == "default/a"][0].ips == ("10.244.1.5",)
        path.write_text(yaml.safe_dump({"pods": [b]}))  # a and c are gone
        assert wait_for(lambda: [p.name for p in calls[-1]] == ["default/b"], 5)
    finally:
        stop.set()
        t.join(5)


class _FakePods:
    """meshaccel.datapath.pods as the Reconciler uses it, on a dict: pod add checks the
    settings and records their digest, as the maps would give it back."""

    def __init__(self) -> None:
        self.registered: dict[str, pods.Registration] = {}
        self.added: list[str] = []
        self.netns_addresses: dict[str, list[str]] = {}  # netns -> addresses besides ips

    def registrations(self, bpffs: str) -> list[pods.Registration]:
        return list(self.registered.values())

    def add(self, bpffs, name, ips, netns=None, annotations=None):
        settings = pods.desired_settings(bpffs, name, annotations)  # raises as pod add does
        name = compiler.recorded_name(name)  # as pod_config records it
        addresses = frozenset([*ips, *self.netns_addresses.get(netns, [])])
        self.registered[name] = pods.Registration(name, tuple(ips), 1, settings, addresses)
        self.added.append(name)

    def addresses_now(self, bpffs, netns, ips):
        if netns not in self.netns_addresses:
            raise MeshaccelError(f"--netns {netns}: No such file or directory")
        return frozenset([*ips, *self.netns_addresses[netns]])

    def remove(self, bpffs, ip):
        for name, reg in list(self.registered.items()):
            if ip in reg.ips:
                del self.registered[name]


@pytest.fixture
def fake(monkeypatch) -> _FakePods:
    fake = _FakePods()
    for fn in ("registrations", "add", "remove", "addresses_now"):
        monkeypatch.setattr(pods, fn, getattr(fake, fn))
    monkeypatch.setattr(reconciler, "netns_cookie", lambda path: 1)
    monkeypatch.setattr(pods, "default_args", lambda bpffs: "-p 15001 -b '*'")
    return fake


def test_reconciler_reports_a_bad_annotation_by_pod_and_serves_the_others(fake):
    key = "traffic.sidecar.istio.io/excludeInboundPorts"
    specs = [
        PodSpec("default/a", ("10.244.1.5",), "/run/netns/a"),
        PodSpec("default/bad", ("10.244.1.6",), "/run/netns/bad", {key: "80,http"}),
        PodSpec("default/" + "long" * 20, ("10.244.1.7",), "/run/netns/long"),
    ]
    r = Reconciler("/sys/fs/bpf/x", relist_seconds=0)
    res = r.sync(specs)
    assert res.failed == {"default/bad": f'{key} "http": not a port number'}
    assert len(res.added) == 2 and len(fake.registered) == 2
    # a relist reads the long name back as recorded: it is the same pod, left alone
    assert compiler.recorded_name(specs[2].name) in fake.registered
    again = r.sync(specs)
    assert again.added == again.removed == again.updated == [] and "default/bad" in again.failed


def test_a_restarted_reconciler_tells_written_settings_by_their_compiled_digest(fake):
    """After an agent restart, what the maps hold is compared with what pod add would
    compile: pods as wanted are left alone, also with settings spelled out past the 511
    bytes pod_config records of them, and a changed shortcut annotation is written."""
    # 20 rules, but over 511 bytes spelled out
    cidrs = ",".join(f"2001:db8:{i + 1:x}:1111:2222:3333:4444:5500/120" for i in range(20))
    specs = [
        PodSpec("default/a", ("10.244.1.5",), "/run/netns/a"),
        PodSpec("default/long", ("10.244.1.6",), "/run/netns/long",
                {"traffic.sidecar.istio.io/excludeOutboundIPRanges": cidrs}),
    ]  # fmt: skip
    assert len(pods.capture_args("/x", None, specs[1].annotations)) == 511
    assert Reconciler("/sys/fs/bpf/x").sync(specs).added == ["default/a", "default/long"]

    restarted = Reconciler("/sys/fs/bpf/x")
    again = restarted.sync(specs)
    assert again.added == again.updated == again.removed == [] and not again.failed

    opted_in = PodSpec("default/a", ("10.244.1.5",), "/run/netns/a",
                       {"meshaccel.io/shortcut": "true"})  # fmt: skip
    assert Reconciler("/sys/fs/bpf/x").sync([opted_in, specs[1]]).updated == ["default/a"]


class _Watch:
    """AddressWatch as the agent sees it: paths followed, changes reported when told."""

    def __init__(self) -> None:
        self.followed: set[str] = set()
        self.pending: set[str] = set()

    def follow(self, paths) -> set[str]:
        paths = set(paths)
        new, self.followed = paths - self.followed, paths
        return new

    def changed(self) -> set[str]:
        found, self.pending = self.pending, set()
        return found


def test_the_agent_registers_addresses_put_on_its_pods_when_their_netns_changes(fake, monkeypatch):
    """A pod whose netns changed (AddressWatch), whose watch just began, or that a sync
    just registered is compared with what is registered for it at the next tick, and
    registered again when an address was put on it (counted as updated); every
    ADDRESS_CHECK_SECONDS all pods are. A pod whose netns is gone is left alone."""
    fake.netns_addresses = {"/run/netns/a": [], "/run/netns/b": []}  # (c's cannot be read)
    specs = [
        PodSpec("default/a", ("10.244.1.5",), "/run/netns/a"),
        PodSpec("default/b", ("10.244.1.6",), "/run/netns/b"),
        PodSpec("default/c", ("10.244.1.7",), "/run/netns/c"),
    ]
    agent = daemon.Agent("file", object(), "/sys/fs/bpf/x", None, "", True, False, ("", 0))
    agent.addresses = watch = _Watch()  # type: ignore[assignment]
    checked: list[list[str]] = []
    real_check = agent.reconciler.register_new_addresses

    def check(desired: list[PodSpec]):
        checked.append([s.name for s in desired])
        return real_check(desired)

    monkeypatch.setattr(agent.reconciler, "register_new_addresses", check)
    agent.on_desired(specs)
    assert sorted(fake.added) == ["default/a", "default/b", "default/c"]
    fake.added.clear()

    agent._check_addresses_if_due()  # watched from now on, and just registered: read once
    assert checked == [["default/a", "default/b", "default/c"]] and fake.added == []
    assert watch.followed == {"/run/netns/a", "/run/netns/b", "/run/netns/c"}
    fake.netns_addresses["/run/netns/b"] = ["10.244.1.30"]
    agent._check_addresses_if_due()  # no change seen: nothing read
    assert len(checked) == 1
    watch.pending = {"/run/netns/b"}
    agent._check_addresses_if_due()
    assert checked[-1] == ["default/b"] and fake.added == ["default/b"]
    assert fake.registered["default/b"].addresses == {"10.244.1.6", "10.244.1.30"}
    updated = agent.metrics.registry.get_sample_value(
        "meshaccel_reconcile_pods_total", {"result": "updated"}
    )
    assert updated == 1

    fake.netns_addresses["/run/netns/a"] = ["10.244.1.31"]  # (a change not seen)
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + daemon.ADDRESS_CHECK_SECONDS)
    agent._check_addresses_if_due()  # every pod, every ADDRESS_CHECK_SECONDS
    assert checked[-1] == ["default/a", "default/b", "default/c"]
    assert fake.added == ["default/b", "default/a"]
    agent._check_addresses_if_due()  # the next one is due ADDRESS_CHECK_SECONDS later
    assert len(checked) == 3
