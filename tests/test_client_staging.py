"""The client's staging ring for small payloads: live payloads never overlap, space comes back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flexnpu.ring import Stager as _StagingRing


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 3)), min_size=1, max_size=200))
def test_live_payloads_never_overlap(ops):
    ring = _StagingRing(4096, 16384)
    live: list[tuple[int, int, int]] = []  # (seq, start, end)
    seq = 0
    for n, release in ops:
        off = ring.alloc(n, seq)
        if off is not None:
            assert 4096 <= off and off + n <= 4096 + 16384
            for _, s, e in live:
                assert off + n <= s or e <= off, "overlaps a live payload"
            live.append((seq, off, off + n))
        seq += 1
        if release:
            cut = seq - release
            ring.release_before(cut)
            live = [x for x in live if x[0] >= cut]
    ring.release_all()
    assert ring.alloc(16384, seq) == 4096  # everything came back


def test_full_ring_refuses_instead_of_overwriting():
    ring = _StagingRing(0, 1024)
    assert ring.alloc(512, 0) == 0 and ring.alloc(512, 1) == 512
    assert ring.alloc(64, 2) is None
    ring.release_before(1)
    assert ring.alloc(512, 3) == 0
