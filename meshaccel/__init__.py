"""meshaccel: eBPF acceleration for Istio-style sidecar meshes."""

__version__ = "0.1.0"
