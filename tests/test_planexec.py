"""The compiled executor of planned table launches (flexnpu/daemon/compiled.py,
planexec.cpp): what it records, that it repeats exactly what the Python path computes, and
that every launch it is unsure of goes back to Python (which has the checks and the errors)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from flexnpu.daemon import optable
from flexnpu.daemon import compiled
from flexnpu.protocol import TensorRef

from test_launch_plans import value_cases


def _place(
    d: Any, a: dict[str, Any], buf: torch.Tensor, start: int, fill: int
) -> tuple[dict, list, list, int]:
    """`a` with each tensor moved into `buf` (uint8) at increasing element offsets from `start`
    (each tensor's own dtype), its values from a seeded generator: the argument dict over views,
    the plan's Slots and each slot's offset, in payload order (params order, lists flattened)."""
    g = torch.Generator().manual_seed(fill)
    out: dict[str, Any] = {}
    slots: list[Any] = []
    offsets: list[int] = []
    pos = start * 8  # bytes; every offset stays aligned for 8-byte types

    def put(t: torch.Tensor) -> torch.Tensor:
        nonlocal pos
        item = t.element_size()
        off = pos // item
        ref = TensorRef(1, t.dtype, tuple(t.shape), tuple(t.stride()), off)
        v = optable.build_view(ref, buf)
        if t.dtype == torch.bool:
            v.copy_(torch.rand(t.shape, generator=g) > 0.5)
        elif t.is_floating_point():
            v.copy_(torch.rand(t.shape, generator=g) + 0.5)
        else:
            v.copy_(torch.randint(1, 9, t.shape, generator=g).to(t.dtype))
        slots.append(optable.Slot(len(slots), ref))
        offsets.append(off)
        pos += (t.numel() * item + 15) // 8 * 8 + 8
        return v

    for name, _ in d.params:
        v = a.get(name)
        if isinstance(v, torch.Tensor):
            out[name] = put(v.contiguous())
        elif isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
            out[name] = [put(t.contiguous()) for t in v]
        else:
            out[name] = v
    for k, v in a.items():
        out.setdefault(k, v)
    dest = next(i for i, v in enumerate(_views_at(out, d)) if v is out[d.dest])
    return out, slots, offsets, dest


def _views_at(a: dict[str, Any], d: Any) -> list[torch.Tensor]:
    vs: list[torch.Tensor] = []
    for name, _ in d.params:
        v = a.get(name)
        if isinstance(v, torch.Tensor):
            vs.append(v)
        elif isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
            vs.extend(v)
    return vs


def test_every_recordable_value_entry_repeats_the_python_result_bit_for_bit(pe):
    """For each register_value entry: record its in-place call on one launch, then run a
    second launch (other allocation, other offsets, other data) through the executor and
    compare with the entry's own Python result, bit for bit."""
    got_exec, skipped = [], []
    for op, d, dtype, a0, want0 in value_cases():
        if d.indices is not None:
            continue
        a0[d.dest] = torch.zeros_like(want0)
        buf1 = torch.zeros(1 << 14, dtype=torch.uint8)
        a1, slots, _, dest = _place(d, a0, buf1, 0, 1)
        views1 = _views_at(a1, d)
        _, cx = compiled.record(lambda: d.value(a1, a1[d.dest]), views1, slots, dest)
        if cx is None:
            skipped.append(op)
            continue
        buf2 = torch.zeros(1 << 14, dtype=torch.uint8)
        a2, _, offs2, _ = _place(d, a0, buf2, 37, 2)
        want = d.value(a2, None).clone()  # (computed, not written: a2's destination is unchanged)
        before = buf2.clone()
        assert cx.run([buf2] * len(slots), offs2), op
        out = _views_at(a2, d)[dest]
        torch.testing.assert_close(out, want.to(out.dtype), rtol=0, atol=0, equal_nan=True, msg=op)
        # nothing but the destination's bytes changed
        lo = offs2[dest] * out.element_size()
        hi = lo + out.numel() * out.element_size()
        assert torch.equal(buf2[:lo], before[:lo]) and torch.equal(buf2[hi:], before[hi:]), op
        got_exec.append((op, dtype))
    ops = {op for op, _ in got_exec}
    assert {
        "aclnn::Mul",
        "aclnn::Muls",
        "aclnn::Add",
        "aclnn::Cat",
        "aclnn::Mean",
        "aclnn::Silu",
        "aclnn::Mm",
    } <= ops, sorted(set(skipped))
    assert len(ops) >= 70, (len(ops), sorted(set(skipped)))


def _add_plan() -> Any:
    ref = TensorRef(1, torch.float32, (6,), (1,), 0)
    plan = optable.make_plan(torch.device("cpu"), "aclnn::Add", (ref, ref, 2.0, ref), {}, [])
    assert plan is not None
    return plan


def test_a_plan_records_on_its_first_in_place_launch_and_then_runs_compiled(pe):
    """The first launch decides the in-place form, the second records the operator on views of
    its own (here self and other are one tensor: two slots must still be told apart), and the
    third runs in C++ with two different tensors: the result is theirs, not the recorded pair's."""
    plan = _add_plan()
    buf = torch.zeros(64 * 4, dtype=torch.uint8)
    flat = buf.view(torch.float32)
    flat[:] = torch.arange(64.0)
    plan.run([buf] * 3, (1, 1, 1), (0, 0, 40))  # first: decides direct
    assert plan.direct is True and plan.cx is None
    plan.run([buf] * 3, (1, 1, 1), (6, 6, 40))  # self is other: recorded apart
    assert plan.cx and plan.cx.name == "aten::add.out"
    assert torch.equal(flat[40:46], torch.arange(6.0, 12.0) * 3)
    flat[:40] = torch.arange(40.0) * 0.25
    assert plan.cx.run([buf] * 3, (0, 12, 50))
    assert torch.equal(flat[50:56], torch.arange(0, 6.0) * 0.25 + 2 * torch.arange(12.0, 18.0) * 0.25)


def test_the_executor_hands_back_every_launch_it_is_unsure_of(pe):
    """Out of bounds, negative, misaligned, overlapping, another dtype's buffer, a wrong count:
    run() returns False with nothing written, and the plan's Python path then reports or
    handles the launch (LaunchError naming the bounds; the overlap's compute-then-put)."""
    plan = _add_plan()
    buf = torch.zeros(64 * 4, dtype=torch.uint8)
    flat = buf.view(torch.float32)
    flat[:] = torch.arange(64.0)
    for offs in ((0, 6, 40), (1, 7, 46)):
        plan.run([buf] * 3, (1, 1, 1), offs)
    cx = plan.cx
    assert cx
    snap = buf.clone()
    for offs in ((0, 6, 59), (-1, 6, 40), (0, 6, 1 << 60), (3, 24, 5)):
        assert not cx.run([buf] * 3, offs), offs
        assert torch.equal(buf, snap), offs
    assert not cx.run([buf] * 2, (0, 6))  # wrong count
    assert not cx.run([buf, buf, buf.view(torch.float32)], (0, 6, 40))  # not a byte buffer
    assert not cx.run([buf, buf, buf[1:]], (0, 6, 40))  # misaligned for float32
    assert torch.equal(buf, snap)
    with pytest.raises(optable.LaunchError, match="beyond the allocation"):
        plan.run([buf] * 3, (1, 1, 1), (0, 6, 59))
    plan.run([buf] * 3, (1, 1, 1), (3, 24, 5))  # overlapping: Python computes, then puts
    assert torch.equal(flat[5:11], snap.view(torch.float32)[3:9] + 2 * snap.view(torch.float32)[24:30])


def test_entries_the_executor_cannot_repeat_keep_the_python_path(pe):
    """An entry that makes tensors of its own or calls several operators records as None:
    its plan never gets an executor and keeps computing in Python."""
    buf = torch.zeros(256, dtype=torch.uint8)
    ref = TensorRef(1, torch.float32, (4,), (1,), 0)
    sl = [optable.Slot(0, ref), optable.Slot(1, ref)]
    x, out = (optable.build_view(TensorRef(1, torch.float32, (4,), (1,), o), buf) for o in (0, 8))
    _, cx = compiled.record(lambda: torch.add(x, torch.ones(4), out=out), [x, out], sl, 1)
    assert cx is None  # a tensor the entry made
    _, cx = compiled.record(lambda: torch.mul(x.neg(), 2, out=out), [x, out], sl, 1)
    assert cx is None  # two operators
    _, cx = compiled.record(lambda: torch.neg(x, out=out), [x, out], sl, 1)
    assert cx is not None and cx.name == "aten::neg.out"


@pytest.mark.parametrize("policy", ["fifo", "priority"])
def test_the_daemon_runs_a_repeating_table_launch_compiled_and_reports_it(pe, start_daemon, policy):
    """Through a real daemon (inline under fifo, queued under priority): a client repeats one
    aclnn::Mul structure at new offsets; after the launches that make the plan and record its
    operator, the rest run compiled (daemon status: plans.compiled_launches), with the same
    results as the Python path, and a launch out of bounds is still refused with nothing
    written."""
    from flexnpu.client import Client
    from flexnpu.control import query
    from flexnpu.errors import FlexNPUError

    d = start_daemon("--policy", policy)
    with Client(0) as c:
        data = torch.arange(64.0) * 0.5
        h = c.malloc(64 * 4, sync=True)
        c.memcpy_h2d(h, 0, data.numpy().tobytes())
        t = lambda off: TensorRef(h, torch.float32, (2, 3), (3, 1), off)  # noqa: E731
        runs = [(i % 8, 8 + (i * 3) % 20, 34 + (i % 5) * 6) for i in range(12)]
        for x, y, o in runs:
            c.launch("aclnn::Mul", (t(x), t(y), t(o)), {}, [])
            data[o : o + 6] = data[x : x + 6] * data[y : y + 6]
        c.synchronize()
        got = torch.frombuffer(bytearray(c.memcpy_d2h(h, 0, 256)), dtype=torch.float32)
        assert torch.equal(got, data)
        st = query(str(d.socket), {"op": "status"})["daemon"]["plans"]
        assert st["compiled_executor"] is True and st["compiled"] >= 1
        # seen, then planned, then the plan's first launch decides in place, the next records
        assert st["compiled_launches"] == len(runs) - 4, st
        c.launch("aclnn::Mul", (t(0), t(8), t(59)), {}, [])  # past the end
        with pytest.raises(FlexNPUError, match="beyond the allocation"):
            c.synchronize()
        got = torch.frombuffer(bytearray(c.memcpy_d2h(h, 0, 256)), dtype=torch.float32)
        assert torch.equal(got, data)


def test_the_recorder_refuses_layouts_it_cannot_bound(pe):
    """The layouts come from validated plans; the C++ side still refuses any whose bounds
    arithmetic could go wrong (a negative size or stride, a span past 2**62, ranks that differ,
    a count that is not the views')."""
    buf = torch.zeros(256, dtype=torch.uint8)
    x, out = (optable.build_view(TensorRef(1, torch.float32, (4,), (1,), o), buf) for o in (0, 8))
    good = (torch.float32, [4], [1])
    assert pe.record(lambda: torch.neg(x, out=out), [x, out], [good, good], 1)[1] is not None
    for bad in (
        (torch.float32, [4], [-1]),
        (torch.float32, [-4], [1]),
        (torch.float32, [4, 2], [1]),
        (torch.float32, [3, 1 << 40], [1 << 40, 1 << 22]),
    ):
        _, cx = pe.record(lambda: torch.neg(x, out=out), [x, out], [bad, good], 1)
        assert cx is None, bad
    assert pe.record(lambda: torch.neg(x, out=out), [x, out], [good], 1)[1] is None
    assert pe.record(lambda: torch.neg(x, out=out), [x, out], [good, good], 5)[1] is None
