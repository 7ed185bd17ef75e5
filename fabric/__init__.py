"""fabric: the node agent (fabricd) and the fabricctl CLI, in rooms with one job each.

    cli/        fabricctl                       top: imports resources/, never agent/
    agent/      fabricd, the composition root   top: composes the rooms below
    workloads/  the CNI side of the agent       imports dataplane/, resources/ (never agent/)
    resources/  user resources and their codecs imports nothing of fabric but errors
    policy/     NetworkPolicy semantics (pure)  imports resources/ models only
    explain/    "why can't A reach B" walk      imports resources/, policy/ (never agent/,
                                                dataplane/, workloads/); cli/ imports it
    dataplane/  everything that touches the kernel: imports nothing of fabric above it

``errors`` (fabricctl's exit codes and one-line messages) is shared by all; the CNI error
codes are ``workloads.errors``. ``unit`` is fabricd's systemd unit (fabricctl installs it).
ipam/, bgp/ and cni/ are imported from here; they never import fabric. Nothing in fabric
imports lab/. tests/test_layout.py reads every import and holds these rules.
"""
