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

import logging
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import ops
from ..protocol import Op, TensorRef
from . import optable
from .backends import torch_exec
from .objects import ready_buf

log = logging.getLogger("flexnpu.daemon.graphs")

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
                    and torch_exec.same_strides(ref.shape, t.stride(), ref.stride)
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
        self.replays = 0
        self.traced: _Traced | None | bool = None  # None: not tried yet; False: not traceable

    def run(self, s: Any = None, st: Any = None) -> None:
        t = self.traced
        if t:
            assert isinstance(t, _Traced)
            t.run()
            return
        self._run_steps()
        self.replays += 1
        if t is None and self.replays >= TRACE_AFTER and TRACE:
            self.traced = _Traced.build(self.steps) or False

    def _run_steps(self) -> None:
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


# ---------------------------------------------------------------------------------- traced replay
# Once every step has proved it owns its results, the straight-line program is traced into a
# TorchScript graph and later replays run in its C++ interpreter (no optimisation passes: the
# nodes run in program order, exactly the operators above), which removes the Python of each
# step (~25 us a step on the 2-core VM: a decoder step of 100 operators lost 2.5 ms to it). The
# trace run executes the graph once on copies of the allocations it writes in place, so tracing
# changes nothing. Index tensors are range-checked before each replay, from outside the graph.
TRACE = os.environ.get("FLEXNPU_GRAPH_TRACE", "1") != "0"
TRACE_AFTER = OWNED_PROOFS  # interpretive replays first: ownership proved, views decided
TRACE_COPY_MAX = 64 << 20  # bytes of in-place targets the trace run may copy; beyond, no trace


class _Traced:
    """A graph as a traced TorchScript function of its outside views."""

    __slots__ = ("fn", "ext", "out_allocs", "checks")

    def __init__(
        self, fn: Any, ext: list[_Src], out_allocs: list[Any], checks: list[tuple[Any, ...]]
    ) -> None:
        self.fn, self.ext, self.out_allocs, self.checks = fn, ext, out_allocs, checks

    @staticmethod
    def build(steps: list[_Step]) -> _Traced | None:
        ext: list[_Src] = []
        pos: dict[int, int] = {}

        out_allocs = [al for st in steps for al in st.outs]
        if not out_allocs or any(st.outs and st.owned < OWNED_PROOFS for st in steps):
            return None
        for st in steps:
            for x in _srcs([*st.args, *st.kwargs.values()]):
                if x.kind == _EXTERNAL:
                    if id(x) not in pos:
                        pos[id(x)] = len(ext)
                        ext.append(x)
                elif not (x.direct or x.restride):
                    return None  # a result re-viewed through its bytes: not a plain op chain
        views = [x.get(_NO_RESULTS) for x in ext]
        copied = sum(v.untyped_storage().nbytes() for x, v in zip(ext, views) if x.mutable)
        if copied > TRACE_COPY_MAX:
            return None

        def program(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            results: dict[int, torch.Tensor] = {}
            outs: list[torch.Tensor] = []

            def val(x: _Src) -> torch.Tensor:
                if x.kind == _EXTERNAL:
                    return xs[pos[id(x)]]
                r = results[id(x.alloc)]
                return r if x.direct else r.as_strided(x.ref.shape, x.ref.stride, x.ref.offset)

            for st in steps:
                args = [_map_srcs(a, val) for a in st.args]
                kw = {k: _map_srcs(v, val) for k, v in st.kwargs.items()}
                r = st.opov(*args, **kw)
                if st.outs:
                    flat: list[torch.Tensor] = []
                    torch_exec._flatten_tensors(r, flat)
                    for al, t in zip(st.outs, flat):
                        results[id(al)] = t
                        outs.append(t)
            return tuple(outs)

        # Index checks of INDEXED steps, from outside the graph: every index tensor must be one
        # of the outside views (an index computed inside the graph cannot be checked before it
        # runs, and such a graph is not traced); the indexed sizes are fixed by the layouts.
        checks: list[tuple[Any, ...]] = []
        try:
            for st in steps:
                if st.rule is None:
                    continue

                def arg(x: _Src) -> torch.Tensor:
                    if x.kind == _EXTERNAL:
                        return views[pos[id(x)]]
                    r = x.ref  # a result inside the graph: only its layout is known here
                    return torch.empty_strided(r.shape, r.stride, dtype=r.dtype, device="meta")

                args = tuple([_map_srcs(a, arg) for a in st.args])
                kw = {k: _map_srcs(a, arg) for k, a in st.kwargs.items()}
                for idx, size, wrap, what in ops.index_args(st.rule, st.opov, args, kw):
                    at = next((i for i, v in enumerate(views) if v is idx), None)
                    if at is None:
                        return None
                    checks.append((st.op, st.opov._schema.name, at, size, wrap, what))
        except Exception:  # noqa: BLE001 - a rule that needs more than layouts: keep the step loop
            return None
        traced = _Traced(None, ext, out_allocs, checks)
        try:
            traced.check(views)
            example = tuple(v.clone() if x.mutable else v for x, v in zip(ext, views))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced.fn = torch.jit.trace(  # type: ignore[no-untyped-call]  # untyped in torch
                    program, example, check_trace=False, strict=False
                )
        except Exception:  # noqa: BLE001 - anything the tracer cannot take keeps the step loop
            return None
        return traced

    def check(self, views: list[torch.Tensor]) -> None:
        for op, name, at, size, wrap, what in self.checks:
            try:
                ops.check_index_range(name, views[at], size, wrap, what)
            except ops.IndexOutOfRange as e:
                raise torch_exec.IndexRangeError(f"{op}: {e}") from None

    def run(self) -> None:
        views = [x.get(_NO_RESULTS) for x in self.ext]  # the allocations as they are now
        if self.checks:
            self.check(views)
        with torch.jit.optimized_execution(False):
            outs = self.fn(*views)
        for al, t in zip(self.out_allocs, outs):
            al.set_result(t)


_NO_RESULTS: dict[int, torch.Tensor] = {}  # what an outside view's get() is given (it reads none)


def _srcs(x: Any) -> list[_Src]:
    """The sources in an argument template, nested lists and tuples included."""
    if type(x) is _Src:
        return [x]
    if type(x) in (list, tuple):
        return [s for v in x for s in _srcs(v)]
    return []


def _map_srcs(x: Any, f: Callable[[_Src], Any]) -> Any:
    """The argument template with each source replaced by f(source)."""
    t = type(x)
    if t is _Src:
        return f(x)
    if t is list:
        return [_map_srcs(v, f) for v in x]
    if t is tuple:
        return tuple([_map_srcs(v, f) for v in x])
    return x


def _span(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    p = st.data_ptr()
    return (p, p + st.nbytes()) if st.nbytes() else (0, 0)


# ------------------------------------------------------------------ graphs of the native front end
ASCEND_PREFIXES = ("aclnn::", "aclop::")


class _AscendStep:
    """One operator of the native front end (optable): it writes the tensors it is given, so
    there is nothing to bind. Its converted arguments (views of the allocations, checked against
    the operator's declaration) are kept while every allocation keeps its buffer; the index
    ranges are checked on every run."""

    __slots__ = ("cmd", "device", "allocs", "bufs", "d", "a")

    def __init__(self, cmd: Cmd, device: Any) -> None:
        self.cmd, self.device = cmd, device
        self.allocs: list[tuple[int, Any]] = list(cmd.a[1].items())  # (handle, Alloc)
        self.bufs: list[Any] = []
        self.d: Any = None
        self.a: Any = None

    def run(self) -> None:
        if self.a is None or any(al.buf is not b for (_, al), b in zip(self.allocs, self.bufs)):
            launch, allocs, _ = self.cmd.a

            def resolve(h: int) -> Any:
                al = allocs.get(h)
                if al is None:
                    raise torch_exec.LaunchError(
                        f"{launch.op}: device handle {h} is not an input of this launch"
                    )
                return ready_buf(al, h)

            self.a = None
            self.d, a = optable.prepare(
                self.device, launch.op, launch.args, launch.kwargs, launch.outputs, resolve
            )
            self.bufs = [al.buf for _, al in self.allocs]
            self.a = a
        optable.check_indices(self.d, self.a)
        self.d.fn(dict(self.a))  # a fresh dict: an entry may keep notes in it


class CompiledAscendGraph:
    """A graph of the native front end: its operators with their arguments converted once;
    other commands (device copies, memsets) run as recorded. After TRACE_AFTER replays a graph
    of operators only is traced (_TracedAscend) and replays in TorchScript's interpreter."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps
        self.replays = 0
        self.traced: _TracedAscend | None | bool = None  # None: not tried yet; False: not traceable

    def run(self, s: Any = None, st: Any = None) -> None:
        t = self.traced
        if t:
            assert isinstance(t, _TracedAscend)
            if t.current():
                t.run()
                return
            self.traced, self.replays = None, 0  # an allocation changed its buffer: convert again
        for step in self.steps:
            if type(step) is _AscendStep:
                step.run()
            else:
                step.run(s, st, step)
        self.replays += 1
        if self.traced is None and self.replays >= TRACE_AFTER and TRACE:
            self.traced = _TracedAscend.build(self.steps) or False


class _TracedAscend:
    """A native graph's operators as one traced TorchScript function of the views its steps
    were converted to. The steps' table functions are first recorded as the aten operators
    they run, with every size a constant (make_fx on real tensors: a graph's shapes are fixed),
    then that straight-line graph is traced to TorchScript. Traced only when that cannot change
    what a replay does: every step is a table operator (no device copies or memsets between
    them), no recorded operator reads a tensor's value on the host (the value would be frozen
    into the graph) or draws random numbers, the tracer warned of nothing, and every index
    tensor a step range-checks is read-only in the graph (so checking all of them before the
    replay checks what each step reads). The trace runs execute the program on copies of the
    storages it writes, so tracing changes nothing; replays run it on the views themselves, in
    program order (no optimisation passes), while every allocation keeps the buffer the views
    were built on."""

    __slots__ = ("fn", "inputs", "checked", "held")

    def __init__(self, fn: Any, inputs: list[torch.Tensor], checked: list[Any], held: list[Any]) -> None:
        self.fn, self.inputs, self.checked, self.held = fn, inputs, checked, held

    def current(self) -> bool:
        return all(al.buf is b for al, b in self.held)

    def run(self) -> None:
        for step in self.checked:
            optable.check_indices(step.d, step.a)
        with torch.jit.optimized_execution(False):
            self.fn(*self.inputs)

    @staticmethod
    def build(steps: list[Any]) -> _TracedAscend | None:
        if not steps or any(type(x) is not _AscendStep or x.a is None for x in steps):
            return _untraced("device copies or memsets between its operators")
        inputs: list[torch.Tensor] = []
        pos: dict[int, int] = {}

        def take(v: Any) -> None:
            if isinstance(v, torch.Tensor):
                if id(v) not in pos:
                    pos[id(v)] = len(inputs)
                    inputs.append(v)
            elif type(v) is list or type(v) is tuple:
                for u in v:
                    take(u)

        written: list[torch.Tensor] = []
        for x in steps:
            for v in x.a.values():
                take(v)
            for name in x.d.writes:
                _tensors(x.a.get(name), written)
        spans = [_extent(t) for t in written]
        checked = []
        for x in steps:
            if x.d.indices is None:
                continue
            for idx, *_ in x.d.indices(x.a):
                if isinstance(idx, torch.Tensor):
                    lo, hi = _extent(idx)
                    if any(lo < b and a < hi for a, b in spans):
                        return _untraced("an index tensor the graph itself writes")
            checked.append(x)
        # the trace run works on copies of every storage the graph writes, viewed alike
        copies: dict[int, Any] = {}
        for t in written:
            st = t.untyped_storage()
            if st.data_ptr() not in copies:
                copies[st.data_ptr()] = st
        if sum(st.nbytes() for st in copies.values()) > TRACE_COPY_MAX:
            return _untraced("the storages it writes exceed TRACE_COPY_MAX")
        copies = {p: st.clone() for p, st in copies.items()}

        def rebase(t: torch.Tensor) -> torch.Tensor:
            st = copies.get(t.untyped_storage().data_ptr())
            if st is None:
                return t
            return torch.empty(0, dtype=t.dtype, device=t.device).set_(
                st, t.storage_offset(), t.shape, t.stride()
            )

        def program(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            def sub(v: Any) -> Any:
                if isinstance(v, torch.Tensor):
                    return xs[pos[id(v)]]
                if type(v) is list:
                    return [sub(u) for u in v]
                if type(v) is tuple:
                    return tuple(sub(u) for u in v)
                return v

            for x in steps:
                x.d.fn({k: sub(v) for k, v in x.a.items()})
            return tuple(xs[pos[id(t)]] for t in written[:1])

        try:
            for x in checked:
                optable.check_indices(x.d, x.a)
            examples = tuple(rebase(t) for t in inputs)
            # First the aten operators the steps run, with every size a constant (the graph's
            # shapes are fixed), as an FX graph: a value read on the host shows as a node.
            from torch.fx.experimental.proxy_tensor import make_fx

            gm = make_fx(program, tracing_mode="real")(*examples)
            for node in gm.graph.nodes:
                if node.op == "call_function" and _reads_or_draws(node.target):
                    return _untraced(f"{node.target} reads a value on the host or draws random numbers")
            # then that straight-line graph as TorchScript (C++ interpreter, no Python per op)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                fn = torch.jit.trace(  # type: ignore[no-untyped-call]  # untyped in torch
                    gm, tuple(rebase(t) for t in inputs), check_trace=False, strict=False
                )
            warned = [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)]
            if warned:
                w = warned[0]
                return _untraced(f"the tracer warned at {w.filename}:{w.lineno} ({w.message})")
            if not written:
                return _untraced("it writes nothing")
        except Exception as e:  # noqa: BLE001 - anything the tracer cannot take keeps the step loop
            return _untraced(f"the tracer refused it ({type(e).__name__}: {e})")
        held = [(al, b) for x in steps for (_, al), b in zip(x.allocs, x.bufs)]
        return _TracedAscend(fn, inputs, checked, held)


def _untraced(why: str) -> _TracedAscend | None:
    """No trace (say why in the debug log): the graph keeps its step-by-step replay."""
    log.debug("native graph replays step by step: %s", why)
    return None


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes a view can touch: from its first element to just past its last."""
    if t.numel() == 0:
        return (0, 0)
    p = t.data_ptr()
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return (p, p + (last + 1) * t.element_size())


def _tensors(v: Any, out: list[torch.Tensor]) -> None:
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif type(v) is list or type(v) is tuple:
        for u in v:
            _tensors(u, out)


_HOST_READS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "tolist"})


def _reads_or_draws(target: Any) -> bool:
    """Does this operator of a traced graph read a tensor's value on the host (the value would
    be frozen into the graph) or draw random numbers?"""
    if not isinstance(target, torch._ops.OpOverload):
        return True  # a Python function in the graph: nothing to vouch for it
    if target._opname in _HOST_READS:
        return True
    return torch.Tag.nondeterministic_seeded in target.tags


def _compile_ascend(cmds: list[Cmd], device: Any) -> CompiledAscendGraph | None:
    steps: list[Any] = []
    for cmd in cmds:
        if cmd.op == Op.LAUNCH:
            if not cmd.a[0].op.startswith(ASCEND_PREFIXES):
                return None  # aten launches mixed in: their results are bound lazily (generic path)
            steps.append(_AscendStep(cmd, device))
        elif cmd.op in (Op.MEMCPY_D2D, Op.MEMSET):
            steps.append(cmd)
        else:
            return None
    return CompiledAscendGraph(steps) if any(type(x) is _AscendStep for x in steps) else None


def compile_graph(cmds: list[Cmd], device: Any) -> CompiledGraph | CompiledAscendGraph | None:
    """A compiled program for the graph's commands, or None if any command needs the generic path."""
    if any(c.op == Op.LAUNCH and c.a[0].op.startswith(ASCEND_PREFIXES) for c in cmds):
        return _compile_ascend(cmds, device)
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
