"""fabricctl: the click command groups, their shared options and the table/JSON/YAML output.

May import ``fabric.resources``, ``fabric.errors``, ipam and bgp (heavy modules imported
where a command runs, so ``fabricctl --help`` stays fast). It never imports the agent, the
dataplane or the workloads room: it reads and writes etcd and the nodes' published status.
Nothing imports it.
"""
