"""The npu device's C dispatch path (flexnpu/hook/fastdispatch.c) against the Python one it
mirrors (tensor.dispatch), on a real daemon: the same cache keys, the same launches, the same
results, and every call it does not handle handed to Python untouched."""

from __future__ import annotations

import pytest
import torch

from _hookutil import npu  # noqa: F401  (fixture)
from flexnpu.hook import tensor as T
from flexnpu.protocol import split_launch

aten = torch.ops.aten

pytestmark = pytest.mark.skipif(
    T.FAST is None, reason="the C dispatch path is not built (pip install -e .) or FLEXNPU_FASTDISPATCH=0"
)

C_DISPATCH = T.NPUTensor.__torch_dispatch__


def _python_dispatch(cls, func, types, args=(), kwargs=None):
    return T.dispatch(func, args, kwargs or {})


@pytest.fixture
def python_only(monkeypatch):
    """Route this test's operators through the Python dispatch()."""
    monkeypatch.setattr(T.NPUTensor, "__torch_dispatch__", classmethod(_python_dispatch))


def _calls(x, y, i):
    """(op, args, kwargs): every kind of argument the C walk takes, and some it hands back."""
    return [
        (aten.add.Tensor, (x, y), {}),
        (aten.add.Tensor, (x, y), {"alpha": 2}),
        (aten.add.Tensor, (x, y), {"alpha": 0.5}),
        (aten.mul.Scalar, (x, 0.0), {}),
        (aten.mul.Scalar, (x, -0.0), {}),  # a different key: the payload tells them apart
        (aten.mul.Scalar, (x, float("nan")), {}),
        (aten.add_.Scalar, (x.clone(), 3), {}),  # value_free: the scalar's type only
        (aten.add_.Scalar, (x.clone(), 3.5), {}),
        (aten.add_.Tensor, (x.clone(), y), {"alpha": 0.25}),
        (aten.gt.Scalar, (x, True), {}),
        (aten.view.default, (x, [6, 4]), {}),
        (aten.view.default, (x, (4, 6)), {}),
        (aten.transpose.int, (x, 0, 1), {}),
        (aten.slice.Tensor, (x, 1, None, 3, 1), {}),
        (aten.cat.default, ([x, y, x], 0), {}),
        (aten.cat.default, ((x, y), -1), {}),
        (aten.sum.dim_IntList, (x, [1], True), {"dtype": torch.float64}),
        (aten._to_copy.default, (x,), {"dtype": torch.float16}),
        (aten.div.Tensor_mode, (x, y), {"rounding_mode": "floor"}),
        (aten.embedding.default, (x, i), {}),
        (aten.index_select.default, (x, 0, i), {}),
        (aten.where.self, (x > 0, x, y), {}),
        (aten.split_with_sizes.default, (x, [1, 3], 0), {}),
        (aten.max.dim, (x, 1), {}),
        (aten.empty_like.default, (x,), {"memory_format": torch.contiguous_format}),
        # factories: the device argument names the device (their PrivateUse1 kernels)
        (aten.full.default, ([2, 3], 1.5), {"dtype": torch.float32, "device": x.device, "pin_memory": False}),
        (aten.arange.start_step, (0, 5, 1), {"dtype": torch.int64, "device": torch.device("npu")}),
        (aten.zeros.default, ([3],), {"device": x.device}),
    ]


def _tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g)
    b = torch.randn(4, 6, generator=g)
    return a, b, a.to("npu"), b.to("npu"), torch.tensor([3, 0, 1]).to("npu")


def test_cache_keys_are_pythons(npu):
    """For each call, the key the C walk builds is the one Python's dispatch inserted: a C key
    that differed would only miss, but one that matched another call's would run that call's
    spec, so equality is what is checked, call by call."""
    _, _, x, y, i = _tensors()
    checked = 0
    for op, args, kwargs in _calls(x, y, i):
        if T._info(op).special is not None:  # ops with their own Python handler (_to_copy)
            assert T.FAST["key_of"](op, args, kwargs) is None
            continue
        T._cache.clear()
        T.dispatch(op, args, kwargs)  # the Python path: a miss that caches the call's spec
        keys = list(T._cache)
        assert len(keys) == 1, op
        assert T.FAST["key_of"](op, args, kwargs) == keys[0], op
        checked += 1
    assert checked == len(_calls(x, y, i)) - 1
    # calls the C path hands to Python before building a key
    assert T.FAST["key_of"](aten.add.Tensor, (x, torch.tensor(2.0)), {}) is None  # a host scalar
    assert T.FAST["key_of"](aten._to_copy.default, (x,), {"device": torch.device("cpu")}) is None
    assert T.FAST["key_of"](aten.nonzero.default, (x,), {}) is None  # host fallback op (cpu)


def _structures(npu, fn):
    """Run fn, returning its result on the host and its launches' structures (handles zeroed)."""
    c = npu.client
    seen: list[bytes] = []
    real = c.launch_payload

    def record(payload, stream=0):
        seen.append(split_launch(bytes(payload))[0])
        return real(payload, stream)

    c.launch_payload = record
    try:
        out = fn()
        out = [t.cpu() if isinstance(t, torch.Tensor) else t for t in out]
    finally:
        del c.launch_payload
    return out, seen


def _workload(x, y, i):
    """The calls twice, so that the second round hits the caches; the results but the
    uninitialized ones (empty_like)."""
    outs = []
    for _ in range(2):
        for op, args, kwargs in _calls(x, y, i):
            r = op(*args, **kwargs)
            if op is not aten.empty_like.default:
                outs.extend(r if isinstance(r, (tuple, list)) else [r])
    return outs


def test_same_launches_and_results_as_python(npu, monkeypatch):
    a, b, x, y, i = _tensors()
    T._cache.clear()
    fast, fast_launches = _structures(npu, lambda: _workload(x, y, i))
    monkeypatch.setattr(T.NPUTensor, "__torch_dispatch__", classmethod(_python_dispatch))
    T._cache.clear()
    slow, slow_launches = _structures(npu, lambda: _workload(x, y, i))
    assert len(fast_launches) > 20 and fast_launches == slow_launches
    assert len(fast) == len(slow) > 20
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=0, atol=0, equal_nan=True)
    assert torch.allclose(torch.add(x, y, alpha=2).cpu(), a + 2 * b)


def test_hits_run_in_c_and_misses_in_python(npu):
    """The second identical call runs without the Python dispatch; a miss calls it once."""
    _, _, x, y, _ = _tensors()
    calls = []

    def counting(func, args, kwargs):
        calls.append(func)
        return T.dispatch(func, args, kwargs)

    cfg = _config(fallback=counting)
    try:
        T._cache.clear()
        x.add(y, alpha=3)
        assert calls == [aten.add.Tensor]  # a miss: Python's dispatch made the spec
        h0 = T.stats["hits"]
        r = x.add(y, alpha=3)
        assert calls == [aten.add.Tensor] and T.stats["hits"] == h0 + 1
        v = r.view(24)
        assert v._a is r._a and calls == [aten.add.Tensor, aten.view.default]
        v2 = r.view(24)  # a view from the cache: same allocation, new wrapper, no launch
        assert v2._a is r._a and v2 is not v and len(calls) == 2
        # its wire reference made with it, as _make_rk makes it from the wrapper
        rk = v2._rk
        assert rk is not None and rk == T._make_rk(v2) and rk[0].handle == r._a.handle
        assert torch.equal(v2.cpu(), torch.add(x.cpu(), y.cpu(), alpha=3).view(24))
    finally:
        T.FAST["configure"](cfg)


def _config(**changes):
    """Reconfigure the C path with some objects replaced; returns the original configuration."""
    cfg = T._fast_config()
    T.FAST["configure"]({**cfg, **changes})
    return cfg


def test_errors_are_pythons(npu):
    """Calls that fail are handed to Python before anything is done, and fail as there."""
    _, _, x, y, _ = _tensors()
    x + y  # cached
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        x + torch.ones(4, 6)  # a host tensor that is not a scalar
    denied = aten._local_scalar_dense.default
    assert T.FAST["key_of"](denied, (x.sum(),), {}) is None  # a special op: Python's own path
    with pytest.raises(TypeError):
        T.FAST["dispatch"](aten.add.Tensor, (x, y))
    with pytest.raises(TypeError):
        C_DISPATCH(aten.add.Tensor)
    # the TensorRef the C path builds for a fresh output is a real one
    r = x * y
    ref = T.ref_of(r)
    assert type(ref) is T.TensorRef and ref.handle == r._a.handle
    assert (ref.dtype, ref.shape, ref.stride, ref.offset) == (torch.float32, (4, 6), (6, 1), 0)
    with pytest.raises(Exception):  # still frozen
        ref.handle = 5  # type: ignore[misc]


def test_python_only_switch(npu, python_only):
    """With the Python dispatch alone (FLEXNPU_FASTDISPATCH=0's path) the same program runs."""
    a, b, x, y, _ = _tensors()
    assert torch.allclose((x @ y.t()).softmax(-1).cpu(), (a @ b.t()).softmax(-1))


def test_c_alloc_accounts_like_the_python_one():
    """The C Alloc (every allocation of the npu device) does what tensor.PyAlloc does: the
    device's byte count and peak, deferred frees and their flush mark, a capturing graph's
    holds (not once the graph was reset), and the free of one in a reference cycle."""
    import gc

    from flexnpu.hook import runtime

    assert T.Alloc is T.FAST["Alloc"]

    class Graph:  # what an allocation reads of npu_module.NPUGraph
        def __init__(self):
            self._graph, self._held = object(), []

    results = []
    for cls in (T.PyAlloc, T.Alloc):
        d = runtime.Device(7, 7)
        a, b = cls(d, 11, 100), cls(d, 12, 50)
        made = (d.allocated, d.peak, b.saved, b.graph, b.handle, b.nbytes, b.dev is d)
        del a
        freed = (d.allocated, d.peak, list(d.pending), d.pending_bytes, d.flush_due)
        g = Graph()
        d.capture = g
        c = cls(d, 13, 8)
        d.capture = None
        del c
        g2 = Graph()
        d.capture = g2
        e = cls(d, 14, 8)
        d.capture = None
        g2._graph = None  # reset: it no longer holds its memory
        del e
        held = (list(g._held), list(g2._held), list(d.pending))
        x = cls(d, 15, 4)
        x.saved = [x]  # a cycle through the allocation
        del x
        gc.collect()
        cycle = (list(d.pending), d.allocated)
        many = [cls(d, 100 + i, 1) for i in range(runtime.FREE_BATCH)]
        assert not d.flush_due
        del many
        results.append((made, freed, held, cycle, d.flush_due, len(d.pending)))
    assert results[0] == results[1]
    assert results[0][1][2] == [11] and results[0][3][0][-1] == 15 and results[0][4] is True
