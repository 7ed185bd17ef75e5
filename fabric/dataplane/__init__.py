"""Everything that touches the kernel: netlink (routes, links, addresses, sysctls), the route
table fabricd owns under its route protocol, pod wiring (veth pairs, pod addresses and
routes) and the NAT table in nftables.

Imports nothing of fabric above it (only ``fabric.dataplane`` itself); it knows nothing of
etcd, BGP or CNI. The agent and the workloads room drive it; the CLI never imports it.
"""
