"""The datapath: what `meshaccel attach` and the node agent load and manage on a node.

The eBPF programs (bpf/, compiled by bcc at attach time), their loader, the pinned maps'
struct layouts, the per-pod registry, capture settings (Istio annotations and
istio-iptables flags), doctor and the socket-semantics self-test, in-place upgrades.
"""
