"""The CNI side of the agent: the unix-socket server the plugin talks to, the verbs (ADD,
DEL, CHECK, GC, STATUS), pod IPAM on top of the allocator, the pod checks and the state
directory of attachments.

May import ``fabric.dataplane``, ``fabric.errors``, ipam and cni. Only ``fabric.agent``
imports it; the dataplane and the CLI never do.
"""
