"""flexnpu.shape_rules: every rule gives what meta inference gives, or declines (issue 13)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from flexnpu.ops import shape_rules
from flexnpu.protocol import TensorRef

aten = torch.ops.aten


def ref(shape, dtype=torch.float32, stride=None, offset=0):
    st = shape_rules.contiguous_strides(shape) if stride is None else tuple(stride)
    return TensorRef(1, dtype, tuple(shape), st, offset)


def meta(x):
    if isinstance(x, TensorRef):
        need = x.offset + 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride) if s > 0)
        if any(s == 0 for s in x.shape):
            need = x.offset
        return torch.empty(need, dtype=x.dtype, device="meta").as_strided(x.shape, x.stride, x.offset)
    if isinstance(x, list):
        return [meta(v) for v in x]
    if isinstance(x, tuple):
        return tuple(meta(v) for v in x)
    return x


def check(func, *args, **kwargs):
    """The rule's answer equals meta's; returns whether a rule answered."""
    got = shape_rules.infer(func, args, kwargs)
    try:
        r = func(*meta(args), **{k: meta(v) for k, v in kwargs.items()})
    except Exception:  # noqa: BLE001 - torch refuses: the rule must have declined too
        assert got is None, (func, args, kwargs, got)
        return False
    if got is None:
        return False
    assert isinstance(r, torch.Tensor)
    # strides of size-1 dims address no memory (torch itself is not consistent about them)
    want = (r.dtype, tuple(r.shape), _norm(r.shape, r.stride()))
    assert (got[0], got[1], _norm(got[1], got[2])) == want, (func, args, kwargs, got, r.stride())
    return True


def _norm(shape, stride):
    return tuple(None if n == 1 else s for n, s in zip(shape, stride))


SHAPES = [(), (0,), (1,), (5,), (3, 1), (1, 4), (3, 4), (2, 0, 4), (2, 3, 4), (1, 3, 1), (2, 1, 4, 1)]
DTYPES = [torch.float32, torch.float16, torch.int64, torch.bool]


def test_binary_broadcasting_dtypes_and_scalars():
    answered = 0
    for op in (
        aten.add.Tensor,
        aten.mul.Tensor,
        aten.sub.Tensor,
        aten.div.Tensor,
        aten.eq.Tensor,
        aten.lt.Tensor,
        aten.maximum.default,
    ):
        for sa, sb in itertools.product(SHAPES, SHAPES):
            for da, db in (
                (torch.float32, torch.float32),
                (torch.int64, torch.int64),
                (torch.float32, torch.int64),
                (torch.bool, torch.bool),
                (torch.float16, torch.float32),
            ):
                answered += check(op, ref(sa, da), ref(sb, db))
    for op in (
        aten.add.Scalar,
        aten.mul.Scalar,
        aten.div.Scalar,
        aten.eq.Scalar,
        aten.gt.Scalar,
        aten.add.Tensor,
        aten.mul.Tensor,
    ):
        for s, d, v in itertools.product(SHAPES, DTYPES, (2, 0.5, True)):
            if op in (aten.add.Tensor, aten.mul.Tensor):
                continue
            answered += check(op, ref(s, d), v)
    for s, d in itertools.product(SHAPES, DTYPES):
        answered += check(aten.add.Tensor, ref(s, d), ref(s, d), alpha=2)
        answered += check(aten.add.Tensor, ref(s, d), ref(s, d), alpha=0.5)
    assert answered > 300  # the rules do cover the common cases


def test_strided_inputs_fall_back_or_agree():
    """TensorIterator orders the output's dims by the inputs' strides (size-1 dims included):
    the rule reproduces it for permuted, gapped and broadcast inputs, or declines."""
    rnd = random.Random(0)
    answered = 0
    for _ in range(300):
        nd = rnd.randint(1, 4)
        shape = tuple(rnd.choice((1, 2, 3)) for _ in range(nd))
        perm = list(range(nd))
        rnd.shuffle(perm)
        base = shape_rules.contiguous_strides([shape[p] for p in perm])
        stride = [0] * nd
        for i, p in enumerate(perm):
            stride[p] = base[i]
        # size-1 dims may carry any stride; contiguity must ignore them like torch does
        stride = [st if n != 1 else rnd.choice((st, 7, 0)) for n, st in zip(shape, stride)]
        a = ref(shape, stride=stride, offset=rnd.choice((0, 3)))
        b = ref(shape[rnd.randint(0, nd - 1) :])
        gapped = ref(shape, stride=[st * 2 for st in stride])  # a slice with holes
        answered += check(aten.add.Tensor, a, b)
        answered += check(aten.mul.Tensor, b, a)
        answered += check(aten.mul.Tensor, a, a)
        answered += check(aten.add.Tensor, gapped, a)
        answered += check(aten.neg.default, a)
        answered += check(aten.neg.default, gapped)
        answered += check(aten.where.self, ref(shape[-1:], torch.bool), a, b)
        answered += check(aten.cat.default, [a, gapped], -1)
        check(aten.clone.default, a)
        check(aten.clone.default, a, memory_format=torch.contiguous_format)
        check(aten._softmax.default, a, -1, False)
        check(aten.mean.dim, a, [-1], True)
        check(aten.cat.default, [a, a], 0)
    assert answered > 1500  # of 2400: strided inputs are covered, not just declined


def test_unary_where_masked_fill_pow():
    for s, d in itertools.product(SHAPES, DTYPES):
        for op in (
            aten.neg.default,
            aten.rsqrt.default,
            aten.silu.default,
            aten.cos.default,
            aten.abs.default,
        ):
            check(op, ref(s, d))
        check(aten.pow.Tensor_Scalar, ref(s, d), 2)
        check(aten.pow.Tensor_Scalar, ref(s, d), 0.5)
        for s2 in SHAPES:
            check(aten.where.self, ref(s2, torch.bool), ref(s, d), ref(s, d))
            check(aten.masked_fill.Scalar, ref(s, d), ref(s2, torch.bool), -1.0)
            check(aten.masked_fill.Scalar, ref(s, d), ref(s2, torch.bool), 0)
    assert check(aten.where.self, ref((1, 4), torch.bool), ref((3, 1)), ref((3, 4)))
    assert check(aten.masked_fill.Scalar, ref((3, 4)), ref((1, 4), torch.bool), float("-inf"))


def test_cat_matmul_softmax_reductions_embedding():
    assert check(aten.cat.default, [ref((1, 2, 5, 8)), ref((1, 2, 1, 8))], -2)
    assert check(aten.cat.default, [ref((1, 2, 5, 8)), ref((1, 2, 1, 8))], 2)
    assert check(aten.cat.default, [ref((4,)), ref((0,))])
    # the KV cache: the old cache (contiguous) and the new keys (a transposed view)
    new_k = ref((1, 2, 1, 32), stride=(64, 32, 64, 1))
    assert check(aten.cat.default, [ref((1, 2, 17, 32)), new_k], -2)
    assert check(aten.cat.default, [new_k, new_k], -2)
    cl = ref((2, 3, 4, 5), stride=(60, 1, 15, 3))  # channels-last
    check(aten.cat.default, [cl, cl], 1)
    check(aten.cat.default, [cl, ref((2, 3, 4, 5))], 1)
    # legacy 1-D empty inputs are skipped (transformers' DynamicCache starts from one)
    assert check(aten.cat.default, [ref((4, 2)), ref((0,))])
    assert check(aten.cat.default, [ref((0,)), ref((1, 2, 5, 8))], -2)
    check(aten.cat.default, [ref((0,)), ref((0,))])
    check(aten.cat.default, [ref((0,), torch.int64), ref((1, 2, 5, 8))], -2)  # dtypes differ
    check(aten.cat.default, [ref((4, 2)), ref((4, 3))], 0)  # mismatch: torch refuses
    check(aten.cat.default, [ref((4, 2)), ref((4, 2), torch.float16)], 0)
    check(aten.cat.default, [ref(())], 0)
    assert check(aten.mm.default, ref((1, 128)), ref((128, 384)))
    check(aten.mm.default, ref((1, 128)), ref((127, 384)))
    assert check(aten.bmm.default, ref((8, 1, 32)), ref((8, 32, 17)))
    assert check(aten.addmm.default, ref((384,)), ref((1, 128)), ref((128, 384)))
    assert check(aten.addmm.default, ref((1, 384)), ref((3, 128)), ref((128, 384)), beta=0.5)
    check(aten.mm.default, ref((2, 3), torch.int64), ref((3, 2), torch.int64))
    for s in SHAPES:
        for dim in (0, -1, 1, 5):
            check(aten._softmax.default, ref(s), dim, False)
            check(aten._safe_softmax.default, ref(s), dim)
            check(aten._safe_softmax.default, ref(s), dim, torch.float32)
            for keep in (True, False):
                check(aten.mean.dim, ref(s), [dim], keep)
                check(aten.sum.dim_IntList, ref(s), [dim], keep)
                check(aten.sum.dim_IntList, ref(s, torch.int64), [dim], keep)
                check(aten.amax.default, ref(s), [dim], keep)
                check(aten.mean.dim, ref(s), [0, dim], keep)
    assert check(aten.mean.dim, ref((1, 5, 128)), [-1], True)
    assert check(aten.embedding.default, ref((1000, 128)), ref((1, 7), torch.int64))
    assert check(aten.embedding.default, ref((1000, 128)), ref((), torch.int64))


def test_linear():
    linear = aten.linear.default
    x, w, b = ref((1, 5, 16)), ref((8, 16)), ref((8,))
    assert check(linear, x, w, b)
    assert check(linear, x, w)
    assert check(linear, ref((16,)), w, b)
    assert check(linear, ref((2, 3, 4, 16)), w, None)
    # transformers' lm_head reads hidden_states[:, -1:, :]: size-1 dims with any stride
    assert check(linear, ref((1, 1, 16), stride=(2048, 16, 1), offset=96), w, b)
    assert check(linear, ref((4, 1, 16), stride=(16, 7, 1)), w)
    for bad in (
        (x, ref((8, 15)), b),  # in_features differ
        (x, w, ref((7,))),  # bias size
        (x, ref((8, 16), torch.float16), b),
        (ref((1, 5, 16), stride=(80, 1, 5)), w, b),  # not contiguous: meta decides the strides
    ):
        assert shape_rules.infer(linear, bad, {}) is None


def test_scaled_dot_product_attention():
    sdpa = aten.scaled_dot_product_attention.default
    q, k, v = ref((1, 4, 1, 32)), ref((1, 4, 17, 32)), ref((1, 4, 17, 16))
    assert check(sdpa, q, k, v)
    assert check(sdpa, q, k, v, ref((1, 1, 1, 17)))  # HF's additive mask, broadcast over heads
    assert check(sdpa, q, k, v, ref((1, 4, 1, 17), torch.bool))
    assert check(sdpa, q, k, v, attn_mask=ref((1, 1, 1, 17)), dropout_p=0.0, scale=0.125, is_causal=False)
    assert check(sdpa, ref((2, 4, 9, 32)), ref((2, 4, 9, 32)), ref((2, 4, 9, 32)), None, 0.0, True)
    assert check(sdpa, ref((1, 4, 1, 32), stride=(128, 32, 128, 1)), k, v)  # a transposed view
    for bad in (
        (q, ref((1, 4, 17, 31)), v),  # head dims differ
        (q, k, ref((1, 4, 16, 16))),  # key and value lengths differ
        (q, k, v, ref((1, 1, 1, 5))),  # mask does not broadcast
        (q, ref((1, 4, 17, 32), torch.float16), v),
    ):
        assert not check(sdpa, *bad)
    assert shape_rules.infer(sdpa, (q, k, v), {"dropout_p": 0.1}) is None  # random: never a rule
    # grouped heads (Qwen2, Llama: fewer key/value heads than query heads)
    assert check(sdpa, ref((1, 8, 1, 32)), ref((1, 2, 17, 32)), ref((1, 2, 17, 16)), enable_gqa=True)
    assert check(sdpa, q, k, v, ref((1, 1, 1, 17)), 0.0, False, scale=0.5, enable_gqa=True)
    assert not check(sdpa, ref((1, 6, 1, 32)), ref((1, 4, 17, 32)), ref((1, 4, 17, 16)), enable_gqa=True)
    assert not check(sdpa, ref((1, 8, 1, 32)), ref((1, 2, 17, 32)), ref((1, 2, 17, 16)))


def test_bitwise_cumulative_and_whole_reductions():
    answered = 0
    for op in (aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_xor.Tensor):
        for sa, sb in itertools.product(SHAPES, SHAPES):
            for da, db in itertools.product((torch.int64, torch.int32, torch.bool, torch.float32), repeat=2):
                answered += check(op, ref(sa, da), ref(sb, db))
    for op in (aten.bitwise_and.Scalar, aten.bitwise_or.Scalar, aten.bitwise_xor.Scalar):
        for v in (1, True, 2.5):
            for dt in (torch.int64, torch.bool, torch.float32):
                check(op, ref((3, 4), dt), v)
                check(op, ref((), dt), v)
    assert answered > 300
    assert check(aten.bitwise_or.Scalar, ref((3, 4), torch.int64), 1)
    assert check(aten.bitwise_and.Scalar, ref((3, 4), torch.bool), True)
    # a stopping criterion: unfinished (int64) & ~done (bool)
    assert check(aten.bitwise_and.Tensor, ref((1,), torch.int64), ref((1,), torch.bool))
    assert check(aten.bitwise_and.Tensor, ref((), torch.bool), ref((4,), torch.int32))
    for s in SHAPES:
        for dt in DTYPES + [torch.uint8]:
            check(aten.bitwise_not.default, ref(s, dt))
            for dim in (0, -1, 2):
                check(aten.cumsum.default, ref(s, dt), dim)
                check(aten.cumprod.default, ref(s, dt), dim)
                check(aten.cumsum.default, ref(s, dt), dim, dtype=torch.float64)
                check(aten.argmax.default, ref(s, dt), dim)
                check(aten.argmax.default, ref(s, dt), dim, True)
            for op in (aten.all.default, aten.any.default, aten.max.default, aten.min.default):
                check(op, ref(s, dt))
            check(aten.argmax.default, ref(s, dt))
            check(aten.argmin.default, ref(s, dt), None, True)
    assert check(aten.cumsum.default, ref((1, 8), torch.int64), -1)  # position ids from a mask
    assert check(aten.cumsum.default, ref((1, 8), torch.bool), 1)
    assert check(aten.all.default, ref((1, 8), torch.bool))
    assert check(aten.any.default, ref((2, 3), torch.uint8))
    assert check(aten.max.default, ref((1,), torch.int64))
    assert check(aten.argmax.default, ref((1, 1000)), -1)
    assert not check(aten.cumsum.default, ref((3, 4), stride=(1, 3)), 0)  # meta decides the layout


def test_every_computing_operator_of_transformers_generate_has_a_rule():
    """The main example's generate(), traced on the CPU: every operator that computes (not a
    view, factory or host copy) has a rule that agrees with meta on its real arguments. Meta
    inference there would cost each side its first meta call: 1.8 s importing torch._dynamo."""
    pytest.importorskip("transformers")
    import importlib.util
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    path = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("_example_generate", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.build_model(2, 64, 100, 0)

    def wire(x):
        if isinstance(x, torch.Tensor):
            return TensorRef(1, x.dtype, tuple(x.shape), tuple(x.stride()), x.storage_offset())
        if isinstance(x, (list, tuple)):
            return type(x)(wire(v) for v in x)
        return x

    calls = {}

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            calls.setdefault(func, (wire(args), {k: wire(v) for k, v in kwargs.items()}))
            return func(*args, **kwargs)

    prompt = torch.randint(0, 100, (1, 9))
    with torch.no_grad(), Trace():
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    # what the front end does not infer by rule: views (the client's own metadata), factories
    # and host copies (sized by their arguments), reads; t/addmm/_unsafe_view and the CPU
    # attention kernel are linear's and sdpa's decompositions, which FlexNPU's npu device
    # sends whole (their rules are tested above)
    exempt = {
        "view",
        "_unsafe_view",
        "t",
        "transpose",
        "slice",
        "select",
        "unsqueeze",
        "expand",
        "detach",
        "alias",
        "_to_copy",
        "lift_fresh",
        "full",
        "ones",
        "ones_like",
        "zeros",
        "arange",
        "_local_scalar_dense",
        "mm",
        "addmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "copy_",
    }
    missing = []
    for func, (args, kwargs) in calls.items():
        if func._opname in exempt:
            continue
        if not shape_rules.covered(func) or not check(func, *args, **kwargs):
            missing.append(str(func))
    assert not missing, f"no rule answers for {missing}"
    assert len(calls) > 20


@pytest.mark.parametrize("bad", [(-1, 3), (3,)])
def test_hostile_shapes_decline(bad):
    r = TensorRef(1, torch.float32, bad, (3, 1), 0)
    assert shape_rules.infer(aten.neg.default, (r,), {}) is None
    assert shape_rules.infer(aten.cat.default, ([r, r], 0), {}) is None


def test_factories_and_likes():
    """What torch.full / zeros / ones / arange / scalar_tensor / *_like make on the npu device:
    the daemon checks their declared outputs by these rules, not by a meta call (whose first
    call in a process imports torch._dynamo)."""
    m = {"device": torch.device("meta")}
    answered = 0
    for size in ([], [0], [3], [2, 3], (1, 4, 2)):
        for dt in (None, torch.float16, torch.int64, torch.bool):
            kw = {**m, **({"dtype": dt} if dt is not None else {})}
            for v in (True, 3, 2.5, -0.0):
                answered += check(aten.full.default, size, v, **kw)
            answered += check(aten.zeros.default, size, **kw)
            answered += check(aten.ones.default, size, **kw, pin_memory=False)
    for args in [
        (5,),
        (0,),
        (2.5,),
        (1, 7),
        (7, 1),
        (0, 10, 3),
        (10, 0, -3),
        (0.0, 1.0, 0.1),
        (1, 2.5, 0.5),
        (-3, 4, 2),
    ]:
        for dt in (None, torch.float32, torch.int64):
            kw = {**m, **({"dtype": dt} if dt is not None else {})}
            op = {1: aten.arange.default, 2: aten.arange.start, 3: aten.arange.start_step}[len(args)]
            answered += check(op, *args, **kw)
    assert not check(aten.arange.start, 5, 1, **m)  # inconsistent bounds: torch refuses, so does the rule
    for v in (3, 2.5, True):
        answered += check(aten.scalar_tensor.default, v, **m)
    for s in SHAPES:
        for dt in (None, torch.int64):
            kw = {**m, **({"dtype": dt} if dt is not None else {})}
            answered += check(aten.zeros_like.default, ref(s), **kw)
            answered += check(
                aten.ones_like.default, ref(s, torch.int64), **kw, memory_format=torch.contiguous_format
            )
            answered += check(aten.full_like.default, ref(s, torch.bool), 7, **kw)
    assert not check(aten.ones_like.default, ref((3, 4), stride=(1, 3)), **m)  # meta decides that layout
    assert answered > 150
    # the calls transformers' generate() makes: a stopping criterion, position ids, a mask
    assert check(aten.full.default, [1], False, dtype=torch.bool, **m)
    assert check(aten.arange.default, 1, dtype=torch.int64, **m)
    assert check(aten.ones_like.default, ref((1, 16), torch.int64), **m)


def check_view(func, *args):
    """The view rule's answer equals meta's view; returns whether a rule answered."""
    got = shape_rules.view(func, args, {})
    try:
        r = func(*meta(args))
    except Exception:  # noqa: BLE001 - torch refuses: the rule must have declined too
        assert got is None, (func, args, got)
        return False
    if got is None:
        return False
    want = (r.dtype, tuple(r.shape), tuple(r.stride()), r.storage_offset())
    assert got == want, (func, args, got, want)
    return True


VIEW_LAYOUTS = [
    ((), None, 0),
    ((5,), None, 3),
    ((3, 4), None, 0),
    ((3, 4), (1, 3), 2),  # transposed
    ((2, 0, 4), None, 0),
    ((2, 3, 4), (24, 8, 2), 5),  # gapped
    ((1, 3, 1), (7, 1, 9), 0),  # size-1 dims with odd strides
    ((2, 1, 6), (6, 0, 1), 1),  # expanded
]


def test_view_rules_agree_with_meta():
    answered = 0
    for shape, stride, offset in VIEW_LAYOUTS:
        a = ref(shape, stride=stride, offset=offset)
        nd = len(shape)
        dims = range(-nd - 1, nd + 1)
        ends = (None, 0, 1, 2, -1, -2, 3, 100, -100, 2**63 - 1)
        for d in dims:
            for start, end, step in itertools.product((None, 0, 1, -1, -3, 7), ends, (1, 2, 3)):
                answered += check_view(aten.slice.Tensor, a, d, start, end, step)
            answered += check_view(aten.slice.Tensor, a, d)
            answered += check_view(aten.slice.Tensor, a, d, 1, None, 0)  # step 0: refused
            for i in (-3, -1, 0, 1, 2, 5):
                answered += check_view(aten.select.int, a, d, i)
            answered += check_view(aten.unsqueeze.default, a, d)
            for d1 in dims:
                answered += check_view(aten.transpose.int, a, d, d1)
        answered += check_view(aten.slice.Tensor, a)
    assert answered > 2000
    # not a view rule's: declines
    a = ref((3, 4))
    assert shape_rules.view(aten.neg.default, (a,), {}) is None
    assert shape_rules.view(aten.slice.Tensor, (a, 0, 1.5), {}) is None
    assert (
        shape_rules.view(aten.slice.Tensor, (TensorRef(1, torch.float32, (-1, 3), (3, 1), 0), 0), {}) is None
    )
