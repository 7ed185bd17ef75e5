"""The node agent, fabricd: the daemon and the composition root.

Owns the daemon entry point and its config, the reconcile loop (intent: what this node
announces and programs), registration in etcd, the watches, the status document, health
and readiness probes, convergence after a start (``sessions``, pure), metrics and the systemd
integration.

May import every other room of fabric (dataplane, workloads, resources), and ipam, bgp, cni.
Nothing imports it: it is a top, as ``fabric.cli`` is the other one.
"""
