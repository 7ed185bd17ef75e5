"""cni: the CNI plugin shim and the CNI spec types shared with fabricd."""
