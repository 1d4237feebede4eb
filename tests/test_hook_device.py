"""The torch `npu` device against a real daemon: ops, views, copies, errors, autograd, streams."""

from __future__ import annotations

import gc

import pytest
import torch

from _hookutil import npu  # noqa: F401  (fixture)
from flexnpu.errors import FlexNPUError
from flexnpu.hook import tensor as T


def test_basic_ops_match_cpu(npu):
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    x, y = a.to("npu"), b.npu()
    assert x.is_npu and x.device == torch.device("npu", 0) and type(x) is T.NPUTensor
    assert torch.allclose((x @ y).cpu(), a @ b)
    assert torch.allclose(torch.softmax(x, -1).cpu(), torch.softmax(a, -1))
    assert torch.equal((x > 0).cpu(), a > 0)
    assert torch.equal(x.argmax(1).cpu(), a.argmax(1))
    assert torch.allclose(x.to(torch.float16).cpu(), a.half())
    assert x.sum().item() == pytest.approx(a.sum().item(), rel=1e-5)
    assert x.tolist() == a.tolist()
    assert "device='npu:0'" in repr(x)
    assert torch.equal(torch.cat([x, x]).cpu(), torch.cat([a, a]))
    assert torch.equal(x[x > 0].cpu(), a[a > 0])  # data-dependent shape: host path
    assert torch.equal(x[:, 1:4][[0, 2]].cpu(), a[:, 1:4][[0, 2]])  # host index tensor, as on cuda


def test_factories(npu):
    assert torch.equal(torch.zeros(2, 3, device="npu").cpu(), torch.zeros(2, 3))
    assert torch.equal(torch.full((2,), 7, device="npu").cpu(), torch.full((2,), 7))
    assert torch.equal(torch.arange(10, device="npu").cpu(), torch.arange(10))
    assert torch.equal(torch.tensor([1, 2, 3], device="npu").cpu(), torch.tensor([1, 2, 3]))
    assert torch.equal(torch.eye(3, device="npu").cpu(), torch.eye(3))
    torch.manual_seed(3)
    r = torch.randn(4, 4, device="npu")
    torch.manual_seed(3)
    assert torch.equal(r.cpu(), torch.randn(4, 4))  # random numbers follow the app's seed
    e = torch.empty(0, device="npu")
    assert e.cpu().shape == (0,)


def test_views_do_not_launch(npu):
    c = npu.client
    x = torch.arange(24.0, device="npu")
    torch.npu.synchronize()
    n0 = c.launches
    v = x.view(4, 6).t()[1:3, ::2].unsqueeze(0).expand(2, -1, -1).transpose(0, 2)
    s = x.split(5)
    u = x.view(2, 12).unbind(0)
    assert c.launches == n0
    ref = torch.arange(24.0).view(4, 6).t()[1:3, ::2].unsqueeze(0).expand(2, -1, -1).transpose(0, 2)
    assert torch.equal(v.cpu(), ref)
    assert torch.equal(s[2].cpu(), torch.arange(10.0, 15.0)) and torch.equal(
        u[1].cpu(), torch.arange(12.0, 24.0)
    )
    assert v._a is x._a  # same allocation, no copy
    v2 = x.view(4, 6)
    v2[1].fill_(-1)  # in-place through a view reaches the base
    assert x[6:12].tolist() == [-1.0] * 6


def test_inplace_and_out(npu):
    c = npu.client
    x = torch.ones(4, device="npu")
    n0 = c.launches
    r = x.add_(2)
    assert r is x and c.launches == n0 + 1
    out = torch.empty(4, device="npu")
    r = torch.mul(x, x, out=out)
    assert r is out and out.tolist() == [9.0] * 4
    small = torch.empty(0, device="npu")
    r = torch.mul(x, x, out=small)  # out= resizes, as torch does
    assert r is small and small.shape == (4,) and small.tolist() == [9.0] * 4
    y = torch.arange(3.0, device="npu")
    y.resize_(5)
    assert y.shape == (5,) and y[:3].tolist() == [0.0, 1.0, 2.0]  # resize_ keeps the old elements
    y.unsqueeze_(0).transpose_(0, 1)
    assert y.shape == (5, 1) and y[:3, 0].tolist() == [0.0, 1.0, 2.0]


def test_meta_cache_hits(npu):
    a = torch.randn(3, 3, device="npu")
    b = torch.randn(3, 3, device="npu")
    a * b
    h0, m0 = T.stats["hits"], T.stats["misses"]
    for _ in range(5):
        a * b
    assert T.stats["hits"] - h0 == 5 and T.stats["misses"] == m0
    a * 2.0
    a * 3.0  # a different scalar value is a different key (values can change result dtypes)
    assert T.stats["misses"] == m0 + 2
    m1 = T.stats["misses"]
    for lr in (0.1, 0.2, 0.3):
        a.add_(b, alpha=-lr)  # in-place: scalar values do not split the cache
    assert T.stats["misses"] == m1 + 1
    c = torch.randn(3, 4, device="npu")[:, :3]
    m1 = T.stats["misses"]
    a * c  # different strides: a new entry
    a * c
    assert T.stats["misses"] == m1 + 1


def test_mixing_devices_raises_torch_error(npu):
    x = torch.ones(3, device="npu")
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device.*npu:0.*cpu"):
        x + torch.ones(3)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        torch.mm(torch.ones(3, 3), torch.ones(3, 3, device="npu"))
    assert (x + torch.tensor(2.0)).tolist() == [3.0] * 3  # 0-dim CPU scalars mix, as on cuda


def test_unknown_and_denied_ops_name_the_op(npu):
    lib = torch.library.Library("flexnpu_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x.new_empty(x.shape), "Meta")
    lib.impl("twice", lambda x: x * 2, "CPU")
    x = torch.ones(2, device="npu")
    with pytest.raises(NotImplementedError, match="flexnpu_test::twice"):
        torch.ops.flexnpu_test.twice(x)
    with pytest.raises(NotImplementedError, match="aten::_nested_tensor_from_mask"):
        torch.ops.aten._nested_tensor_from_mask(x, x.bool())
    # an op the daemon refuses at execution time surfaces at the next sync, naming the op
    from flexnpu.protocol import TensorRef

    c = npu.client
    h = c.alloc_handle()
    c.launch(
        "aten::from_file.default", ("/etc/hostname",), {}, [(8, TensorRef(h, torch.uint8, (8,), (1,), 0))]
    )
    with pytest.raises(FlexNPUError, match="aten::from_file"):
        torch.npu.synchronize()
    del lib


def test_freed_handle_error(npu):
    x = torch.ones(4, device="npu")
    handle = x._a.handle
    del x
    gc.collect()
    torch.npu.synchronize()  # flushes the deferred free
    with pytest.raises(FlexNPUError, match=str(handle)):
        npu.client.memcpy_d2h(handle, 0, 16)


def test_handles_freed_when_last_view_dies(npu):
    torch.npu.synchronize()
    base_alloc = torch.npu.memory_allocated()
    x = torch.ones(1024, device="npu")
    v = x[10:20]
    assert torch.npu.memory_allocated() == base_alloc + 4096
    del x
    gc.collect()
    assert torch.npu.memory_allocated() == base_alloc + 4096  # the view keeps it
    assert v.sum().item() == 10
    del v
    gc.collect()
    assert torch.npu.memory_allocated() == base_alloc
    torch.npu.synchronize()
    assert npu.client.memory_stats()["allocated"] <= base_alloc + 4096


def test_training_step_matches_cpu(npu):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    net_n = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    ).npu()
    net_n.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt_n = torch.optim.AdamW(net_n.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_n = torch.nn.functional.cross_entropy(net_n(x.npu()), y.npu())
        opt_n.zero_grad()
        loss_n.backward()
        opt_n.step()
        assert loss_n.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    for p, pn in zip(net.parameters(), net_n.parameters()):
        assert pn.grad.device.type == "npu"
        assert torch.allclose(pn.grad.cpu(), p.grad, atol=1e-6)
        assert torch.allclose(pn.detach().cpu(), p.detach(), atol=1e-6)


def test_torch_npu_module_surface(npu):
    m = torch.npu
    assert m.is_available() and m.device_count() == 1 and m.current_device() == 0
    m.set_device(0)
    m.set_device("npu:0")
    with pytest.raises(RuntimeError, match="npu:1 is not available"):
        m.set_device(1)
    s = m.Stream()
    assert m.current_stream().stream_id == 0
    with m.stream(s):
        assert m.current_stream() == s
        x = torch.ones(1000, device="npu") * 3
        ev = m.Event(enable_timing=True)
        ev.record()
        m.mark_step()  # FlexNPU: iteration end on the current stream (not a barrier)
    m.mark_step(s)
    m.current_stream().wait_event(ev)
    ev.synchronize()
    assert x.sum().item() == 3000
    s.synchronize()
    free, total = m.mem_get_info()
    assert total > 0 and 0 <= free <= total
    assert m.memory_allocated() >= 4000 and m.max_memory_allocated() >= m.memory_allocated()
    assert m.memory_reserved() >= 0
    m.empty_cache()
    m.synchronize()
    assert torch.ones(2).npu().device.type == "npu"
    lin = torch.nn.Linear(2, 2).npu()
    assert lin.weight.is_npu and isinstance(lin.weight, torch.nn.Parameter)


def test_autocast_matches_cpu_autocast(npu):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    lin_n = torch.nn.Linear(8, 8).npu()
    lin_n.load_state_dict(lin.state_dict())
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        s = torch.softmax(h, -1)
    with torch.autocast("npu", dtype=torch.bfloat16):
        h_n = lin_n(x.npu())
        s_n = torch.softmax(h_n, -1)
        r_n = h_n + 1  # not listed: follows its input
    assert h_n.dtype == torch.bfloat16 and s_n.dtype == torch.float32 and r_n.dtype == torch.bfloat16
    # softmax runs in float32 as on CUDA (CPU autocast keeps it in bfloat16)
    assert torch.equal(h_n.cpu(), h) and torch.allclose(s_n.cpu(), torch.softmax(h.float(), -1))
    s_n.sum().backward()
    assert lin_n.weight.grad.dtype == torch.float32


def test_save_load_and_host_reads(npu):
    import io

    x = torch.randn(3, 3).npu()
    buf = io.BytesIO()
    torch.save({"x": x}, buf)
    buf.seek(0)
    y = torch.load(buf, weights_only=False)["x"]
    assert y.device.type == "npu" and torch.equal(y.cpu(), x.cpu())
    assert f"{x.sum():.3f}" == f"{x.cpu().sum():.3f}"
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    assert bool((x == x).all()) is True
