"""What meshaccel's parsers accept, the real iptables accepts: for any istio-iptables
args that parse (the property tests' generator, tests/unit/test_parser_properties.py),
iptables-restore and ip6tables-restore --test take the iptables mode's rules in a pod
netns (parsed and checked by the tools and the kernel's tables, nothing committed); the
eBPF datapath compiles the same CaptureConfig (checked there)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshaccel.datapath import iptables_mode
from tests.unit.test_parser_properties import PROPS, accepted, argv, ip_networks, valid_ports


def listed(items: st.SearchStrategy, wildcard: bool = False) -> st.SearchStrategy[str]:
    out = st.lists(items, max_size=10).map(lambda xs: ",".join(map(str, xs)))
    return out | st.just("*") if wildcard else out


# args that parse: every list flag with valid items (and '*' where allowed)
valid_args = st.fixed_dictionaries(
    {
        "-p": valid_ports.map(str),
        "-z": valid_ports.map(str),
        "-u": st.lists(st.integers(0, 2**32 - 2), min_size=1, max_size=3).map(
            lambda xs: ",".join(map(str, xs))
        ),
        "-i": listed(ip_networks, wildcard=True),
        "-x": listed(ip_networks),
        "-b": listed(valid_ports, wildcard=True),
        "-d": listed(valid_ports),
        "-q": listed(valid_ports),
        "-o": listed(valid_ports),
    },
).map(lambda flags: [word for flag, value in flags.items() for word in (flag, value)])

CHECK = settings(
    PROPS, max_examples=40, suppress_health_check=[*PROPS.suppress_health_check,
                                                    HealthCheck.function_scoped_fixture]
)  # fmt: skip


@CHECK
@given(valid_args | argv())
def test_iptables_takes_what_the_parser_accepts(lab, args):
    cfg = accepted(args)
    if cfg is None:
        return
    ns = getattr(lab, "props_netns", None)  # one netns for every example
    if ns is None:
        ns = lab.props_netns = lab.node("props")
    for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        iptables_mode._run(ns, [tool, "--test", "--noflush"], iptables_mode.rules(cfg, family))
