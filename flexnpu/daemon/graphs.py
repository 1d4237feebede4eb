"""Compiled replay of captured graphs.

A captured graph is a list of commands that were validated and executed once during capture.
Replaying them one by one through the generic launch path rebuilds every view and re-binds
every output for every operator. Compiling turns the graph into a straight-line program:

- operators are resolved once;
- a tensor produced inside the graph is handed to its consumers directly when the consumer
  reads it with the layout it was produced in (the common case), else re-viewed;
- views of allocations from outside the graph (weights, static inputs, KV caches) are built
  once and reused while the allocation keeps its storage;
- outputs are bound lazily: each Alloc keeps the result tensor and makes its byte view only if
  something outside the graph reads it;
- a result is kept only if it owns its storage: one whose storage overlaps an input or another
  output of its step (schemas do not declare every alias: ``_unsafe_view``, ``type_as``,
  ``lift``, ``unsafe_split`` ...) is copied, so no Alloc ever points into memory it does not
  hold a reference to. A step proved to own its results (OWNED_PROOFS replays) skips the check;
- a consumer reading a graph result in another layout (a view op on the client) restrides the
  result tensor when it is exactly the allocation's bytes, instead of viewing its byte buffer;
- views of allocations mutated in place are kept too, and rebuilt if an operator changed their
  metadata.

Anything the compiler does not handle makes it return None, and replay falls back to running
the commands one by one, so compilation is an optimization, never a semantic change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import ops
from ..protocol import Op, TensorRef
from .backends import torch_exec

if TYPE_CHECKING:
    from .objects import Cmd

_INTERNAL, _EXTERNAL = 0, 1


class _Src:
    """Where a tensor argument comes from at replay time."""

    __slots__ = ("kind", "ref", "alloc", "step", "mutable", "cache_key", "cache", "direct", "ptr", "restride")

    def __init__(self, kind: int, ref: TensorRef, alloc: Any, step: int, mutable: bool) -> None:
        self.kind, self.ref, self.alloc, self.step, self.mutable = kind, ref, alloc, step, mutable
        self.cache_key: Any = None
        self.cache: Any = None
        self.direct: bool | None = None  # producer's layout == consumer's view (same every replay)
        self.ptr = 0  # the cached view's data pointer when it was handed out
        self.restride: bool | None = None  # an internal result read in another layout: as_strided?

    def get(self, results: dict[int, torch.Tensor]) -> torch.Tensor:
        ref = self.ref
        if self.kind == _INTERNAL:
            t = results[id(self.alloc)]
            if self.direct is None:
                self.direct = (
                    t.dtype == ref.dtype
                    and t.storage_offset() == ref.offset
                    and tuple(t.shape) == ref.shape
                    and tuple(t.stride()) == ref.stride
                )
            if self.direct:
                return t
            al = self.alloc
            if self.restride is None:  # decided once: the producer's result is laid out alike every replay
                self.restride = al.result is t and t.dtype == ref.dtype and al.result_is_buffer()
            if self.restride and al.result is t:
                # the result's storage is the allocation as declared: the consumer's view is a
                # restride of it (its bounds against the allocation were checked at capture)
                restrided: torch.Tensor = t.as_strided(ref.shape, ref.stride, ref.offset)
                return restrided
            # read it as the producer's declared layout says, like any other consumer would
            return torch_exec.build_view(ref, al.materialize())
        buf = self.alloc.materialize()
        v: torch.Tensor = self.cache
        if self.cache_key is not buf:
            v = self.cache = torch_exec.build_view(ref, buf)
            self.cache_key = buf
        elif self.mutable and (
            v.data_ptr() != self.ptr or v.shape != ref.shape or v.stride() != ref.stride
        ):  # an operator changed the view's metadata (an out= resize): view the allocation again
            v = self.cache = torch_exec.build_view(ref, buf)
        self.ptr = v.data_ptr()
        return v


# Whether an operator's result aliases its inputs follows from the operator and its arguments'
# layouts, dtypes and devices, which are the same in every replay of a graph (values never decide
# it): a step whose results owned their storage in this many replays is not checked again; one
# that ever needed a copy is checked on every replay.
OWNED_PROOFS = 2


class _Step:
    __slots__ = ("opov", "args", "kwargs", "outs", "flat_args", "slots", "nested", "op", "rule", "owned")

    def __init__(
        self,
        opov: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outs: list[Any],
        op: str = "",
        rule: Any = None,
    ) -> None:
        self.opov, self.args, self.kwargs, self.outs = opov, args, kwargs, outs
        self.op = op
        # INDEXED operators: the index tensors' contents may have changed since the capture
        # (the client writes them between replays), so they are checked on every replay.
        self.rule = rule if rule is not None and rule.kind == ops.INDEXED else None
        # Top-level tensor arguments are patched into a prebuilt list; only arguments that
        # nest tensors in lists (cat, stack, index) go through the recursive fill.
        self.flat_args = list(args)
        self.slots = [(i, a) for i, a in enumerate(args) if type(a) is _Src]
        self.nested = [(i, a) for i, a in enumerate(args) if type(a) in (list, tuple)]
        self.owned = 0  # replays whose results owned their storage; -1: one needed a copy


def _template(x: Any, srcs: list[_Src], make: Callable[[TensorRef, bool], _Src], mutable: bool) -> Any:
    if isinstance(x, TensorRef):
        s = make(x, mutable)
        srcs.append(s)
        return s
    if isinstance(x, list):
        return [_template(v, srcs, make, mutable) for v in x]
    if isinstance(x, tuple):
        return tuple(_template(v, srcs, make, mutable) for v in x)
    return x


def _fill(x: Any, results: dict[int, torch.Tensor]) -> Any:
    t = type(x)
    if t is _Src:
        return x.get(results)
    if t is list:
        return [_fill(v, results) for v in x]
    if t is tuple:
        return tuple([_fill(v, results) for v in x])
    return x


class CompiledGraph:
    def __init__(self, steps: list[_Step], device: Any) -> None:
        self.steps = steps
        self.device = device

    def run(self) -> None:
        results: dict[int, torch.Tensor] = {}
        for st in self.steps:
            args = st.flat_args
            for i, src in st.slots:
                args[i] = src.get(results)
            for i, v in st.nested:
                args[i] = _fill(v, results)
            kw = {k: _fill(v, results) for k, v in st.kwargs.items()} if st.kwargs else {}
            if st.rule is not None:
                torch_exec.validate_indices(st.op, st.opov, st.rule, tuple(args), kw)
            r = st.opov(*args, **kw) if kw else st.opov(*args)
            if st.outs:
                flat: list[torch.Tensor] = []
                torch_exec._flatten_tensors(r, flat)
                if st.owned >= OWNED_PROOFS:
                    for al, t in zip(st.outs, flat):
                        results[id(al)] = t
                        al.set_result(t)
                    continue
                cloned = False
                ins: list[torch.Tensor] = []
                torch_exec._flatten_tensors(args, ins)
                if kw:
                    torch_exec._flatten_tensors(list(kw.values()), ins)
                taken = [_span(x) for x in ins]
                for al, t in zip(st.outs, flat):
                    span = _span(t)
                    if any(span[0] < hi and lo < span[1] for lo, hi in taken):
                        t = t.clone()  # a view of memory it does not own: make it its own
                        span = _span(t)
                        cloned = True
                    taken.append(span)
                    results[id(al)] = t
                    al.set_result(t)
                st.owned = -1 if cloned or st.owned < 0 else st.owned + 1


def _span(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    p = st.data_ptr()
    return (p, p + st.nbytes()) if st.nbytes() else (0, 0)


def compile_graph(cmds: list[Cmd], device: Any) -> CompiledGraph | None:
    """A compiled program for the graph's commands, or None if any command needs the generic path."""
    steps: list[_Step] = []
    produced: set[int] = set()
    for cmd in cmds:
        if cmd.op != Op.LAUNCH:
            return None
        launch, allocs, outs = cmd.a
        try:
            opov, rule = torch_exec._resolve(launch.op)
        except Exception:  # noqa: BLE001
            return None
        if opov._opname in ops.UNINITIALIZED:
            return None  # the generic path hands out zeroed memory instead of running it
        if outs and (
            not torch_exec._returns_fresh(opov) or any(r.alias_info is not None for r in opov._schema.returns)
        ):
            return None  # outputs that may alias inputs: the generic path copies them
        mpos, mnames = torch_exec._mutable_args(opov)

        def make(ref: TensorRef, mutable: bool) -> _Src:
            al = allocs[ref.handle]  # noqa: B023 - make() is called within this iteration only
            if id(al) in produced:
                if mutable:
                    raise _Unsupported  # in-place writes into graph temporaries: generic path
                return _Src(_INTERNAL, ref, al, 0, False)
            return _Src(_EXTERNAL, ref, al, 0, mutable)

        srcs: list[_Src] = []
        try:
            args = tuple(_template(a, srcs, make, i in mpos) for i, a in enumerate(launch.args))
            kwargs = {k: _template(v, srcs, make, k in mnames) for k, v in launch.kwargs.items()}
        except _Unsupported:
            return None
        out_allocs = [outs[ref.handle] for _, ref in launch.outputs]
        for (nbytes, ref), al in zip(launch.outputs, out_allocs):
            if ref.offset != 0:
                return None
            produced.add(id(al))
        kwargs = {k: (device if isinstance(v, torch.device) else v) for k, v in kwargs.items()}
        steps.append(_Step(opov, args, kwargs, out_allocs, launch.op, rule))
    return CompiledGraph(steps, device)


class _Unsupported(Exception):
    pass
