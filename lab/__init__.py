"""lab: topologies from network namespaces, real etcd/FRR/BIRD, and the benchmarks."""
