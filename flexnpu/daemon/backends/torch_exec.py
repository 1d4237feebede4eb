"""Daemon-side execution of an operator launch on a torch device (cpu, cuda, npu, ...).

A launch names an aten operator and carries its arguments with ``TensorRef`` in place of tensors.
Everything in it is client-controlled, so before touching memory this module:

* checks the operator against an allowlist (``is_op_allowed``);
* builds every tensor argument as a view over a *non-owning, non-resizable* storage that spans
  exactly the referenced allocation, after checking shape/stride/offset arithmetic (in Python
  integers, so no overflow) against the allocation size. An operator therefore cannot read or
  write outside the allocation, nor resize it (``out=`` tensors of the wrong shape, ``resize_``
  and ``set_`` fail with torch's "not resizable" error instead of reallocating daemon memory);
* infers the outputs on the meta device (cached) and checks that the declared outputs match
  them, so a client cannot make the daemon allocate more than it declared (and is charged for);
* binds each result to its fresh handle, copying whenever the result aliases an input (a
  non-owning view must never outlive the launch).
"""
from __future__ import annotations

import re
import threading
from typing import Any, Callable, Sequence

import torch

from flexnpu.protocol import TensorRef

__all__ = ["execute_launch", "is_op_allowed", "LaunchError", "build_view", "check_view_bounds"]

aten = torch.ops.aten

# Largest magnitude accepted for any shape/stride/offset value: far beyond any real allocation,
# and small enough that torch's int64 arithmetic on it cannot overflow.
_MAX_DIM_VALUE = 1 << 48
_MAX_NDIM = 64
_OP_NAME = re.compile(r"^aten::([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?$")

# Operators a client may not run even though they are aten ops. Reasons:
# - raw-pointer / raw-layout views that bypass bounds (nested views from buffers, as_strided and
#   _reshape_alias take arbitrary sizes/strides; the hook computes views client-side anyway);
# - storage re-pointing and resizing (set_, resize_ ...): daemon memory is allocated and
#   accounted only through malloc and declared launch outputs;
# - files, printing, process-global state (from_file, _print, cuFFT plan cache, thread counts,
#   anomaly/grad mode switches, ...).
_DENY_EXACT = frozenset({
    "from_file", "_print", "set_", "resize_", "resize_as_", "_resize_output_", "_resize_output",
    "resize_as_sparse_", "sparse_resize_", "sparse_resize_and_clear_", "as_strided",
    "as_strided_", "as_strided_copy", "as_strided_scatter", "_reshape_alias", "_reshape_alias_copy",
    "set_data", "_set_grad_enabled", "_cufft_set_plan_cache_max_size", "_cufft_clear_plan_cache",
    "_cufft_get_plan_cache_size", "_cufft_get_plan_cache_max_size", "record_stream",
    "_unsafe_set_version_counter", "_set_check_sparse_tensor_invariants", "save", "load",
    "_share_memory_", "share_memory_", "_fused_sdp_choice", "_assert_async", "_functional_assert_async",
    "sym_constrain_range", "_make_per_tensor_quantized_tensor", "_make_per_channel_quantized_tensor",
    "_from_functional_tensor", "_to_functional_tensor", "_sync", "_propagate_xla_data",
    "_nnz", "lift_fresh", "_debug_has_internal_overlap", "_pin_memory", "pin_memory",
})
_DENY_PREFIX = ("_nested", "_cufft", "_cudnn_rnn_flatten", "_foreach_copy", "_mps", "_cslt", "_sparse",
                "sparse_", "_to_sparse", "to_sparse", "_coalesce", "_mkldnn", "mkldnn", "quantize",
                "_fake_quantize", "fake_quantize", "_jagged", "_safe_softmax_backward_", "_functionalize")

_op_cache: dict[str, Any] = {}
_op_cache_lock = threading.Lock()


class LaunchError(ValueError):
    """A launch the backend refuses (bad op, bad view, mismatched outputs); message names the op."""


def _resolve_op(op: str):
    """Return the OpOverload for an allowed "aten::name.overload" string, or raise LaunchError."""
    hit = _op_cache.get(op)
    if hit is not None:
        return hit
    m = _OP_NAME.match(op) if isinstance(op, str) and len(op) < 200 else None
    if m is None:
        raise LaunchError(f"malformed operator name {op!r} (expected 'aten::name.overload')")
    name, overload = m.group(1), m.group(2) or "default"
    if name.startswith("__") or overload.startswith("__"):
        raise LaunchError(f"malformed operator name {op!r}")
    try:
        packet = getattr(aten, name)
        opov = getattr(packet, overload)
    except (AttributeError, RuntimeError):
        raise LaunchError(f"unknown operator {op!r}: the backend's torch has no such aten op") from None
    if not isinstance(opov, torch._ops.OpOverload):
        raise LaunchError(f"unknown operator {op!r}")
    if not _allowed(name, opov):
        raise LaunchError(f"operator {op!r} is not allowed on FlexNPU (denied: touches files, global "
                          "state, raw memory layout or the daemon's random generator)")
    with _op_cache_lock:
        if len(_op_cache) > 4096:
            _op_cache.clear()
        _op_cache[op] = opov
    return opov


def _allowed(name: str, opov) -> bool:
    if name in _DENY_EXACT or name.startswith(_DENY_PREFIX):
        return False
    tags = opov.tags
    # Random operators would draw from the daemon's process-wide generator: results would not
    # follow the app's torch.manual_seed and one client's draws would shift another's. The hook
    # generates random numbers client-side instead.
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    # In-place metadata changes (squeeze_, t_, ...) would alter the daemon's cached view objects;
    # the hook applies them client-side, they never need the device.
    if torch.Tag.inplace_view in tags:
        return False
    return True


def is_op_allowed(op: str) -> bool:
    """True if ``op`` ("aten::name.overload") names an existing aten operator a client may launch."""
    try:
        _resolve_op(op)
    except LaunchError:
        return False
    return True


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
            f"byte {end}, beyond the allocation of {nbytes} bytes")


def _raw_storage(alloc: torch.Tensor, handle: int) -> torch.UntypedStorage:
    if not isinstance(alloc, torch.Tensor) or alloc.dtype != torch.uint8 or alloc.dim() != 1 \
            or not alloc.is_contiguous():
        raise LaunchError(f"handle {handle}: backend storage must be a contiguous 1-D uint8 tensor")
    # Non-owning and non-resizable, spanning exactly this allocation: as_strided tricks inside an
    # operator see only these bytes, and resize attempts fail instead of reallocating.
    return torch._C._construct_storage_from_data_pointer(alloc.data_ptr(), alloc.device, alloc.numel())


def build_view(ref: TensorRef, alloc: torch.Tensor) -> torch.Tensor:
    """A tensor viewing ``alloc`` (uint8 storage of the allocation) as ``ref`` says, bounds-checked."""
    check_view_bounds(ref, alloc.numel())
    st = _raw_storage(alloc, ref.handle)
    t = torch.empty(0, dtype=ref.dtype, device=alloc.device)
    if ref.dtype.itemsize == 1 or alloc.data_ptr() % ref.dtype.itemsize == 0:
        return t.set_(st, ref.offset, ref.shape, ref.stride)
    raise LaunchError(f"handle {ref.handle}: allocation not aligned for {ref.dtype}")


# Views of allocations, keyed by (data pointer, allocation size, layout). A view is only a pointer
# plus layout, so any live allocation with that pointer and size yields the same view: reusing it
# is sound as long as the key comes from the allocation the client's handle resolves to now, and
# no operator changes a cached view's metadata (in-place view ops are denied; mutable arguments,
# whose metadata out= may change, always get a fresh view).
_VIEW_CACHE_MAX = 4096
_view_cache: dict[tuple, torch.Tensor] = {}


def _cached_view(ref: TensorRef, alloc: torch.Tensor) -> torch.Tensor:
    key = (alloc.data_ptr(), alloc.numel(), ref.dtype, ref.shape, ref.stride, ref.offset, alloc.device)
    try:
        v = _view_cache.get(key)
    except TypeError:  # unhashable junk in the ref: let build_view produce the proper error
        return build_view(ref, alloc)
    if v is None:
        v = build_view(ref, alloc)
        if len(_view_cache) >= _VIEW_CACHE_MAX:
            _view_cache.clear()
        _view_cache[key] = v
    return v


_mutable_cache: dict[Any, tuple[frozenset, frozenset]] = {}


def _mutable_args(opov) -> tuple[frozenset, frozenset]:
    """(positions, names) of the arguments the op writes to."""
    m = _mutable_cache.get(opov)
    if m is None:
        args = opov._schema.arguments
        w = [(i, a.name) for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
        m = _mutable_cache[opov] = (frozenset(i for i, _ in w), frozenset(n for _, n in w))
    return m


class _Ctx:
    __slots__ = ("device", "resolve", "allocs", "in_ptrs")

    def __init__(self, device: torch.device, resolve: Callable[[int], torch.Tensor]):
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
            return build_view(x, a) if fresh else _cached_view(x, a)
        if x is None or isinstance(x, (bool, int, float, complex, str, torch.dtype, torch.layout,
                                       torch.memory_format)):
            return x
        if isinstance(x, torch.device):
            return self.device  # the client's "npu" is whatever device this backend runs
        if isinstance(x, (list, tuple)):
            if depth > 4 or len(x) > 100000:
                raise LaunchError("argument nesting too deep or too long")
            out = [self.convert(v, depth + 1, fresh) for v in x]
            return out if isinstance(x, list) else tuple(out)
        raise LaunchError(f"unsupported argument type {type(x).__name__}")


def _flatten_tensors(r: Any, out: list) -> None:
    if isinstance(r, torch.Tensor):
        out.append(r)
    elif isinstance(r, (list, tuple)):
        for v in r:
            _flatten_tensors(v, out)


# ---- meta validation -------------------------------------------------------------------------
_META_CACHE_MAX = 8192
_meta_cache: dict[tuple, tuple | Exception] = {}


_SCALARS = (type(None), bool, int, float, complex, str, torch.dtype, torch.layout, torch.memory_format,
            torch.device)


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


def _launch_key(op: str, args, kwargs) -> tuple:
    """Everything but the handles: what the outputs' metadata can depend on."""
    parts: list = [op]
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


def _expected_outputs(op: str, opov, args, kwargs, key: tuple) -> tuple:
    """(dtype, shape) of each tensor the op returns, from meta inference (cached)."""
    hit = _meta_cache.get(key)
    if hit is None:
        try:
            r = opov(*_to_meta(args), **{k: _to_meta(v) for k, v in kwargs.items()})
            flat: list = []
            _flatten_tensors(r, flat)
            hit = tuple((t.dtype, tuple(t.shape)) for t in flat)
        except Exception as e:  # noqa: BLE001 - any failure means "cannot validate"
            hit = LaunchError(f"{op}: cannot infer the outputs of this launch ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})")
        if len(_meta_cache) >= _META_CACHE_MAX:
            _meta_cache.clear()
        _meta_cache[key] = hit
    if isinstance(hit, Exception):
        raise LaunchError(str(hit))
    return hit


# (launch key, declared output layouts) pairs already validated: skips re-checking on repeats.
_validated: set = set()


def _validate_outputs(op: str, opov, args, kwargs, outputs) -> None:
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


def _returns_fresh(opov) -> bool:
    """True if the op returns at least one tensor that is not an alias of an input."""
    r = _fresh_cache.get(opov)
    if r is None:
        r = any(ret.alias_info is None and "Tensor" in str(ret.type) for ret in opov._schema.returns)
        _fresh_cache[opov] = r
    return r


def _check_outputs(op: str, outputs, expected: tuple) -> None:
    if len(outputs) != len(expected):
        raise LaunchError(f"{op}: {len(outputs)} outputs declared, the op returns {len(expected)} tensors")
    for i, (item, (dtype, shape)) in enumerate(zip(outputs, expected)):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise LaunchError(f"{op}: output {i} must be (nbytes, TensorRef)")
        nbytes, ref = item
        if type(nbytes) is not int or nbytes < 0 or not isinstance(ref, TensorRef):
            raise LaunchError(f"{op}: output {i} must be (nbytes >= 0, TensorRef)")
        if ref.dtype != dtype or tuple(ref.shape) != shape:
            raise LaunchError(f"{op}: output {i} declared {ref.dtype} {tuple(ref.shape)} but the op "
                              f"returns {dtype} {shape}")
        check_view_bounds(ref, nbytes)


def execute_launch(device: torch.device, op: str, args: Sequence, kwargs: dict,
                   outputs: Sequence, resolve: Callable[[int], torch.Tensor],
                   allocate: Callable[[int], torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """Run one launch; return ``[(handle, uint8_storage_tensor)]`` to bind, one per output.

    ``resolve(handle)`` gives the contiguous 1-D uint8 tensor of an allocation the client owns
    (and raises otherwise); ``allocate(nbytes)`` gives a fresh one. Raises LaunchError (a
    ValueError) for anything the client got wrong; errors raised by the operator itself propagate
    unchanged (RuntimeError etc.), their message names the op via the caller.
    """
    opov = _resolve_op(op)
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise LaunchError(f"{op}: args must be a tuple and kwargs a dict")
    if any(not isinstance(k, str) for k in kwargs):
        raise LaunchError(f"{op}: keyword names must be strings")
    if not isinstance(outputs, (tuple, list)):
        raise LaunchError(f"{op}: outputs must be a list")
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
    result = opov(*cargs, **ckwargs)
    if not outputs:
        return []
    flat: list[torch.Tensor] = []
    _flatten_tensors(result, flat)
    bound: list[tuple[int, torch.Tensor]] = []
    for (nbytes, ref), r in zip(outputs, flat):
        bound.append((ref.handle, _bind(op, ctx, nbytes, ref, r, allocate)))
    return bound


def _bind(op: str, ctx: _Ctx, nbytes: int, ref: TensorRef, r: torch.Tensor,
          allocate: Callable[[int], torch.Tensor]) -> torch.Tensor:
    if r.device != ctx.device:
        raise LaunchError(f"{op}: result on {r.device}, expected {ctx.device}")
    st = r.untyped_storage()
    ptr = st.data_ptr()
    aliases_input = any(lo <= ptr < hi for lo, hi in ctx.in_ptrs) if st.nbytes() else False
    if (not aliases_input and st.nbytes() == nbytes and tuple(r.stride()) == tuple(ref.stride)
            and r.storage_offset() == ref.offset and r.dtype == ref.dtype):
        return torch.empty(0, dtype=torch.uint8, device=ctx.device).set_(st)
    buf = allocate(nbytes)
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.numel() < nbytes:
        raise LaunchError(f"{op}: backend allocator returned an unusable buffer")
    view = build_view(ref, buf)
    view.copy_(r)
    return buf
