"""Property tests of the pure block algebra (no I/O)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from ipam.block import Attribute, Block

CIDR = ipaddress.ip_network("10.1.0.0/28")

# An operation: ("assign", handle, count) | ("release", ordinal, stale?) | ("release_handle", handle)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("assign"), st.integers(0, 5), st.integers(1, 4)),
        st.tuples(st.just("release"), st.integers(0, 15), st.booleans()),
        st.tuples(st.just("release_handle"), st.integers(0, 5), st.just(0)),
    ),
    max_size=60,
)


def invariants(b: Block) -> None:
    free = set(b.unallocated)
    assert len(free) == len(b.unallocated), "an ordinal is free twice"
    for o in range(b.size):
        assert (o in free) != (b.allocations[o] is not None), f"ordinal {o} free and allocated"
    assert len(b.unallocated) + b.in_use == b.size
    refs = {i for i in b.allocations if i is not None}
    assert refs == set(range(len(b.attributes))), "attribute table not compact"
    assert set(b.seq_for) == {o for o in range(b.size) if b.allocations[o] is not None}


@settings(max_examples=300, deadline=None)
@given(ops)
def test_block_invariants_hold_under_any_sequence(seq: list[tuple[str, int, int]]) -> None:
    b = Block.new(CIDR, "host:n1")
    owners: dict[int, str] = {}
    for op, a, n in seq:
        before = b
        if op == "assign":
            b, taken = b.assign(n, Attribute(f"h{a}"))
            assert len(taken) == min(n, len(before.unallocated))
            for o in taken:
                assert o not in owners, "an address handed out twice"
                owners[o] = f"h{a}"
        elif op == "release":
            seq_seen = b.seq_for.get(a)
            want = (seq_seen + 1) if (n and seq_seen is not None) else seq_seen
            b, rel, stale = b.release({a: want})
            if a not in owners:
                assert (rel, stale, b) == ([], [], before), "releasing a free IP must be a no-op"
            elif n:
                assert stale == [a] and rel == [] and b.owner(a) is not None
            else:
                assert rel == [a]
                del owners[a]
        else:
            b, rel = b.release_handle(f"h{a}")
            assert sorted(rel) == sorted(o for o, h in owners.items() if h == f"h{a}")
            for o in rel:
                del owners[o]
            again, rel2 = b.release_handle(f"h{a}")
            assert rel2 == [] and again == b, "release by handle must be idempotent"
        invariants(b)
        assert {o: b.owner(o).handle for o, _ in b.allocated()} == owners  # type: ignore[union-attr]
        assert Block.loads(b.dumps()) == b


def test_free_list_is_fifo_reuse_last() -> None:
    b = Block.new(CIDR, None)
    b, _ = b.assign(16, Attribute("a"))
    b, _, _ = b.release({3: None})
    b, _, _ = b.release({7: None})
    b, got = b.assign(1, Attribute("b"))
    assert got == [3], "the address free the longest is reused first"


def test_excluded_ordinals_are_never_assigned_and_keep_their_place() -> None:
    b = Block.new(CIDR, None)
    b, taken = b.assign(16, Attribute("a"), excluded=lambda o: o < 4)
    assert taken == list(range(4, 16))
    assert b.unallocated == (0, 1, 2, 3)
    assert b.free_count(lambda o: o < 4) == 0


def test_stale_release_never_frees_a_reused_address() -> None:
    b = Block.new(ipaddress.ip_network("10.1.0.0/31"), None)
    b, [o] = b.assign(1, Attribute("first"))
    old_seq = b.seq_for[o]
    b, _, _ = b.release({o: old_seq})
    b, _ = b.assign(1, Attribute("x"))  # takes ordinal 1
    b, [o2] = b.assign(1, Attribute("second"))
    assert o2 == o
    b, rel, stale = b.release({o: old_seq})
    assert rel == [] and stale == [o] and b.owner(o).handle == "second"  # type: ignore[union-attr]


def test_assign_specific_is_idempotent_and_refuses_others() -> None:
    import pytest

    from ipam.errors import AlreadyAllocatedError

    b = Block.new(CIDR, None)
    b = b.assign_specific(5, Attribute("a"))
    assert b.assign_specific(5, Attribute("a")) is b
    with pytest.raises(AlreadyAllocatedError):
        b.assign_specific(5, Attribute("b"))
