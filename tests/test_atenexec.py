"""The compiled executor of planned aten launches (flexnpu/daemon/backends/atenexec.cpp, the
Python front end's operators): a plan records its operator on its first launch, later launches
repeat the Python path's results bit for bit at other allocations, and every launch or result
it is unsure of goes back to Python, which has the checks and the errors."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from flexnpu.daemon.backends import torch_exec as X
from flexnpu.protocol import TensorRef

CPU = torch.device("cpu")


def _plan(op: str, args: tuple, kwargs: dict, outputs: list) -> X.LaunchPlan:
    launch = types.SimpleNamespace(op=op, args=args, kwargs=kwargs, outputs=outputs, values=0)
    p = X.make_plan(CPU, launch)
    assert p is not None, op
    return p


def _ref(h: int, shape: tuple, dtype: torch.dtype = torch.float32, stride: Any = None) -> TensorRef:
    st = stride if stride is not None else torch.empty(shape).stride()
    return TensorRef(h, dtype, shape, tuple(st), 0)


def _buf(nbytes: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = nbytes // dtype.itemsize
    if dtype.is_floating_point:
        vals = torch.rand(n, generator=g, dtype=torch.float64).to(dtype) + 0.5
    else:
        vals = torch.randint(0, 3, (n,), generator=g).to(dtype)
    return vals.view(torch.uint8).clone()


def _alloc(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.uint8)


def _outputs_bytes(results: list) -> list[bytes]:
    return [bytes(v.contiguous().view(torch.uint8).flatten().numpy()) for _, v in results]


# (op, args, kwargs, outputs, input buffers' byte sizes, in-place slot or None)
def _cases() -> list[tuple]:
    a = _ref(1, (2, 8))
    b = _ref(2, (2, 8))
    w = _ref(2, (4, 8))
    o = _ref(9, (2, 8))
    o4 = _ref(9, (2, 4))
    oc = _ref(9, (4, 8))
    return [
        ("aten::add.Tensor", (a, b), {"alpha": 2}, [(64, o)], [64, 64]),
        ("aten::mul.Tensor", (a, a), {}, [(64, o)], [64]),  # one handle read twice
        ("aten::mul.Scalar", (a, -0.5), {}, [(64, o)], [64]),
        ("aten::linear.default", (a, w), {}, [(32, o4)], [64, 128]),
        ("aten::cat.default", ([a, b, a],), {"dim": 0}, [(192, _ref(9, (6, 8)))], [64, 64]),
        ("aten::sum.dim_IntList", (a, [1], True), {}, [(8, _ref(9, (2, 1)))], [64]),
        ("aten::_softmax.default", (a, 1, False), {}, [(64, o)], [64]),
        ("aten::max.dim", (a, 1), {}, [(8, _ref(9, (2,))), (16, _ref(10, (2,), torch.int64))], [64]),
        ("aten::where.self", (_ref(3, (2, 8), torch.bool), a, b), {}, [(64, o)], [16, 64, 64]),
        ("aten::add_.Tensor", (a, b), {}, [], [64, 64]),  # in place: a mutable slot
        ("aten::clone.default", (_ref(1, (8, 2), stride=(1, 8)),), {}, [(64, _ref(9, (8, 2)))], [64]),
        ("aten::cat.default", ([a, b],), {}, [(128, oc)], [64, 64]),
    ]


def _launch_views(
    p: X.LaunchPlan, sizes: list[int], seed: int, dtypes: dict[int, torch.dtype]
) -> tuple[list, tuple]:
    """Buffers for each slot (one per distinct input handle) and the launch's handles."""
    bufs_by_handle: dict[int, torch.Tensor] = {}
    order = []
    for sl in p.slots:
        h = sl.ref.handle
        if h not in bufs_by_handle:
            size = sizes[len(bufs_by_handle)]
            bufs_by_handle[h] = _buf(size, seed + h, dtypes.get(h, sl.ref.dtype))
        order.append(h)
    bufs = [bufs_by_handle[h] for h in order]
    handles = tuple(order) + tuple(r.handle for _, r in p.outputs)
    return bufs, handles


def test_every_case_records_and_repeats_the_python_result_bit_for_bit(pe):
    """Each plan records on its first launch; a later launch over other buffers gives, bit for
    bit, what the Python path gives for the same buffers (and the in-place one writes the same
    bytes)."""
    for case in _cases():
        op, args, kwargs, outputs, sizes = case
        fast = _plan(op, args, kwargs, outputs)
        slow = _plan(op, args, kwargs, outputs)
        slow.cx = False
        dtypes = {sl.ref.handle: sl.ref.dtype for sl in fast.slots}
        bufs, handles = _launch_views(fast, sizes, 1, dtypes)
        X.run_plan(CPU, fast, bufs, handles, _alloc, [None] * len(bufs))  # records
        assert fast.cx, op
        for seed in (2, 3):
            fb, handles = _launch_views(fast, sizes, seed, dtypes)
            sb = [b.clone() for b in fb]
            if len({id(b) for b in fb}) < len(fb):  # one buffer read by two slots stays one
                first: dict[int, torch.Tensor] = {}
                sb = [first.setdefault(id(b), c) for b, c in zip(fb, sb)]
            runs = fast.cx.runs
            got = X.run_plan(CPU, fast, fb, handles, _alloc, [None] * len(fb))
            assert fast.cx.runs == runs + 1, op
            want = X.run_plan(CPU, slow, sb, handles, _alloc, [None] * len(sb))
            assert _outputs_bytes(got) == _outputs_bytes(want), op
            assert [bytes(b.numpy()) for b in fb] == [bytes(b.numpy()) for b in sb], op  # in place too


def test_two_slots_sharing_one_cached_view_are_recorded_apart(pe):
    """x * x on its first launch (one buffer, both slots) must not make the executor read one
    slot for both: a later launch naming two allocations multiplies the two."""
    a = _ref(1, (2, 8))
    b = _ref(2, (2, 8))
    p = _plan("aten::mul.Tensor", (a, b), {}, [(64, _ref(9, (2, 8)))])
    x = _buf(64, 1)
    X.run_plan(CPU, p, [x, x], (1, 1, 9), _alloc, [None, None])
    assert p.cx
    y, z = _buf(64, 2), _buf(64, 3)
    ((_, v),) = X.run_plan(CPU, p, [y, z], (1, 2, 9), _alloc, [None, None])
    assert torch.equal(v, y.view(torch.float32).view(2, 8) * z.view(torch.float32).view(2, 8))


def test_the_executor_hands_back_every_launch_it_is_unsure_of(pe):
    """A buffer too small for its view, misaligned, of the wrong dtype or rank, or not a tensor:
    cx.run returns None having run nothing, and the Python path raises its own error."""
    a = _ref(1, (2, 8))
    p = _plan("aten::neg.default", (a,), {}, [(64, _ref(9, (2, 8)))])
    X.run_plan(CPU, p, [_buf(64, 1)], (1, 9), _alloc, [None])
    cx = p.cx
    assert cx
    runs = cx.runs
    small = _buf(60, 1)
    misaligned = _buf(72, 1)[1:65]
    wrong = [small, misaligned, torch.zeros(16), torch.zeros(8, 8, dtype=torch.uint8), "junk"]
    for b in wrong:
        assert cx.run([b], [None]) is None
    assert cx.run([], []) is None and cx.run(5, None) is None
    assert cx.runs == runs
    with pytest.raises(X.LaunchError, match="beyond the allocation"):
        X.run_plan(CPU, p, [small], (1, 9), _alloc, [None])
    with pytest.raises(X.LaunchError, match="not aligned"):
        X.run_plan(CPU, p, [misaligned], (1, 9), _alloc, [None])


def test_a_pending_input_read_through_its_hint_and_results_python_must_bind(pe):
    """An input whose producer's result is its view (a hint) is read as that tensor; a result
    the executor cannot bind as the declared output (here: it aliases an input) comes back to
    Python's binding, which copies it into a fresh allocation."""
    a = _ref(1, (2, 8))
    p = _plan("aten::exp.default", (a,), {}, [(64, _ref(9, (2, 8)))])
    buf = _buf(64, 1)
    X.run_plan(CPU, p, [buf], (1, 9), _alloc, [None])
    assert p.cx
    prod = torch.rand(2, 8) + 1
    hint = (prod, X.layout_key(a), prod)
    ((ob, v),) = X.run_plan(CPU, p, [prod], (1, 9), _alloc, [hint])
    assert ob is None and torch.equal(v, prod.exp())
    # a declared output laid out otherwise than the operator's result (the stride of a size-1
    # dimension is free for the plan's check, not for binding as is): Python copies it
    q = _plan("aten::sum.dim_IntList", (a, [1], True), {}, [(8, _ref(9, (2, 1), stride=(1, 7)))])
    X.run_plan(CPU, q, [buf], (1, 9), _alloc, [None])
    assert q.cx
    b2 = _buf(64, 5)
    runs = q.cx.runs
    ((ob, v),) = X.run_plan(CPU, q, [b2], (1, 9), _alloc, [None])
    assert q.cx.runs == runs + 1 and ob is not None and ob.numel() == 8  # a fresh allocation
    assert v.stride() == (1, 7) and torch.equal(v, b2.view(torch.float32).view(2, 8).sum(1, keepdim=True))


def test_plans_with_index_ranges_or_uninitialized_outputs_never_compile(pe):
    i = _ref(2, (3,), torch.int64)
    p = _plan("aten::embedding.default", (_ref(1, (4, 8)), i), {}, [(96, _ref(9, (3, 8)))])
    assert p.indexed and p.cx is False
    e = _plan("aten::empty_like.default", (_ref(1, (2, 8)),), {}, [(64, _ref(9, (2, 8)))])
    assert e.uninit and e.cx is False


@pytest.mark.parametrize("policy", ["fifo", "priority"])
def test_the_daemon_runs_repeated_aten_launches_compiled(pe, start_daemon, policy):
    """Through a real daemon: one add structure repeated with fresh outputs runs compiled after
    its plan's recording launch (status: compiled_launches), with the right results."""
    from flexnpu.client import Client
    from flexnpu.control import query

    d = start_daemon("--policy", policy)
    with Client(0) as c:
        x = torch.arange(16.0)
        hx = c.malloc(64, sync=True)
        c.memcpy_h2d(hx, 0, x.numpy().tobytes())
        ref = TensorRef(hx, torch.float32, (16,), (1,), 0)
        outs = []
        for k in range(10):
            h = c.alloc_handle()
            c.launch(
                "aten::add.Tensor",
                (ref, ref),
                {"alpha": 3},
                [(64, TensorRef(h, torch.float32, (16,), (1,), 0))],
            )
            outs.append(h)
        c.synchronize()
        for h in outs:
            got = torch.frombuffer(bytearray(c.memcpy_d2h(h, 0, 64)), dtype=torch.float32)
            assert torch.equal(got, x + 3 * x)
        st = query(str(d.socket), {"op": "status"})["daemon"]["plans"]
        assert st["compiled"] >= 1
        # seen once, planned the second time, recorded at the plan's first launch: 7 compiled
        assert st["compiled_launches"] == 10 - 3, st


# ---- plans without sizes (torch_exec.SizedLaunchPlan): AtenExec.run_sized ----------------------


def _sized_cat(n: int, hs=(1, 2, 3)):
    """A sized plan's launch: cat of a (1, n, 8) cache and a (1, 1, 8) row, as prepared."""
    from flexnpu import protocol as P
    from flexnpu.ring.segment import launch_split

    f32 = torch.float32
    a = TensorRef(hs[0], f32, (1, n, 8), (n * 8, 8, 1), 0)
    b = TensorRef(hs[1], f32, (1, 1, 8), (8, 8, 1), 0)
    o = TensorRef(hs[2], f32, (1, n + 1, 8), ((n + 1) * 8, 8, 1), 0)
    payload = bytes(P.encode_launch("aten::cat.default", ([a, b], 1), {}, [((n + 1) * 32, o)]))
    return payload, launch_split(payload, 3)


def test_a_plan_without_sizes_records_once_and_repeats_for_every_size(pe):
    """The first launch of a sized plan records its call; launches of other sizes run compiled
    with each launch's own layouts (pending results, the operator's values), reading an input
    through its hint, and matching what the Python path gives."""
    from flexnpu import protocol as P

    payload, _ = _sized_cat(3)
    sp = X.make_sized_plan(CPU, P.decode_launch(payload, CPU))
    slow = X.make_sized_plan(CPU, P.decode_launch(payload, CPU))
    assert sp is not None and sp.cx is None
    slow.cx = False
    for i, n in enumerate((3, 5, 17, 64, 1)):
        _, (_, hs, offs, dims, nbs) = _sized_cat(n)
        refs, outs = X.prepare_sized_plan(sp, hs, offs, dims, nbs)
        cache, row = _buf(n * 32, i), _buf(32, 100 + i)
        runs = sp.cx.runs if sp.cx else 0
        got, keys = X.run_sized_plan(CPU, sp, [cache, row], refs, outs, _alloc)
        want, _ = X.run_sized_plan(CPU, slow, [cache, row], refs, outs, _alloc)
        assert sp.cx and sp.cx.runs == runs + (i > 0)  # the first launch records
        assert got[0][0] is None and torch.equal(got[0][1], want[0][1]), n
        assert keys == [X.layout_key(outs[0][1])]
    # an input given as its producer's pending result, in this very layout: read as that tensor
    _, (_, hs, offs, dims, nbs) = _sized_cat(9)
    refs, outs = X.prepare_sized_plan(sp, hs, offs, dims, nbs)
    prod = torch.rand(1, 9, 8)
    row = _buf(32, 7)
    runs = sp.cx.runs
    got, _ = X.run_sized_plan(
        CPU, sp, [prod, row], refs, outs, _alloc, [(prod, X.layout_key(refs[0]), prod), None]
    )
    assert sp.cx.runs == runs + 1
    assert torch.equal(got[0][1], torch.cat([prod, row.view(torch.float32).view(1, 1, 8)], 1))


def test_the_sized_executor_hands_back_every_layout_it_is_unsure_of(pe):
    """run_sized validates each launch's layouts as check_view_bounds does: sizes past the
    buffer, negative or huge sizes, strides or offsets, bools for ints, ranks that differ,
    misaligned or non-byte buffers: None, nothing ran (the Python path then raises its error).
    A result unlike its declaration comes back for Python to check (and refuse)."""
    from flexnpu import protocol as P

    payload, (_, hs, offs, dims, nbs) = _sized_cat(4)
    sp = X.make_sized_plan(CPU, P.decode_launch(payload, CPU))
    refs, outs = X.prepare_sized_plan(sp, hs, offs, dims, nbs)
    X.run_sized_plan(CPU, sp, [_buf(128, 1), _buf(32, 2)], refs, outs, _alloc)  # records
    cx = sp.cx
    assert cx
    runs = cx.runs
    f32 = torch.float32
    good_out = outs[0][1]
    row = _buf(32, 2)

    def ref(shape, stride, offset=0):
        return TensorRef(1, f32, shape, stride, offset)

    bad_refs = [
        ref((1, 5, 8), (40, 8, 1)),  # 160 bytes: past the 128-byte buffer
        ref((1, 4, 8), (32, 8, 1), 1),  # offset one element: past the end
        ref((1, -4, 8), (32, 8, 1)),
        ref((1, 4, 8), (32, -8, 1)),
        ref((1, 4, 8), (32, 8, 1), -1),
        ref((1, 4, 8), (32, 8, 1), 1 << 60),
        ref((1, 1 << 49, 8), (32, 8, 1)),
        ref((1, True, 8), (32, 8, 1)),
        ref((1, 4, 8), (32, 8)),  # ranks differ
        ref([1, 4, 8], (32, 8, 1)),  # not a tuple
        ref((1, 4, 8.0), (32, 8, 1)),
        "junk",
    ]
    for r in bad_refs:
        assert cx.run_sized([_buf(128, 1), row], [None, None], [r, refs[1]], good_out, 160) is None, r
    for b in (_buf(136, 1)[1:129], torch.zeros(32), torch.zeros(2, 64, dtype=torch.uint8), "junk"):
        assert cx.run_sized([b, row], [None, None], refs, good_out, 160) is None
    assert cx.run_sized([row], [None], refs[:1], good_out, 160) is None  # too few
    assert cx.run_sized([_buf(128, 1), row], [None, None], refs, "junk", 160) is None
    assert cx.runs == runs
    with pytest.raises(X.LaunchError, match="beyond the allocation"):
        X.run_sized_plan(CPU, sp, [_buf(120, 1), row], refs, outs, _alloc)
    # the result is (1, 5, 8); declared (1, 4, 8): ran, handed back, and Python refuses it
    short = TensorRef(3, f32, (1, 4, 8), (32, 8, 1), 0)
    r = cx.run_sized([_buf(128, 1), row], [None, None], refs, short, 128)
    assert type(r) is tuple and tuple(r[0].shape) == (1, 5, 8)
    with pytest.raises(X.LaunchError, match="declared"):
        X.run_sized_plan(CPU, sp, [_buf(128, 1), row], refs, [(128, short)], _alloc)
