"""Pure hook bookkeeping with the in-process loopback client (tests/_loopback.py): fast, no daemon.

End-to-end behaviour is tested against the real daemon elsewhere; these check the hook's own
rules: frees never happen in a destructor, they are batched, and graphs keep their memory.
"""

from __future__ import annotations

import gc

import pytest
import torch

from _loopback import LoopbackClient
from flexnpu.hook import install_torch_device, runtime


@pytest.fixture
def lb(monkeypatch):
    monkeypatch.setenv("FLEXNPU_DEVICES", "0")
    client = LoopbackClient()
    runtime.set_client_factory(lambda i: client)
    install_torch_device()
    yield client
    runtime.set_client_factory(None)


def test_frees_are_deferred_and_batched(lb, monkeypatch):
    frees = []
    real_free = lb.free
    monkeypatch.setattr(lb, "free", lambda h: (frees.append(h), real_free(h)))
    x = torch.ones(8, device="npu")
    handles = []
    for _ in range(runtime.FREE_BATCH - 1):
        t = x + 1
        handles.append(t._a.handle)
        del t  # each result dies right away
    gc.collect()
    assert frees == []  # nothing freed from a destructor, nothing yet flushed
    assert runtime.get(0).flush_due is False
    y = x + 1
    yh = y._a.handle
    del y
    assert runtime.get(0).flush_due is True
    z = x * 2  # the next command flushes the batch first
    assert sorted(frees) == sorted(handles + [yh])
    del z
    torch.npu.synchronize()  # and every sync point flushes the rest
    assert len(frees) == runtime.FREE_BATCH + 1
    assert set(lb.mem) == {x._a.handle}


def test_graph_keeps_capture_allocations_until_reset(lb):
    x = torch.ones(4, device="npu")
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        y = (x + 1) * 3  # the intermediate x + 1 dies inside the capture
    held = list(g._held)
    assert held
    del y
    gc.collect()
    g.replay()
    torch.npu.synchronize()
    assert all(h in lb.mem for h in held)  # still reserved: the graph replays into them
    g.reset()
    torch.npu.synchronize()
    assert not any(h in lb.mem for h in held)


def test_static_outputs_are_freed_after_graph_reset(lb):
    x = torch.ones(4, device="npu")
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        y = x * 2
    h = y._a.handle
    g.replay()
    g.reset()
    del y  # dies after the reset: freed normally, not held by the dead graph
    gc.collect()
    torch.npu.synchronize()
    assert h not in lb.mem and h not in g._held
