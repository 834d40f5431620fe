"""iptables mode: rules() against Istio's own golden iptables-restore files, IPv6 and a few
option combinations; remove()'s restore input; refusal to touch the root netns."""

from __future__ import annotations

import pytest

from meshaccel.datapath import iptables_mode
from meshaccel.datapath import netns as netns_mod
from meshaccel.datapath.capture import CaptureConfig, parse_istio_args
from meshaccel.datapath.iptables_mode import install, removal, remove, rules
from meshaccel.errors import MeshaccelError
from tests.istio_golden import GOLDEN_DIR, GOLDEN_FLAGS, header_flags

# Goldens rules() cannot produce, and why: each needs an option CaptureConfig does not have.
UNSUPPORTED = {
    "cni-dns-capture-all": "DNS capture (ISTIO_OUTPUT_DNS, raw table)",
    "cni-tproxy": "-m TPROXY (mangle table)",
    "ip-range": "DNS capture (--redirect-dns, DNS servers)",
    "loopback-outbound-iprange": "DNS capture (--redirect-dns, DNS servers)",
    "kube-virt-interfaces": "-k (kube-virt interfaces)",
    "host-ipv4-loopback-cidr": "env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR=127.0.0.1/8 (no flag)",
}
STEMS = [name.removesuffix(".rules") for name in GOLDEN_FLAGS]
SUPPORTED = sorted(stem for stem in STEMS if stem not in UNSUPPORTED)


def config(args: str) -> CaptureConfig:
    return parse_istio_args(args)


def golden(stem: str) -> tuple[str, list[str]]:
    """A golden file's flags (from its header, else GOLDEN_FLAGS) and its rule lines."""
    path = GOLDEN_DIR / f"{stem}.rules"
    assert path.exists(), f"Istio golden {path} missing"
    return header_flags(path) or GOLDEN_FLAGS[path.name][0], significant(path.read_text())


def significant(text: str) -> list[str]:
    """Rule lines: no comments or blank lines; Istio writes '* nat', iptables-save '*nat'."""
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln.replace("* ", "*", 1) for ln in lines if ln and not ln.startswith("#")]


def test_every_golden_is_accounted_for():
    assert GOLDEN_DIR.is_dir(), f"Istio goldens missing: {GOLDEN_DIR}"
    stems = {p.stem for p in GOLDEN_DIR.glob("*.rules")}
    assert stems == set(SUPPORTED) | set(UNSUPPORTED)


@pytest.mark.parametrize("stem", SUPPORTED)
def test_reproduces_istio_golden(stem):
    args, expected = golden(stem)
    assert significant(rules(config(args))) == expected


SEED = config("-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020")

SEED_V6 = """\
*nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d ::1/128 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""  # noqa: E501 - Istio's ip6tables lines for the seed args (cf. its ipv6-*.golden files)


def test_seed_rules_v6():
    assert rules(SEED, family=6) == SEED_V6


def test_seed_rules_v4_differ_from_v6_only_in_addresses():
    v4 = rules(SEED, family=4)
    swapped = v4.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128")
    assert swapped == SEED_V6


def _output(cfg: CaptureConfig, family: int = 4) -> list[str]:
    return [ln for ln in rules(cfg, family).splitlines() if ln.startswith("-A ISTIO_OUTPUT")]


def test_cidrs_go_to_their_family():
    """Like Istio's ipv6-ipnets golden: -x/-i lists are split by family; '*' is both."""
    cfg = config("-i 10.244.0.0/16,fd00:244::/64 -x 10.244.9.0/24,fd00:244::9/128")
    assert _output(cfg, 4)[-2:] == [
        "-A ISTIO_OUTPUT -d 10.244.9.0/24 -j RETURN",
        "-A ISTIO_OUTPUT -d 10.244.0.0/16 -j ISTIO_REDIRECT",
    ]
    assert _output(cfg, 6)[-2:] == [
        "-A ISTIO_OUTPUT -d fd00:244::9/128 -j RETURN",
        "-A ISTIO_OUTPUT -d fd00:244::/64 -j ISTIO_REDIRECT",
    ]
    v4_only = config("-i 10.244.0.0/16")
    assert _output(v4_only, 6)[-1] == "-A ISTIO_OUTPUT -d ::1/128 -j RETURN"  # v6: no capture
    assert _output(config("-i '*'"), 6)[-1] == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"


def test_loopback_include_drops_the_app_to_itself_return():
    """An -i CIDR that is a loopback address removes '-o lo ! --uid-owner X -j RETURN' in
    both families (Istio checks both lists), so app->own pod IP can be captured."""
    for family in (4, 6):
        lines = _output(config("-u 1337,1338 -g 1 -i 127.0.0.0/8,10.244.0.0/16"), family)
        assert not [ln for ln in lines if "! --uid-owner" in ln or "! --gid-owner" in ln]
        assert sum("-j ISTIO_IN_REDIRECT" in ln for ln in lines) == 3


def test_multiple_uids_and_gids_in_order():
    lines = _output(config("-u 1337,1000 -g 7,8 -i '*'"))
    owners = [ln.split("-owner ")[1].split()[0] for ln in lines if "-owner" in ln]
    assert owners == ["1337"] * 3 + ["1000"] * 3 + ["7"] * 3 + ["8"] * 3
    assert "--uid-owner 1000" in lines[4] and "--gid-owner 7" in lines[7]


def test_exclude_ports_and_outbound_includes():
    text = rules(config("-b 9080,9443 -d 9443 -o 25,15020 -q 3306 -i ''"))
    lines = text.splitlines()
    # -d only matters with -b '*'; a -b list redirects exactly those ports
    assert [ln for ln in lines if ln.startswith("-A ISTIO_INBOUND")] == [
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_INBOUND -p tcp --dport 9443 -j ISTIO_IN_REDIRECT",
    ]
    out = _output(config("-b 9080,9443 -d 9443 -o 25,15020 -q 3306 -i ''"))
    assert out[:5] == [
        "-A ISTIO_OUTPUT -p tcp --dport 25 -j RETURN",
        "-A ISTIO_OUTPUT -p udp --dport 25 -j RETURN",
        "-A ISTIO_OUTPUT -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_OUTPUT -p udp --dport 15020 -j RETURN",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    ]
    assert out[-1] == "-A ISTIO_OUTPUT -p tcp --dport 3306 -j ISTIO_REDIRECT"


def test_no_inbound_ports_means_no_prerouting_jump():
    text = rules(config("-b '' -d 15020 -i '*'"))
    assert "PREROUTING" not in text and "--dport 15020" not in text


def test_custom_ports():
    text = rules(config("-p 16001 -z 16006 -b '*' -i '*'"))
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in text
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in text


def test_rejects_tproxy_and_bad_family():
    with pytest.raises(MeshaccelError, match="-m TPROXY: only REDIRECT mode is supported"):
        rules(config("-m TPROXY"))
    with pytest.raises(ValueError):
        rules(SEED, family=5)


SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m mark --mark 7 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_OUTPUT - [0:0]
:KEEP - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p udp -j KEEP
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_OUTPUT -j KEEP
COMMIT
"""


def test_removal_deletes_only_istio_chains_and_jumps():
    assert removal(SAVE).splitlines() == [
        "*nat",
        "-D PREROUTING -p tcp -j ISTIO_INBOUND",
        "-D OUTPUT -j ISTIO_OUTPUT",
        "-F ISTIO_INBOUND",
        "-F ISTIO_OUTPUT",
        "-X ISTIO_INBOUND",
        "-X ISTIO_OUTPUT",
        "COMMIT",
    ]
    assert removal(SAVE.replace("ISTIO_", "OTHER_")) == ""


@pytest.mark.parametrize("netns", [None, ""])
def test_refuses_the_root_netns(netns, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("ran a command")

    monkeypatch.setattr(iptables_mode.subprocess, "run", never)
    for call in (lambda: install(netns, SEED), lambda: remove(netns)):
        with pytest.raises(MeshaccelError, match="refusing to change the root netns"):
            call()


@pytest.mark.parametrize("netns", ["../../proc/1/ns/net", "/proc/1/ns/net", ".."])
def test_refuses_paths(netns):
    with pytest.raises(MeshaccelError, match="not a path"):
        remove(netns)


def test_missing_netns_and_missing_tool(monkeypatch, tmp_path):
    monkeypatch.setattr(netns_mod, "NETNS_DIR", str(tmp_path))
    with pytest.raises(MeshaccelError, match="netns 'nope' not found"):
        remove("nope")
    (tmp_path / "pod").touch()
    monkeypatch.setattr(iptables_mode.shutil, "which", lambda *a, **kw: None)
    with pytest.raises(MeshaccelError, match="iptables-save not found: apt-get install iptables"):
        remove("pod")
