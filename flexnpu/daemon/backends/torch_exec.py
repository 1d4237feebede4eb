"""Daemon-side execution of an operator launch on a torch device (cpu, cuda, npu, ...).

A launch names an aten operator and carries its arguments with ``TensorRef`` in place of tensors.
Everything in it is client-controlled, so before touching memory this module:

* checks the operator against the allow list of flexnpu.ops (``is_op_allowed``) and, for
  operators with index inputs, the range of every index tensor before the operator runs;
* builds every tensor argument as a view over a *non-owning, non-resizable* storage that spans
  exactly the referenced allocation, after checking shape/stride/offset arithmetic (in Python
  integers, so no overflow) against the allocation size. An operator therefore cannot read or
  write outside the allocation, nor resize it (``out=`` tensors of the wrong shape, ``resize_``
  and ``set_`` fail with torch's "not resizable" error instead of reallocating daemon memory);
* infers the outputs on the meta device (cached) and checks that the declared outputs match
  them *and* hold at least as many bytes as the operator's real result, so a client cannot make
  the daemon allocate more than it declared (and is charged for);
* binds each result to its fresh handle, copying whenever the result's storage overlaps an input
  or another output, whatever the operator's schema says (a non-owning view must never outlive
  the launch, and every handle owns the storage it points into).
"""

from __future__ import annotations

from typing import Any, cast
from collections.abc import Callable, Sequence

import torch
from torch.types import Storage

from flexnpu import ops
from flexnpu.ops import shape_rules
from flexnpu.errors import OpFailed
from flexnpu.protocol import TensorRef

__all__ = [
    "execute_launch",
    "LaunchPlan",
    "make_plan",
    "run_plan",
    "SizedLaunchPlan",
    "make_sized_plan",
    "prepare_sized_plan",
    "run_sized_plan",
    "is_op_allowed",
    "LaunchError",
    "build_view",
    "cached_view",
    "check_view_bounds",
]

aten = torch.ops.aten

# Largest magnitude accepted for any shape/stride/offset value: far beyond any real allocation,
# and small enough that torch's int64 arithmetic on it cannot overflow.
_MAX_DIM_VALUE = 1 << 48
_MAX_NDIM = 64


class LaunchError(ValueError):
    """A launch the backend refuses (bad op, bad view, mismatched outputs); message names the op."""


class IndexRangeError(OpFailed, LaunchError):
    """An index tensor out of range: on a device the operator would fault, so it is reported the
    way a device-side failure is (OP_FAILED; ACL: AICORE exception), but it never ran."""


def _resolve_op(op: str) -> Any:
    """Return the OpOverload for an allowed "aten::name.overload" string, or raise LaunchError."""
    return _resolve(op)[0]


def _resolve(op: str) -> tuple[Any, ops.Rule]:
    try:
        return ops.resolve(op, values=True)
    except ops.OpRefused as e:
        raise LaunchError(str(e)) from None


def _check_not_random(opov: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    try:
        ops.check_not_random(opov, args, kwargs)
    except ops.OpRefused as e:
        raise LaunchError(str(e)) from None


def is_op_allowed(op: str) -> bool:
    """True if ``op`` ("aten::name.overload") is an aten operator a client may launch (flexnpu.ops)."""
    return ops.is_allowed(op, values=True)


def check_view_bounds(ref: TensorRef, nbytes: int) -> None:
    """Raise LaunchError unless the view ``ref`` lies inside an allocation of ``nbytes`` bytes."""
    dtype = ref.dtype
    if not isinstance(dtype, torch.dtype):
        raise LaunchError(f"handle {ref.handle}: dtype must be a torch.dtype, got {type(dtype).__name__}")
    shape, stride, offset = ref.shape, ref.stride, ref.offset
    if not isinstance(shape, tuple) or not isinstance(stride, tuple):
        raise LaunchError(f"handle {ref.handle}: shape and stride must be tuples")
    if len(shape) != len(stride):
        raise LaunchError(f"handle {ref.handle}: shape {shape} and stride {stride} differ in rank")
    if len(shape) > _MAX_NDIM:
        raise LaunchError(f"handle {ref.handle}: {len(shape)} dimensions (max {_MAX_NDIM})")
    if type(offset) is not int or offset < 0 or offset > _MAX_DIM_VALUE:
        raise LaunchError(f"handle {ref.handle}: storage offset {offset!r} out of range")
    itemsize = dtype.itemsize
    numel = 1
    last = offset  # index of the last element touched, in elements
    for size, st in zip(shape, stride):
        if type(size) is not int or type(st) is not int:
            raise LaunchError(f"handle {ref.handle}: shape/stride entries must be ints")
        if size < 0 or size > _MAX_DIM_VALUE:
            raise LaunchError(f"handle {ref.handle}: size {size} out of range")
        if st < 0 or st > _MAX_DIM_VALUE:
            raise LaunchError(f"handle {ref.handle}: stride {st} not allowed (negative or too large)")
        numel *= size
        if size > 1:
            last += (size - 1) * st
    if numel == 0:
        if offset * itemsize > nbytes:
            raise LaunchError(f"handle {ref.handle}: offset {offset} beyond allocation of {nbytes} bytes")
        return
    end = (last + 1) * itemsize
    if end > nbytes:
        raise LaunchError(
            f"handle {ref.handle}: view {dtype} shape {shape} stride {stride} offset {offset} reaches "
            f"byte {end}, beyond the allocation of {nbytes} bytes"
        )


def _raw_storage(alloc: torch.Tensor, handle: int) -> Storage:
    if (
        not isinstance(alloc, torch.Tensor)
        or alloc.dtype != torch.uint8
        or alloc.dim() != 1
        or not alloc.is_contiguous()
    ):
        raise LaunchError(f"handle {handle}: backend storage must be a contiguous 1-D uint8 tensor")
    # Non-owning and non-resizable, spanning exactly this allocation: as_strided tricks inside an
    # operator see only these bytes, and resize attempts fail instead of reallocating.
    return torch._C._construct_storage_from_data_pointer(alloc.data_ptr(), alloc.device, alloc.numel())


def build_view(ref: TensorRef, alloc: torch.Tensor) -> torch.Tensor:
    """A tensor viewing ``alloc`` (uint8 storage of the allocation) as ``ref`` says, bounds-checked."""
    check_view_bounds(ref, alloc.numel())
    return _base(alloc, ref.dtype, ref.handle).as_strided(ref.shape, ref.stride, ref.offset)


# One flat tensor of each dtype over each allocation (its raw storage, _raw_storage), keyed like
# the view cache below by pointer and size: a view is then one as_strided of it (~3 us), not a
# storage and a set_ (~8 us). as_strided checks the view against that storage too.
_BASES_MAX = 1024
_bases: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def _base(alloc: torch.Tensor, dtype: torch.dtype, handle: int) -> torch.Tensor:
    ptr, nbytes = alloc.data_ptr(), alloc.numel()
    key = (ptr, nbytes, dtype)
    b = _bases.get(key)
    if b is None or alloc.dtype is not torch.uint8:
        st = _raw_storage(alloc, handle)  # (checks what an allocation must be: raises if not)
        if dtype.itemsize != 1 and ptr % dtype.itemsize:
            raise LaunchError(f"handle {handle}: allocation not aligned for {dtype}")
        b = torch.empty(0, dtype=dtype, device=alloc.device).set_(st, 0, (nbytes // dtype.itemsize,), (1,))
        if len(_bases) >= _BASES_MAX:
            _bases.clear()
        _bases[key] = b
    return b


# Views of allocations, keyed by (data pointer, allocation size, layout). A view is only a pointer
# plus layout, so any live allocation with that pointer and size yields the same view: reusing it
# is sound as long as the key comes from the allocation the client's handle resolves to now, and
# no operator changes a cached view's metadata (in-place view ops are denied; mutable arguments,
# whose metadata out= may change, always get a fresh view).
_VIEW_CACHE_MAX = 4096
_view_cache: dict[tuple[Any, ...], torch.Tensor] = {}


def cached_view(ref: TensorRef, alloc: torch.Tensor) -> torch.Tensor:
    """build_view, cached: for arguments whose metadata the operator does not change."""
    key = (alloc.data_ptr(), alloc.numel(), ref.dtype, ref.shape, ref.stride, ref.offset, alloc.device)
    try:
        return _keyed_view(key, ref, alloc)
    except TypeError:  # unhashable junk in the ref: let build_view produce the proper error
        return build_view(ref, alloc)


def _keyed_view(key: Any, ref: TensorRef, alloc: torch.Tensor) -> torch.Tensor:
    """The cached view under `key` (pointer, size and layout of `ref` over `alloc`), built and
    kept on first use."""
    v = _view_cache.get(key)
    if v is None:
        v = build_view(ref, alloc)
        keep_view(key, v)
    return v


# For callers that build their own keys (optable's plans); the dict is cleared, never rebound.
lookup_view = _view_cache.get


def keep_view(key: Any, v: torch.Tensor) -> None:
    if len(_view_cache) >= _VIEW_CACHE_MAX:
        _view_cache.clear()
    _view_cache[key] = v


_mutable_cache: dict[Any, tuple[frozenset[int], frozenset[str]]] = {}


def _mutable_args(opov: Any) -> tuple[frozenset[int], frozenset[str]]:
    """(positions, names) of the arguments the op writes to."""
    m = _mutable_cache.get(opov)
    if m is None:
        args = opov._schema.arguments
        w = [(i, a.name) for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
        m = _mutable_cache[opov] = (frozenset(i for i, _ in w), frozenset(n for _, n in w))
    return m


class _Ctx:
    __slots__ = ("device", "resolve", "allocs", "in_ptrs")

    def __init__(self, device: torch.device, resolve: Callable[[int], torch.Tensor]) -> None:
        self.device = device
        self.resolve = resolve
        self.allocs: dict[int, torch.Tensor] = {}
        self.in_ptrs: list[tuple[int, int]] = []

    def alloc(self, handle: int) -> torch.Tensor:
        a = self.allocs.get(handle)
        if a is None:
            if type(handle) is not int or handle <= 0:
                raise LaunchError(f"invalid handle {handle!r}")
            a = self.resolve(handle)
            self.allocs[handle] = a
            self.in_ptrs.append((a.data_ptr(), a.data_ptr() + a.numel()))
        return a

    def convert(self, x: Any, depth: int = 0, fresh: bool = True) -> Any:
        if isinstance(x, TensorRef):
            a = self.alloc(x.handle)
            return build_view(x, a) if fresh else cached_view(x, a)
        if x is None or isinstance(
            x, (bool, int, float, complex, str, torch.dtype, torch.layout, torch.memory_format)
        ):
            return x
        if isinstance(x, torch.device):
            return self.device  # the client's "npu" is whatever device this backend runs
        if isinstance(x, (list, tuple)):
            if depth > 4 or len(x) > 100000:
                raise LaunchError("argument nesting too deep or too long")
            out = [self.convert(v, depth + 1, fresh) for v in x]
            return out if isinstance(x, list) else tuple(out)
        raise LaunchError(f"unsupported argument type {type(x).__name__}")


def _flatten_tensors(r: Any, out: list[torch.Tensor]) -> None:
    if isinstance(r, torch.Tensor):
        out.append(r)
    elif isinstance(r, (list, tuple)):
        for v in r:
            _flatten_tensors(v, out)


# ---- meta validation -------------------------------------------------------------------------
_META_CACHE_MAX = 8192
# (dtype, shape, bytes) of each tensor an op returns
_OutputMeta = tuple[torch.dtype, tuple[int, ...], int]
_meta_cache: dict[tuple[Any, ...], tuple[_OutputMeta, ...] | Exception] = {}


_SCALARS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    torch.dtype,
    torch.layout,
    torch.memory_format,
    torch.device,
)


def _meta_key(x: Any, depth: int = 0) -> Any:
    if isinstance(x, TensorRef):
        if not (isinstance(x.shape, tuple) and isinstance(x.stride, tuple)):
            raise LaunchError(f"handle {x.handle}: shape and stride must be tuples")
        return ("T", x.dtype, x.shape, x.stride, x.offset)
    if isinstance(x, (list, tuple)):
        if depth > 4 or len(x) > 100000:
            raise LaunchError("argument nesting too deep or too long")
        return (type(x).__name__,) + tuple(_meta_key(v, depth + 1) for v in x)
    if type(x) not in _SCALARS:
        raise LaunchError(f"unsupported argument type {type(x).__name__}")
    return (type(x).__name__, x)


def _to_meta(x: Any) -> Any:
    if isinstance(x, TensorRef):
        numel_needed = x.offset + 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride) if s > 0)
        if any(s == 0 for s in x.shape):
            numel_needed = x.offset
        base = torch.empty(numel_needed, dtype=x.dtype, device="meta")
        return base.as_strided(x.shape, x.stride, x.offset)
    if isinstance(x, torch.device):
        return torch.device("meta")
    if isinstance(x, list):
        return [_to_meta(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_to_meta(v) for v in x)
    return x


def _launch_key(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Everything but the handles: what the outputs' metadata can depend on."""
    parts: list[Any] = [op]
    for a in args:
        tp = type(a)
        if tp is TensorRef and type(a.shape) is tuple and type(a.stride) is tuple:
            parts.append((a.dtype, a.shape, a.stride, a.offset))
        elif tp is int or tp is float or tp is bool:
            parts.append(tp)
            parts.append(a)
        else:
            parts.append(_meta_key(a))
    if kwargs:
        for k in sorted(kwargs):
            parts.append(k)
            parts.append(_meta_key(kwargs[k]))
    return tuple(parts)


_device_pos: dict[Any, int | None] = {}


def _device_arg(opov: Any) -> int | None:
    """Position of the op's ``device`` argument (factories), None if it has none."""
    if opov not in _device_pos:
        names = [a.name for a in opov._schema.arguments]
        _device_pos[opov] = names.index("device") if "device" in names else None
    return _device_pos[opov]


def _extent(t: torch.Tensor) -> int:
    """Bytes from the first to the last element of ``t`` (what the operator materialises when
    the result is fresh; a result aliasing an input is copied into the declared layout)."""
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 1)
    return (last + 1) * t.dtype.itemsize


def _expected_outputs(
    op: str, opov: Any, args: Sequence[Any], kwargs: dict[str, Any], key: tuple[Any, ...]
) -> tuple[_OutputMeta, ...]:
    """(dtype, shape, bytes) of each tensor the op returns (cached): by the daemon's own
    size-generic rule where flexnpu.shape_rules has one, else from meta inference."""
    hit = _meta_cache.get(key)
    if hit is None:
        ruled = shape_rules.infer(opov, args, kwargs)
        if ruled is not None:
            dt, sh, _ = ruled
            n = 1
            for v in sh:
                n *= v
            hit = ((dt, sh, n * dt.itemsize),)  # rules give contiguous outputs: extent = size
        else:
            hit = _meta_outputs(op, opov, args, kwargs)
        if len(_meta_cache) >= _META_CACHE_MAX:
            _meta_cache.clear()
        _meta_cache[key] = hit
    if isinstance(hit, Exception):
        raise LaunchError(str(hit))
    return hit


def _meta_outputs(
    op: str, opov: Any, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[_OutputMeta, ...] | Exception:
    try:
        mkw = {k: _to_meta(v) for k, v in kwargs.items()}
        dpos = _device_arg(opov)
        if dpos is not None and dpos >= len(args) and "device" not in mkw:
            mkw["device"] = torch.device("meta")  # a factory: infer it on meta, not in host RAM
        r = opov(*_to_meta(args), **mkw)
        flat: list[torch.Tensor] = []
        _flatten_tensors(r, flat)
        return tuple((t.dtype, tuple(t.shape), _extent(t)) for t in flat)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot validate"
        return LaunchError(
            f"{op}: cannot infer the outputs of this launch ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        )


# (launch key, declared output layouts) pairs already validated: skips re-checking on repeats.
_validated: set[tuple[Any, ...]] = set()


def _validate_outputs(
    op: str, opov: Any, args: Sequence[Any], kwargs: dict[str, Any], outputs: Sequence[Any]
) -> None:
    key = _launch_key(op, args, kwargs)
    try:
        sig = (key, tuple((nb, r.dtype, r.shape, r.stride, r.offset) for nb, r in outputs))
        if sig in _validated:
            return
    except (TypeError, ValueError, AttributeError):
        sig = None  # malformed outputs: the full check below reports them
    _check_outputs(op, outputs, _expected_outputs(op, opov, args, kwargs, key))
    if sig is not None:
        if len(_validated) >= _META_CACHE_MAX:
            _validated.clear()
        _validated.add(sig)


_fresh_cache: dict[Any, bool] = {}


def _returns_fresh(opov: Any) -> bool:
    """True if the op returns at least one tensor that is not an alias of an input."""
    r = _fresh_cache.get(opov)
    if r is None:
        r = any(ret.alias_info is None and "Tensor" in str(ret.type) for ret in opov._schema.returns)
        _fresh_cache[opov] = r
    return r


def _check_outputs(op: str, outputs: Sequence[Any], expected: tuple[_OutputMeta, ...]) -> None:
    if len(outputs) != len(expected):
        raise LaunchError(f"{op}: {len(outputs)} outputs declared, the op returns {len(expected)} tensors")
    for i, (item, (dtype, shape, need)) in enumerate(zip(outputs, expected)):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise LaunchError(f"{op}: output {i} must be (nbytes, TensorRef)")
        nbytes, ref = item
        if type(nbytes) is not int or nbytes < 0 or not isinstance(ref, TensorRef):
            raise LaunchError(f"{op}: output {i} must be (nbytes >= 0, TensorRef)")
        if ref.dtype != dtype or tuple(ref.shape) != shape:
            raise LaunchError(
                f"{op}: output {i} declared {ref.dtype} {tuple(ref.shape)} but the op returns {dtype} {shape}"
            )
        check_view_bounds(ref, nbytes)
        # The operator materialises its result at its own layout before it is bound: the client
        # pays for that, not for a declared layout that folds it into a few bytes (stride 0).
        if need > nbytes:
            raise LaunchError(
                f"{op}: output {i} declared with {nbytes} bytes but the op's result "
                f"{dtype} {shape} takes {need} bytes"
            )
        if any(sz > 1 and st == 0 for sz, st in zip(ref.shape, ref.stride)):
            raise LaunchError(
                f"{op}: output {i} declared with a zero stride {tuple(ref.stride)}: outputs "
                "must not overlap themselves"
            )


def execute_launch(
    device: torch.device,
    op: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    outputs: Sequence[Any],
    resolve: Callable[[int], torch.Tensor],
    allocate: Callable[[int], torch.Tensor],
) -> list[tuple[int, torch.Tensor]]:
    """Run one launch; return ``[(handle, uint8_storage_tensor)]`` to bind, one per output.

    ``resolve(handle)`` gives the contiguous 1-D uint8 tensor of an allocation the client owns
    (and raises otherwise); ``allocate(nbytes)`` gives a fresh one. Raises LaunchError (a
    ValueError) for anything the client got wrong; errors raised by the operator itself propagate
    unchanged (RuntimeError etc.), their message names the op via the caller.
    """
    opov, rule = _resolve(op)
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise LaunchError(f"{op}: args must be a tuple and kwargs a dict")
    if any(not isinstance(k, str) for k in kwargs):
        raise LaunchError(f"{op}: keyword names must be strings")
    if not isinstance(outputs, (tuple, list)):
        raise LaunchError(f"{op}: outputs must be a list")
    _check_not_random(opov, args, kwargs)
    if _returns_fresh(opov):
        _validate_outputs(op, opov, tuple(args), kwargs, outputs)
    elif outputs:
        raise LaunchError(f"{op}: returns only its (mutated or viewed) inputs; launch it with outputs=[]")
    else:
        for v in kwargs.values():  # types are validated while converting; keys checked above
            _meta_key(v)

    ctx = _Ctx(device, resolve)
    mpos, mnames = _mutable_args(opov)
    cargs = tuple([ctx.convert(a, 1, i in mpos) for i, a in enumerate(args)])
    ckwargs = {k: ctx.convert(v, 1, k in mnames) for k, v in kwargs.items()}
    if opov._opname in ops.UNINITIALIZED:
        # torch would hand out whatever the daemon's heap held: a zeroed allocation instead
        return [(ref.handle, _fresh(op, nbytes, allocate)) for nbytes, ref in outputs]
    if rule.kind == ops.INDEXED:
        validate_indices(op, opov, rule, cargs, ckwargs)
    result = opov(*cargs, **ckwargs)
    if not outputs:
        return []
    flat: list[torch.Tensor] = []
    _flatten_tensors(result, flat)
    bound: list[tuple[int, torch.Tensor]] = []
    for (nbytes, ref), r in zip(outputs, flat):
        buf = cast(torch.Tensor, _bind(op, ctx.device, ctx.in_ptrs, nbytes, ref, r, allocate)[0])
        ctx.in_ptrs.append((buf.data_ptr(), buf.data_ptr() + buf.numel()))  # outputs must not share
        bound.append((ref.handle, buf))
    return bound


def validate_indices(
    op: str, opov: Any, rule: ops.Rule, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse the launch unless every index tensor is in range (before anything runs)."""
    try:
        ops.check_indices(rule, opov, args, kwargs)
    except (IndexError, KeyError, TypeError, RuntimeError) as e:
        raise IndexRangeError(f"{op}: {e}") from None


def _fresh(op: str, nbytes: int, allocate: Callable[[int], torch.Tensor]) -> torch.Tensor:
    buf = allocate(nbytes)
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.numel() < nbytes:
        raise LaunchError(f"{op}: backend allocator returned an unusable buffer")
    return buf


def same_strides(shape: Any, a: Any, b: Any) -> bool:
    """Do strides a and b lay out `shape` alike? A dimension of size 1 is never stepped along,
    so its stride is free (operators leave all sorts there)."""
    if len(a) != len(b):
        return False
    return all(x == y or n == 1 for n, x, y in zip(shape, a, b))


def is_dense(t: torch.Tensor) -> bool:
    """Every element of the span from its first to its last element is one element of ``t``."""
    if t.is_contiguous():
        return True
    expected = 1
    for st, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if st != expected:
            return False
        expected *= size
    return True


def _overlaps(ptr: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    for lo, hi in ranges:  # a plain loop: a generator per bound output cost more than the test
        if ptr < hi and lo < end:
            return True
    return False


def _bind(
    op: str,
    device: torch.device,
    in_ptrs: list[tuple[int, int]],
    nbytes: int,
    ref: TensorRef,
    r: torch.Tensor,
    allocate: Callable[[int], torch.Tensor],
    pending: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The buffer to bind for result ``r`` of a declared output, and a tensor over it with the
    declared layout (``r`` itself when its storage is bound as is). With ``pending``, a result
    whose storage is bound as is comes back as (None, r): the caller keeps r as the allocation's
    pending result (Alloc.set_result) and its byte buffer is made only if something needs it
    (a planned launch reads r itself as its view; wrapping the storage costs 3 us a launch)."""
    if r.device != device:
        raise LaunchError(f"{op}: result on {r.device}, expected {device}")
    st = r.untyped_storage()
    ptr = st.data_ptr()
    size = st.nbytes()
    # The storage is bound as the handle's own only if the operator made it: it overlaps no input
    # (whatever the schema says about aliasing) and no other output, and the result covers it
    # densely (no bytes the operator left unwritten). Anything else is copied into a fresh,
    # zeroed allocation.
    aliases = _overlaps(ptr, ptr + size, in_ptrs) if size else False
    if (
        not aliases
        and size == nbytes
        and tuple(r.stride()) == tuple(ref.stride)
        and r.storage_offset() == ref.offset
        and r.dtype == ref.dtype
        and r.numel() * r.dtype.itemsize == nbytes
        and is_dense(r)
    ):
        if pending:
            return None, r
        return torch.empty(0, dtype=torch.uint8, device=device).set_(st), r
    buf = _fresh(op, nbytes, allocate)
    view = build_view(ref, buf)
    view.copy_(r)
    return buf, view


# ---- launch plans ------------------------------------------------------------------------------
# A plan is everything about a launch that does not depend on which allocations it names: the
# operator, its arguments with each tensor replaced by a slot (the k-th handle of the payload,
# protocol.split_launch), the outputs' layouts, all validated once (allow list, argument types,
# output metadata against the operator's own inference). The daemon keys plans on the payload's
# structure (handles zeroed), so a launch whose structure it has seen costs a dict lookup plus
# what truly depends on the handles: resolving them, bounds-checking each view against its
# allocation (cached_view: a view is checked when first built for a pointer, size and layout),
# index ranges, running the operator and binding its results.


class _Slot:
    __slots__ = ("k", "ref", "mutable", "key")

    def __init__(self, k: int, ref: TensorRef, mutable: bool) -> None:
        self.k, self.ref, self.mutable = k, ref, mutable
        self.key = layout_key(ref)


def layout_key(ref: TensorRef) -> tuple[Any, ...]:
    """What a view's layout is made of (Alloc.view keeps it next to its tensor)."""
    return (ref.dtype, ref.shape, ref.stride, ref.offset)


class LaunchPlan:
    __slots__ = (
        "op",
        "opov",
        "rule",
        "args",
        "kwargs",
        "flat",
        "n_in",
        "outputs",
        "out_keys",
        "values",
        "cost",
        "uninit",
        "slots",
        "static",
        "arg_at",
        "kw_static",
        "kw_at",
        "call",
        "indexed",
        "cx",
    )

    def __init__(self, op: str, opov: Any, rule: ops.Rule) -> None:
        self.op, self.opov, self.rule = op, opov, rule
        self.args: list[Any] = []
        self.kwargs: dict[str, Any] = {}
        self.flat = True  # no tensor inside a list argument: args fill by position
        self.n_in = 0  # input tensor slots; the outputs' handles follow them in the payload
        self.outputs: list[tuple[int, TensorRef]] = []
        self.out_keys: list[tuple[Any, ...]] = []  # layout_key of each output
        self.values = 0  # what holding one of its commands costs (session.held_bytes)
        self.cost: Any = None  # the scheduler's cost of one launch (the same for every launch of it)
        self.uninit = opov._opname in ops.UNINITIALIZED
        # What run_plan needs in the order it needs it (_finish): every slot in payload order;
        # for flat plans the arguments with None where a slot goes, and where each slot goes.
        self.slots: list[_Slot] = []
        self.static: list[Any] = []
        self.arg_at: tuple[tuple[int, int], ...] = ()
        self.kw_static: dict[str, Any] = {}
        self.kw_at: tuple[tuple[str, int], ...] = ()
        self.call = opov._op  # OpOverload.__call__ is exactly this call, one Python frame more
        self.indexed = rule.kind == ops.INDEXED
        # the compiled executor of this plan (atenexec.cpp): None until its first launch decides
        # (_record), False where it has none (index ranges to check, uninitialized outputs)
        self.cx: Any = False if self.indexed or self.uninit else None

    def _finish(self) -> None:
        found: list[_Slot] = []
        _collect_slots(self.args, found)
        _collect_slots(list(self.kwargs.values()), found)
        self.slots = sorted(found, key=lambda sl: sl.k)
        if [sl.k for sl in self.slots] != list(range(self.n_in)):
            raise _NoPlan  # every handle of the payload has exactly one slot
        if self.flat:
            self.static = [None if type(a) is _Slot else a for a in self.args]
            self.arg_at = tuple((i, a.k) for i, a in enumerate(self.args) if type(a) is _Slot)
            self.kw_static = {k: v for k, v in self.kwargs.items() if type(v) is not _Slot}
            self.kw_at = tuple((k, v.k) for k, v in self.kwargs.items() if type(v) is _Slot)


class _NoPlan(Exception):
    pass


def make_plan(device: torch.device, launch: Any) -> LaunchPlan | None:
    """The plan of a decoded launch, or None if it has none (the generic path then runs it, and
    reports whatever is wrong with it): validation errors are never raised from here."""
    op, args, kwargs, outputs = launch.op, launch.args, launch.kwargs, launch.outputs
    try:
        opov, rule = _resolve(op)
        _check_not_random(opov, args, kwargs)  # the values are part of the structure
        if _returns_fresh(opov):
            _validate_outputs(op, opov, tuple(args), kwargs, outputs)
        elif outputs:
            return None
        plan = LaunchPlan(op, opov, rule)
        mpos, mnames = _mutable_args(opov)
        k = 0

        def tpl(x: Any, depth: int, mutable: bool) -> Any:
            nonlocal k
            if type(x) is TensorRef:
                check_view_bounds(x, _MAX_DIM_VALUE)  # well-formed; sizes are checked per launch
                k += 1
                if depth > 1:
                    plan.flat = False
                return _Slot(k - 1, x, mutable)
            if x is None or type(x) in _SCALARS:
                return device if isinstance(x, torch.device) else x
            if type(x) is list or type(x) is tuple:
                if depth > 4:
                    raise _NoPlan
                out = [tpl(v, depth + 1, mutable) for v in x]
                return out if type(x) is list else tuple(out)
            raise _NoPlan

        plan.args = [tpl(a, 1, i in mpos) for i, a in enumerate(args)]
        plan.kwargs = {kk: tpl(v, 1, kk in mnames) for kk, v in kwargs.items()}
        if any(type(v) is not _Slot and has_slot(v) for v in plan.kwargs.values()):
            plan.flat = False
        plan.n_in = k
        plan.outputs = list(outputs)
        plan.out_keys = [layout_key(r) for _, r in outputs]
        plan.values = launch.values
        plan._finish()
        return plan
    except (LaunchError, _NoPlan, TypeError, ValueError, AttributeError):
        return None


def _collect_slots(x: Any, out: list[_Slot]) -> None:
    for v in x:
        if type(v) is _Slot:
            out.append(v)
        elif type(v) is list or type(v) is tuple:
            _collect_slots(v, out)


def has_slot(x: Any, slot: type = _Slot) -> bool:
    """Whether a plan's argument template (lists, tuples, dicts) holds a tensor slot."""
    if type(x) is slot:
        return True
    if type(x) is list or type(x) is tuple:
        return any(has_slot(v, slot) for v in x)
    if type(x) is dict:
        return any(has_slot(v, slot) for v in x.values())
    return False


def fill_slots(x: Any, views: list[torch.Tensor], slot: type = _Slot) -> Any:
    """A plan's argument template with each slot replaced by its view (views[slot.k])."""
    if type(x) is slot:
        return views[x.k]  # type: ignore[attr-defined]  # a slot type: it has k
    if type(x) is list:
        return [fill_slots(v, views, slot) for v in x]
    if type(x) is tuple:
        return tuple(fill_slots(v, views, slot) for v in x)
    if type(x) is dict:
        return {k: fill_slots(v, views, slot) for k, v in x.items()}
    return x


def _slot_view(sl: _Slot, buf: torch.Tensor, handles: Sequence[int]) -> torch.Tensor:
    """The view of slot `sl` over `buf`, bounds-checked (cached unless the operator writes it)."""
    try:
        if sl.mutable:
            return build_view(sl.ref, buf)
        return _keyed_view((buf.data_ptr(), buf.numel(), sl.key), sl.ref, buf)
    except LaunchError:
        # the message names the handle of this launch, not the plan's first one
        ref = sl.ref
        build_view(TensorRef(handles[sl.k], ref.dtype, ref.shape, ref.stride, ref.offset), buf)
        raise


def run_plan(
    device: torch.device,
    plan: LaunchPlan,
    bufs: Sequence[torch.Tensor],
    handles: Sequence[int],
    allocate: Callable[[int], torch.Tensor],
    hints: Sequence[Any],
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """Run one launch of ``plan``: ``bufs[k]`` is the allocation of its k-th input slot (named by
    ``handles[k]``), ``hints[k]`` its Alloc.view. Returns, for each declared output in order,
    the buffer to bind and a tensor over it in the declared layout (for Alloc.view); buffer None:
    the tensor is the allocation's pending result (_bind). An input's buffer may itself be a
    pending result if its slot reads it through its hint (handlers/launch.py _run_now)."""
    # (bufs are the backend's own allocations; a view built over one checks it: _raw_storage)
    # The hot path of eager decoding: per launch, only what depends on its handles.
    cx = plan.cx
    if cx:
        r = cx.run(bufs, hints)  # None: nothing ran, this path runs it (with every check)
        if r is not None:
            if type(r) is list:
                return r  # every result bound as declared, pending
            return _bind_results(plan, device, bufs, r, allocate)
    elif cx is None and device.type == "cpu":
        recorded = _record(plan, bufs, handles, hints)
        if recorded is not None:
            return _bind_results(plan, device, bufs, recorded[0], allocate)
    views: list[Any] = [None] * plan.n_in
    for sl in plan.slots:
        k = sl.k
        buf = bufs[k]
        if not sl.mutable:
            h = hints[k]
            # the producer's own result over this very buffer, in the layout asked for
            if h is not None and h[0] is buf and h[1] == sl.key:
                views[k] = h[2]
                continue
        views[k] = _slot_view(sl, buf, handles)
    if plan.uninit:
        out: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        for nbytes, ref in plan.outputs:
            b = _fresh(plan.op, nbytes, allocate)
            out.append((b, build_view(ref, b)))
        return out
    if plan.flat:
        args = plan.static.copy()
        for i, k in plan.arg_at:
            args[i] = views[k]
        kwargs = plan.kw_static
        if plan.kw_at:
            kwargs = dict(kwargs)
            for name, k in plan.kw_at:
                kwargs[name] = views[k]
    else:
        args = fill_slots(plan.args, views)
        kwargs = {k: fill_slots(v, views) for k, v in plan.kwargs.items()}
    if plan.indexed:
        validate_indices(plan.op, plan.opov, plan.rule, tuple(args), kwargs)
    result = plan.call(*args, **kwargs)
    return _bind_results(plan, device, bufs, result, allocate)


# ---- plans without sizes ------------------------------------------------------------------------
# A decode loop's growing tensors (the KV cache's cat, attention, masks) have a new shape every
# token: their exact structure never repeats, so each took the generic path (decode, meta
# inference, output checks, a plan made for nothing): ~10 launches a token at several times a
# planned launch's cost. A SizedLaunchPlan is the plan of the structure with every tensor's
# sizes, strides and offset and every output's byte count left out (protocol launch_split mode
# 3). Each launch brings those; before anything runs, the daemon's own size-generic shape rule
# (flexnpu.ops.shape_rules, so only operators it covers, with one fresh output) predicts the
# output and the declared one is checked against it exactly as the generic path checks it, and
# every view is bounds-checked as it is built. Anything the rule declines takes the generic path.


class SizedLaunchPlan:
    __slots__ = ("plan", "op", "dtypes", "n_in", "cx")

    def __init__(self, plan: LaunchPlan) -> None:
        self.plan = plan
        self.op = plan.op
        self.n_in = plan.n_in
        # the compiled executor (atenexec.cpp AtenExec.run_sized) of its launches after the
        # first, recorded at that one; None: not recorded yet; False: none (Python runs them)
        self.cx: Any = None
        # every tensor's dtype, in payload order (the launch ceilings' byte count: check_sized)
        self.dtypes = [sl.ref.dtype for sl in plan.slots] + [r.dtype for _, r in plan.outputs]


def make_sized_plan(device: torch.device, launch: Any) -> SizedLaunchPlan | None:
    """The plan of `launch`'s structure without sizes, or None (the generic path runs it)."""
    try:
        opov, _ = _resolve(launch.op)
    except (LaunchError, TypeError, ValueError, AttributeError):
        return None
    if not shape_rules.covered(opov) or len(launch.outputs) != 1:
        return None
    plan = make_plan(device, launch)
    if plan is None or plan.indexed or plan.uninit or len(plan.outputs) != 1:
        return None
    plan.cx = False  # the compiled executor repeats one exact call
    return SizedLaunchPlan(plan)


def prepare_sized_plan(
    sp: SizedLaunchPlan,
    handles: Sequence[int],
    offsets: Sequence[int],
    dims: Sequence[tuple[Any, Any]],
    out_nbytes: Sequence[int],
) -> tuple[list[TensorRef], list[tuple[int, TensorRef]]] | None:
    """This launch's input and output layouts, its declared output checked against the shape
    rule's prediction (_check_outputs, as for a generic launch); None if the rule declines or
    disagrees (the generic path then runs the launch and reports what is wrong)."""
    plan = sp.plan
    n = plan.n_in
    if len(handles) != n + 1 or len(dims) != n + 1 or len(out_nbytes) != 1:
        return None
    refs = [
        TensorRef(handles[k], sl.ref.dtype, dims[k][0], dims[k][1], offsets[k])
        for k, sl in enumerate(plan.slots)
    ]
    out = TensorRef(handles[n], plan.outputs[0][1].dtype, dims[n][0], dims[n][1], offsets[n])
    outputs = [(out_nbytes[0], out)]
    # What is checked below depends on the plan and the layouts only, not on the handles: a
    # decode step repeats each layout once per layer (every layer's key and value caches grow
    # alike), and only the first of them needs the rule.
    key = (sp, offsets, dims, out_nbytes)
    if key in _sized_checked:
        return refs, outputs
    try:
        wire = cast("list[torch.Tensor]", refs)  # fill_slots puts whatever stands for a slot
        ruled = shape_rules.infer(
            plan.opov, fill_slots(plan.args, wire), {k: fill_slots(v, wire) for k, v in plan.kwargs.items()}
        )
        if ruled is None:
            return None
        dt, sh, _ = ruled
        need = dt.itemsize
        for v in sh:
            need *= v
        _check_outputs(plan.op, outputs, ((dt, tuple(sh), need),))
    except (LaunchError, TypeError, ValueError, AttributeError, IndexError):
        return None
    if len(_sized_checked) >= _SIZED_CHECKED_MAX:
        _sized_checked.clear()
    _sized_checked.add(key)
    return refs, outputs


# (plan, offsets, dims, output bytes) of the sized launches prepare_sized_plan passed
_SIZED_CHECKED_MAX = 4096
_sized_checked: set[tuple[Any, ...]] = set()


def run_sized_plan(
    device: torch.device,
    sp: SizedLaunchPlan,
    bufs: Sequence[torch.Tensor],
    refs: Sequence[TensorRef],
    outputs: Sequence[tuple[int, TensorRef]],
    allocate: Callable[[int], torch.Tensor],
    hints: Sequence[Any] | None = None,
) -> tuple[list[tuple[torch.Tensor | None, torch.Tensor]], list[tuple[Any, ...]]]:
    """Run one launch of a plan without sizes, on its layouts from prepare_sized_plan: the
    bound results as run_plan returns them, and each output's layout_key. ``hints[k]``: input
    k's Alloc.view, used as run_plan uses it (the producer's own result over this very buffer,
    in this very layout, needs no new view; ``bufs[k]`` may then be that pending result)."""
    plan = sp.plan
    nbytes, ref = outputs[0]
    cx = sp.cx
    result: Any = _NOT_RUN
    if cx:
        r = cx.run_sized(bufs, hints if hints is not None else [None] * len(bufs), refs, ref, nbytes)
        if r is not None:  # (None: nothing ran, this path runs it with every check)
            if type(r) is list:
                return r, [layout_key(ref)]  # bound as declared, pending
            result = r[0] if len(r) == 1 else r  # Python checks and binds it, below
    elif cx is None and device.type == "cpu":
        recorded = _record_sized(sp, bufs, refs, outputs, hints)
        if recorded is not None:
            result = recorded[0]
    if result is _NOT_RUN:
        views = _sized_views(plan, bufs, refs, hints)
        args = fill_slots(plan.args, views)
        kwargs = {k: fill_slots(v, views) for k, v in plan.kwargs.items()}
        result = plan.call(*args, **kwargs)
    if not isinstance(result, torch.Tensor) or tuple(result.shape) != ref.shape or result.dtype != ref.dtype:
        got = (
            f"{result.dtype} {tuple(result.shape)}"
            if isinstance(result, torch.Tensor)
            else type(result).__name__
        )
        raise LaunchError(f"{plan.op}: output 0 declared {ref.dtype} {ref.shape} but the op returned {got}")
    in_ptrs = [(p, p + b.nbytes) for b in bufs for p in (b.data_ptr(),)]
    return [_bind(plan.op, device, in_ptrs, nbytes, ref, result, allocate, True)], [layout_key(ref)]


_NOT_RUN = object()


def _sized_views(
    plan: LaunchPlan,
    bufs: Sequence[torch.Tensor],
    refs: Sequence[TensorRef],
    hints: Sequence[Any] | None,
    alias: bool = False,
) -> list[torch.Tensor]:
    """A sized launch's input views: the producer's own result where ``hints`` name it in this
    very layout (checked when its output was declared; with ``alias``, an alias of it of its
    own, as _record needs), else a bounds-checked view."""
    if hints is None:
        return [build_view(ref, buf) for ref, buf in zip(refs, bufs)]
    views = []
    for ref, buf, h, sl in zip(refs, bufs, hints, plan.slots):
        if (
            h is not None
            and h[0] is buf
            and not sl.mutable
            and h[1] == (ref.dtype, ref.shape, ref.stride, ref.offset)  # layout_key(ref)
        ):
            v = h[2]
            views.append(v.as_strided(v.shape, v.stride(), v.storage_offset()) if alias else v)
        else:
            views.append(build_view(ref, buf))
    return views


def _record_sized(
    sp: SizedLaunchPlan,
    bufs: Sequence[torch.Tensor],
    refs: Sequence[TensorRef],
    outputs: Sequence[tuple[int, TensorRef]],
    hints: Sequence[Any] | None,
) -> tuple[Any] | None:
    """_record for a plan without sizes: its first launch, recorded; sets sp.cx (run_sized
    repeats the call with each later launch's layouts). Returns (the operator's result,), or
    None (nothing ran)."""
    from .. import compiled

    m = compiled.module()
    if m is None:
        sp.cx = False
        return None
    plan = sp.plan
    views = _sized_views(plan, bufs, refs, hints, alias=True)
    args = fill_slots(plan.args, views)
    kwargs = {k: fill_slots(v, views) for k, v in plan.kwargs.items()}
    call = plan.call
    slots = [
        (ref.dtype, list(ref.shape), list(ref.stride), ref.offset, sl.mutable, layout_key(ref))
        for ref, sl in zip(refs, plan.slots)
    ]
    outs = [(nbytes, ref.dtype, list(ref.stride), ref.offset) for nbytes, ref in outputs]
    result, cx = m.record_aten(lambda: call(*args, **kwargs), views, slots, outs)
    sp.cx = cx if cx is not None else False
    return (result,)


def _bind_results(
    plan: LaunchPlan,
    device: torch.device,
    bufs: Sequence[torch.Tensor],
    result: Any,
    allocate: Callable[[int], torch.Tensor],
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """run_plan's binding of the operator's result (a tensor, or a tuple or list of them)."""
    if not plan.outputs:
        return []
    # (an input's buffer may be a pending result, not bytes: nbytes covers both, see _bind)
    in_ptrs = [(p, p + b.nbytes) for b in bufs for p in (b.data_ptr(),)]
    if type(result) is torch.Tensor or isinstance(result, torch.Tensor):
        if len(plan.outputs) == 1:
            nbytes, ref = plan.outputs[0]
            return [_bind(plan.op, device, in_ptrs, nbytes, ref, result, allocate, True)]
        flat: list[torch.Tensor] = [result]
    else:
        flat = []
        _flatten_tensors(result, flat)
    bound: list[tuple[torch.Tensor | None, torch.Tensor]] = []
    for (nbytes, ref), r in zip(plan.outputs, flat):
        ob, view = _bind(plan.op, device, in_ptrs, nbytes, ref, r, allocate, True)
        b = view if ob is None else ob
        in_ptrs.append((b.data_ptr(), b.data_ptr() + b.nbytes))  # outputs must not share
        bound.append((ob, view))
    return bound


def _record(
    plan: LaunchPlan, bufs: Sequence[torch.Tensor], handles: Sequence[int], hints: Sequence[Any]
) -> tuple[Any] | None:
    """A plan's first launch, run while its ATen call is recorded (atenexec.cpp): sets plan.cx
    to the compiled executor of its later launches, or False where the call cannot be repeated
    exactly. On views built for this launch alone: the executor tells slots apart by identity,
    and two slots may share one cached view (x * x) where later launches have two tensors.
    An input read through its producer's result (a hint, as run_plan reads it) gets an alias of
    that tensor of its own. Returns (the operator's result,), or None (nothing ran: the
    executor is not built; run_plan's own path runs it)."""
    from .. import compiled

    m = compiled.module()
    if m is None:
        plan.cx = False
        return None
    views: list[Any] = [None] * plan.n_in
    for sl in plan.slots:
        k, ref = sl.k, sl.ref
        h = hints[k]
        if not sl.mutable and h is not None and h[0] is bufs[k] and h[1] == sl.key:
            v = h[2]
            views[k] = v.as_strided(v.shape, v.stride(), v.storage_offset())
        else:
            views[k] = build_view(
                TensorRef(handles[k], ref.dtype, ref.shape, ref.stride, ref.offset), bufs[k]
            )
    args = fill_slots(plan.args, views)
    kwargs = {k: fill_slots(v, views) for k, v in plan.kwargs.items()}
    call = plan.call
    slots = [
        (sl.ref.dtype, list(sl.ref.shape), list(sl.ref.stride), sl.ref.offset, sl.mutable, sl.key)
        for sl in plan.slots
    ]
    outs = [(nbytes, ref.dtype, list(ref.stride), ref.offset) for nbytes, ref in plan.outputs]
    result, cx = m.record_aten(lambda: call(*args, **kwargs), views, slots, outs)
    plan.cx = cx if cx is not None else False
    return (result,)
