"""Istio's own golden iptables-restore files (Apache-2.0, from istio/istio's tests; see the
README beside them) and the istio-iptables flags behind each: shared by the capture-config
and iptables-mode tests.

The headers of most golden files name only their source, not the flags; the flags below
come from the test code that produced them (tools/istio-iptables/pkg/capture/run_test.go
getCommonTestCases, cni/pkg/plugin/plugin_dryrun_test.go + sidecar_redirect.go, which
turns annotations into the same settings) and are cross-checked against the rules in
each file by test_capture_config's test_golden_rules_agree_with_parsed_flags. Where a
header does name the flags, they must equal the entry here.
"""

from __future__ import annotations

import os
from pathlib import Path

from meshaccel.datapath.capture import ISTIO_INJECTION_DEFAULT_ARGS

GOLDEN_DIR = Path(
    os.environ.get(
        "MESHACCEL_ISTIO_GOLDEN_DIR", Path(__file__).parent / "data" / "istio-iptables-golden"
    )
)

BASE = "-p 15001 -z 15006 -u 1337 -g 1337"
CNI = f"{BASE} -m REDIRECT -i '*' -x '' -b '*' -d 15020,15021,15090"
GOLDEN_FLAGS: dict[str, tuple[str, str | None]] = {
    # file: (istio-iptables flags, None if they parse, else the start of the error)
    "cni-basic.rules": (f"{CNI} -o 15020", None),
    "cni-custom-uid.rules": (
        f"{CNI} -o 15020 -u 1000670000 -g 1000670001", None,
    ),
    "cni-dns-capture-all.rules": (
        f"{CNI} -o 15020 --redirect-dns --capture-all-dns", "--redirect-dns: not supported",
    ),
    # annotations includeOutboundIPRanges 127.0.0.0/8, excludeOutboundIPRanges 10.0.0.0/8
    "cni-include-exclude-ip.rules": (
        f"{BASE} -m REDIRECT -i 127.0.0.0/8 -x 10.0.0.0/8 -b '*' -d 15020,15021,15090 -o 15020",
        None,
    ),
    # includeInboundPorts 1111,2222; excludeInboundPorts 3333,4444 (+15020,15021,15090,
    # which have no effect without -b '*'); excludeOutboundPorts 5555,6666
    "cni-include-exclude-ports.rules": (
        f"{BASE} -m REDIRECT -i '*' -x '' -b 1111,2222 -d 3333,4444,15020,15021,15090"
        " -o 5555,6666", None,
    ),
    "cni-tproxy.rules": (
        f"{BASE} -m TPROXY -i '*' -x '' -b '*' -d 15020,15021,15090 -o 15020",
        "-m TPROXY: only REDIRECT mode is supported",
    ),
    # flags are the defaults; the file's 127.0.0.1/8 comes from the environment variable
    # ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR, which CaptureConfig does not model (127.0.0.1/32)
    "host-ipv4-loopback-cidr.rules": (BASE, None),
    "inbound-ports-include.rules": (f"{BASE} -b 32000,31000", None),
    # 1.1.0.0/16 and 9.9.0.0/16 replaced by lab ranges, as in the file's header
    "ip-range.rules": (
        "-p 15001 -z 15006 -u 3,4 -g 1,2 -x 10.244.9.8/30 -i 10.244.9.0/28 --redirect-dns",
        "--redirect-dns: not supported",
    ),
    "ipnets.rules": (f"{BASE} -i 10.0.0.0/8", None),
    "istio-init-default.rules": (ISTIO_INJECTION_DEFAULT_ARGS, None),
    "istio-init-seed-args.rules": (ISTIO_INJECTION_DEFAULT_ARGS, None),
    "kube-virt-interfaces.rules": (
        f"{BASE} -k eth1,eth2 -i '*'", '-k "eth1,eth2": not supported',
    ),
    "loopback-outbound-iprange.rules": (
        "-p 15001 -z 15006 -u 3,4 -g 1,2 -i 127.1.2.3/32 --redirect-dns",
        "--redirect-dns: not supported",
    ),
    "outbound-ports-include.rules": (f"{BASE} -q 32000,31000", None),
}  # fmt: skip


def header_flags(path: Path) -> str | None:
    """The istio-iptables flags a golden file's '#' header names, if it names them."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("-"):
            return text
    return None
