"""NetworkPolicy semantics (networking.k8s.io/v1), pure: no I/O, no kernel, no etcd.

    model       the compiled-model contract shared with the dataplane (frozen dataclasses)
    selectors   label selectors (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist)
    endpoints   Endpoint objects from IPAM allocation attributes + Pod objects + CNI labels
    compiler    compile(policies, namespaces, endpoints, local_node) -> Compiled
    verdict     verdict()/trace(): evaluate a Compiled for one probe (the same sets and
                rules the dataplane programs, not a second copy of the semantics)

May import only ``fabric.resources`` models (NetworkPolicy, Namespace, Pod), ``ipam.block``
(pure block algebra, to read allocations) and the standard library. Never imports fabric.dataplane, fabric.agent, fabric.workloads or
fabric.cli: the agent feeds it and renders its output, the CLI asks it for verdicts.
"""
