"""Everything that touches the kernel: netlink (routes, links, addresses, sysctls), the route
table fabricd owns under its route protocol, pod wiring (veth pairs, pod addresses and
routes), the NAT and NetworkPolicy tables in nftables (``nft``: the module that runs nft;
``nat``; ``policy_table``; and ``policy_snapshot``, which execs nft once at fabricd's start,
before anything else is imported, to restore the policy table's snapshot).

Imports nothing of fabric above it (only ``fabric.dataplane`` itself, and the pure data
contract ``fabric.policy.model``, which ``policy_table`` renders); it knows nothing of
etcd, BGP or CNI. The agent and the workloads room drive it; the CLI never imports it.
"""
