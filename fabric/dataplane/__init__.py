"""Everything that touches the kernel: netlink (routes, links, addresses, sysctls), the route
table fabricd owns under its route protocol, pod wiring (veth pairs, pod addresses and
routes), the NAT and NetworkPolicy tables in nftables (``nft``: the only module that runs
nft; ``nat``; ``policy_table``).

Imports nothing of fabric above it (only ``fabric.dataplane`` itself, and the pure data
contract ``fabric.policy.model``, which ``policy_table`` renders); it knows nothing of
etcd, BGP or CNI. The agent and the workloads room drive it; the CLI never imports it.
"""
