"""Operator safety (issue 9, items 1, 2, 3, 5, 6): what one client can make the daemon's
operators do to memory, to other clients, and to the daemon's time.

Unit tests run flexnpu.ops / torch_exec on real CPU torch; the rest attach real clients to a real
daemon and send raw launches, the way a hostile client would.
"""

from __future__ import annotations

import re
import struct
import time

import pytest
import torch

from flexnpu import ops
from flexnpu.daemon.backends.torch_exec import LaunchError, execute_launch
from flexnpu.errors import FlexNPUError, InvalidArgument, OpNotSupported
from flexnpu.protocol import TensorRef

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------------------
# item 1: the allow list

# Tensor arguments whose *values* are positions in another tensor, by schema name ...
_INDEX_ARG = re.compile(
    r"^(index|indices|indexes|idx|target|targets|offsets|lengths|input_lengths|"
    r"target_lengths|pivots|LU_pivots|segment_ids|sorted_indices|unsorted_indices|"
    r"batch_sizes|repeats|crow_indices|col_indices|ccol_indices|row_indices|"
    r"random_samples)$"
)
# ... and operators known to read positions or counts from a tensor whatever its argument is named.
_KNOWN_INDEX_SEMANTICS = {
    "masked_scatter",
    "masked_scatter_",
    "embedding_dense_backward",
    "_unsafe_masked_index",
    "_unsafe_masked_index_put_accumulate",
    "repeat_interleave",
    "bincount",
    "histc",
}


# Arguments with an index-like name that hold values, not positions: regression-loss targets are
# float tensors of the input's shape (torch checks the shapes on the host).
_VALUE_ARGS = {
    (n, "target")
    for n in (
        "mse_loss",
        "mse_loss_backward",
        "l1_loss",
        "smooth_l1_loss",
        "smooth_l1_loss_backward",
        "huber_loss",
        "huber_loss_backward",
        "binary_cross_entropy",
        "binary_cross_entropy_backward",
        "binary_cross_entropy_with_logits",
        "soft_margin_loss",
        "soft_margin_loss_backward",
        "kl_div",
    )
}


def _tensor_typed(a) -> bool:
    t = str(a.type)
    return (
        t.startswith("Tensor")
        or t.startswith("Optional[Tensor]")
        or t.startswith("List[Tensor]")
        or t.startswith("List[Optional[Tensor]]")
    )


def test_every_allowed_operator_with_index_arguments_has_a_validator():
    missing = []
    checked = 0
    for name, rule in ops.ALLOW.items():
        packet = getattr(torch.ops.aten, name, None)
        assert packet is not None, f"allow list names {name}, which this torch does not have"
        for ov in packet.overloads():
            schema = getattr(packet, ov)._schema
            idx_args = [
                a.name
                for a in schema.arguments
                if _tensor_typed(a)
                and _INDEX_ARG.match(a.name)
                and not a.is_out
                and (name.rstrip("_"), a.name) not in _VALUE_ARGS
            ]
            if idx_args or name in _KNOWN_INDEX_SEMANTICS:
                checked += 1
                if rule.kind != ops.INDEXED or rule.indices is None:
                    missing.append(f"{name}.{ov} ({', '.join(idx_args) or 'index semantics'})")
    assert not missing, "allowed operators with index inputs but no validator: " + "; ".join(missing)
    assert checked >= 20  # the sweep really saw the indexing operators


def test_refused_classes_and_random_operators():
    for op in (
        "aten::resize_.default",
        "aten::resize.default",
        "aten::set_.source_Storage",
        "aten::as_strided.default",
        "aten::from_file.default",
        "aten::_unsafe_set_version_counter.default",
        "aten::nonzero.default",
        "aten::segment_reduce.default",
        "aten::_embedding_bag.default",
        "aten::bincount.default",
        "aten::histc.default",
        "aten::linalg_lu_solve.default",
        "aten::squeeze_.dim",
        "aten::_unsafe_masked_index.default",
        "aten::_unsafe_masked_index_put_accumulate.default",
    ):
        assert not ops.is_allowed(op), op
    sdpa = "aten::_scaled_dot_product_flash_attention_for_cpu.default"  # has a dropout argument
    assert not ops.is_allowed(sdpa)  # it would draw from the daemon's generator
    assert ops.is_allowed(sdpa, values=False)  # shape-only emu runs nothing
    assert not ops.is_allowed("aten::bernoulli.default", values=False)
    assert ops.is_allowed("aten::embedding_dense_backward.default")
    assert ops.rule_of("aten::index.Tensor").kind == ops.INDEXED
    assert ops.rule_of("aten::mm.default").kind == ops.PLAIN
    # the hook still runs data-dependent ops on the host; never the refused class
    assert ops.host_fallback_ok("nonzero") and not ops.host_fallback_ok("from_file")


class Mem:
    def __init__(self):
        self.bufs: dict[int, torch.Tensor] = {}

    def put(self, h: int, t: torch.Tensor) -> TensorRef:
        t = t.contiguous()
        self.bufs[h] = t.reshape(-1).view(torch.uint8).clone()
        return TensorRef(h, t.dtype, tuple(t.shape), t.stride(), 0)

    def resolve(self, h: int) -> torch.Tensor:
        return self.bufs[h]

    def allocate(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.uint8)

    def run(self, op, args, kwargs=None):
        """Run with outputs declared as meta inference says (as the hook declares them)."""
        opov = ops.resolve(op)[0]

        def meta(x):
            if isinstance(x, TensorRef):
                return torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device="meta")
            if isinstance(x, (list, tuple)):
                return type(x)(meta(v) for v in x)
            return x

        try:
            r = opov(*meta(args), **{k: meta(v) for k, v in (kwargs or {}).items()})
        except Exception:  # noqa: BLE001 - meta may reject; then the launch has no outputs
            r = None
        outs, h = [], 1000 + len(self.bufs)
        fresh = any(ret.alias_info is None for ret in opov._schema.returns)
        for t in [r] if isinstance(r, torch.Tensor) else list(r) if isinstance(r, tuple) else []:
            if isinstance(t, torch.Tensor) and fresh:
                n = t.numel() * t.dtype.itemsize
                outs.append((n, TensorRef(h, t.dtype, tuple(t.shape), t.stride(), 0)))
                h += 1
        bound = execute_launch(CPU, op, args, kwargs or {}, outs, self.resolve, self.allocate)
        for hh, buf in bound:
            self.bufs[hh] = buf
        return bound


def _i(*v):
    return torch.tensor(v, dtype=torch.long)


# One launch per INDEXED operator: (op, builder(mem, bad) -> (args, kwargs)); `bad` puts an index
# out of range. In range it must run; out of range it must be refused before it runs.
def _idx_cases():
    x = torch.arange(12.0).reshape(3, 4)

    def c(op, build):
        return pytest.param(op, build, id=op)

    return [
        c("aten::index.Tensor", lambda m, bad: ((m.put(1, x), [m.put(2, _i(5 if bad else 2))]), {})),
        c("aten::index.Tensor", lambda m, bad: ((m.put(1, x), [None, m.put(2, _i(-5 if bad else -4))]), {})),
        c("aten::_unsafe_index.Tensor", lambda m, bad: ((m.put(1, x), [m.put(2, _i(3 if bad else 0))]), {})),
        c(
            "aten::index_put.default",
            lambda m, bad: ((m.put(1, x), [m.put(2, _i(9 if bad else 1))], m.put(3, torch.ones(4))), {}),
        ),
        c(
            "aten::_unsafe_index_put.default",
            lambda m, bad: (
                (m.put(1, x), [m.put(2, _i(1 << 40 if bad else 1))], m.put(3, torch.ones(4)), True),
                {},
            ),
        ),
        c(
            "aten::_index_put_impl_.default",
            lambda m, bad: (
                (m.put(1, x), [m.put(2, _i(3 if bad else 2))], m.put(3, torch.ones(4)), True, True),
                {},
            ),
        ),
        c("aten::index_select.default", lambda m, bad: ((m.put(1, x), 1, m.put(2, _i(4 if bad else 3))), {})),
        c(
            "aten::gather.default",
            lambda m, bad: ((m.put(1, x), 0, m.put(2, _i(0, 3 if bad else 2).reshape(1, 2))), {}),
        ),
        c(
            "aten::scatter.src",
            lambda m, bad: (
                (m.put(1, x), 0, m.put(2, _i(-1 if bad else 1).reshape(1, 1)), m.put(3, torch.ones(1, 1))),
                {},
            ),
        ),
        c(
            "aten::scatter_add.default",
            lambda m, bad: (
                (m.put(1, x), 1, m.put(2, _i(4 if bad else 3).reshape(1, 1)), m.put(3, torch.ones(1, 1))),
                {},
            ),
        ),
        c(
            "aten::scatter_reduce.two",
            lambda m, bad: (
                (
                    m.put(1, x),
                    0,
                    m.put(2, _i(3 if bad else 0).reshape(1, 1)),
                    m.put(3, torch.ones(1, 1)),
                    "sum",
                ),
                {},
            ),
        ),
        c(
            "aten::index_add.default",
            lambda m, bad: ((m.put(1, x), 0, m.put(2, _i(3 if bad else 0)), m.put(3, torch.ones(1, 4))), {}),
        ),
        c(
            "aten::index_copy.default",
            lambda m, bad: ((m.put(1, x), 0, m.put(2, _i(-1 if bad else 2)), m.put(3, torch.ones(1, 4))), {}),
        ),
        c(
            "aten::index_reduce.default",
            lambda m, bad: (
                (m.put(1, x), 0, m.put(2, _i(3 if bad else 0)), m.put(3, torch.ones(1, 4)), "prod"),
                {},
            ),
        ),
        c(
            "aten::index_fill.int_Scalar",
            lambda m, bad: ((m.put(1, x), 0, m.put(2, _i(-4 if bad else -3)), 1.0), {}),
        ),
        c("aten::take.default", lambda m, bad: ((m.put(1, x), m.put(2, _i(12 if bad else 11))), {})),
        c(
            "aten::put.default",
            lambda m, bad: ((m.put(1, x), m.put(2, _i(-13 if bad else -12)), m.put(3, torch.ones(1))), {}),
        ),
        c("aten::embedding.default", lambda m, bad: ((m.put(1, x), m.put(2, _i(0, 3 if bad else 2))), {})),
        c(
            "aten::embedding_dense_backward.default",
            lambda m, bad: (
                (m.put(1, torch.ones(2, 4)), m.put(2, _i(1, 1 << 20 if bad else 4)), 5, -1, True),
                {},
            ),
        ),
        c(
            "aten::embedding_renorm_.default",
            lambda m, bad: ((m.put(1, x), m.put(2, _i(3 if bad else 1)), 1.0, 2.0), {}),
        ),
        c(
            "aten::nll_loss_forward.default",
            lambda m, bad: ((m.put(1, x), m.put(2, _i(0, -100, 4 if bad else 3)), None, 1, -100), {}),
        ),
        c(
            "aten::nll_loss_backward.default",
            lambda m, bad: (
                (
                    m.put(1, torch.tensor(1.0)),
                    m.put(2, x),
                    m.put(3, _i(0, 1, -2 if bad else 2)),
                    None,
                    1,
                    -100,
                    m.put(4, torch.tensor(3.0)),
                ),
                {},
            ),
        ),
        c(
            "aten::nll_loss2d_forward.default",
            lambda m, bad: (
                (
                    m.put(1, torch.zeros(1, 3, 2, 2)),
                    m.put(2, _i(0, 1, 2, 3 if bad else 2).reshape(1, 2, 2)),
                    None,
                    1,
                    -100,
                ),
                {},
            ),
        ),
        c(
            "aten::nll_loss2d_backward.default",
            lambda m, bad: (
                (
                    m.put(1, torch.tensor(1.0)),
                    m.put(2, torch.zeros(1, 3, 2, 2)),
                    m.put(3, _i(0, 1, 2, 3 if bad else 2).reshape(1, 2, 2)),
                    None,
                    1,
                    -100,
                    m.put(4, torch.tensor(4.0)),
                ),
                {},
            ),
        ),
        c(
            "aten::max_pool2d_with_indices_backward.default",
            lambda m, bad: (
                (
                    m.put(1, torch.ones(1, 1, 1, 1)),
                    m.put(2, torch.zeros(1, 1, 2, 2)),
                    [2, 2],
                    [2, 2],
                    [0, 0],
                    [1, 1],
                    False,
                    m.put(3, _i(4 if bad else 3).reshape(1, 1, 1, 1)),
                ),
                {},
            ),
        ),
        c(
            "aten::max_pool3d_with_indices_backward.default",
            lambda m, bad: (
                (
                    m.put(1, torch.ones(1, 1, 1, 1, 1)),
                    m.put(2, torch.zeros(1, 1, 2, 2, 2)),
                    [2, 2, 2],
                    [2, 2, 2],
                    [0, 0, 0],
                    [1, 1, 1],
                    False,
                    m.put(3, _i(8 if bad else 7).reshape(1, 1, 1, 1, 1)),
                ),
                {},
            ),
        ),
        c(
            "aten::max_unpool2d.default",
            lambda m, bad: (
                (m.put(1, torch.ones(1, 1, 1, 1)), m.put(2, _i(4 if bad else 3).reshape(1, 1, 1, 1)), [2, 2]),
                {},
            ),
        ),
        c(
            "aten::max_unpool3d.default",
            lambda m, bad: (
                (
                    m.put(1, torch.ones(1, 1, 1, 1, 1)),
                    m.put(2, _i(8 if bad else 7).reshape(1, 1, 1, 1, 1)),
                    [2, 2, 2],
                    [1, 1, 1],
                    [0, 0, 0],
                ),
                {},
            ),
        ),
        c(
            "aten::masked_scatter.default",
            lambda m, bad: (
                (
                    m.put(1, x),
                    m.put(2, torch.ones(3, 4, dtype=torch.bool)),
                    m.put(3, torch.ones(11 if bad else 12)),
                ),
                {},
            ),
        ),
        c(
            "aten::multi_margin_loss.default",
            lambda m, bad: ((m.put(1, x), m.put(2, _i(0, 1, 4 if bad else 3))), {}),
        ),
        c(
            "aten::multilabel_margin_loss_forward.default",
            lambda m, bad: (
                (
                    m.put(1, x),
                    m.put(2, _i(0, -1, 0, 0, 1, 2, -1, 0, 3, -2 if bad else 0, -1, 0).reshape(3, 4)),
                    1,
                ),
                {},
            ),
        ),
        c(
            "aten::adaptive_max_pool2d_backward.default",
            lambda m, bad: (
                (
                    m.put(1, torch.ones(1, 1, 1, 1)),
                    m.put(2, torch.zeros(1, 1, 2, 2)),
                    m.put(3, _i(4 if bad else 3).reshape(1, 1, 1, 1)),
                ),
                {},
            ),
        ),
        c(
            "aten::adaptive_max_pool3d_backward.default",
            lambda m, bad: (
                (
                    m.put(1, torch.ones(1, 1, 1, 1, 1)),
                    m.put(2, torch.zeros(1, 1, 2, 2, 2)),
                    m.put(3, _i(8 if bad else 7).reshape(1, 1, 1, 1, 1)),
                ),
                {},
            ),
        ),
    ]


@pytest.mark.parametrize("op,build", _idx_cases())
def test_index_validators_refuse_out_of_range_before_running(op, build):
    good = Mem()
    args, kw = build(good, False)
    good.run(op, args, kw)  # in range (negative where torch wraps): runs
    bad = Mem()
    args, kw = build(bad, True)
    before = {h: b.clone() for h, b in bad.bufs.items()}
    with pytest.raises(LaunchError, match="out of range"):
        bad.run(op, args, kw)
    for h, b in bad.bufs.items():  # refused before it ran: nothing written
        assert torch.equal(b, before[h]), (op, h)


def test_masks_consume_their_own_dimensions():
    """x[mask, i]: i indexes the dimension after the mask's dims (a 0-d mask has none)."""
    opov, rule = ops.resolve("aten::index.Tensor")
    x = torch.zeros(3, 1000)
    ops.check_indices(rule, opov, (x, [torch.tensor(True), _i(2)]), {})
    with pytest.raises(IndexError, match="holds 500"):
        ops.check_indices(rule, opov, (x, [torch.tensor(True), _i(500)]), {})
    ops.check_indices(rule, opov, (x, [torch.ones(3, dtype=torch.bool), _i(999)]), {})
    with pytest.raises(IndexError, match="holds 1000"):
        ops.check_indices(rule, opov, (x, [torch.ones(3, dtype=torch.bool), _i(1000)]), {})


def test_every_indexed_operator_has_a_range_test():
    tested = {p.values[0].partition("::")[2].partition(".")[0].rstrip("_") for p in _idx_cases()}
    indexed = {n.rstrip("_") for n, r in ops.ALLOW.items() if r.kind == ops.INDEXED}
    assert indexed <= tested, f"indexed operators without an out-of-range test: {sorted(indexed - tested)}"


# ------------------------------------------------------------------------------------------
# real daemon, raw launches


def _put(c, t: torch.Tensor) -> TensorRef:
    t = t.contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    h = c.malloc(max(len(data), 1))
    if data:
        c.memcpy_h2d(h, 0, data)
    return TensorRef(h, t.dtype, tuple(t.shape), t.stride(), 0)


def _get(c, ref: TensorRef, nbytes: int | None = None) -> torch.Tensor:
    n = nbytes if nbytes is not None else ref.dtype.itemsize * max(1, int(torch.Size(ref.shape).numel()))
    raw = bytes(c.memcpy_d2h(ref.handle, 0, n))
    return torch.frombuffer(bytearray(raw), dtype=ref.dtype)[: torch.Size(ref.shape).numel()].reshape(
        ref.shape
    )


def _out(c, dtype, shape) -> tuple[int, TensorRef]:
    stride = torch.empty(shape, device="meta").stride()
    n = dtype.itemsize * int(torch.Size(shape).numel())
    return (n, TensorRef(c.alloc_handle(), dtype, tuple(shape), stride, 0))


def _alive(c) -> None:
    a = _put(c, torch.arange(4.0))
    o = _out(c, torch.float32, (4,))
    c.launch("aten::mul.Tensor", (a, a), {}, [o])
    c.synchronize()
    assert _get(c, o[1]).tolist() == [0.0, 1.0, 4.0, 9.0]


def test_embedding_backward_with_an_out_of_range_index_is_refused_daemon_survives(daemon):
    """Old code: the cpu kernel counts frequencies at indices[i] -> heap write out of bounds."""
    from flexnpu.client import Client

    with Client(0) as bystander, Client(0) as c:
        _alive(bystander)
        grad = _put(c, torch.ones(4, 8))
        idx = _put(c, torch.tensor([0, 1, 1 << 40, -(1 << 40)], dtype=torch.long))
        o = _out(c, torch.float32, (16, 8))
        c.launch("aten::embedding_dense_backward.default", (grad, idx, 16, -1, True), {}, [o])
        with pytest.raises(FlexNPUError, match="out of range"):
            c.synchronize()
        c.launch(
            "aten::_unsafe_index.Tensor",
            (_put(c, torch.ones(4)), [_put(c, torch.tensor([1 << 30]))]),
            {},
            [_out(c, torch.float32, (1,))],
        )
        with pytest.raises(FlexNPUError, match="out of range"):
            c.synchronize()
        for op, args in [
            (
                "aten::_unsafe_masked_index.default",
                (
                    _put(c, torch.ones(4)),
                    _put(c, torch.tensor([True])),
                    [_put(c, torch.tensor([-(1 << 30)]))],
                    0.0,
                ),
            ),
            (
                "aten::_unsafe_masked_index_put_accumulate.default",
                (
                    _put(c, torch.ones(4)),
                    _put(c, torch.tensor([True])),
                    [_put(c, torch.tensor([1 << 30]))],
                    _put(c, torch.ones(1)),
                ),
            ),
        ]:
            c.launch(op, args, {}, [_out(c, torch.float32, (1,) if "put" not in op else (4,))])
            with pytest.raises(OpNotSupported):
                c.synchronize()
        _alive(c)
        _alive(bystander)
    assert daemon.proc.poll() is None


def test_index_tensors_changed_between_graph_replays_are_checked(daemon):
    """A captured index_copy_ is replayed with an index the client rewrote after capture."""
    from flexnpu.client import Client

    with Client(0) as c:
        cache = _put(c, torch.zeros(4, 8))
        pos = _put(c, torch.tensor([1]))
        row = _put(c, torch.ones(1, 8))
        g = c.graph_begin_capture()
        c.launch("aten::index_copy_.default", (cache, 0, pos, row), {}, [])
        c.graph_end_capture(g)
        c.graph_replay(g)
        c.synchronize()
        assert _get(c, cache)[1].tolist() == [1.0] * 8
        c.memcpy_h2d(pos.handle, 0, struct.pack("<q", 1 << 40))
        c.graph_replay(g)
        with pytest.raises(FlexNPUError, match="out of range"):
            c.synchronize()
        _alive(c)
    assert daemon.proc.poll() is None


def test_index_tensors_are_checked_before_a_traced_replay(daemon):
    """Replays after the first few run as a traced TorchScript graph (graphs._Traced): the index
    tensors the client may rewrite are range-checked before it runs, so a bad one fails the
    replay with nothing written, and the daemon keeps serving."""
    from flexnpu.client import Client
    from flexnpu.control import query

    with Client(0) as c:
        w = _put(c, torch.arange(32.0).reshape(8, 4))
        idx = _put(c, torch.tensor([2, 5]))
        cache = _put(c, torch.zeros(4, 4))
        pos = _put(c, torch.tensor([0]))
        rows, twice = _out(c, torch.float32, (2, 4)), _out(c, torch.float32, (2, 4))
        row0 = TensorRef(twice[1].handle, torch.float32, (1, 4), (4, 1), 0)  # a graph result, re-viewed
        g = c.graph_begin_capture()
        c.launch("aten::index_select.default", (w, 0, idx), {}, [rows])
        c.launch("aten::mul.Tensor", (rows[1], 2.0), {}, [twice])
        c.launch("aten::index_copy_.default", (cache, 0, pos, row0), {}, [])
        c.graph_end_capture(g)
        for p in range(4):
            c.memcpy_h2d(pos.handle, 0, struct.pack("<q", p))
            c.graph_replay(g)
        c.synchronize()
        want = torch.arange(32.0).reshape(8, 4)[[2]] * 2
        assert torch.equal(_get(c, cache), want.expand(4, 4))
        st = query(str(daemon.socket), {"op": "status"})["daemon"]
        me = [x for x in st["clients"] if x["client_id"] == c.client_id][0]
        assert me["graphs_traced"] == 1, me
        before = _get(c, cache).clone()
        c.memcpy_h2d(idx.handle, 0, struct.pack("<qq", 2, 99))  # out of range for 8 rows
        c.memcpy_h2d(pos.handle, 0, struct.pack("<q", 1))
        c.memcpy_h2d(w.handle, 0, torch.full((8, 4), 7.0).numpy().tobytes())
        c.graph_replay(g)
        with pytest.raises(FlexNPUError, match="holds 99, out of range for size 8"):  # our check's words
            c.synchronize()
        assert torch.equal(_get(c, cache), before)  # checked before anything ran
        c.memcpy_h2d(pos.handle, 0, struct.pack("<q", 9))  # the in-place target's index, too
        c.memcpy_h2d(idx.handle, 0, struct.pack("<qq", 2, 5))
        c.graph_replay(g)
        with pytest.raises(FlexNPUError, match="holds 9, out of range for size 4"):
            c.synchronize()
        c.memcpy_h2d(pos.handle, 0, struct.pack("<q", 3))
        c.graph_replay(g)
        c.synchronize()
        assert _get(c, cache)[3].tolist() == [14.0] * 4  # the new weights, through the traced graph
        _alive(c)
    assert daemon.proc.poll() is None


# ------------------------------------------------------------------------------------------
# item 2: outputs that alias inputs without saying so


def _view_like_cases():
    """Allowed operators whose result may be (part of) an input although their schema declares a
    fresh tensor: (op, args builder, output shapes)."""
    x = torch.arange(24.0).reshape(4, 6)
    return [
        ("aten::_unsafe_view.default", lambda c: (_put(c, x), [6, 4]), [((6, 4), torch.float32)]),
        ("aten::type_as.default", lambda c: (_put(c, x), _put(c, torch.zeros(1))), [((4, 6), torch.float32)]),
        ("aten::lift.default", lambda c: (_put(c, x),), [((4, 6), torch.float32)]),
        ("aten::unsafe_chunk.default", lambda c: (_put(c, x), 2), [((2, 6), torch.float32)] * 2),
        ("aten::unsafe_split.Tensor", lambda c: (_put(c, x), 2), [((2, 6), torch.float32)] * 2),
        (
            "aten::unsafe_split_with_sizes.default",
            lambda c: (_put(c, x), [1, 3]),
            [((1, 6), torch.float32), ((3, 6), torch.float32)],
        ),
    ]


HOOK_WRITER = """
import torch, torch_npu
keep = [torch.full((12800,), 3.5, device="npu") for _ in range(40)]
torch.npu.synchronize()
print("written", flush=True)
"""
HOOK_READER = """
import torch, torch_npu
ys = [torch.empty(12800, device="npu") for _ in range(40)]
print(sum(int((y != 0).sum().item()) for y in ys), flush=True)
"""


def test_torch_empty_under_the_hook_shows_no_other_process_data(daemon, runtime_dir):
    """The new user's reproduction: torch.empty on npu after another process exited."""
    import subprocess
    import sys

    from conftest import ROOT, child_env

    env = child_env(runtime_dir, FLEXNPU_DEVICES="0")
    env["PYTHONPATH"] = str(ROOT / "flexnpu" / "hook" / "bootstrap") + ":" + env["PYTHONPATH"]
    w = subprocess.run(
        [sys.executable, "-c", HOOK_WRITER], env=env, capture_output=True, text=True, timeout=300
    )
    assert "written" in w.stdout, w.stderr
    r = subprocess.run(
        [sys.executable, "-c", HOOK_READER], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "0", r.stdout


@pytest.mark.parametrize("via_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("op,build,shapes", _view_like_cases(), ids=[c[0] for c in _view_like_cases()])
def test_outputs_own_their_memory_after_the_input_is_freed(start_daemon, op, build, shapes, via_graph):
    """Old code (graph): the compiled replay bound the output to a non-owning view of the input;
    after free + graph destroy the handle read whatever reused that memory."""
    from flexnpu.client import Client

    start_daemon()
    with Client(0) as c, Client(0) as other:
        args = build(c)
        src = args[0]
        want = _get(c, src).clone()
        outs = [_out(c, dt, sh) for sh, dt in shapes]
        if via_graph:
            g = c.graph_begin_capture()
            c.launch(op, args, {}, outs)
            c.graph_end_capture(g)
            c.graph_replay(g)
        else:
            c.launch(op, args, {}, outs)
        c.synchronize()
        for r in args:
            if isinstance(r, TensorRef):
                c.free(r.handle)
        if via_graph:
            c.graph_destroy(g)
        c.synchronize()
        # someone else gets the memory and fills it
        junk = [_put(other, torch.full((4, 6), -7.0)) for _ in range(8)]
        other.synchronize()
        got = torch.cat([_get(c, r).reshape(-1) for _, r in outs])
        assert torch.equal(got, want.reshape(-1)[: got.numel()]), (op, got)
        # and writing through the handle touches only this client's memory
        for _, r in outs:
            c.memset(r.handle, 0, 0xFF, 4)
        c.synchronize()
        for j in junk:
            assert torch.equal(_get(other, j), torch.full((4, 6), -7.0))


def test_no_bound_output_overlaps_an_input_for_aliasing_ops():
    """execute_launch level: for each view-like op, the buffer bound to the output shares no
    byte with any input allocation."""

    class FakeClient:
        def __init__(self):
            self.m = Mem()
            self.n = 0

        def malloc(self, n):
            self.n += 1
            return self.n

        def memcpy_h2d(self, h, off, data):
            self.m.bufs[h] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

        def alloc_handle(self):
            self.n += 1
            return self.n

    for op, build, shapes in _view_like_cases():
        fc = FakeClient()
        args = build(fc)
        outs = [_out(fc, dt, sh) for sh, dt in shapes]
        bound = execute_launch(CPU, op, args, {}, outs, fc.m.resolve, fc.m.allocate)
        spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in fc.m.bufs.values()]
        for _, buf in bound:
            lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
            assert not any(lo < h2 and l2 < hi for l2, h2 in spans), op
            spans.append((lo, hi))


@pytest.mark.skipif(
    not __import__("os").environ.get("FLEXNPU_OPDB_SWEEP"),
    reason="minutes on a small machine: set FLEXNPU_OPDB_SWEEP=1 (needs expecttest)",
)
def test_opinfo_sweep_no_allowed_op_binds_an_output_into_an_input():
    """Every aten call torch's OpInfo samples make (what the hook would launch), for every
    allowed op declared to return a fresh tensor: run through the executor, the buffers bound to
    its outputs share no byte with any input allocation or with each other."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list = []

    class Capture(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            r = func(*args, **(kwargs or {}))
            calls.append((func, args, kwargs or {}))
            return r

    for oi in op_db:
        try:
            samples = list(oi.sample_inputs("cpu", torch.float32, requires_grad=False))[:2]
        except Exception:  # noqa: BLE001
            continue
        for smp in samples:
            try:
                with Capture():
                    oi.op(smp.input, *smp.args, **smp.kwargs)
            except Exception:  # noqa: BLE001
                pass
    ran, seen = 0, set()
    for func, args, kwargs in calls:
        name = f"aten::{func._opname}.{func._overloadname}"
        if func.namespace != "aten" or not ops.is_allowed(name):
            continue
        if not any(r.alias_info is None and "Tensor" in str(r.type) for r in func._schema.returns):
            continue
        m = Mem()

        def conv(x):
            if isinstance(x, torch.Tensor):
                return m.put(len(m.bufs) + 1, x.detach())
            if isinstance(x, (list, tuple)):
                return type(x)(conv(v) for v in x)
            if isinstance(x, torch.device):
                return CPU
            return x

        try:
            cargs, ckw = conv(args), {k: conv(v) for k, v in kwargs.items()}
        except Exception:  # noqa: BLE001 - dtypes the wire cannot carry
            continue
        spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in m.bufs.values() if b.numel()]
        try:
            bound = m.run(name, cargs, ckw)
        except Exception:  # noqa: BLE001 - refused or failing launches bind nothing
            continue
        ran += 1
        seen.add(name)
        for _, buf in bound:
            if not buf.numel():
                continue
            lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
            assert not any(lo < h2 and l2 < hi for l2, h2 in spans), name
            spans.append((lo, hi))
    assert ran > 300 and len(seen) > 150, (ran, len(seen))


# ------------------------------------------------------------------------------------------
# item 3: scrubbing


def test_fresh_memory_never_shows_another_clients_data(daemon):
    from flexnpu.client import Client

    # 48 KiB blocks: below glibc's mmap threshold, so freed blocks are reused from the heap
    pattern = bytes([0xA5, 0x5A, 0xC3, 0x3C]) * (12 << 10)
    with Client(0) as a:
        hs = []
        for _ in range(32):
            h = a.malloc(len(pattern))
            a.memcpy_h2d(h, 0, pattern)
            hs.append(h)
        # a declared launch output with slack bytes past its view, and an uninitialized factory
        a.synchronize()
        for h in hs:
            a.free(h)
        a.synchronize()
    with Client(0) as b:
        for _ in range(32):
            h = b.malloc(len(pattern))
            assert bytes(b.memcpy_d2h(h, 0, len(pattern))) == bytes(len(pattern))
        # uninitialized factories and outputs with bytes beyond their view are zeros too
        o = (len(pattern), TensorRef(b.alloc_handle(), torch.float32, (len(pattern) // 4,), (1,), 0))
        b.launch("aten::empty.memory_format", ([len(pattern) // 4],), {"dtype": torch.float32}, [o])
        b.synchronize()
        assert bytes(b.memcpy_d2h(o[1].handle, 0, len(pattern))) == bytes(len(pattern))
        x = _put(b, torch.ones(8))
        o2 = (len(pattern), TensorRef(b.alloc_handle(), torch.float32, (8,), (1,), 0))
        b.launch("aten::neg.default", (x,), {}, [o2])
        b.synchronize()
        raw = bytes(b.memcpy_d2h(o2[1].handle, 0, len(pattern)))
        assert raw[32:] == bytes(len(pattern) - 32)


def test_resize_is_refused_by_the_daemon(client):
    x = _put(client, torch.ones(4))
    for op, args in [
        ("aten::resize_.default", (x, [1 << 20])),
        ("aten::resize.default", (x, [1 << 20])),
        ("aten::resize_as_.default", (x, _put(client, torch.ones(64)))),
    ]:
        outs = [] if op.endswith("_.default") else [_out(client, torch.float32, (1 << 20,))]
        client.launch(op, args, {}, outs)
        with pytest.raises(OpNotSupported, match="not allowed|not supported"):
            client.synchronize()
    _alive(client)


# ------------------------------------------------------------------------------------------
# item 5: declared outputs must hold the operator's real result


def test_stride0_output_declaration_is_refused_before_the_op_runs(client):
    x = _put(client, torch.ones(1))
    big = TensorRef(x.handle, torch.float32, (1 << 15, 1 << 15), (0, 0), 0)  # 4 GiB as seen, 4 bytes held
    out = (8, TensorRef(client.alloc_handle(), torch.float32, (1 << 15, 1 << 15), (0, 0), 0))
    t0 = time.monotonic()
    client.launch("aten::neg.default", (big,), {}, [out])
    with pytest.raises(FlexNPUError, match="takes 4294967296 bytes|zero stride"):
        client.synchronize()
    assert client.memory_stats()["allocated"] < 1 << 20
    _alive(client)
    assert time.monotonic() - t0 < 60  # refused, not computed (generous: shared machine)


def test_graphs_charge_what_they_retain(start_daemon):
    from flexnpu.client import Client
    from flexnpu.errors import OutOfMemory

    start_daemon("--memory-limit", "8MiB")
    with Client(0) as c:
        x = _put(c, torch.ones(1 << 18))  # 1 MiB
        graphs = []
        with pytest.raises(OutOfMemory):
            for _ in range(16):  # each graph keeps a 1 MiB temporary after its free
                g = c.graph_begin_capture()
                o = _out(c, torch.float32, (1 << 18,))
                c.launch("aten::neg.default", (x,), {}, [o])
                c.graph_end_capture(g)
                c.free(o[1].handle)
                c.synchronize()
                graphs.append(g)
                c.malloc(1)  # a sync point that allocates: fails once the limit is hit
        assert 5 <= len(graphs) <= 8
        used = c.memory_stats()["allocated"]
        assert used >= (1 << 20) * (len(graphs) + 1)
        for g in graphs:
            c.graph_destroy(g)
        c.synchronize()
        assert c.memory_stats()["allocated"] < used - (1 << 20) * (len(graphs) - 1)


# ------------------------------------------------------------------------------------------
# item 6: one launch may not monopolise the device


def test_huge_broadcast_reduction_is_refused_quickly(start_daemon):
    from flexnpu.client import Client

    start_daemon()
    with Client(0) as c, Client(0) as bystander:
        x = _put(c, torch.ones(1))
        view = TensorRef(x.handle, torch.float32, (250000, 250000), (0, 0), 0)
        t0 = time.monotonic()
        c.launch("aten::sum.default", (view,), {}, [_out(c, torch.float32, ())])
        with pytest.raises(
            InvalidArgument, match=r"aten::sum.default: this launch would read and write .* bytes"
        ):
            c.synchronize()
        refused = time.monotonic() - t0
        t1 = time.monotonic()
        _alive(bystander)
        assert refused < 10 * max(time.monotonic() - t1, 0.05) + 5  # not seconds of reduction


def test_launch_ceiling_flags(start_daemon):
    from flexnpu.client import Client

    start_daemon("--max-launch-gflop", "0.001", "--max-launch-bytes", "1MiB")
    with Client(0) as c:
        a = _put(c, torch.ones(128, 128))
        c.launch("aten::mm.default", (a, a), {}, [_out(c, torch.float32, (128, 128))])  # 4.2 MFLOP
        with pytest.raises(InvalidArgument, match="GFLOP.*--max-launch-gflop"):
            c.synchronize()
        big = _put(c, torch.ones(1 << 18))  # 1 MiB in + 1 MiB out
        c.launch("aten::neg.default", (big,), {}, [_out(c, torch.float32, (1 << 18,))])
        with pytest.raises(InvalidArgument, match="--max-launch-bytes"):
            c.synchronize()
        _alive(c)
