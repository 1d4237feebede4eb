"""Property tests (hypothesis) for the arena allocator and record encoding."""

from __future__ import annotations


from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import pytest

from flexnpu.ring import Segment

ARENA = 1 << 16

ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, ARENA // 4), st.sampled_from([1, 8, 64, 256, 4096])),
        st.tuples(st.just("free"), st.integers(0, 1000), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_alloc_free_invariants(seq):
    seg = Segment.create(sq_entries=1, cq_entries=1, arena_bytes=ARENA)
    live: dict[int, int] = {}
    try:
        for op, a, b in seq:
            if op == "alloc":
                try:
                    off = seg.alloc(a, b)
                except MemoryError:
                    continue
                assert off % b == 0, "alignment"
                assert 0 <= off and off + a <= seg.arena_size, "bounds"
                for o, n in live.items():
                    assert off + a <= o or o + n <= off, "overlap"
                live[off] = a
                seg.arena_view(off, a)[:] = bytes([len(live) % 256]) * a  # usable memory
            elif live:
                off = sorted(live)[a % len(live)]
                seg.free(off)
                del live[off]
            assert seg.arena_free_bytes == ARENA - sum(live.values())
        for off in list(live):
            seg.free(off)
        assert seg.arena_free_bytes == ARENA
        assert seg.arena_free_blocks == 1, "full coalescing back to one block"
        assert seg.alloc(ARENA, 4096) == 0
    finally:
        seg.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-1, 1 << 20), max_size=20))
def test_bad_frees_are_rejected(offsets):
    seg = Segment.create(sq_entries=1, cq_entries=1, arena_bytes=ARENA)
    good = seg.alloc(128)
    for o in offsets:
        if o != good:
            with pytest.raises(ValueError):
                seg.free(o)
    seg.free(good)
    with pytest.raises(ValueError):
        seg.free(good)  # double free
    seg.close()


def test_exhaustion_raises_memoryerror():
    seg = Segment.create(sq_entries=1, cq_entries=1, arena_bytes=4096)
    a = seg.alloc(4096)
    with pytest.raises(MemoryError, match="arena full"):
        seg.alloc(1)
    seg.free(a)
    with pytest.raises(ValueError):
        seg.alloc(0)
    with pytest.raises(ValueError):
        seg.alloc(8, align=3)
    seg.close()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=64), min_size=1, max_size=40))
def test_records_roundtrip_exactly(recs):
    """Record encoding: any bytes up to entry_size come back zero-padded, in order, across
    single and batched paths."""
    c = Segment.create(sq_entries=64, cq_entries=1, arena_bytes=0)
    d = Segment.attach(c.fd)
    for r in recs:
        assert c.sq.push(r)
    for r in recs:
        assert d.sq.pop() == r.ljust(64, b"\0")
    packed = b"".join(r.ljust(64, b"\0") for r in recs)
    assert c.sq.push_batch(packed, len(recs)) == len(recs)
    out = bytearray(64 * len(recs))
    assert d.sq.pop_into(out, len(recs)) == len(recs)
    assert bytes(out) == packed
    d.close()
    c.close()
