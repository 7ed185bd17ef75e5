"""``fabricctl explain``: why can (or can't) A reach B, layer by layer.

* :mod:`fabric.explain.evidence`: one read of what the walk needs (blocks, affinities,
  nodes, pools from etcd; the status documents of the nodes involved), and the endpoints
  resolved from it (a pod ``NAMESPACE/POD``, an IP, or a node name).
* :mod:`fabric.explain.walk`: pure: the hops, in path order (each end's IPAM allocation and
  node, the announcement, the forwarding, the policy verdict), stopping at the first broken
  one with what to do.
* :mod:`fabric.explain.live`: the ``--live`` kernel lookup, asked of the local fabricd over
  its loopback health listener (``GET /route?dst=IP``): fabricd does the lookup through
  pyroute2 in the dataplane room, so this room (and the CLI) never imports the dataplane.

May import ipam, bgp, ``fabric.errors``, ``fabric.resources`` and ``fabric.policy`` (the
same compiler that programs nftables gives the policy verdict). Never imports the agent,
the dataplane or the workloads room. Only ``fabric.cli`` imports it.
"""
