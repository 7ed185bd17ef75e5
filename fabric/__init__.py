"""fabric: the node agent (fabricd) and the fabricctl CLI, in rooms with one job each.

    cli/        fabricctl                       top: imports resources/, never agent/
    agent/      fabricd, the composition root   top: composes the rooms below
    workloads/  the CNI side of the agent       imports dataplane/, resources/ (never agent/)
    resources/  user resources and their codecs imports nothing of fabric but errors
    policy/     NetworkPolicy semantics (pure)  imports resources/ models only
    explain/    "why can't A reach B" walk      imports resources/, policy/ (never agent/,
                                                dataplane/, workloads/); cli/ imports it
    dataplane/  everything that touches the kernel: imports nothing of fabric above it

``errors`` (the CLI and CNI error mapping) is shared by all. ipam/, bgp/ and cni/ are
imported from here; they never import fabric. Nothing in fabric imports lab/.
"""
