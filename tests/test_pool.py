"""Pool validation, selectors and candidate-block order (pure)."""

from __future__ import annotations

import ipaddress

import pytest

from ipam import selector
from ipam.blocks import candidate_blocks
from ipam.errors import ValidationError
from ipam.pool import IPAMConfig, Pool, Reservation, check_overlap


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"cidr": "10.0.0.0/33"}, "spec.cidr", "not a valid CIDR"),
        ({"cidr": "banana"}, "spec.cidr", "not a CIDR"),
        ({"cidr": "10.0.0.1/16"}, "spec.cidr", "host bits"),
        ({"cidr": "127.0.0.0/16"}, "spec.cidr", "127.0.0.0/8"),
        ({"cidr": "169.254.0.0/24"}, "spec.cidr", "169.254.0.0/16"),
        ({"cidr": "224.1.0.0/16"}, "spec.cidr", "224.0.0.0/4"),
        ({"cidr": "fe80::/64"}, "spec.cidr", "fe80::/10"),
        ({"cidr": "10.0.0.0/24", "blockSize": 20}, "spec.blockSize", "larger than the pool"),
        ({"cidr": "10.0.0.0/16", "blockSize": 33}, "spec.blockSize", "outside"),
        ({"cidr": "fd00::/64", "blockSize": 26}, "spec.blockSize", "outside"),
        ({"cidr": "10.0.0.0/16", "blockSize": "26"}, "spec.blockSize", "not an integer"),
        ({"cidr": "10.0.0.0/16", "nodeSelector": "rack == "}, "spec.nodeSelector", "selector"),
        ({"cidr": "10.0.0.0/16", "disabled": "yes"}, "spec.disabled", "true or false"),
        ({"cidr": "10.0.0.0/16", "colour": "red"}, "spec.colour", "unknown field"),
        ({}, "spec.cidr", "required"),
    ],
)
def test_bad_pools_are_refused_naming_the_field(
    spec: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as e:
        Pool.from_spec("p", spec)
    assert e.value.field == field
    assert words in str(e.value)


def test_defaults_and_round_trip() -> None:
    p4 = Pool.from_spec("v4", {"cidr": "10.244.0.0/16"})
    p6 = Pool.from_spec("v6", {"cidr": "fd00:244::/64"})
    assert (p4.block_size, p6.block_size) == (26, 122)
    assert Pool.from_spec("v4", p4.spec()) == p4


def test_overlap_refused() -> None:
    a = Pool.from_spec("a", {"cidr": "10.0.0.0/16"})
    b = Pool.from_spec("b", {"cidr": "10.0.128.0/17"})
    with pytest.raises(ValidationError, match="overlaps pool a"):
        check_overlap(b, [a])
    check_overlap(Pool.from_spec("c", {"cidr": "10.1.0.0/16"}), [a])


def test_immutable_fields() -> None:
    a = Pool.from_spec("a", {"cidr": "10.0.0.0/16"})
    with pytest.raises(ValidationError, match="immutable"):
        a.updated({"cidr": "10.0.0.0/16", "blockSize": 28})
    assert a.updated({"cidr": "10.0.0.0/16", "disabled": True}).disabled


@pytest.mark.parametrize(
    ("text", "labels", "want"),
    [
        ("", {}, True),
        ("all()", {"a": "b"}, True),
        ("rack == 'r1'", {"rack": "r1"}, True),
        ("rack == 'r1'", {"rack": "r2"}, False),
        ("rack != 'r1'", {}, True),
        ("has(edge)", {"edge": ""}, True),
        ("!has(edge)", {"edge": ""}, False),
        ("rack in {'r1', 'r2'} && zone == \"a\"", {"rack": "r2", "zone": "a"}, True),
        ("rack not in {'r1'} || has(x)", {"rack": "r1"}, False),
        ("(rack == 'r1' || rack == 'r2') && !has(cordon)", {"rack": "r2"}, True),
    ],
)
def test_selectors(text: str, labels: dict[str, str], want: bool) -> None:
    assert selector.parse(text).matches(labels) is want


def test_candidate_blocks_cover_the_pool_once_in_a_node_specific_order() -> None:
    pool = Pool.from_spec("p", {"cidr": "10.0.0.0/22", "blockSize": 26})
    a = list(candidate_blocks(pool, "node-a"))
    b = list(candidate_blocks(pool, "node-b"))
    assert sorted(a, key=lambda c: int(c.network_address)) == list(pool.blocks())
    assert len(set(a)) == 16
    assert a == list(candidate_blocks(pool, "node-a")), "deterministic per node"
    assert a[0] != b[0] or a[1] != b[1]


def test_huge_v6_pool_is_lazy() -> None:
    pool = Pool.from_spec("p6", {"cidr": "fd00::/48"})
    first = next(iter(candidate_blocks(pool, "n")))
    assert first.prefixlen == 122 and first.subnet_of(ipaddress.ip_network("fd00::/48"))


def test_config_and_reservation_validation() -> None:
    with pytest.raises(ValidationError, match="maxBlocksPerHost"):
        IPAMConfig.from_json({"maxBlocksPerHost": -1})
    r = Reservation.from_spec("r", {"reservedCIDRs": ["10.0.0.0/30", "10.0.0.9"]})
    assert [str(c) for c in r.cidrs] == ["10.0.0.0/30", "10.0.0.9/32"]
    with pytest.raises(ValidationError, match=r"reservedCIDRs\[0\]"):
        Reservation.from_spec("r", {"reservedCIDRs": ["10.0.0.1/30"]})
