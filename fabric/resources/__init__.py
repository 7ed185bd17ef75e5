"""User resources as YAML/JSON documents and their stores in etcd: IPPool, IPReservation,
IPAMConfig, Node, BGPPeer and BGPConfiguration (codecs for ``fabricctl apply|get|delete``).

May import ``fabric.errors``, ipam and bgp's models. Imported by ``fabric.cli`` and
``fabric.agent``; it never imports either of them, nor the dataplane.
"""
