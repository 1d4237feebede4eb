"""Compiled graph replay (flexnpu/daemon/graphs.py) gives exactly what op-by-op replay gives:
a temporary read transposed (restrided), an in-place write into an outside allocation (its view
kept across replays), a reinterpreting view (re-viewed bytes), and steps proved to own their
results (no ownership check after the first replays)."""

from __future__ import annotations

import torch

from _hookutil import npu  # noqa: F401  (fixture)


def _step(x, w, cache, pos):
    h = x @ w  # mm: a fresh output consumed below as produced
    ht = h.t()  # a view of a graph temporary, read transposed
    y = torch.relu(ht.contiguous()).t() * 2
    cache.index_copy_(0, pos, y[:1])  # in-place write into an allocation from outside the graph
    return (y + cache.sum()).to(torch.float64), h.view(torch.int32)  # dtype change + reinterpreting view


def test_compiled_replay_matches_eager(npu):
    torch.manual_seed(0)
    x = torch.randn(4, 8).npu()
    w = torch.randn(8, 8).npu()
    cache = torch.zeros(16, 8).npu()
    pos = torch.zeros(1, dtype=torch.long).npu()
    ref_cache = torch.zeros(16, 8)
    _step(x, w, cache, pos)  # warm up
    ref_cache.copy_(cache.cpu())
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        out, bits = _step(x, w, cache, pos)
    ref_cache.copy_(cache.cpu())  # capture also ran once
    for i in range(1, 7):  # past graphs.OWNED_PROOFS: later replays skip the ownership check
        xi = torch.randn(4, 8)
        x.copy_(xi.npu())
        pos.fill_(i)
        g.replay()
        e_out, e_bits = _step(xi, w.cpu(), ref_cache, torch.tensor([i]))
        torch.testing.assert_close(out.cpu(), e_out)
        assert torch.equal(bits.cpu(), e_bits)
        torch.testing.assert_close(cache.cpu(), ref_cache)
    from flexnpu.control import query

    st = query(str(npu.client.path), {"op": "status"})["daemon"]
    me = [c for c in st["clients"] if c["client_id"] == npu.client.client_id][0]
    assert me["graphs_compiled"] >= 1, me  # the straight-line path was taken, not the fallback
    assert me["graphs_traced"] >= 1, me  # ... and later replays ran as a traced TorchScript graph
