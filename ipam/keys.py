"""The etcd key layout (relative to the store prefix, default ``/fabric/v1``).

See ARCHITECTURE.md, "etcd layout". A CIDR in a key has its ``/`` replaced by ``-``.
"""

from __future__ import annotations

import ipaddress

from ipam.block import IPNetwork

CONFIG_IPAM = "config/ipam"
CONFIG_BGP = "config/bgp"
POOLS = "pools/"
RESERVATIONS = "reservations/"
NODES = "nodes/"
PEERS = "peers/"
BLOCKS = "ipam/blocks/"
AFFINITIES = "ipam/affinity/"
HANDLES = "ipam/handles/"
# What each fabricd publishes about itself (BGP sessions, installed routes), under its
# node lease: fabricctl bgp status / routes read it.
STATUS = "status/"


def cidr_key(cidr: IPNetwork) -> str:
    return str(cidr).replace("/", "-")


def cidr_of(key_part: str) -> IPNetwork:
    addr, _, plen = key_part.rpartition("-")
    return ipaddress.ip_network(f"{addr}/{plen}")


def pool(name: str) -> str:
    return POOLS + name


def reservation(name: str) -> str:
    return RESERVATIONS + name


def node(name: str) -> str:
    return NODES + name


def block(cidr: IPNetwork) -> str:
    return BLOCKS + cidr_key(cidr)


def affinity(node_name: str, cidr: IPNetwork) -> str:
    return f"{AFFINITIES}{node_name}/{cidr_key(cidr)}"


def node_affinities(node_name: str) -> str:
    return f"{AFFINITIES}{node_name}/"


def parse_affinity(key: str) -> tuple[str, IPNetwork]:
    """(node, block cidr) of an affinity key."""
    node_name, _, c = key[len(AFFINITIES) :].partition("/")
    return node_name, cidr_of(c)


def handle(handle_id: str) -> str:
    return HANDLES + handle_id


def peer(name: str) -> str:
    return PEERS + name


def status(node_name: str) -> str:
    return STATUS + node_name
