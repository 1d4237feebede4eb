"""Launch plans (daemon/handlers/launch.py, torch_exec.make_plan/run_plan): a launch whose
structure the daemon has validated before runs from its cached plan. What depends on the handles
must still be checked on every launch: that each handle is the client's, that each view fits
the allocation it names now, index ranges, fresh outputs.

protocol.split_launch is checked against decode_launch; the rest attaches real clients to a real
daemon (cpu backend) and repeats one structure with different handles.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from flexnpu import protocol as P
from flexnpu.errors import FlexNPUError, InvalidHandle
from flexnpu.protocol import TensorRef

from test_op_safety import _alive, _get, _out, _put


def _dfs(x, out: list[int], field: str) -> list[int]:
    if isinstance(x, TensorRef):
        out.append(getattr(x, field))
    elif isinstance(x, (list, tuple)):
        for v in x:
            _dfs(v, out, field)
    return out


def _refs_in_payload_order(launch: P.Launch, field: str = "handle") -> list[int]:
    """Each tensor's `field` in payload order: args depth first, then kwargs, then outputs."""
    out = _dfs(launch.args, [], field)
    for v in launch.kwargs.values():
        _dfs(v, out, field)
    return out + [getattr(r, field) for _, r in launch.outputs]


def _payloads() -> list[bytes]:
    a = TensorRef(5, torch.float32, (2, 3), (3, 1), 0)
    b = TensorRef(7, torch.float16, (4,), (1,), 2)
    o = TensorRef(9, torch.float32, (2, 3), (3, 1), 0)
    return [
        P.encode_launch("aten::add.Tensor", (a, b), {"alpha": 2}, [(24, o)]),
        P.encode_launch("aten::cat.default", ([a, b, a], 0), {}, [(24, o)]),
        P.encode_launch(
            "aten::x", (None, True, 1.5, 3, "s", complex(1, 2), torch.float32, torch.device("cpu")), {}, []
        ),
        P.encode_launch("aten::y", ((a, [b, (a,)]),), {"k": [a, None], "m": torch.strided}, [(4, o), (8, b)]),
        P.encode_launch("aten::z", (), {}, []),
    ]


def test_split_matches_decode_and_zeroes_only_handles():
    for pl in _payloads():
        split = P.split_launch(pl)
        assert split is not None
        key, handles = split
        launch = P.decode_launch(pl, torch.device("cpu"))
        assert list(handles) == _refs_in_payload_order(launch)
        assert len(key) == len(pl)
        diff = [i for i in range(len(pl)) if key[i] != pl[i]]
        assert all(key[i] == 0 for i in diff)
        # the same structure naming other allocations: same key, the new handles
        renamed = P.encode_launch(
            launch.op,
            _rename(launch.args),
            {k: _rename(v) for k, v in launch.kwargs.items()},
            [(n, _rename(r)) for n, r in launch.outputs],
        )
        k2, h2 = P.split_launch(renamed)  # type: ignore[misc]
        assert k2 == key
        assert list(h2) == [h + 1000 for h in handles]


def _rename(x, shift: int = 0):
    """x with every tensor's handle + 1000 and its offset + shift."""
    if isinstance(x, TensorRef):
        return TensorRef(x.handle + 1000, x.dtype, x.shape, x.stride, x.offset + shift)
    if isinstance(x, list):
        return [_rename(v, shift) for v in x]
    if isinstance(x, tuple):
        return tuple(_rename(v, shift) for v in x)
    return x


def test_split_refuses_what_decode_refuses_and_never_crashes():
    rng = random.Random(7)
    for pl in _payloads():
        for cut in range(len(pl)):
            assert P.split_launch(pl[:cut]) is None  # every truncation
        assert P.split_launch(pl + b"\0") is None  # trailing bytes
        for _ in range(300):  # random corruption: either refused, or a payload decode accepts too
            b = bytearray(pl)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            split = P.split_launch(bytes(b))
            if split is not None:
                try:
                    launch = P.decode_launch(bytes(b))
                except P.DecodeError:
                    continue  # e.g. a bad dtype code: decode reports it; a plan is made only after decode
                assert list(split[1]) == _refs_in_payload_order(launch)
    deep = b"\x01\x00x" + b"\x08\x01\x00" * 20 + b"\x00" + b"\x00\x00\x00\x00"
    assert P.split_launch(deep) is None  # nesting beyond MAX_DEPTH
    many = P.encode_launch(
        "aten::cat.default", ([TensorRef(i + 1, torch.float32, (1,), (1,), 0) for i in range(300)],), {}, []
    )
    assert P.split_launch(many) is None  # more tensors than a plan takes: the generic path
    with pytest.raises(TypeError):
        P.split_launch(bytearray(b"x"))  # type: ignore[arg-type]


def _launch_mul(c, a: TensorRef, b: TensorRef) -> TensorRef:
    o = _out(c, torch.float32, a.shape)
    c.launch("aten::mul.Tensor", (a, b), {}, [o])
    return o[1]


def test_repeated_structure_gives_right_results_with_new_handles(client):
    for i in range(6):  # first: generic; second: plan made; then planned
        x = torch.arange(6.0).reshape(2, 3) + i
        a, b = _put(client, x), _put(client, x + 1)
        o = _launch_mul(client, a, b)
        client.synchronize()
        assert torch.equal(_get(client, o), x * (x + 1))
        for h in (a.handle, b.handle, o.handle):
            client.free(h)


def test_planned_launches_with_tensor_lists_and_tensor_keywords_give_right_results(client):
    """Plans whose tensors sit in a list (cat: filled by walking the template) or in keyword
    arguments (clamp's min/max: filled by name) bind each handle of each launch to its own slot."""
    for i in range(4):
        x, lo, hi = torch.arange(6.0) - i, torch.full((6,), -1.0 - i), torch.full((6,), 2.0 + i)
        a, b, c = _put(client, x), _put(client, lo), _put(client, hi)
        cat = _out(client, torch.float32, (18,))
        client.launch("aten::cat.default", ([a, c, b], 0), {}, [cat])
        clamp = _out(client, torch.float32, (6,))
        client.launch("aten::clamp.Tensor", (a,), {"min": b, "max": c}, [clamp])
        client.synchronize()
        assert torch.equal(_get(client, cat[1]), torch.cat([x, hi, lo]))
        assert torch.equal(_get(client, clamp[1]), torch.clamp(x, min=lo, max=hi))
        for h in (a.handle, b.handle, c.handle, cat[1].handle, clamp[1].handle):
            client.free(h)


def test_pending_planned_results_read_in_place_relaid_and_by_copy_give_right_results(client):
    """A planned launch leaves its result pending (no byte buffer) until something needs its
    bytes. Each way of reading one must see the values: another planned launch through the
    result itself (twice in one launch), a view in another layout, an in-place write, the same
    allocation read and then written by one launch (mul.out(y, x, out=y)), a copy to the host."""
    for i in range(5):  # the first two make the plans, the rest run from them
        x = torch.arange(6.0).reshape(2, 3) + i
        a = _put(client, x)
        y = [_launch_mul(client, a, a) for _ in range(4)]
        z = _launch_mul(client, y[0], y[0])
        relaid = TensorRef(y[1].handle, torch.float32, (3, 2), (2, 1), 0)
        t = _out(client, torch.float32, (3, 2))
        client.launch("aten::add.Tensor", (relaid, 1.0), {}, [t])
        client.launch("aten::mul_.Tensor", (y[2], a), {}, [])
        client.launch("aten::mul.out", (y[3], a), {"out": y[3]}, [])
        client.synchronize()
        sq = x * x
        assert torch.equal(_get(client, z), sq * sq)
        assert torch.equal(_get(client, t[1]), sq.reshape(3, 2) + 1)
        assert torch.equal(_get(client, y[2]), sq * x)
        assert torch.equal(_get(client, y[3]), sq * x)
        assert torch.equal(_get(client, y[1]), sq)
        for h in (a.handle, z.handle, t[1].handle, *(r.handle for r in y)):
            client.free(h)


def test_planned_launch_checks_each_view_against_the_allocation_it_names_now(client):
    a = _put(client, torch.ones(64))
    for _ in range(3):
        _launch_mul(client, a, a)
    client.synchronize()
    small = _put(client, torch.ones(4))  # same structure, but the handle names 16 bytes
    ref = TensorRef(small.handle, torch.float32, (64,), (1,), 0)
    _launch_mul(client, ref, ref)
    with pytest.raises(FlexNPUError, match=f"handle {small.handle}.*beyond the allocation"):
        client.synchronize()
    _alive(client)


def test_planned_launch_refuses_freed_foreign_and_reused_handles(daemon):
    from flexnpu.client import Client

    with Client(0) as owner, Client(0) as other:
        a = _put(owner, torch.ones(8))
        for _ in range(3):
            _launch_mul(owner, a, a)
        owner.synchronize()
        # another client sends the same structure naming the owner's handle: not in its table
        _launch_mul(other, a, a)
        with pytest.raises(InvalidHandle):
            other.synchronize()
        # a freed handle
        owner.free(a.handle)
        _launch_mul(owner, a, a)
        with pytest.raises(InvalidHandle):
            owner.synchronize()
        # an output handle that is not fresh (it names a live input)
        b = _put(owner, torch.ones(8))
        for _ in range(2):
            _launch_mul(owner, b, b)
        owner.synchronize()
        owner.launch("aten::mul.Tensor", (b, b), {}, [(32, b)])
        with pytest.raises(InvalidHandle, match="not fresh"):
            owner.synchronize()
        assert torch.equal(_get(owner, b), torch.ones(8))  # untouched
        _alive(owner)
        _alive(other)
    assert daemon.proc.poll() is None


@pytest.mark.parametrize("planned", [False, True])
def test_refused_output_handle_leaves_memory_accounting_unchanged(client, planned):
    """An output handle the client's table refuses (it names another live allocation) fails the
    launch and gives back what was charged for the output: nothing leaks per refused launch."""
    a = _put(client, torch.ones(16))
    taken = _put(client, torch.zeros(16))
    if planned:  # the same structure twice first: the refused launch then takes the planned path
        for _ in range(2):
            _launch_mul(client, a, a)
        client.synchronize()
    used = client.memory_stats()["allocated"]
    for _ in range(3):
        client.launch(
            "aten::mul.Tensor", (a, a), {}, [(64, TensorRef(taken.handle, torch.float32, (16,), (1,), 0))]
        )
        with pytest.raises(InvalidHandle, match="already in use"):
            client.synchronize()
    assert client.memory_stats()["allocated"] == used
    assert torch.equal(_get(client, taken), torch.zeros(16))
    _alive(client)


def test_planned_index_launches_still_check_index_ranges(client):
    src = _put(client, torch.arange(8.0))
    for i in range(3):
        idx = _put(client, torch.tensor([i, 7]))
        o = _out(client, torch.float32, (2,))
        client.launch("aten::index_select.default", (src, 0, idx), {}, [o])
        client.synchronize()
        assert _get(client, o[1]).tolist() == [float(i), 7.0]
    bad = _put(client, torch.tensor([1, 1 << 40]))
    client.launch("aten::index_select.default", (src, 0, bad), {}, [_out(client, torch.float32, (2,))])
    with pytest.raises(FlexNPUError, match="out of range"):
        client.synchronize()
    _alive(client)


def test_daemon_refuses_sdpa_with_dropout_from_a_raw_client(client):
    """The daemon allows scaled_dot_product_attention only without dropout (its random numbers
    would come from the daemon's generator): checked on every launch, planned or not."""
    q = _put(client, torch.ones(1, 2, 3, 4))
    for dropout in (0.0, 0.0, 0.0, 0.5):
        o = _out(client, torch.float32, (1, 2, 3, 4))
        client.launch("aten::scaled_dot_product_attention.default", (q, q, q, None, dropout), {}, [o])
        if dropout:
            with pytest.raises(FlexNPUError, match="dropout_p=0.5 is not allowed"):
                client.synchronize()
        else:
            client.synchronize()
            assert torch.allclose(_get(client, o[1]), torch.ones(1, 2, 3, 4))
    _alive(client)


def test_launch_template_fills_to_the_same_payload_as_encoding():
    """The client's encoded-launch cache (hook/tensor.py _enc_cache): a template filled with
    other handles is byte for byte what encode_launch gives for those handles."""
    for pl in _payloads():
        launch = P.decode_launch(pl, torch.device("cpu"))
        tpl = P.encode_launch_template(launch.op, launch.args, launch.kwargs, launch.outputs)
        assert tpl[0] == pl
        hs = [h + 1000 for h in _refs_in_payload_order(launch)]
        renamed = P.encode_launch(
            launch.op,
            _rename(launch.args),
            {k: _rename(v) for k, v in launch.kwargs.items()},
            [(n, _rename(r)) for n, r in launch.outputs],
        )
        assert bytes(P.fill_launch(tpl, hs)) == renamed
        with pytest.raises(ValueError):
            P.fill_launch(tpl, hs + [1])


def test_a_full_plan_cache_drops_structures_seen_once_before_plans():
    """A growing cache adds structures seen once every token; when the plan cache is full they
    go, and the repeating structures keep their plans (launch._evict)."""
    from types import SimpleNamespace

    from flexnpu.daemon.handlers import launch

    be = SimpleNamespace(PLAN_CACHE_MAX=8)
    plans = {b"hot%d" % i: object() for i in range(3)}
    plans[b"never"] = False  # a structure with no plan: remembered as such
    for i in range(20):
        launch._remember_plan(be, plans, (b"once%d" % i, ()), None, None)
        assert len(plans) <= be.PLAN_CACHE_MAX
        assert all(plans[b"hot%d" % j] is not None for j in range(3))
    assert plans[b"never"] is False and plans[b"once19"] is None
    # plans alone past half the cache: everything goes (nothing else to drop)
    plans = {b"p%d" % i: object() for i in range(8)}
    launch._remember_plan(be, plans, (b"new", ()), None, None)
    assert plans == {b"new": None}


# ------------------------------------------------------------------ the native front end's plans
def test_split_with_offsets_zeroes_handles_and_offsets_and_returns_both():
    """The native front end's tensors are views into its allocator's blocks: their plans key on
    the structure without offsets (protocol.split_launch_offsets), and each launch's offsets come
    back in payload order next to its handles."""
    pls = _payloads() + [
        P.encode_launch(
            "aclnn::Add",
            (
                TensorRef(3, torch.float32, (2, 3), (3, 1), 17),
                TensorRef(3, torch.float32, (3,), (1,), 99),
                1.0,
            )
            + (TensorRef(4, torch.float32, (2, 3), (3, 1), 5),),
            {},
            [],
        )
    ]
    for pl in pls:
        key, handles, offsets = P.split_launch_offsets(pl)  # type: ignore[misc]
        launch = P.decode_launch(pl, torch.device("cpu"))
        assert list(handles) == _refs_in_payload_order(launch)
        assert list(offsets) == _refs_in_payload_order(launch, "offset")
        assert P.split_launch(pl)[1] == handles  # type: ignore[index]
        diff = [i for i in range(len(pl)) if key[i] != pl[i]]
        assert all(key[i] == 0 for i in diff)
        moved = P.encode_launch(
            launch.op,
            _rename(launch.args, 7),
            {k: _rename(v, 7) for k, v in launch.kwargs.items()},
            [(n, _rename(r, 7)) for n, r in launch.outputs],
        )
        k2, h2, o2 = P.split_launch_offsets(moved)  # type: ignore[misc]
        assert k2 == key and list(h2) == [h + 1000 for h in handles]
        assert list(o2) == [o + 7 for o in offsets]
        if offsets:  # without offsets in the key, the moved launch has the same structure
            assert P.split_launch(moved)[0] != P.split_launch(pl)[0]  # type: ignore[index]
        for cut in range(len(pl)):
            assert P.split_launch_offsets(pl[:cut]) is None


def test_table_plan_checks_once_what_the_structure_fixes_and_per_launch_what_it_does_not():
    """optable.make_plan runs the declaration's checks once; TablePlan.run builds each view at
    the launch's own offset, bounds-checked against the allocation it is given."""
    from flexnpu.daemon import optable
    from flexnpu.daemon.backends.torch_exec import LaunchError

    dev = torch.device("cpu")
    ref = TensorRef(1, torch.float32, (2, 3), (3, 1), 0)
    plan = optable.make_plan(dev, "aclnn::Add", (ref, ref, 2.0, ref), {}, [])
    assert plan is not None and plan.n_in == 3 and not plan.outputs
    # what the generic path refuses gets no plan (that path then reports it)
    assert optable.make_plan(dev, "aclnn::Add", (ref, ref, ref), {}, []) is None  # arity
    assert optable.make_plan(dev, "aclnn::Add", (ref, 3, 1, ref), {}, []) is None  # kind
    assert optable.make_plan(dev, "aclnn::NoSuchOp", (ref,), {}, []) is None
    overlapping = TensorRef(1, torch.float32, (2, 3), (0, 1), 0)
    assert optable.make_plan(dev, "aclnn::Adds", (ref, 1, 1, overlapping), {}, []) is None
    assert optable.make_plan(dev, "aclnn::Add", (ref, ref, 1, ref), {}, [(24, ref)]) is None  # fresh outputs
    buf = torch.zeros(64 * 4, dtype=torch.uint8)
    flat = buf.view(torch.float32)
    flat[:30] = torch.arange(30.0)
    for x, y, o in ((0, 6, 40), (12, 18, 50), (3, 24, 58)):  # one plan, other offsets each time
        plan.run([buf, buf, buf], (1, 1, 1), (x, y, o))
        want = flat[x : x + 6] + 2 * flat[y : y + 6]
        assert torch.equal(flat[o : o + 6], want)
    with pytest.raises(LaunchError, match="handle 9: .*beyond the allocation"):
        plan.run([buf, buf, buf], (1, 1, 9), (0, 6, 59))  # 59 + 6 elements > 64
    with pytest.raises(LaunchError, match="offset -1"):
        plan.run([buf, buf, buf], (1, 1, 1), (-1, 6, 40))


def test_table_plan_writes_results_in_place_only_where_that_equals_put():
    """A plan of a register_value entry (Add here) writes its result straight into the
    destination (torch's out=) once its first launch shows the result has the destination's
    dtype and shape, and falls back to compute-then-put whenever the destination shares bytes
    with an input at that launch's offsets (out= would read what it already wrote)."""
    from flexnpu.daemon import optable

    dev = torch.device("cpu")
    ref = TensorRef(1, torch.float32, (6,), (1,), 0)
    plan = optable.make_plan(dev, "aclnn::Add", (ref, ref, 2.0, ref), {}, [])
    assert plan is not None and plan.direct is None  # not decided before a launch
    buf = torch.zeros(64 * 4, dtype=torch.uint8)
    flat = buf.view(torch.float32)
    for i, (x, y, o) in enumerate(((0, 6, 40), (12, 18, 50), (3, 24, 5), (30, 31, 34), (0, 6, 0))):
        flat[:] = torch.arange(64.0) * 0.5 - 7
        want = flat[x : x + 6] + 2 * flat[y : y + 6]  # computed before anything is written
        if i == 2:  # out [5, 11) overlaps self [3, 9): the fallback must read self first
            assert plan._overlaps([buf] * 3, (x, y, o))
        plan.run([buf, buf, buf], (1, 1, 1), (x, y, o))
        assert plan.direct is True
        assert torch.equal(flat[o : o + 6], want), (x, y, o)
    # (30, 31, 34): self and other overlap each other but not out: out= is right there
    assert not plan._overlaps([buf] * 3, (30, 31, 40)) and plan._overlaps([buf] * 3, (30, 31, 35))
    # separate allocations never overlap, whatever the offsets
    other = torch.zeros(64 * 4, dtype=torch.uint8)
    assert not plan._overlaps([buf, buf, other], (0, 6, 0))

    # int32 + int32 into a float32 destination: the result's dtype is not the destination's,
    # so this plan keeps put (which casts), and its results stay right
    iref = TensorRef(1, torch.int32, (4,), (1,), 0)
    fref = TensorRef(2, torch.float32, (4,), (1,), 0)
    mixed = optable.make_plan(dev, "aclnn::Add", (iref, iref, 1, fref), {}, [])
    ibuf, fbuf = (
        torch.arange(8, dtype=torch.int32).view(torch.uint8).clone(),
        torch.zeros(16, dtype=torch.uint8),
    )
    for _ in range(2):
        mixed.run([ibuf, ibuf, fbuf], (1, 1, 2), (0, 4, 0))
        assert mixed.direct is False
        assert torch.equal(fbuf.view(torch.float32), torch.tensor([4.0, 6.0, 8.0, 10.0]))


def _value_args(d: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Arguments for a register_value entry: small tensors of `dtype` (positive, so every
    unary function is in its domain), shapes that fit the matrix products."""
    g = torch.Generator().manual_seed(hash(d.op) % 1000)

    def t(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 3 + 0.25).to(dtype)

    name = d.op.removeprefix("aclnn::")
    mats = {"Matmul": ((3, 4), (4, 5)), "Mm": ((3, 4), (4, 5)), "BatchMatMul": ((2, 3, 4), (2, 4, 5))}
    a: dict[str, Any] = {}
    tensors = iter(mats.get(name, ((3, 4),) * 4))
    for pname, kind in d.params:
        if pname == d.dest and pname != "selfRef":  # (selfRef is read too: InplaceCopy's shape)
            continue
        if pname == "condition":
            a[pname] = t(*next(tensors)) > 1.5
        elif kind == "tensor":
            a[pname] = t(*next(tensors))
        elif kind == "tensor_list":
            a[pname] = [t(3, 4), t(2, 4)]
        elif kind == "scalar":
            a[pname] = 2 if not dtype.is_floating_point else 1.5
        elif kind == "int":
            a[pname] = 0
        elif kind == "int_array":
            a[pname] = [1]
        elif kind == "bool":
            a[pname] = True
        elif kind == "dtype":
            a[pname] = torch.float32
        else:
            raise AssertionError(f"{d.op}: no test value for a {kind}")
    return a


def value_cases() -> Iterator[tuple[str, Any, torch.dtype, dict[str, Any], torch.Tensor]]:
    """(op, declaration, dtype, arguments, computed result) for every register_value entry and
    each of float32 / int32 it is defined for (bitwise operators have no float32 case, ...)."""
    from flexnpu.daemon import optable

    for op, d in sorted(optable.TABLE.items()):
        if d.value is None:
            continue
        for dtype in (torch.float32, torch.int32):
            a = _value_args(d, dtype)
            try:
                want = d.value(a, None)
            except (RuntimeError, TypeError):
                continue
            yield op, d, dtype, a, want


def test_every_in_place_value_entry_matches_its_computed_result_bit_for_bit():
    """register_value's contract, checked for every entry that has one: value(args, out) writes
    exactly what value(args, None) returns (the plan's in-place path equals put's)."""
    checked = []
    for op, d, dtype, a, want in value_cases():
        out = torch.full_like(want, 7) if want.dtype != torch.bool else torch.zeros_like(want)
        got = d.value(a, out)
        assert got is out or got.data_ptr() == out.data_ptr(), op
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True, msg=op)
        checked.append((op, dtype))
    ops = {op for op, _ in checked}
    assert (
        len(ops) >= 70 and {"aclnn::Matmul", "aclnn::Cat", "aclnn::Mean", "aclnn::Silu", "aclnn::Mul"} <= ops
    )


@pytest.mark.parametrize("policy", ["fifo", "priority"])
def test_table_operator_launches_repeat_their_structure_at_new_offsets(start_daemon, policy):
    """A client of the native front end repeats one aclnn structure at other offsets of one
    allocation (as torch_npu's caching allocator does): every launch is right, every bound is
    checked against the offset it names, and another client's handle is refused. fifo runs a
    planned launch at once; priority queues every command (a planned one is a queued command)."""
    from flexnpu.client import Client

    daemon = start_daemon("--policy", policy)

    with Client(0) as c, Client(0) as other:
        data = torch.arange(64.0)
        h = c.malloc(64 * 4, sync=True)
        c.memcpy_h2d(h, 0, data.numpy().tobytes())

        def add(cl, hx: int, x: int, y: int, o: int) -> None:
            t = lambda off: TensorRef(hx, torch.float32, (2, 3), (3, 1), off)  # noqa: E731
            cl.launch("aclnn::Add", (t(x), t(y), 2.0, t(o)), {}, [])

        for i, (x, y, o) in enumerate(((0, 6, 40), (1, 7, 46), (2, 8, 52), (3, 9, 58), (4, 10, 34))):
            add(c, h, x, y, o)
            c.synchronize()
            got = torch.frombuffer(bytearray(c.memcpy_d2h(h, 0, 256)), dtype=torch.float32)
            assert torch.equal(got[o : o + 6], data[x : x + 6] + 2 * data[y : y + 6]), i
            data = got.clone()
        add(c, h, 0, 6, 59)  # past the end: refused, nothing written
        with pytest.raises(FlexNPUError, match="beyond the allocation"):
            c.synchronize()
        add(other, h, 0, 6, 40)  # the owner's handle from another client
        with pytest.raises(InvalidHandle):
            other.synchronize()
        got = torch.frombuffer(bytearray(c.memcpy_d2h(h, 0, 256)), dtype=torch.float32)
        assert torch.equal(got, data)
        _alive(c)
        _alive(other)
    assert daemon.proc.poll() is None


def test_split_with_dims_zeroes_sizes_and_strides_too_and_returns_them():
    """A decode loop's growing tensors repeat their structure with other sizes: the structure
    without sizes (protocol.split_launch_dims) is equal across them, and each launch's sizes
    and strides come back in payload order; dtype and rank stay in the structure."""
    for pl in _payloads():
        key, handles, offsets, dims = P.split_launch_dims(pl)  # type: ignore[misc]
        launch = P.decode_launch(pl, torch.device("cpu"))
        assert (handles, offsets) == P.split_launch_offsets(pl)[1:]  # type: ignore[index]
        assert list(dims) == [
            (s, st)
            for s, st in zip(
                _refs_in_payload_order(launch, "shape"), _refs_in_payload_order(launch, "stride")
            )
        ]

    def cat(n: int, dtype: torch.dtype = torch.float32, rank: int = 4) -> bytes:
        r = lambda h, s: TensorRef(
            h, dtype, (1, 2, s, 8)[4 - rank :], (16 * s, 8 * s, 8, 1)[4 - rank :], 3 * h
        )  # noqa: E731
        return P.encode_launch("aclnn::Cat", ([r(5, n), r(6, 1)], -2, r(7, n + 1)), {}, [])

    k7, k8 = P.split_launch_dims(cat(7)), P.split_launch_dims(cat(8))  # type: ignore[misc]
    assert k7[0] == k8[0] and k7[3] != k8[3] and k8[3][2] == ((1, 2, 9, 8), (144, 72, 8, 1))
    assert P.split_launch_offsets(cat(7))[0] != P.split_launch_offsets(cat(8))[0]  # type: ignore[index]
    assert P.split_launch_dims(cat(7, torch.float16))[0] != k7[0]  # type: ignore[index]
    assert P.split_launch_dims(cat(7, rank=3))[0] != k7[0]  # type: ignore[index]
    assert P.split_launch_dims(cat(7)[:-5]) is None  # truncated: the decoder reports it


def test_sized_plan_checks_each_launchs_sizes_and_makes_the_exact_plan_make_plan_would():
    """optable.SizedPlan: one plan for a structure whose sizes change; each launch's views come
    from its own sizes and strides with the generic path's checks (bounds, values, written
    tensors that overlap themselves); exact() gives what make_plan gives for those sizes."""
    from flexnpu.daemon import optable
    from flexnpu.daemon.backends.torch_exec import LaunchError

    dev = torch.device("cpu")
    r = lambda s, off: TensorRef(1, torch.float32, (2, s), (s, 1), off)  # noqa: E731
    plan = optable.make_plan(dev, "aclnn::Cat", ([r(3, 0), r(1, 0)], 1, r(4, 0)), {}, [], sized=True)
    assert isinstance(plan, optable.SizedPlan) and plan.written == {2}
    buf = torch.zeros(64 * 4, dtype=torch.uint8)
    flat = buf.view(torch.float32)
    for s in (3, 4, 5):  # a cache that grows by one each step
        flat[:] = torch.arange(64.0)
        dims = (((2, s), (s, 1)), ((2, 1), (1, 1)), ((2, s + 1), (s + 1, 1)))
        plan.run_sized([buf] * 3, (1, 1, 1), (0, 20, 30), dims)
        want = torch.cat([torch.arange(64.0)[: 2 * s].view(2, s), torch.arange(64.0)[20:22].view(2, 1)], 1)
        assert torch.equal(flat[30 : 30 + 2 * (s + 1)].view(2, s + 1), want), s
        exact = plan.exact(dims)
        twin = optable.make_plan(
            dev,
            "aclnn::Cat",
            ([r(s, 0), TensorRef(1, torch.float32, (2, 1), (1, 1), 0)], 1, r(s + 1, 0)),
            {},
            [],
        )
        assert [(sl.dtype, sl.shape, sl.stride) for sl in exact.slots] == [
            (sl.dtype, sl.shape, sl.stride) for sl in twin.slots
        ]
        assert (exact.top, exact.fixed, exact.dest) == (twin.top, twin.fixed, twin.dest)
    big = (((2, 40), (40, 1)), ((2, 1), (1, 1)), ((2, 41), (41, 1)))
    with pytest.raises(LaunchError, match="beyond the allocation"):
        plan.run_sized([buf] * 3, (1, 1, 1), (0, 20, 30), big)  # sizes past the end: refused
    with pytest.raises(LaunchError, match="size -2 out of range"):
        plan.run_sized([buf] * 3, (1, 1, 1), (0, 20, 30), (((2, -2), (1, 1)),) + big[1:])
    self_overlap = (((2, 3), (3, 1)), ((2, 1), (1, 1)), ((2, 4), (0, 1)))
    with pytest.raises(LaunchError, match="out is written but overlaps itself"):
        plan.run_sized([buf] * 3, (1, 1, 1), (0, 20, 30), self_overlap)
    assert plan.exact(self_overlap) is None  # make_plan refuses it too
    # the FLOP ceiling reads shapes of compute-heavy operators: they get no plan without sizes
    from flexnpu.daemon.limits import sized_plan_allowed

    assert not sized_plan_allowed("aclnn::Matmul") and sized_plan_allowed("aclnn::Cat")


@pytest.mark.parametrize("layers", [2, 4])
def test_growing_launches_run_from_the_plan_without_sizes(start_daemon, layers):
    """A KV cache grown by aclnn Cat, one launch per layer and step, sizes new every step (what
    a decode loop of real torch_npu sends): every result is right; past the allocation, a
    launch is refused with nothing written; over the daemon's byte ceiling, it is refused as
    the generic path refuses it; the client and the daemon stay up."""
    from flexnpu.client import Client

    daemon = start_daemon("--max-launch-bytes", "60000")
    d = 8
    with Client(0) as c:
        cap = 64  # cached positions per layer
        caches = [c.malloc(cap * d * 4, sync=True) for _ in range(layers)]
        new = c.malloc(layers * d * 4, sync=True)
        outs = [c.malloc(cap * d * 4, sync=True) for _ in range(layers)]
        want = [torch.zeros(0, d) for _ in range(layers)]
        for step in range(12):
            rows = torch.randn(layers, d)
            c.memcpy_h2d(new, 0, rows.numpy().tobytes())
            for layer in range(layers):
                n = step  # positions cached before this step
                src = TensorRef(caches[layer], torch.float32, (1, n, d), (n * d, d, 1), 0)
                one = TensorRef(new, torch.float32, (1, 1, d), (d, d, 1), layer * d)
                dst = TensorRef(outs[layer], torch.float32, (1, n + 1, d), ((n + 1) * d, d, 1), 0)
                c.launch("aclnn::Cat", ([src, one], 1, dst), {}, [])
                c.launch(
                    "aclnn::InplaceCopy",
                    (TensorRef(caches[layer], torch.float32, (1, n + 1, d), ((n + 1) * d, d, 1), 0), dst),
                    {},
                    [],
                )
                want[layer] = torch.cat([want[layer], rows[layer : layer + 1]])
            c.synchronize()
            for layer in range(layers):
                got = torch.frombuffer(
                    bytearray(c.memcpy_d2h(outs[layer], 0, (step + 1) * d * 4)), dtype=torch.float32
                )
                assert torch.equal(got.view(-1, d), want[layer]), (step, layer)
        before = bytes(c.memcpy_d2h(outs[0], 0, cap * d * 4))
        n = cap  # the output would need cap + 1 rows: past the allocation
        src = TensorRef(caches[0], torch.float32, (1, n, d), (n * d, d, 1), 0)
        one = TensorRef(new, torch.float32, (1, 1, d), (d, d, 1), 0)
        c.launch(
            "aclnn::Cat",
            ([src, one], 1, TensorRef(outs[0], torch.float32, (1, n + 1, d), ((n + 1) * d, d, 1), 0)),
            {},
            [],
        )
        with pytest.raises(FlexNPUError, match="beyond the allocation"):
            c.synchronize()
        assert bytes(c.memcpy_d2h(outs[0], 0, cap * d * 4)) == before
        # 1000 + 200 + 1200 rows of 8 floats (76800 bytes): over the 60000-byte ceiling
        wide = lambda h, s: TensorRef(h, torch.float32, (1, s, d), (0, 0, 1), 0)  # noqa: E731
        c.launch(
            "aclnn::Cat",
            (
                [wide(caches[0], 1000), wide(new, 200)],
                1,
                TensorRef(outs[0], torch.float32, (1, 1200, d), (0, d, 1), 0),
            ),
            {},
            [],
        )
        with pytest.raises(FlexNPUError, match="max-launch-bytes"):
            c.synchronize()
        _alive(c)
    assert daemon.proc.poll() is None


def test_bench_call_planned_table_worker_runs_its_launches(daemon, runtime_dir):
    """`flexnpu bench call`'s planned-table-launch row: its worker's aclnn launches at moving
    offsets all succeed (a failed one would raise at its synchronize, and no time is printed)."""
    from flexnpu.bench.call import _TABLE_WORKER, _throughput

    row = _throughput(1, 300, str(runtime_dir), _TABLE_WORKER, "planned-table-launch")
    assert row["name"] == "planned-table-launch-1-client" and row["ops_per_s"] > 0


# ---- aten launches from plans without sizes (torch_exec.SizedLaunchPlan, launch_split mode 3) ----


def _cat_launch(
    n: int, out_shape: tuple[int, ...] | None = None, nbytes: int | None = None, hs=(1, 2, 3)
) -> bytes:
    """aten::cat of a (1, n, 8) cache and one (1, 1, 8) row: what a decode step's KV cache sends."""
    f32 = torch.float32
    a = TensorRef(hs[0], f32, (1, n, 8), (n * 8, 8, 1), 0)
    b = TensorRef(hs[1], f32, (1, 1, 8), (8, 8, 1), 0)
    osh = out_shape or (1, n + 1, 8)
    o = TensorRef(hs[2], f32, osh, torch.empty(osh, device="meta").stride(), 0)
    return bytes(P.encode_launch("aten::cat.default", ([a, b], 1), {}, [(nbytes or (n + 1) * 32, o)]))


def test_aten_plan_without_sizes_runs_each_shape_and_checks_each_declaration():
    """One plan serves every size of a structure: each launch's output is predicted by the shape
    rule and its declaration checked before anything runs (a wrong one goes to the generic path,
    which reports it), and the result is the operator's."""
    from flexnpu.daemon.backends import torch_exec as X
    from flexnpu.ring.segment import launch_split

    dev = torch.device("cpu")
    first = _cat_launch(3)
    key = launch_split(first, 3)[0]
    assert launch_split(_cat_launch(9, hs=(7, 8, 9)), 3)[0] == key  # the structure repeats
    assert launch_split(_cat_launch(9), 2)[0] != launch_split(first, 2)[0]  # its output bytes differ
    plan = X.make_sized_plan(dev, P.decode_launch(first, dev))
    assert plan is not None and plan.n_in == 2
    for n in (3, 5, 17):
        _, hs, offs, dims, nbs = launch_split(_cat_launch(n), 3)
        assert nbs == ((n + 1) * 32,)
        prep = X.prepare_sized_plan(plan, hs, offs, dims, nbs)
        assert prep is not None
        cache, row = torch.arange(n * 8.0), torch.full((8,), -1.0)
        bufs = [cache.view(torch.uint8).clone(), row.view(torch.uint8).clone()]
        results, keys = X.run_sized_plan(
            dev, plan, bufs, prep[0], prep[1], lambda nb: torch.zeros(nb, dtype=torch.uint8)
        )
        assert torch.equal(results[0][1], torch.cat([cache.view(1, n, 8), row.view(1, 1, 8)], 1))
        assert keys == [X.layout_key(prep[1][0][1])]
    for bad in (_cat_launch(4, out_shape=(1, 4, 8)), _cat_launch(4, nbytes=64)):  # a row short; too few bytes
        _, hs, offs, dims, nbs = launch_split(bad, 3)
        assert X.prepare_sized_plan(plan, hs, offs, dims, nbs) is None
    # an input view past its allocation is refused when its view is built, before the op runs
    _, hs, offs, dims, nbs = launch_split(_cat_launch(6), 3)
    prep = X.prepare_sized_plan(plan, hs, offs, dims, nbs)
    small = [torch.zeros(16, dtype=torch.uint8), torch.zeros(32, dtype=torch.uint8)]
    with pytest.raises(X.LaunchError, match="beyond the allocation"):
        X.run_sized_plan(dev, plan, small, prep[0], prep[1], lambda nb: torch.zeros(nb, dtype=torch.uint8))
    # operators no shape rule covers, and multi-output ones, have none
    nz = P.encode_launch(
        "aten::max.dim",
        (TensorRef(1, torch.float32, (4, 6), (6, 1), 0), 1),
        {},
        [(16, TensorRef(2, torch.float32, (4,), (1,), 0)), (32, TensorRef(3, torch.int64, (4,), (1,), 0))],
    )
    assert X.make_sized_plan(dev, P.decode_launch(bytes(nz), dev)) is None


def test_sized_plan_checks_each_layout_once_and_reads_pending_results_as_produced():
    """A layout checked before is not checked again (the check depends on the layouts only: the
    next launch with them gets its own handles), a declaration that differs is checked anew, and
    an input given as its producer's pending result with that result's layout (the hint) is
    read as that very tensor, with the same result as from its bytes."""
    from flexnpu.daemon.backends import torch_exec as X
    from flexnpu.ring.segment import launch_split

    dev = torch.device("cpu")
    plan = X.make_sized_plan(dev, P.decode_launch(_cat_launch(3), dev))
    assert plan is not None
    X._sized_checked.clear()
    _, hs, offs, dims, nbs = launch_split(_cat_launch(7), 3)
    assert X.prepare_sized_plan(plan, hs, offs, dims, nbs) is not None
    assert len(X._sized_checked) == 1
    _, hs2, offs2, dims2, nbs2 = launch_split(_cat_launch(7, hs=(11, 12, 13)), 3)
    refs, outputs = X.prepare_sized_plan(plan, hs2, offs2, dims2, nbs2)
    assert len(X._sized_checked) == 1  # the same layouts: not checked again
    assert [r.handle for r in refs] == [11, 12] and outputs[0][1].handle == 13
    _, hs3, offs3, dims3, nbs3 = launch_split(_cat_launch(7, out_shape=(1, 7, 8)), 3)  # a row short
    assert X.prepare_sized_plan(plan, hs3, offs3, dims3, nbs3) is None
    cache, row = torch.arange(7 * 8.0).view(1, 7, 8), torch.full((1, 1, 8), -1.0)
    alloc = lambda nb: torch.zeros(nb, dtype=torch.uint8)  # noqa: E731
    by_bytes, _ = X.run_sized_plan(
        dev,
        plan,
        [cache.reshape(-1).view(torch.uint8), row.reshape(-1).view(torch.uint8)],
        refs,
        outputs,
        alloc,
    )
    hints = [(cache, X.layout_key(refs[0]), cache), None]  # the cache: a pending result
    as_produced, _ = X.run_sized_plan(
        dev, plan, [cache, row.reshape(-1).view(torch.uint8)], refs, outputs, alloc, hints
    )
    want = torch.cat([cache, row], 1)
    assert torch.equal(by_bytes[0][1], want) and torch.equal(as_produced[0][1], want)


def test_growing_aten_cats_through_a_daemon_are_right_and_wrong_declarations_refused(client, daemon, pe):
    """A cache grown by aten::cat every step (new sizes each time: the plan without sizes runs
    them after the second, compiled after its first), with right results; then a declaration a row short and an input
    past its allocation are refused, nothing is written, and the client and daemon stay up."""
    d = 8
    cache = _put(client, torch.zeros(0, d).reshape(1, 0, d))
    want = torch.zeros(1, 0, d)
    for step in range(8):
        row = torch.randn(1, 1, d)
        r = _put(client, row)
        o = _out(client, torch.float32, (1, step + 1, d))
        client.launch("aten::cat.default", ([cache, r], 1), {}, [o])
        client.synchronize()
        want = torch.cat([want, row], 1)
        assert torch.equal(_get(client, o[1]), want), step
        client.free(cache.handle)
        client.free(r.handle)
        cache = o[1]
    from flexnpu.control import query

    plans = query(str(daemon.socket), {"op": "status"})["daemon"]["plans"]
    # the first two are seen, the third makes the plan and records its call: the rest compiled
    assert plans["compiled_sized"] == 1 and plans["compiled_sized_launches"] == 8 - 3, plans
    r = _put(client, torch.ones(1, 1, d))
    short = (8 * d * 4, TensorRef(client.alloc_handle(), torch.float32, (1, 8, d), (8 * d, d, 1), 0))
    client.launch("aten::cat.default", ([cache, r], 1), {}, [short])
    with pytest.raises(FlexNPUError, match="declared"):
        client.synchronize()
    past = TensorRef(cache.handle, torch.float32, (1, 40, d), (40 * d, d, 1), 0)
    client.launch("aten::cat.default", ([past, r], 1), {}, [_out(client, torch.float32, (1, 41, d))])
    with pytest.raises(FlexNPUError, match="beyond the allocation"):
        client.synchronize()
    assert torch.equal(_get(client, cache), want)
    _alive(client)
