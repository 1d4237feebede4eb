"""Output metadata of common aten operators by rule, without running them on the meta device.

torch's meta functions for elementwise operators, ``cat``, softmax and reductions are Python
(torch._refs / _prims_common) and cost 0.3-30 ms per call; an eager decode loop whose shapes
change every token (a growing KV cache) paid that for about ten operators per token on both
sides of the ring. The rules here derive the one fresh output of those operators from the
arguments' dtypes, shapes and strides in microseconds, and are size-generic: a new sequence
length costs no meta call.

They also keep a process from paying torch's first meta call: most meta functions are wrapped
in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` (1.8 s on the 2-core
VM). The main example met it in both the client and the daemon at its first cumsum, and ran
its 24 tokens at 12 tokens/s instead of 50-70 (a direct CPU run: 260). So every operator a
transformers ``generate()`` launches has a rule (tests/test_shape_rules.py traces the main
example's ``generate()`` and checks each of its computing operators' rule against meta).

A rule covers only the cases whose answer is certain: dtypes that need no promotion beyond "all
the same" (Python scalars of a lower or equal category), plain arguments, and layouts it can
derive (elementwise outputs ordered like their inputs' strides as TensorIterator does, cat,
softmax and reductions of contiguous inputs; channels-last and empty corner cases decline).
Anything else returns None and the caller falls back to meta inference, which stays the
reference: tests/test_shape_rules.py checks every rule against it on a broad sample
(broadcasting, 0-d, empty, permuted and gapped strides, size-1 dims with odd strides).

The outputs' layout in memory is meta's; only the strides of size-1 dims, which address no
memory, may differ (torch's own kernels disagree about those).

Both sides use it with wire arguments (``TensorRef`` in place of tensors): the hook to size the
outputs it allocates, the daemon to check a launch's declared outputs. The daemon's answer is
its own computation, never the client's, so its allocation and bounds checks keep their force.
"""

from __future__ import annotations

import math

from typing import Any
from collections.abc import Callable, Sequence

import torch

from flexnpu.protocol import TensorRef

__all__ = ["infer", "covered", "view", "view_covered", "contiguous_strides", "Out", "View"]

aten = torch.ops.aten

# (dtype, shape, stride) of the one fresh output
Out = tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]
Rule = Callable[[Sequence[Any], dict[str, Any]], "Out | None"]
# (dtype, shape, stride, storage offset) of a view of the first argument
View = tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    out = [1] * len(shape)
    acc = 1
    for i in range(len(shape) - 1, -1, -1):
        out[i] = acc
        acc *= max(shape[i], 1)
    return tuple(out)


def _contiguous(r: TensorRef) -> bool:
    """Exactly the strides of a fresh contiguous tensor, size-1 dims included: torch's
    is_contiguous() ignores those, but TensorIterator orders output dims by them."""
    return r.stride == contiguous_strides(r.shape)


def _contig_like(shape: Sequence[int], stride: Sequence[int], order: Sequence[int]) -> bool:
    """torch's contiguity test for a memory format whose dims, fastest first, are ``order``:
    dims of size 1 may have any stride."""
    acc = 1
    for d in order:
        n = shape[d]
        if n != 1:
            if stride[d] != acc:
                return False
            acc *= n
    return True


def _dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """torch's is_non_overlapping_and_dense()."""
    nd = len(shape)
    if nd == 1:
        return shape[0] < 2 or stride[0] == 1
    need = 1
    for d in sorted((d for d in range(nd) if shape[d] >= 2), key=lambda d: stride[d]):
        if stride[d] != need:
            return False
        need *= shape[d]
    return True


_CL = {4: (1, 3, 2, 0), 5: (1, 4, 3, 2, 0)}  # channels-last dim order, fastest first


def _strides_like_cl(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """c10's is_channels_last_strides_2d/3d (what suggest_memory_format() asks)."""
    nd = len(shape)
    if nd not in _CL or stride[1] == 0:
        return False
    lo = 0
    for d in _CL[nd]:
        if shape[d] == 0 or stride[d] < lo:
            return False
        if d == 0 and lo == stride[1]:
            return False
        lo = stride[d]
        if shape[d] > 1:
            lo *= shape[d]
    return True


def _iter_strides(shape: tuple[int, ...], ops: Sequence[TensorRef]) -> tuple[int, ...] | None:
    """The strides TensorIterator gives the fresh output of an elementwise op over ``ops``
    (at/native/TensorIterator.cpp: the fast setup when all inputs have the output's shape,
    else the output's dims ordered like the inputs' strides), or None where channels-last
    formats could be involved."""
    nd = len(shape)
    if all(o.shape == shape for o in ops):
        if all(_contiguous(o) for o in ops):
            return contiguous_strides(shape)
        if nd in _CL and all(_contig_like(shape, o.stride, _CL[nd]) for o in ops):
            return None  # channels-last fast setup: meta decides
        if all(_dense(shape, o.stride) for o in ops) and all(o.stride == ops[0].stride for o in ops):
            return ops[0].stride
    if nd <= 1:
        return contiguous_strides(shape)
    if 0 in shape:
        return None
    sb = []
    for o in ops:
        off = nd - len(o.shape)
        st = [0] * nd
        for i, (n, s) in enumerate(zip(o.shape, o.stride)):
            st[off + i] = 0 if (n == 1 and shape[off + i] != 1) else s
        sb.append(st)

    def should_swap(d0: int, d1: int) -> int:
        for st in sb:
            s0, s1 = st[d0], st[d1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 < s1:
                return -1
            if s0 > s1:
                return 1
            if shape[d0] > shape[d1]:
                return 1
        return 0

    rev = list(range(nd - 1, -1, -1))
    perm = list(rev)  # fastest dim first
    for i in range(1, nd):
        d1 = i
        for d0 in range(i - 1, -1, -1):
            c = should_swap(perm[d0], perm[d1])
            if c > 0:
                perm[d0], perm[d1] = perm[d1], perm[d0]
                d1 = d0
            elif c < 0:
                break
    if perm == rev:
        return contiguous_strides(shape)
    out = [0] * nd
    acc = 1
    for d in perm:
        out[d] = acc
        acc *= shape[d]
    return tuple(out)


def _out(dtype: torch.dtype, shape: Sequence[int]) -> Out:
    sh = tuple(shape)
    return (dtype, sh, contiguous_strides(sh))


def _broadcast(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    nd = max(len(s) for s in shapes)
    out = [1] * nd
    for s in shapes:
        off = nd - len(s)
        for i, n in enumerate(s):
            j = off + i
            if n == out[j] or n == 1:
                continue
            if out[j] == 1:
                out[j] = n
            else:
                return None  # not broadcastable: let meta produce torch's error
    return tuple(out)


# categories of type promotion: a scalar of a higher category changes the result's dtype
def _category(dt: torch.dtype) -> int:
    if dt == torch.bool:
        return 0
    if dt.is_complex:
        return 3
    if dt.is_floating_point:
        return 2
    return 1


def _scalar_category(v: Any) -> int | None:
    tp = type(v)
    if tp is bool:
        return 0
    if tp is int:
        return 1
    if tp is float:
        return 2
    return None


def _common_dtype(tensors: Sequence[TensorRef], scalars: Sequence[Any]) -> torch.dtype | None:
    """The result dtype when no promotion is needed: all tensors one dtype, scalars no higher."""
    dt = tensors[0].dtype
    for t in tensors[1:]:
        if t.dtype != dt:
            return None
    cat = _category(dt)
    for s in scalars:
        c = _scalar_category(s)
        if c is None or c > cat:
            return None
    return dt


def _pointwise(
    tensors: Sequence[TensorRef], scalars: Sequence[Any], out_dtype: torch.dtype | None
) -> Out | None:
    if not tensors or any(type(t) is not TensorRef for t in tensors):
        return None
    dt = _common_dtype(tensors, scalars)
    return None if dt is None else _elementwise(tensors, out_dtype or dt)


def _elementwise(tensors: Sequence[TensorRef], dtype: torch.dtype) -> Out | None:
    """The output of an elementwise operator of dtype ``dtype`` over broadcast ``tensors``."""
    shape = _broadcast([t.shape for t in tensors])
    if shape is None:
        return None
    st = _iter_strides(shape, tensors)
    return None if st is None else (dtype, shape, st)


_COMPARE = torch.bool


def _binary(kind: str) -> Rule:
    """self (Tensor) op other (Tensor or Scalar) [, alpha]: same-dtype elementwise."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if len(args) != 2 or kwargs.keys() - {"alpha"}:
            return None
        a, b = args
        if type(a) is not TensorRef:
            return None
        alpha = kwargs.get("alpha")
        scalars = [] if alpha is None else [alpha]
        tensors = [a]
        if type(b) is TensorRef:
            tensors.append(b)
        else:
            scalars.append(b)
        dt = _common_dtype(tensors, scalars)
        if dt is None:
            return None
        if kind == "float" and not dt.is_floating_point:
            return None  # true division of integers gives floats: meta knows which
        if kind == "arith" and dt == torch.bool:
            return None  # bool arithmetic promotes or refuses: meta decides
        return _pointwise(tensors, scalars, _COMPARE if kind == "compare" else None)

    return rule


def _bitwise(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    """bitwise and / or / xor of integer or bool tensors (.Tensor), or of one and a Python int
    or bool (.Scalar). A bool tensor with an integer one gives the integer dtype whichever is
    0-d (a stopping criterion's `unfinished & ~done`)."""
    if len(args) != 2 or kwargs or type(args[0]) is not TensorRef:
        return None
    a, b = args
    if type(b) is TensorRef:
        tensors = [a, b]
        if a.dtype != b.dtype and torch.bool in (a.dtype, b.dtype):
            other = b.dtype if a.dtype == torch.bool else a.dtype
            if other.is_floating_point or other.is_complex:
                return None
            return _elementwise(tensors, other)
        scalars: list[Any] = []
    else:
        tensors, scalars = [a], [b]
    dt = _common_dtype(tensors, scalars)
    if dt is None or dt.is_floating_point or dt.is_complex:
        return None  # promotion, or floats (which bitwise operators refuse): meta says how
    return _pointwise(tensors, scalars, None)


def _bitwise_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    return _bitwise(args, kwargs) if len(args) == 2 and type(args[1]) is TensorRef else None


def _bitwise_scalar(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    return _bitwise(args, kwargs) if len(args) == 2 and type(args[1]) is not TensorRef else None


def _unary(floating_only: bool, bits: bool = False) -> Rule:
    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if len(args) != 1 or kwargs:
            return None
        a = args[0]
        if type(a) is not TensorRef:
            return None
        if floating_only and not a.dtype.is_floating_point:
            return None
        if bits and (a.dtype.is_floating_point or a.dtype.is_complex):
            return None
        return _pointwise([a], [], None)

    return rule


def _where(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) != 3 or kwargs:
        return None
    c, a, b = args
    if not all(type(t) is TensorRef for t in args) or c.dtype != torch.bool:
        return None
    dt = _common_dtype([a, b], [])
    shape = _broadcast([c.shape, a.shape, b.shape])
    if dt is None or shape is None:
        return None
    st = _iter_strides(shape, [c, a, b])
    return None if st is None else (dt, shape, st)


def _masked_fill_scalar(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) != 3 or kwargs:
        return None
    a, mask, v = args
    if type(a) is not TensorRef or type(mask) is not TensorRef or mask.dtype != torch.bool:
        return None
    if not (_contiguous(a) and _contiguous(mask)):
        return None
    c = _scalar_category(v)
    if c is None or c > _category(a.dtype):
        return None
    shape = _broadcast([a.shape, mask.shape])
    if shape != a.shape:
        return None  # masked_fill does not broadcast self
    return _out(a.dtype, a.shape)


def _pow_tensor_scalar(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) != 2 or kwargs or type(args[0]) is not TensorRef:
        return None
    a, e = args
    if not a.dtype.is_floating_point or _scalar_category(e) not in (1, 2):
        return None
    return _pointwise([a], [], None)


def _clone(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) != 1 or kwargs.keys() - {"memory_format"} or type(args[0]) is not TensorRef:
        return None
    a = args[0]
    mf = kwargs.get("memory_format")
    if mf is None or mf == torch.preserve_format:
        return _out(a.dtype, a.shape) if _contiguous(a) else None
    if mf == torch.contiguous_format:
        return _out(a.dtype, a.shape)
    return None


def _wrap_dim(d: Any, nd: int) -> int | None:
    if type(d) is not int:
        return None
    n = max(nd, 1)
    if not -n <= d < n:
        return None
    return d + n if d < 0 else d


def _cat(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if kwargs or not 1 <= len(args) <= 2:
        return None
    ts = args[0]
    dim = args[1] if len(args) > 1 else 0
    if type(ts) not in (list, tuple) or not ts or not all(type(t) is TensorRef for t in ts):
        return None
    dt = ts[0].dtype
    if any(t.dtype != dt for t in ts):
        return None
    # torch skips 1-D empty inputs (the legacy "no tensor yet": transformers' DynamicCache
    # starts from one) when another input has more dimensions
    kept = [t for t in ts if t.shape != (0,)]
    if kept and len(kept) < len(ts) and len(kept[0].shape) > 1:
        ts = kept
    nd = len(ts[0].shape)
    if nd == 0 or any(len(t.shape) != nd for t in ts):
        return None  # 0-d refused, legacy 1-D empty tensors skipped: meta decides
    if nd in _CL and all(_strides_like_cl(t.shape, t.stride) for t in ts):
        return None  # channels-last inputs keep their format: meta decides
    # else cat's output is contiguous (compute_output_memory_format: any input whose strides
    # do not suggest channels-last makes it so)
    d = _wrap_dim(dim, nd)
    if d is None:
        return None
    shape = list(ts[0].shape)
    total = 0
    for t in ts:
        for i in range(nd):
            if i != d and t.shape[i] != shape[i]:
                return None
        total += t.shape[d]
    shape[d] = total
    return _out(dt, shape)


def _matmul_shapes(a: TensorRef, b: TensorRef, batched: bool) -> tuple[int, ...] | None:
    nd = 3 if batched else 2
    if len(a.shape) != nd or len(b.shape) != nd or a.dtype != b.dtype:
        return None
    if batched and a.shape[0] != b.shape[0]:
        return None
    if a.shape[-1] != b.shape[-2]:
        return None
    return (*a.shape[:-1], b.shape[-1])


def _mm(batched: bool) -> Rule:
    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if len(args) != 2 or kwargs or not all(type(t) is TensorRef for t in args):
            return None
        a, b = args
        if not a.dtype.is_floating_point:
            return None
        shape = _matmul_shapes(a, b, batched)
        return None if shape is None else _out(a.dtype, shape)

    return rule


def _addmm(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) != 3 or kwargs.keys() - {"beta", "alpha"} or not all(type(t) is TensorRef for t in args):
        return None
    bias, a, b = args
    if not a.dtype.is_floating_point or bias.dtype != a.dtype:
        return None
    if any(_scalar_category(v) not in (1, 2) for v in kwargs.values()):
        return None
    shape = _matmul_shapes(a, b, False)
    if shape is None or _broadcast([bias.shape, shape]) != shape:
        return None
    return _out(a.dtype, shape)


def _linear(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    """linear(input, weight, bias=None) of a contiguous input (size-1 dims may have any stride:
    transformers' lm_head reads hidden_states[:, -1:, :]): (*input[:-1], out_features),
    contiguous. Other layouts go to meta inference."""
    if kwargs or not 2 <= len(args) <= 3:
        return None
    x, w = args[0], args[1]
    b = args[2] if len(args) == 3 else None
    if type(x) is not TensorRef or type(w) is not TensorRef or not (b is None or type(b) is TensorRef):
        return None
    if not x.dtype.is_floating_point or w.dtype != x.dtype or len(w.shape) != 2 or not x.shape:
        return None
    if x.shape[-1] != w.shape[1] or not _contig_like(x.shape, x.stride, range(len(x.shape) - 1, -1, -1)):
        return None
    if b is not None and (b.dtype != x.dtype or b.shape != (w.shape[0],)):
        return None
    return _out(x.dtype, (*x.shape[:-1], w.shape[0]))


def _softmax(kind: str) -> Rule:
    """_softmax(self, dim, half_to_float) / _safe_softmax(self, dim, dtype=None)."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if type(args[0]) is not TensorRef if args else True:
            return None
        a = args[0]
        if not a.dtype.is_floating_point or not _contiguous(a) or len(args) < 2:
            return None
        if _wrap_dim(args[1], len(a.shape)) is None:
            return None
        if kind == "_softmax":
            if len(args) != 3 or kwargs or args[2] is not False:
                return None
        else:
            dtype = args[2] if len(args) > 2 else kwargs.get("dtype")
            if len(args) > 3 or kwargs.keys() - {"dtype"} or dtype not in (None, a.dtype):
                return None
        return _out(a.dtype, a.shape)

    return rule


def _reduce_dims(a: TensorRef, dims: Any, keepdim: Any) -> tuple[int, ...] | None:
    nd = len(a.shape)
    if type(keepdim) is not bool:
        return None
    if dims is None or (type(dims) in (list, tuple) and len(dims) == 0):
        return None  # all-dims reductions: meta decides (their shapes have corner cases)
    if type(dims) is int:
        dims = [dims]
    if type(dims) not in (list, tuple):
        return None
    ds = set()
    for d in dims:
        w = _wrap_dim(d, nd)
        if w is None or w in ds:
            return None
        ds.add(w)
    if nd == 0:
        return None
    if 0 in a.shape:
        return None  # empty inputs: identity or error, and torch's odd strides for empty results
    return tuple((1 if i in ds else n) for i, n in enumerate(a.shape) if keepdim or i not in ds)


def _reduction(kind: str) -> Rule:
    """mean.dim / sum.dim_IntList (self, dim, keepdim=False, *, dtype=None), amax (self, dim, keepdim)."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if (
            not args
            or type(args[0]) is not TensorRef
            or len(args) > 3
            or kwargs.keys() - {"keepdim", "dtype"}
        ):
            return None
        a = args[0]
        if not _contiguous(a):
            return None
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if kwargs.get("dtype") is not None:
            return None
        if kind in ("mean", "sum") and not a.dtype.is_floating_point:
            return None  # sum of ints widens to int64, mean of ints refuses: meta decides
        if kind == "amax" and a.dtype == torch.bool:
            return None
        shape = _reduce_dims(a, dims, keepdim)
        return None if shape is None else _out(a.dtype, shape)

    return rule


def _cumulative(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    """cumsum / cumprod (self, dim, *, dtype=None): integers and bools accumulate in int64."""
    if len(args) != 2 or kwargs.keys() - {"dtype"} or type(args[0]) is not TensorRef:
        return None
    a = args[0]
    if not _contiguous(a) or _wrap_dim(args[1], len(a.shape)) is None:
        return None
    dt = kwargs.get("dtype")
    if dt is None:
        dt = a.dtype if (a.dtype.is_floating_point or a.dtype.is_complex) else torch.int64
    elif not isinstance(dt, torch.dtype):
        return None
    return _out(dt, a.shape)


def _arg_reduction(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    """argmax / argmin (self, dim=None, keepdim=False): int64, over everything or one dim (the
    greedy pick: argmax(logits[:, -1], -1))."""
    if not args or type(args[0]) is not TensorRef or kwargs or len(args) > 3:
        return None
    a = args[0]
    if a.dtype.is_complex or a.dtype == torch.bool:
        return None
    dim = args[1] if len(args) > 1 else None
    keep = args[2] if len(args) > 2 else False
    if type(keep) is not bool or 0 in a.shape:
        return None
    if dim is None:
        return _out(torch.int64, tuple(1 for _ in a.shape) if keep else ())
    if not _contiguous(a):
        return None
    shape = _reduce_dims(a, dim, keep)
    return None if shape is None else _out(torch.int64, shape)


def _whole(kind: str) -> Rule:
    """Reductions of every element to a 0-d result: all / any (bool, uint8 stays uint8),
    max / min (the input's dtype; empty inputs refuse)."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if len(args) != 1 or kwargs or type(args[0]) is not TensorRef:
            return None
        a = args[0]
        if kind == "logical":
            return _out(torch.uint8 if a.dtype == torch.uint8 else torch.bool, ())
        if 0 in a.shape or a.dtype.is_complex:
            return None  # max of nothing refuses: meta says how
        return _out(a.dtype, ())

    return rule


def _embedding(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) < 2 or len(args) > 5 or kwargs or not all(type(t) is TensorRef for t in args[:2]):
        return None
    w, idx = args[0], args[1]
    if len(w.shape) != 2 or idx.dtype not in (torch.int64, torch.int32):
        return None
    return _out(w.dtype, (*idx.shape, w.shape[1]))


_SDPA_KW = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    """scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
    is_causal=False, *, scale=None, enable_gqa=False) without dropout: the output has the query's
    dtype and leading shape and the value's last dimension (the math form's contiguous layout)."""
    if len(args) < 3 or len(args) > 6 or kwargs.keys() - set(_SDPA_KW):
        return None
    kw = dict(zip(_SDPA_KW, args[3:]))
    if kw.keys() & kwargs.keys():
        return None
    kw.update(kwargs)
    q, k, v = args[:3]
    if not (type(q) is TensorRef and type(k) is TensorRef and type(v) is TensorRef):
        return None
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    if kw.get("dropout_p", 0.0) not in (0, 0.0) or type(kw.get("is_causal", False)) is not bool:
        return None
    if kw.get("scale") is not None and type(kw["scale"]) is not float:
        return None
    gqa = kw.get("enable_gqa", False)
    if type(gqa) is not bool:
        return None
    nd = len(q.shape)
    if nd < 2 or len(k.shape) != nd or len(v.shape) != nd or k.shape[:-2] != v.shape[:-2]:
        return None
    if gqa and nd >= 3:
        # grouped heads: the query's head count is a multiple of the key's
        if q.shape[:-3] != k.shape[:-3] or k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
            return None
    elif q.shape[:-2] != k.shape[:-2]:
        return None  # broadcast batch dims: meta decides
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2] or 0 in q.shape or 0 in k.shape:
        return None
    mask = kw.get("attn_mask")
    if mask is not None:
        if type(mask) is not TensorRef or mask.dtype not in (torch.bool, q.dtype):
            return None
        if kw.get("is_causal", False):
            return None  # torch refuses both
        want = (*q.shape[:-1], k.shape[-2])
        if _broadcast([mask.shape, want]) != want:
            return None
    return _out(q.dtype, (*q.shape[:-1], v.shape[-1]))


# ---- factories: what torch.full / zeros / ones / arange / *_like make on the npu device --------
_FACTORY_KW = frozenset({"dtype", "layout", "device", "pin_memory"})


def _factory_kwargs_ok(kwargs: dict[str, Any], extra: frozenset[str] = frozenset()) -> bool:
    if kwargs.keys() - _FACTORY_KW - extra:
        return False
    lay = kwargs.get("layout")
    dt = kwargs.get("dtype")
    return (
        (lay is None or lay == torch.strided)
        and not kwargs.get("pin_memory")
        and (dt is None or isinstance(dt, torch.dtype))
    )


def _size(x: Any) -> tuple[int, ...] | None:
    if type(x) not in (list, tuple) or len(x) > 64:
        return None
    if any(type(v) is not int or v < 0 for v in x):
        return None
    return tuple(x)


def _full(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) != 2 or not _factory_kwargs_ok(kwargs):
        return None
    size, v = _size(args[0]), args[1]
    dt = kwargs.get("dtype")
    if dt is None:  # from the fill value, as torch.full infers it
        dt = {bool: torch.bool, int: torch.int64, float: torch.get_default_dtype()}.get(type(v))
    return None if size is None or dt is None else _out(dt, size)


def _filled(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    """zeros(size) / ones(size): the default dtype unless one is given."""
    if len(args) != 1 or not _factory_kwargs_ok(kwargs):
        return None
    size = _size(args[0])
    return None if size is None else _out(kwargs.get("dtype") or torch.get_default_dtype(), size)


def _scalar_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    if len(args) != 1 or type(args[0]) not in (bool, int, float) or not _factory_kwargs_ok(kwargs):
        return None
    return _out(kwargs.get("dtype") or torch.get_default_dtype(), ())


def _arange(nargs: int) -> Rule:
    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if len(args) != nargs or not _factory_kwargs_ok(kwargs):
            return None
        if any(type(v) not in (int, float) for v in args):
            return None
        start, end, step = (0, args[0], 1) if nargs == 1 else (*args, 1) if nargs == 2 else tuple(args)
        if step == 0:
            return None
        if all(type(v) is int for v in (start, end, step)):
            n = -((start - end) // step)  # ceil((end - start) / step), exactly
            dt = kwargs.get("dtype") or torch.int64
        else:
            dt = kwargs.get("dtype") or torch.get_default_dtype()
            if not dt.is_floating_point:
                return None  # torch casts the bounds to an integral dtype first
            d = (end - start) / step  # torch sizes it in double precision too
            if d != d or abs(d) > 2**53:
                return None
            n = math.ceil(d)
        return None if n < 0 else _out(dt, (n,))

    return rule


def _like(nargs: int) -> Rule:
    """zeros_like / ones_like / full_like: the input's shape; its layout only where that is
    contiguous (preserve_format copies other layouts: meta decides those)."""

    def rule(args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
        if len(args) != nargs or type(args[0]) is not TensorRef:
            return None
        if not _factory_kwargs_ok(kwargs, frozenset({"memory_format"})):
            return None
        if nargs == 2 and type(args[1]) not in (bool, int, float):
            return None
        a = args[0]
        dt = kwargs.get("dtype") or a.dtype
        mf = kwargs.get("memory_format")
        if mf is None or mf == torch.preserve_format:
            return _out(dt, a.shape) if _contiguous(a) else None
        return _out(dt, a.shape) if mf == torch.contiguous_format else None

    return rule


_RULES: dict[Any, Rule] = {}


def _add(names: str, rule: Any, table: dict[Any, Any] = _RULES) -> None:
    for n in names.split():
        packet, _, overload = n.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            table[op] = rule


_add("add.Tensor add.Scalar sub.Tensor sub.Scalar mul.Tensor mul.Scalar", _binary("arith"))
_add("maximum.default minimum.default", _binary("same"))
_add("div.Tensor div.Scalar", _binary("float"))
_add(
    "eq.Tensor eq.Scalar ne.Tensor ne.Scalar lt.Tensor lt.Scalar le.Tensor le.Scalar "
    "gt.Tensor gt.Scalar ge.Tensor ge.Scalar",
    _binary("compare"),
)
_add(
    "neg.default rsqrt.default sqrt.default exp.default log.default cos.default sin.default "
    "tanh.default sigmoid.default silu.default gelu.default relu.default reciprocal.default "
    "erf.default abs.default",
    _unary(True),
)
_add("bitwise_and.Tensor bitwise_or.Tensor bitwise_xor.Tensor", _bitwise_tensor)
_add("bitwise_and.Scalar bitwise_or.Scalar bitwise_xor.Scalar", _bitwise_scalar)
_add("bitwise_not.default", _unary(False, bits=True))
_add("cumsum.default cumprod.default", _cumulative)
_add("all.default any.default", _whole("logical"))
_add("max.default min.default", _whole("value"))
_add("argmax.default argmin.default", _arg_reduction)
_add("where.self", _where)
_add("masked_fill.Scalar", _masked_fill_scalar)
_add("pow.Tensor_Scalar", _pow_tensor_scalar)
_add("clone.default", _clone)
_add("cat.default", _cat)
_add("mm.default", _mm(False))
_add("bmm.default", _mm(True))
_add("addmm.default", _addmm)
_add("linear.default", _linear)
_add("_softmax.default", _softmax("_softmax"))
_add("_safe_softmax.default", _softmax("_safe_softmax"))
_add("mean.dim", _reduction("mean"))
_add("sum.dim_IntList", _reduction("sum"))
_add("amax.default", _reduction("amax"))
_add("embedding.default", _embedding)
_add("scaled_dot_product_attention.default", _sdpa)
_add("full.default", _full)
_add("zeros.default ones.default", _filled)
_add("scalar_tensor.default", _scalar_tensor)
_add("arange.default", _arange(1))
_add("arange.start", _arange(2))
_add("arange.start_step", _arange(3))
_add("zeros_like.default ones_like.default", _like(1))
_add("full_like.default", _like(2))


# ---- views ---------------------------------------------------------------------------------
# A view costs no device work, only the client's metadata; but a view of a growing tensor (the
# attention mask's slice in a decode loop) has a new key every token, and without a rule each
# one cost a meta call (~100 us). These are torch's own arithmetic (at::native::slice, select,
# unsqueeze, transpose); anything unusual declines and meta decides (or reports the error).


def _view_of(args: Sequence[Any], nargs: int) -> TensorRef | None:
    if not 1 <= len(args) <= nargs or type(args[0]) is not TensorRef:
        return None
    return args[0]


def _slice(args: Sequence[Any], kwargs: dict[str, Any]) -> View | None:
    a = _view_of(args, 5)
    if a is None or kwargs:
        return None
    dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1 :])[:4]
    nd = len(a.shape)
    if nd == 0 or type(step) is not int or step <= 0:
        return None
    d = _wrap_dim(dim, nd)
    if d is None or not (start is None or type(start) is int) or not (end is None or type(end) is int):
        return None
    n = a.shape[d]
    lo = 0 if start is None else start
    hi = n if end is None else end
    if lo < 0:
        lo += n
    if hi < 0:
        hi += n
    lo = min(max(lo, 0), n)
    hi = min(max(hi, lo), n)
    shape, stride = list(a.shape), list(a.stride)
    shape[d] = (hi - lo + step - 1) // step
    stride[d] *= step
    return a.dtype, tuple(shape), tuple(stride), a.offset + lo * a.stride[d]


def _select(args: Sequence[Any], kwargs: dict[str, Any]) -> View | None:
    a = _view_of(args, 3)
    if a is None or kwargs or len(args) != 3 or type(args[2]) is not int:
        return None
    nd = len(a.shape)
    d = _wrap_dim(args[1], nd) if nd else None
    if d is None:
        return None
    n, i = a.shape[d], args[2]
    if not -n <= i < n:
        return None  # torch's index error: meta reports it
    if i < 0:
        i += n
    shape, stride = list(a.shape), list(a.stride)
    del shape[d], stride[d]
    return a.dtype, tuple(shape), tuple(stride), a.offset + i * a.stride[d]


def _unsqueeze(args: Sequence[Any], kwargs: dict[str, Any]) -> View | None:
    a = _view_of(args, 2)
    if a is None or kwargs or len(args) != 2 or type(args[1]) is not int:
        return None
    nd = len(a.shape)
    d = args[1] + nd + 1 if args[1] < 0 else args[1]
    if not 0 <= d <= nd:
        return None
    shape, stride = list(a.shape), list(a.stride)
    # torch: the new dim's stride is what a contiguous dim there would have
    stride.insert(d, 1 if d >= nd else shape[d] * stride[d])
    shape.insert(d, 1)
    return a.dtype, tuple(shape), tuple(stride), a.offset


def _transpose(args: Sequence[Any], kwargs: dict[str, Any]) -> View | None:
    a = _view_of(args, 3)
    if a is None or kwargs or len(args) != 3:
        return None
    nd = len(a.shape)
    d0, d1 = _wrap_dim(args[1], nd), _wrap_dim(args[2], nd)
    if d0 is None or d1 is None:
        return None
    if nd == 0:
        return a.dtype, a.shape, a.stride, a.offset
    shape, stride = list(a.shape), list(a.stride)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    stride[d0], stride[d1] = stride[d1], stride[d0]
    return a.dtype, tuple(shape), tuple(stride), a.offset


_VIEWS: dict[Any, Callable[[Sequence[Any], dict[str, Any]], View | None]] = {}
_add("slice.Tensor", _slice, _VIEWS)
_add("select.int", _select, _VIEWS)
_add("unsqueeze.default", _unsqueeze, _VIEWS)
_add("transpose.int", _transpose, _VIEWS)


def _sane(args: Sequence[Any], depth: int = 0) -> bool:
    """Every tensor argument has as many strides as sizes, all non-negative ints (the daemon
    decodes whatever a client sent: nonsense goes to the checks that report it)."""
    for a in args:
        if type(a) is TensorRef:
            sh, st = a.shape, a.stride
            if type(sh) is not tuple or type(st) is not tuple or len(sh) != len(st):
                return False
            for v in sh:
                if type(v) is not int or v < 0:
                    return False
            for v in st:
                if type(v) is not int or v < 0:
                    return False
            if not isinstance(a.dtype, torch.dtype):
                return False
        elif type(a) in (list, tuple):
            if depth > 2 or not _sane(a, depth + 1):
                return False
    return True


def infer(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Out | None:
    """(dtype, shape, stride) of the one fresh output of ``func`` on wire arguments, or None when
    no rule covers this call (the caller then asks the meta device)."""
    rule = _RULES.get(func)
    if rule is None or not _sane(args) or not _sane(tuple(kwargs.values())):
        return None
    try:
        return rule(args, kwargs)
    except (TypeError, ValueError, AttributeError, IndexError):
        return None  # odd arguments: meta inference reports them properly


def view(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> View | None:
    """(dtype, shape, stride, offset) of the view ``func`` makes of its first argument, on wire
    arguments, or None when no rule covers this call (the caller then asks the meta device)."""
    rule = _VIEWS.get(func)
    if rule is None or not _sane(args):
        return None
    try:
        return rule(args, kwargs)
    except (TypeError, ValueError, AttributeError, IndexError):
        return None


def covered(func: Any) -> bool:
    return func in _RULES


def view_covered(func: Any) -> bool:
    return func in _VIEWS
