"""The node agent (`meshaccel run`, the DaemonSet): keeps the datapath's pod registry in
step with the meshed pods on the node (a pods file or the Kubernetes API), serves metrics
and health, and replaces or repairs the datapath it finds."""
