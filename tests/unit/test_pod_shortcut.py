"""Per-pod shortcut sockets: which pod a sock_hash key belongs to, how `pod list` shows the
count, and the per-pod gauge of the metrics (synthetic keys; no root needed)."""

from __future__ import annotations

from meshaccel.agent.metrics import Metrics, pod_shortcut_sockets
from meshaccel.cli import format_pods
from meshaccel.datapath import structs
from meshaccel.datapath.pods import shortcut_counts
from tests.unit.test_metrics import fake_status, scrape

A_COOKIE, B_COOKIE, C_COOKIE, STRANGER_COOKIE = 4097, 4098, 4099, 9999
A_IPS = ("10.244.1.10", "fd00:244::10")
B_IPS = ("10.244.1.20",)
C_IPS = ("fd00:244::30",)


def ip(text: str) -> structs.IpKey:
    return structs.IpKey(structs.ip_words(text))


def key(cookie: int, local: str, remote: str, lport: int, rport: int) -> structs.SockKey:
    return structs.SockKey(
        netns_cookie=cookie,
        local_ip=structs.ip_words(local),
        remote_ip=structs.ip_words(remote),
        local_port=lport,
        remote_port=rport,
    )


def registered() -> list[tuple[int, list[structs.IpKey]]]:
    """Three pods as pod_config holds them: ips[0] IPv4 (or zero), ips[1] IPv6 (or zero)."""
    return [
        (A_COOKIE, [ip(A_IPS[0]), ip(A_IPS[1])]),
        (B_COOKIE, [ip(B_IPS[0]), structs.IpKey()]),
        (C_COOKIE, [structs.IpKey(), ip(C_IPS[0])]),
    ]


def test_loopback_keys_belong_to_the_pod_of_their_netns_cookie():
    keys = [  # the app's and the sidecar's end of one captured connection in pod A
        key(A_COOKIE, "127.0.0.1", "127.0.0.1", 40000, 15001),
        key(A_COOKIE, "127.0.0.1", "127.0.0.1", 15001, 40000),
        key(A_COOKIE, "::1", "::1", 40001, 15001),
        key(A_COOKIE, "::1", "::1", 15001, 40001),
        # the very same 4-tuple in pod B's own netns
        key(B_COOKIE, "127.0.0.1", "127.0.0.1", 40000, 15001),
    ]
    assert shortcut_counts(keys, registered()) == {A_COOKIE: 4, B_COOKIE: 1, C_COOKIE: 0}


def test_pod_ip_keys_belong_to_the_pod_holding_their_local_address():
    """Sidecar A -> pod B's inbound port: the two ends carry no netns cookie; each end is
    its own pod's, by local address (IPv4 v4-mapped, IPv6 as is)."""
    keys = [
        key(0, A_IPS[0], B_IPS[0], 41000, 15006),  # A's sidecar end
        key(0, B_IPS[0], A_IPS[0], 15006, 41000),  # B's sidecar end
        key(0, A_IPS[1], C_IPS[0], 41001, 15006),
        key(0, C_IPS[0], A_IPS[1], 15006, 41001),
    ]
    assert shortcut_counts(keys, registered()) == {A_COOKIE: 2, B_COOKIE: 1, C_COOKIE: 1}


def test_keys_of_no_registered_pod_are_not_counted():
    keys = [
        key(STRANGER_COOKIE, "127.0.0.1", "127.0.0.1", 40000, 15001),  # an unregistered netns
        key(0, "10.244.9.9", B_IPS[0], 42000, 15006),  # local address of no registered pod
        key(0, "::", "::", 0, 0),  # an all-zero key does not match a pod without IPv6
    ]
    assert shortcut_counts(keys, registered()) == {A_COOKIE: 0, B_COOKIE: 0, C_COOKIE: 0}
    assert shortcut_counts([], []) == {}


def test_an_address_matches_its_family_only():
    """10.244.1.10 (v4-mapped) is not ::a0f4:10a or any IPv6 pod address."""
    v6_lookalike = "::a0f4:10a"
    keys = [key(0, v6_lookalike, B_IPS[0], 1, 2)]
    assert shortcut_counts(keys, registered())[A_COOKIE] == 0


POD = {
    "name": "default/productpage",
    "ips": ["10.244.1.5"],
    "istio_iptables_args": "-p 15001 -z 15006 -u 1337",
    "shortcut_sockets": 6,
}


def test_pod_list_text_has_a_shortcut_column():
    text = format_pods([POD, {**POD, "name": "default/details", "shortcut_sockets": None}])
    head, first, second = text.splitlines()
    assert head.split()[:3] == ["POD", "ADDRESSES", "SHORTCUT"]
    assert first.split()[:3] == ["default/productpage", "10.244.1.5", "6"]
    assert second.split()[:3] == ["default/details", "10.244.1.5", "-"]  # not counted
    assert first.index("6") + 1 == head.index("SHORTCUT") + len("SHORTCUT")  # right-aligned
    assert format_pods([]) == "no pods registered (meshaccel pod add)"


def test_metrics_gauge_per_pod():
    m = Metrics(fake_status, pod_sockets=lambda st: {"default/b": 0, "default/a": 4})
    samples = scrape(m)
    assert samples[("meshaccel_pod_shortcut_sockets", (("pod", "default/a"),))] == 4
    assert samples[("meshaccel_pod_shortcut_sockets", (("pod", "default/b"),))] == 0
    assert samples[("meshaccel_errors_total", (("kind", "datapath_read"),))] == 0


def test_metrics_gauge_read_failure_keeps_the_rest():
    def broken(st: object) -> dict:
        raise OSError(13, "Permission denied")

    samples = scrape(Metrics(fake_status, pod_sockets=broken))
    assert samples[("meshaccel_datapath_attached", ())] == 1
    assert samples[("meshaccel_errors_total", (("kind", "datapath_read"),))] == 1
    assert not any(name == "meshaccel_pod_shortcut_sockets" for name, _ in samples)


def test_default_provider_reads_nothing_without_pins(tmp_path):
    assert pod_shortcut_sockets({"bpffs": str(tmp_path / "none"), "programs": [{}]}) == {}
    assert pod_shortcut_sockets({"bpffs": str(tmp_path), "programs": []}) == {}
    samples = scrape(Metrics(lambda: {**fake_status(), "bpffs": str(tmp_path / "none")}))
    assert samples[("meshaccel_errors_total", (("kind", "datapath_read"),))] == 0
