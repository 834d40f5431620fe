"""The lab and its benchmarks (`meshaccel lab`, `meshaccel bench`): a small mesh of real
Envoy sidecars and apps in network namespaces on one machine, the load generators and the
report. Not part of the node agent's image."""
