"""ipam: Calico-style block IPAM on etcd (pools, blocks with node affinity, handles)."""
