"""One operator table: Ascend operator names -> backend operations on torch tensors.

The native front end (flexnpu/hook/native) turns every operator call of an Ascend program into
one LAUNCH record named after the Ascend API it came from: ``aclnn::Xxx`` for the two-phase
aclnn API (positional arguments in the order of flexnpu/aclnn_api.py), ``aclop::<OpType>`` for
aclopCompileAndExecute and friends (attributes as keyword arguments). This package is where such
a name gets its meaning, in one place per operator:

* ``register(op, params, writes=..., attrs=..., indices=...)`` declares an operator: its
  positional parameters and their kinds (the kinds of flexnpu/aclnn_api.py), which parameters
  it writes, which keyword attributes it accepts, and which tensors hold *positions* (checked to
  be in range before anything runs, as ops.INDEXED operators are for aten launches);
* ``execute(device, op, args, kwargs, resolve)`` checks a decoded launch against that
  declaration (arity, kind of every value, NULL only where optional), builds every tensor as a
  bounds-checked view of the client's allocation (backends.torch_exec.build_view, cached: a
  view can reach nothing outside its allocation and cannot resize it), checks index ranges, and runs it.

Every byte of a launch is client-controlled: anything that does not fit the declaration raises
LaunchError (a ValueError: INVALID_ARGUMENT on the wire) naming the operator; an unknown name
raises OpNotSupported naming it. Operators write their results with ``put`` (shape-checked copy
into the caller's tensor), so an output that overlaps an input reads the input first, as the
Ascend kernels do. Entries declared with ``register_value`` can also write in place (torch's
``out=``): a plan does so when its result has the destination's dtype and shape and, at each
launch, the destination shares no bytes with an input (TablePlan.run).

Entries live in per-API modules: aclnn.py (the aclnn operators) and, from the aclop side,
aclop.py. Importing this package registers all of them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import torch

from ...ops import aclnn_api as api
from ...errors import OpNotSupported
from ...protocol import TensorRef
from .. import compiled
from ..backends.torch_exec import (
    IndexRangeError,
    LaunchError,
    build_view,
    cached_view,
    check_view_bounds,
    fill_slots,
    has_slot,
    keep_view,
    lookup_view,
)

__all__ = [
    "OpDef",
    "Args",
    "register",
    "register_value",
    "lookup",
    "is_supported",
    "execute",
    "prepare",
    "make_plan",
    "TablePlan",
    "SizedPlan",
    "check_indices",
    "put",
    "LaunchError",
    "TABLE",
]

Args = dict[str, Any]
# index checks: args -> [(index tensor, size of the indexed extent, negatives wrap?, what)]
IndexCheck = Callable[[Args], Iterable[tuple[torch.Tensor, int, bool, str]]]

# Largest number of elements an "empty" tensor placeholder may describe (it must have none)
_MAX_DIM = 1 << 48


@dataclass(frozen=True)
class OpDef:
    op: str
    params: tuple[tuple[str, str], ...]  # (name, kind) of each positional argument
    fn: Callable[[Args], None]
    writes: frozenset[str]
    optional: frozenset[str]
    attrs: dict[str, str] = field(default_factory=dict)  # keyword attributes: name -> kind; "*": any
    # other name, of that kind, gathered in args["*"] (aclop: attributes of free form)
    indices: IndexCheck | None = None
    # Entries declared with register_value: `value(args, None)` returns what the entry writes
    # into parameter `dest`; `value(args, t)` writes it into tensor `t` itself (torch's out=).
    # A plan whose result matches its destination's dtype and shape uses the second form and
    # saves the result's allocation and put's copy (TablePlan.run).
    value: Callable[[Args, torch.Tensor | None], Any] | None = None
    dest: str = ""


TABLE: dict[str, OpDef] = {}


def register(
    op: str,
    params: Sequence[tuple[str, str]] | None = None,
    *,
    writes: Iterable[str] = (),
    optional: Iterable[str] = (),
    attrs: dict[str, str] | None = None,
    indices: IndexCheck | None = None,
) -> Callable[[Callable[[Args], None]], Callable[[Args], None]]:
    """Decorator: ``fn(args)`` runs ``op``. For ``aclnn::Xxx`` the parameters default to the
    signature in flexnpu/aclnn_api.py."""
    if params is None:
        if not op.startswith("aclnn::"):
            raise ValueError(f"{op}: parameters must be given")
        sig = api.SIGNATURES[op.removeprefix("aclnn::")]
        params = [(p.name, p.kind) for p in sig.params]
    names = {n for n, _ in params}
    for n in (*writes, *optional):
        if n not in names:
            raise ValueError(f"{op}: {n!r} is not a parameter")

    def deco(fn: Callable[[Args], None]) -> Callable[[Args], None]:
        if op in TABLE:
            raise ValueError(f"{op} registered twice")
        TABLE[op] = OpDef(
            op, tuple(params), fn, frozenset(writes), frozenset(optional), dict(attrs or {}), indices
        )
        return fn

    return deco


def register_value(
    op: str,
    value: Callable[[Args, torch.Tensor | None], Any],
    *,
    dest: str = "out",
    indices: IndexCheck | None = None,
) -> None:
    """Declare an aclnn operator whose entry is ``put(args[dest], value(args, None))`` and
    whose ``value(args, out)`` computes the same result straight into ``out`` (one torch call
    with ``out=``). The two must agree bit for bit when ``out`` has the result's dtype and
    shape (tests/test_launch_plans.py checks every such entry). A plan may record the ATen call
    ``value(args, out)`` makes once and repeat it for later launches (compiled.py): whatever
    ``value`` decides must follow from dtypes, shapes and the non-tensor arguments alone (or
    from whether tensors overlap the destination, which the executor tests per launch), never
    from tensor data (reading it is a second ATen call, which keeps the plan in Python)."""

    def fn(a: Args) -> None:
        put(a[dest], value(a, None), dest)

    register(op, writes=[dest], indices=indices)(fn)
    TABLE[op] = replace(TABLE[op], value=value, dest=dest)


def lookup(op: str) -> OpDef:
    d = TABLE.get(op) if isinstance(op, str) else None
    if d is None:
        raise OpNotSupported(f"operator {op} is not supported by FlexNPU")
    return d


def is_supported(op: str) -> bool:
    return isinstance(op, str) and op in TABLE


def put(out: torch.Tensor, value: torch.Tensor | float | int | bool, what: str = "out") -> None:
    """Write ``value`` into the caller's tensor ``out`` (dtype cast as the Ascend kernels do);
    the shapes must agree (a scalar fills)."""
    if isinstance(value, torch.Tensor):
        if value.shape != out.shape:
            raise LaunchError(
                f"{what} has shape {tuple(out.shape)} but the result has shape {tuple(value.shape)}"
            )
        out.copy_(value)
    else:
        out.fill_(value)


# ------------------------------------------------------------------ checking and converting
_SCALAR_TYPES = (bool, int, float, complex)


def _is_int(v: Any) -> bool:
    return type(v) is int


class _Conv:
    __slots__ = ("op", "device", "resolve", "allocs")

    def __init__(self, op: str, device: torch.device, resolve: Callable[[int], torch.Tensor]) -> None:
        self.op = op
        self.device = device
        self.resolve = resolve
        self.allocs: dict[int, torch.Tensor] = {}

    def tensor(self, v: Any, name: str) -> torch.Tensor:
        if isinstance(v, TensorRef):
            if type(v.handle) is not int or v.handle <= 0:
                raise LaunchError(f"{self.op}: {name}: invalid handle {v.handle!r}")
            a = self.allocs.get(v.handle)
            if a is None:
                a = self.allocs[v.handle] = self.resolve(v.handle)
            # Views are cached by (allocation pointer and size, layout): entries only read their
            # arguments or write their data (copy_, fill_, index_put_), never their metadata.
            return cached_view(v, a)
        if isinstance(v, tuple) and len(v) == 3 and v[0] == "empty":
            # a tensor without storage (no elements): only its dtype and shape travel
            dtype, shape = v[1], v[2]
            if (
                not isinstance(dtype, torch.dtype)
                or not isinstance(shape, list)
                or len(shape) > 16
                or not all(_is_int(s) and 0 <= s <= _MAX_DIM for s in shape)
                or 0 not in shape
            ):
                raise LaunchError(f"{self.op}: {name}: malformed empty tensor {v!r}")
            return torch.empty(shape, dtype=dtype, device=self.device)
        raise LaunchError(f"{self.op}: {name} must be a tensor, got {type(v).__name__}")

    def value(self, v: Any, kind: str, name: str) -> Any:
        op = self.op
        if kind == api.TENSOR:
            return self.tensor(v, name)
        if kind == api.SCALAR:
            if type(v) not in _SCALAR_TYPES:
                raise LaunchError(f"{op}: {name} must be a scalar, got {type(v).__name__}")
            return v
        if kind in (api.INT_ARRAY, api.FLOAT_ARRAY, api.BOOL_ARRAY, api.TENSOR_LIST, api.SCALAR_LIST):
            if not isinstance(v, list):
                raise LaunchError(f"{op}: {name} must be a list, got {type(v).__name__}")
            if kind == api.TENSOR_LIST:
                return [self.tensor(x, f"{name}[{i}]") for i, x in enumerate(v)]
            ok: Callable[[Any], bool] = {
                api.INT_ARRAY: _is_int,
                api.FLOAT_ARRAY: lambda x: type(x) in (float, int),
                api.BOOL_ARRAY: lambda x: type(x) is bool,
                api.SCALAR_LIST: lambda x: type(x) in _SCALAR_TYPES,
            }[kind]
            if not all(ok(x) for x in v):
                raise LaunchError(f"{op}: {name} holds values of the wrong type for a {kind}")
            return v
        if kind == api.INT:
            if not _is_int(v):
                raise LaunchError(f"{op}: {name} must be an int, got {type(v).__name__}")
            return v
        if kind == api.FLOAT:
            if type(v) not in (float, int):
                raise LaunchError(f"{op}: {name} must be a float, got {type(v).__name__}")
            return float(v)
        if kind == api.BOOL:
            if type(v) is not bool:
                raise LaunchError(f"{op}: {name} must be a bool, got {type(v).__name__}")
            return v
        if kind == api.DTYPE:
            if not isinstance(v, torch.dtype):
                raise LaunchError(f"{op}: {name} must be a dtype, got {type(v).__name__}")
            return v
        if kind == api.STR:
            if not isinstance(v, str):
                raise LaunchError(f"{op}: {name} must be a string, got {type(v).__name__}")
            return v
        if kind == "any":  # aclop attributes of free form: plain values only
            return self.plain(v, name, 0)
        raise LaunchError(f"{op}: parameter {name} has unknown kind {kind}")  # a table bug

    def plain(self, v: Any, name: str, depth: int) -> Any:
        if v is None or type(v) in (bool, int, float, str) or isinstance(v, torch.dtype):
            return v
        if isinstance(v, list) and depth < 3:
            return [self.plain(x, name, depth + 1) for x in v]
        if isinstance(v, TensorRef):
            return self.tensor(v, name)
        raise LaunchError(f"{self.op}: {name}: unsupported value of type {type(v).__name__}")


def check_indices(d: OpDef, a: Args) -> None:
    if d.indices is None:
        return
    try:
        for idx, size, wrap, what in d.indices(a):
            if idx is None:
                continue
            if not isinstance(idx, torch.Tensor) or idx.dtype not in (
                torch.int64,
                torch.int32,
                torch.int16,
                torch.int8,
                torch.uint8,
            ):
                raise LaunchError(f"{d.op}: {what} must be an integer tensor")
            if idx.numel() == 0:
                continue
            lo, hi = int(idx.min()), int(idx.max())
            if hi >= size or lo < (-size if wrap else 0):
                raise IndexRangeError(
                    f"{d.op}: {what} holds {lo if lo < (-size if wrap else 0) else hi}, out of range "
                    f"for an extent of {size}"
                )
    except (LaunchError, IndexRangeError):
        raise
    except (IndexError, KeyError, TypeError, RuntimeError) as e:
        raise LaunchError(f"{d.op}: {e}") from None


def execute(
    device: torch.device,
    op: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    outputs: Sequence[Any],
    resolve: Callable[[int], torch.Tensor],
) -> None:
    """Run one launch of a table operator. ``resolve(handle)`` gives the 1-D uint8 tensor of an
    allocation the client owns. Raises OpNotSupported (unknown name) or LaunchError (a launch
    that does not fit the operator's declaration); the operator's own errors propagate."""
    d, a = prepare(device, op, args, kwargs, outputs, resolve)
    check_indices(d, a)
    d.fn(a)


def prepare(
    device: torch.device,
    op: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    outputs: Sequence[Any],
    resolve: Callable[[int], torch.Tensor],
) -> tuple[OpDef, Args]:
    """Check a launch against its operator's declaration and convert its arguments (tensors:
    views of the client's allocations as ``resolve`` gives them now). The result depends on the
    launch and those allocations only, so a captured graph keeps it while they keep their
    buffers; the index ranges (values) are checked by ``check_indices`` before every run."""
    d = lookup(op)
    if outputs:
        raise LaunchError(f"{op} writes the tensors it is given: launch it with no fresh outputs")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise LaunchError(f"{op}: arguments must be a tuple and attributes a dict")
    if len(args) != len(d.params):
        raise LaunchError(
            f"{op} takes {len(d.params)} arguments ({', '.join(n for n, _ in d.params)}), got {len(args)}"
        )
    return d, _convert(d, op, args, kwargs, _Conv(op, device, resolve))


def _overlaps_itself(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """A broadcast (stride-0) dimension: writing it would write some bytes more than once."""
    return any(n > 1 and st == 0 for n, st in zip(shape, stride))


def _convert(d: OpDef, op: str, args: Sequence[Any], kwargs: dict[str, Any], conv: _Conv) -> Args:
    """prepare's checks and conversions, with `conv` turning each tensor reference into what
    the caller needs (a view now, or a plan's slot)."""
    a: Args = {}
    for (name, kind), v in zip(d.params, args):
        if v is None:
            if name not in d.optional:
                raise LaunchError(f"{op}: {name} must not be NULL")
            a[name] = None
            continue
        if kind == api.TENSOR and type(v) is TensorRef:  # the common case, kept short
            if name in d.writes and _overlaps_itself(v.shape, v.stride):
                raise LaunchError(f"{op}: {name} is written but overlaps itself (stride {v.stride})")
            a[name] = conv.tensor(v, name)
        else:
            a[name] = conv.value(v, kind, name)
    for k, v in kwargs.items():
        akind = d.attrs.get(k) if isinstance(k, str) else None
        if akind is None and isinstance(k, str) and "*" in d.attrs:
            # free-form attributes (aclop: any name): gathered apart, so no name shadows a parameter
            a.setdefault("*", {})[k] = None if v is None else conv.value(v, d.attrs["*"], k)
            continue
        if akind is None:
            raise LaunchError(f"{op}: unknown attribute {k!r}")
        a[k] = None if v is None else conv.value(v, akind, k)
    return a


# ------------------------------------------------------------------ plans
class _NoPlan(Exception):
    """This launch's structure gets no plan (the generic path runs it)."""


class Slot:
    """The k-th tensor of a planned launch (payload order): its layout without the storage
    offset, which each launch brings (the native front end's tensors are views into the
    allocator's blocks, so the offset changes while everything else repeats)."""

    __slots__ = ("k", "dtype", "shape", "stride", "layout", "itemsize", "reach", "empty")

    def __init__(self, k: int, ref: TensorRef) -> None:
        self.k = k
        self.dtype, self.shape, self.stride = ref.dtype, ref.shape, ref.stride
        # the view cache key's layout part: one small int per distinct layout (hashing ints is
        # what a per-launch key can afford; a tuple of dtype and tuples is hashed anew each time)
        self.layout = _layout_id((ref.dtype, ref.shape, ref.stride))
        self.itemsize = ref.dtype.itemsize
        self.empty = 0 in ref.shape
        # elements from the first to the last one the view touches (check_view_bounds' `last`)
        self.reach = sum((n - 1) * st for n, st in zip(ref.shape, ref.stride) if n > 1)

    def view(self, buf: torch.Tensor, handle: int, offset: int) -> torch.Tensor:
        """This slot's view of allocation `buf` at `offset`, bounds-checked (what
        backends.torch_exec.cached_view gives for the full reference; its errors too)."""
        nbytes = buf.numel()
        end = (offset if self.empty else offset + self.reach + 1) * self.itemsize
        if type(offset) is not int or offset < 0 or offset > _MAX_DIM or end > nbytes:
            # out of bounds: build_view raises the LaunchError naming the handle and the bounds
            return build_view(TensorRef(handle, self.dtype, self.shape, self.stride, offset), buf)
        # (no device in the key: every buffer is the one backend device's)
        key = (buf.data_ptr(), nbytes, self.layout, offset)
        v = lookup_view(key)
        if v is None:
            v = build_view(TensorRef(handle, self.dtype, self.shape, self.stride, offset), buf)
            keep_view(key, v)
        return v


_layouts: dict[tuple[Any, ...], int] = {}
_next_layout = itertools.count()


def _layout_id(layout: tuple[Any, ...]) -> int:
    """An int per layout, never reused (so a cached view is never found under another layout)."""
    i = _layouts.get(layout)
    if i is None:
        if len(_layouts) >= 1 << 16:  # a bound on what hostile clients can make the daemon keep
            _layouts.clear()
        i = _layouts[layout] = next(_next_layout)
    return i


class _SlotConv(_Conv):
    """prepare's converter for a plan: each tensor reference becomes a Slot, checked for
    everything but the bounds, which depend on the allocation and offset of each launch."""

    __slots__ = ("slots", "names")

    def __init__(self, op: str, device: torch.device) -> None:
        super().__init__(op, device, _no_resolve)
        self.slots: list[Slot] = []
        self.names: list[str] = []  # each slot's parameter ("tensors[1]" for list items)

    def tensor(self, v: Any, name: str) -> Any:
        if type(v) is not TensorRef:
            if type(v) is tuple and len(v) == 3 and v[0] == "empty":
                # A tensor without storage (torch_npu's softmaxOut of FlashAttentionScore): no
                # bytes, so nothing per launch; its checked, element-less tensor is part of the
                # plan (entries never change a tensor's metadata, and it has no data to write).
                return super().tensor(v, name)
            raise _NoPlan  # malformed values: the generic path reports them
        if type(v.handle) is not int or v.handle <= 0:
            raise LaunchError(f"{self.op}: {name}: invalid handle {v.handle!r}")
        check_view_bounds(v, 1 << 62)  # well-formed; each launch checks its own bounds
        sl = Slot(len(self.slots), v)
        self.slots.append(sl)
        self.names.append(name)
        return sl


def _no_resolve(h: int) -> torch.Tensor:
    raise AssertionError("a plan resolves no handle")


class TablePlan:
    """A validated launch structure of a table operator: the declaration's checks ran once
    (make_plan); per launch only the views (bounds, from each tensor's allocation and offset),
    the index ranges and the operator itself run. Fields n_in/outputs/cost are what
    handlers/launch.py reads of every plan."""

    __slots__ = (
        "op",
        "d",
        "n_in",
        "outputs",
        "cost",
        "values",
        "fixed",
        "top",
        "nested",
        "slots",
        "dest",
        "others",
        "direct",
        "cx",
    )

    def __init__(self, d: OpDef, a: Args, slots: list[Slot], values: int) -> None:
        self.op, self.d, self.slots = d.op, d, slots
        self.n_in = len(slots)
        self.outputs: tuple[Any, ...] = ()  # table operators write the tensors they are given
        self.cost: Any = None
        self.values = values  # what holding one of its commands costs (session.held_bytes)
        self.top: list[tuple[str, int]] = []  # parameter -> slot index
        self.nested: list[tuple[str, Any]] = []  # parameter -> a list/dict template with slots
        self.fixed: Args = {}
        for name, v in a.items():
            if type(v) is Slot:
                self.top.append((name, v.k))
            elif has_slot(v, Slot):
                self.nested.append((name, v))
            else:
                self.fixed[name] = v
        # Writing the result in place (OpDef.value): the destination's slot, the other slots'
        # (k, itemsize, reach) for the per-launch overlap test, and whether the result matches
        # the destination (None: not seen yet; the first launch finds out).
        self.dest = -1
        self.others: tuple[tuple[int, int, int], ...] = ()
        self.direct: bool | None = False
        # the compiled executor of the in-place form (compiled.py): None until the first
        # in-place launch records the entry's operator, False if it cannot be repeated there
        # (or has index ranges, which are checked in Python at every launch)
        self.cx: Any = None if d.indices is None else False
        dest = a.get(d.dest) if d.value is not None else None
        # (`a` may be another plan's template, SizedPlan.exact: its slots stand for positions;
        # `slots` are this plan's)
        if type(dest) is Slot and not slots[dest.k].empty:
            k = dest.k
            self.dest = k
            self.others = tuple((sl.k, sl.itemsize, sl.reach) for sl in slots if sl.k != k and not sl.empty)
            self.direct = None

    def run(self, bufs: Sequence[torch.Tensor], handles: Sequence[int], offsets: Sequence[int]) -> None:
        """One launch: ``bufs[k]`` is the allocation named by ``handles[k]``, its tensor at
        element offset ``offsets[k]``."""
        cx = self.cx
        if cx and cx.run(bufs, offsets):
            return  # (False: nothing ran; the Python path below has every check and error)
        views = [sl.view(bufs[sl.k], handles[sl.k], offsets[sl.k]) for sl in self.slots]
        a = self._args(views)
        d = self.d
        k = self.dest
        if k >= 0:
            out = views[k]
            if self.direct:
                if not self._overlaps(bufs, offsets):
                    if cx is None:
                        self._record(bufs, handles, offsets)
                    else:
                        d.value(a, out)  # type: ignore[misc]  # dest >= 0: the entry has a value
                    return
            elif self.direct is None:
                # The first launch: the result's dtype and shape are the structure's, so they
                # decide for every later launch of this plan.
                v = d.value(a, None)  # type: ignore[misc]
                self.direct = type(v) is torch.Tensor and v.dtype == out.dtype and v.shape == out.shape
                put(out, v, d.dest)
                return
        d.fn(a)

    def _record(self, bufs: Sequence[torch.Tensor], handles: Sequence[int], offsets: Sequence[int]) -> None:
        """This in-place launch, run once while recording its operator (compiled.record) on
        views built for it alone: the executor must tell the slots apart by identity, and two
        slots may share one cached view (Mul(x, x)) where later launches have two tensors."""
        views = [
            build_view(TensorRef(handles[sl.k], sl.dtype, sl.shape, sl.stride, offsets[sl.k]), bufs[sl.k])
            for sl in self.slots
        ]
        a = self._args(views)
        value = self.d.value
        assert value is not None  # dest >= 0
        _, cx = compiled.record(lambda: value(a, views[self.dest]), views, self.slots, self.dest)
        self.cx = cx if cx is not None else False

    def _args(self, views: list[torch.Tensor]) -> Args:
        """The entry's arguments with these views in the slots, index ranges checked."""
        a = self.fixed.copy()
        for name, k in self.top:
            a[name] = views[k]
        for name, tpl in self.nested:
            a[name] = fill_slots(tpl, views, Slot)
        if self.d.indices is not None:
            check_indices(self.d, a)
        return a

    def _overlaps(self, bufs: Sequence[torch.Tensor], offsets: Sequence[int]) -> bool:
        """Whether this launch's destination may share bytes with another of its tensors
        (written in place, it would be read after being written: put's copy then runs)."""
        k = self.dest
        sl = self.slots[k]
        lo = bufs[k].data_ptr() + offsets[k] * sl.itemsize
        hi = lo + (sl.reach + 1) * sl.itemsize
        for j, size, reach in self.others:
            b = bufs[j].data_ptr() + offsets[j] * size
            if b < hi and lo < b + (reach + 1) * size:
                return True
        return False


class SizedPlan(TablePlan):
    """A TablePlan whose structure leaves out the tensors' sizes and strides too
    (protocol.split_launch_dims): one plan for every launch of a decode loop's growing tensors
    (the KV cache's Cat, attention, the mask arithmetic), whose sizes change every token. Per
    launch, besides what TablePlan.run checks, each view is built from the sizes and strides the
    launch brings (build_view: the full bounds and value checks of the generic path) and the
    written tensors are checked not to overlap themselves. Results are put (the in-place form's
    test depends on shapes)."""

    __slots__ = ("dtypes", "written", "names", "a")

    def __init__(self, d: OpDef, a: Args, slots: list[Slot], values: int, names: list[str]) -> None:
        super().__init__(d, a, slots, values)
        self.dest, self.others, self.direct = -1, (), False
        self.a = a  # the template (its slots stand for positions): exact() reuses it
        self.dtypes = tuple(sl.dtype for sl in slots)
        self.names = tuple(names)
        self.written = frozenset(k for k, n in enumerate(names) if n.split("[", 1)[0] in d.writes)

    def exact(self, dims: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> TablePlan | None:
        """The TablePlan of this structure with these sizes and strides (what make_plan gives
        for a launch with them, without decoding one), or None where make_plan would refuse."""
        slots = []
        for k, (dtype, (shape, stride)) in enumerate(zip(self.dtypes, dims)):
            if k in self.written and _overlaps_itself(shape, stride):
                return None
            ref = TensorRef(1, dtype, shape, stride, 0)
            try:
                check_view_bounds(ref, 1 << 62)  # well-formed (_SlotConv's check)
            except LaunchError:
                return None
            slots.append(Slot(k, ref))
        return TablePlan(self.d, self.a, slots, self.values)

    def run_sized(
        self,
        bufs: Sequence[torch.Tensor],
        handles: Sequence[int],
        offsets: Sequence[int],
        dims: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        """One launch: as TablePlan.run, with ``dims[k]`` = (sizes, strides) of tensor k."""
        views = []
        written, dtypes = self.written, self.dtypes
        for k, (shape, stride) in enumerate(dims):
            if k in written and _overlaps_itself(shape, stride):
                raise LaunchError(
                    f"{self.op}: {self.names[k]} is written but overlaps itself (stride {stride})"
                )
            buf, off = bufs[k], offsets[k]
            # (a key of its own shape: the plans' (pointer, size, layout id, offset) keys and
            # the generic path's never equal it)
            key = (buf.data_ptr(), buf.numel(), dtypes[k], shape, stride, off)
            v = lookup_view(key)
            if v is None:
                v = build_view(TensorRef(handles[k], dtypes[k], shape, stride, off), buf)
                keep_view(key, v)
            views.append(v)
        self.d.fn(self._args(views))


def make_plan(
    device: torch.device,
    op: str,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    outputs: Any,
    values: int = 0,
    *,
    sized: bool = False,
) -> TablePlan | None:
    """The plan of a decoded launch of a table operator, or None: it has none (the generic
    path then runs it and reports whatever is wrong with it; nothing is raised from here).
    ``values``: the decoded launch's value count (protocol.Launch.values). ``sized``: the plan
    of its structure without sizes (SizedPlan)."""
    r = _slots_of(device, op, args, kwargs, outputs)
    if r is None:
        return None
    d, a, conv = r
    return SizedPlan(d, a, conv.slots, values, conv.names) if sized else TablePlan(d, a, conv.slots, values)


def _slots_of(
    device: torch.device, op: str, args: Sequence[Any], kwargs: dict[str, Any], outputs: Any
) -> tuple[OpDef, Args, _SlotConv] | None:
    """The declaration's checks of a decoded launch, with each tensor as a Slot; None if it
    fails them or has something plans do not take."""
    d = TABLE.get(op) if isinstance(op, str) else None
    if d is None or outputs or not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        return None
    if len(args) != len(d.params):
        return None
    conv = _SlotConv(op, device)
    try:
        a = _convert(d, op, args, kwargs, conv)
    except (_NoPlan, LaunchError):
        return None
    return d, a, conv


def _load() -> None:
    # one import per API module; each registers its operators
    from . import aclnn  # noqa: F401
    from . import aclop  # noqa: F401


_load()
