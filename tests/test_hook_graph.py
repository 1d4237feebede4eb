"""NPU graphs against a real daemon: capture once, replay as one command, static tensors."""

from __future__ import annotations

import gc

import pytest
import torch

from _hookutil import npu  # noqa: F401  (fixture)


def _step(model, x):
    return torch.softmax(model(x) * 2 + 1, dim=-1)


def test_graph_replay_equals_eager(npu):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).npu()
    static_x = torch.zeros(4, 16, device="npu")
    with torch.no_grad():
        _step(model, static_x)  # warm-up (fills the meta cache; nothing special needed)
        torch.npu.synchronize()
        g = torch.npu.NPUGraph()
        with torch.npu.graph(g):
            static_y = _step(model, static_x)
        c = npu.client
        for i in range(3):
            x = torch.randn(4, 16)
            static_x.copy_(x)
            n0 = c.launches
            g.replay()
            assert c.launches == n0  # replay is one command, not a launch per op
            with torch.no_grad():
                eager = _step(model, x.npu()).cpu()
            assert torch.allclose(static_y.cpu(), eager, atol=1e-6), i
    # intermediates of the capture stay reserved by the graph until reset
    held = len(g._held)
    assert held > 0
    g.reset()
    gc.collect()
    torch.npu.synchronize()


def test_host_reads_are_refused_during_capture(npu):
    x = torch.ones(3, device="npu")
    g = torch.npu.NPUGraph()
    with pytest.raises(RuntimeError, match="capturing"):
        with torch.npu.graph(g):
            (x * 2).sum().item()
    assert npu.capture is None
    y = (x * 2).sum().item()  # the device works normally afterwards
    assert y == 6.0


def test_graph_capture_on_side_stream_and_replay_on_default(npu):
    a = torch.arange(8.0, device="npu")
    out = torch.zeros(8, device="npu")
    g = torch.npu.NPUGraph()
    s = torch.npu.Stream()
    with torch.npu.graph(g, stream=s):
        out.copy_(a * 3)
    assert torch.npu.current_stream().stream_id == 0
    a.fill_(1.5)
    g.replay()
    assert out.tolist() == [4.5] * 8
