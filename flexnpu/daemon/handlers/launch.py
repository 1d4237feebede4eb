"""Operator launches: decode the payload, resolve every tensor handle at prepare time (so a later
free cannot pull memory from under queued work), bind fresh outputs, run on the backend.

A launch whose structure (the payload with its handles zeroed, protocol.split_launch) the daemon
has validated before takes the planned path: the backend's plan replaces decoding, the output
checks and the cost model, and only what depends on the handles runs per launch. On a daemon
that runs commands in arrival order, a planned launch with nothing queued ahead of it runs at
once (_run_now), without the queued command's object, undo closure and bookkeeping.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from ... import protocol as P
from ...errors import FlexNPUError, InvalidArgument, InvalidHandle, OpNotSupported, code_of, error_for
from ...ops import tensor_refs
from ...protocol import Op
from .. import requests as R
from ...ring.segment import launch_split  # protocol.split_launch, without its wrapper's cost
from ..limits import sized_plan_allowed
from ..objects import HANDLE_COST, MAX_HANDLE, MAX_HANDLES, Alloc, Cmd, MemoryAccount, StreamState, ready_buf
from ..scheduling import command_cost, launch_cost

if TYPE_CHECKING:
    from ..interfaces import PlanningBackend
    from ..session import Session

# Launch payloads up to this size are split for the plan cache (the key is the payload itself).
PLAN_MAX_PAYLOAD = 4096


def _failed(launch_op: str, outs: dict[int, Alloc], e: Exception) -> Exception:
    for al in outs.values():
        al.failed = f"{launch_op}: {e}"
    if isinstance(e, FlexNPUError):
        return e
    return error_for(code_of(e), f"{launch_op} failed on the device: {e}")


def _bind_result(outs: dict[int, Alloc], h: int, buf: Any) -> Alloc | None:
    al = outs.get(h)
    if al is None:
        return None
    actual = buf.numel() * buf.element_size()
    if actual != al.nbytes and al.tables:
        al.owner.uncharge(al.nbytes)
        al.owner.charge(actual)  # may exceed the limit by rounding only: never refuse here
        al.nbytes = actual
    al.buf = buf
    al.result = None
    al.failed = None
    return al


def _run_launch(s: Session, st: StreamState, c: Cmd) -> None:
    launch, allocs, outs = c.a
    be = s.daemon.backend

    def resolve(h: int) -> Any:
        al = allocs.get(h)
        if al is None:
            raise InvalidHandle(f"{launch.op}: device handle {h} is not an input of this launch")
        return ready_buf(al, h)

    def allocate(nbytes: int) -> Any:
        return be.alloc(nbytes)

    try:
        results = be.launch(launch, resolve, allocate)
    except Exception as e:
        raise _failed(launch.op, outs, e) from e
    for h, buf in results:
        _bind_result(outs, h, buf)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _bind_planned(outs: dict[int, Alloc], out_handles: Any, results: Any, keys: Any) -> None:
    """Bind a planned launch's results; each keeps its result tensor as its producer's view.
    A result whose storage is exactly the allocation stays pending (buffer None from run_plan):
    the next planned launch reads the tensor itself, and ready_buf makes its bytes if needed."""
    for h, (buf, view), key in zip(out_handles, results, keys):
        if buf is None:
            al = outs.get(h)
            if al is not None:  # same size as declared (run_plan checked): no accounting change
                al.set_result(view)
                al.failed = None
                al.view = (view, key, view)
            continue
        al = _bind_result(outs, h, buf)
        if al is not None:
            al.view = (buf, key, view)


def _run_planned(s: Session, st: StreamState, c: Cmd) -> None:
    plan, handles, allocs, outs = c.a
    be = cast("PlanningBackend", s.daemon.backend)  # only such a backend made the plan
    n = plan.n_in
    try:
        ins = [allocs[h] for h in handles[:n]]
        bufs = [ready_buf(al, h) for al, h in zip(ins, handles)]
        results = be.run_plan(plan, bufs, handles, be.alloc, [al.view for al in ins])
    except Exception as e:
        raise _failed(plan.op, outs, e) from e
    _bind_planned(outs, handles[n:], results, plan.out_keys)
    if c.sync:
        s.reply_sync(c.user_data, st)


def run_hot(s: Session, st: StreamState, rec: tuple[int, ...]) -> bool:
    """Session.prepare's shortcut for the commonest record of an eager loop: an aten launch whose
    exact structure has a plan, on a stream with nothing queued or captured, on a daemon that
    runs commands in arrival order. Runs it (_run_now) and returns True; returns False, having
    done nothing, for every other launch (the generic path, _p_launch, then takes it from the
    start). Raises what _p_launch would raise for the same record."""
    n = rec[5]
    if n > PLAN_MAX_PAYLOAD:
        return False
    try:
        payload = s.seg.arena_bytes(rec[4], n)  # copied out before parsing
    except Exception:  # noqa: BLE001 - outside the arena: the generic path reports it
        return False
    if payload[2:9] in _TABLE_PREFIXES:
        return False
    plans = s.plans
    if plans is None:
        return False
    split = launch_split(payload, False)
    if split is None:
        return False
    plan = plans.get(split[0])
    if not plan:
        return False
    _run_now(s, st, rec, plan, split[1])
    return True


def _run_now(s: Session, st: StreamState, r: Any, plan: Any, handles: tuple[int, ...]) -> None:
    """A planned launch with nothing queued ahead of it on a daemon that runs commands in arrival
    order (Session.prepare's inline case): checked and run in one pass, without the command, undo
    and stream bookkeeping a queued launch needs. Same checks, same errors, same accounting as
    _p_planned + Session.execute + _run_planned. ``r``: the launch's record (R.Launch or its plain
    tuple). (The hot path of eager decoding: written flat, its common cases inlined.)"""
    if s.dead:
        return
    n = plan.n_in
    table = s.handles
    get = table._h.get
    found = [get(h) for h in handles[:n]]
    # InvalidHandle (another client's, freed) from the table itself: nothing made yet
    ins: list[Alloc] = found if None not in found else [table.get(h) for h in handles[:n]]  # type: ignore[assignment]  # no None: checked
    outs = _planned_outputs(s, plan, handles)
    t = perf_counter()
    try:
        try:
            bufs = _input_bufs(ins, handles, plan.slots, [sl.key for sl in plan.slots])
            hints = [al.view for al in ins]
            be: PlanningBackend = s.daemon.backend  # type: ignore[assignment]  # it made the plan
            if st.device_stream is None:
                results = be.run_plan(plan, bufs, handles, be.alloc, hints)
            else:
                with be.stream_context(st.device_stream):
                    results = be.run_plan(plan, bufs, handles, be.alloc, hints)
        except Exception as e:  # noqa: BLE001 - the client's error, reported like a queued launch's
            s.fail(r[3], r[1] & P.FLAG_SYNC != 0, st, _failed(plan.op, outs, e))
        else:
            if len(results) == 1 and len(outs) == 1:
                # _bind_planned's common case: one output, left pending
                ((buf, view),) = results
                if buf is None:
                    for al in outs.values():
                        al.set_result(view)
                        al.failed = None
                        al.view = (view, plan.out_keys[0], view)
                else:
                    _bind_planned(outs, handles[n:], results, plan.out_keys)
            else:
                _bind_planned(outs, handles[n:], results, plan.out_keys)
            if r[1] & P.FLAG_SYNC:
                s.reply_sync(r[3], st)
    except Exception as e:  # noqa: BLE001 - reporting failed: drop this client alone (as execute)
        _cannot_report(s, e)
    # _ran, inlined
    t1 = perf_counter()
    st.busy_s += t1 - t
    st.ops_done += 1
    s.launches += 1
    s.latency_observe(t1 - s._drain_t)


def _input_bufs(ins: list[Alloc], handles: tuple[int, ...], slots: Any, keys: list[Any]) -> list[Any]:
    """The buffers a launch run at once reads: each input's bytes, except that a pending result
    read in the very layout (keys[k]) its producer returned it needs no bytes made (materialize):
    the tensor itself is the input (_bind_planned; run_plan then uses its view)."""
    bufs = []
    made = False
    for al, h, sl, key in zip(ins, handles, slots, keys):
        b = al.buf
        if b is None:
            res, v = al.result, al.view
            if res is not None and v is not None and v[0] is res and not sl.mutable and v[1] == key:
                b = res
            else:
                b = ready_buf(al, h)
                made = True
        bufs.append(b)
    if made:  # an allocation read twice may have been given its bytes after its first read
        bufs = [al.buf if al.buf is not None else b for al, b in zip(ins, bufs)]
    return bufs


def _cannot_report(s: Session, e: Exception) -> None:
    s.daemon.log.error("client %d: cannot report an error: %s", s.pid, e, exc_info=e)
    s.condemn(f"internal error: {e}")


def _ran(s: Session, st: StreamState, t: float) -> None:
    """What Session.execute counts for a launch that ran at once (since `t`)."""
    t1 = perf_counter()
    st.busy_s += t1 - t
    st.ops_done += 1
    s.launches += 1
    s.daemon.metrics.launch_latency.observe(t1 - s._drain_t)


def _planned_outputs(s: Session, plan: Any, handles: tuple[int, ...]) -> dict[int, Alloc]:
    """_new_outputs for a planned launch: its output handles follow its n_in input handles."""
    n = plan.n_in
    outs: dict[int, Alloc] = {}
    ins = handles[:n]
    table = s.handles
    try:
        for h, (nbytes, ref) in zip(handles[n:], plan.outputs):
            if h in outs or h in ins:
                raise InvalidHandle(f"{plan.op}: output handle {h} is not fresh")
            al = s.new_alloc(nbytes)
            al.ref = ref
            _enter(table, h, al)
            outs[h] = al
    except BaseException:
        for h in outs:
            table.remove(h)
        raise
    return outs


def _enter(table: Any, h: int, al: Alloc) -> None:
    """Put a new allocation in the client's table; if the table refuses it (handle in use or out
    of range, too many handles), give back what new_alloc charged for it."""
    try:
        table.add(h, al)
    except BaseException:
        al.owner.uncharge(al.nbytes)
        raise


def _new_outputs(
    s: Session, op: str, outputs: Any, handle_of: Any, inputs: Any
) -> tuple[dict[int, Alloc], list[int]]:
    """Fresh allocations for a launch's declared outputs, entered in the client's table."""
    outs: dict[int, Alloc] = {}
    created: list[int] = []
    try:
        for i, (nbytes, ref) in enumerate(outputs):
            h = handle_of(i, ref)
            if h in outs or h in inputs:
                raise InvalidHandle(f"{op}: output handle {h} is not fresh")
            al = s.new_alloc(nbytes)
            al.ref = ref  # its declared layout (only the layout is read)
            _enter(s.handles, h, al)
            created.append(h)
            outs[h] = al
    except BaseException:
        for h in created:
            s.handles.remove(h)
        raise
    return outs, created


def _undo(s: Session, created: list[int], outs: dict[int, Alloc]) -> Any:
    def undo() -> None:
        for h in created:
            if h in s.handles and s.handles.get(h) is outs[h]:
                s.handles.remove(h)

    return undo


def _p_planned(s: Session, r: R.Launch, plan: Any, handles: tuple[int, ...]) -> Cmd:
    """A launch whose structure has a plan: only what depends on its handles is left to check."""
    n = plan.n_in
    allocs: dict[int, Alloc] = {}
    alloc_of = s.alloc_of
    for h in handles[:n]:
        if h not in allocs:
            allocs[h] = alloc_of(h)
    outs = _planned_outputs(s, plan, handles)
    created = list(outs)
    cmd = Cmd(
        Op.LAUNCH,
        r.user_data,
        r.sync,
        _run_planned,
        (plan, handles, allocs, outs),
        undo=_undo(s, created, outs),
    )
    cmd.cost = plan.cost  # the launch limits and the cost model depend only on the structure
    return cmd


_TABLE_PREFIXES = (b"aclnn::", b"aclop::")


def _run_table_planned(s: Session, st: StreamState, c: Cmd) -> None:
    plan, handles, offsets, allocs = c.a
    be = cast("PlanningBackend", s.daemon.backend)  # only such a backend made the plan
    try:
        bufs = [ready_buf(al, h) for al, h in zip(allocs, handles)]
        be.run_table_plan(plan, bufs, handles, offsets)
    except Exception as e:
        raise _failed(plan.op, {}, e) from e
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_table_planned(
    s: Session, r: R.Launch, plan: Any, handles: tuple[int, ...], offsets: tuple[int, ...]
) -> Cmd:
    """_p_planned for a table operator's plan: every tensor is an input (it writes the ones it
    is given), each at the offset this launch names."""
    alloc_of = s.alloc_of
    allocs = [alloc_of(h) for h in handles]
    cmd = Cmd(Op.LAUNCH, r.user_data, r.sync, _run_table_planned, (plan, handles, offsets, allocs))
    cmd.cost = plan.cost
    return cmd


def _run_table_now(
    s: Session,
    st: StreamState,
    r: R.Launch,
    plan: Any,
    handles: tuple[int, ...],
    offsets: tuple[int, ...],
    dims: Any = None,
) -> None:
    """_run_now for a table operator's plan (the native front end's eager hot path); `dims`:
    the tensors' sizes and strides, for a plan without them (sized_plans)."""
    if s.dead:
        return
    get = s.handles.get
    ins = [get(h) for h in handles]  # InvalidHandle (another client's, freed): nothing ran
    be: PlanningBackend = s.daemon.backend  # type: ignore[assignment]  # it made the plan

    def run() -> None:
        be.run_table_plan(plan, [ready_buf(al, h) for al, h in zip(ins, handles)], handles, offsets, dims)

    _run_inline(s, st, r, plan.op, {}, run)


def _run_inline(
    s: Session, st: StreamState, r: R.Launch, op: str, outs: dict[int, Alloc], run: Any, bind: Any = None
) -> None:
    """What a launch run at once shares (_run_now is the same, written flat): `run()` on the
    stream's device stream; its failure is the client's error (its outputs marked failed),
    reported like a queued launch's; `bind(run())` and a sync launch's reply on success;
    failing to report drops this client alone, as execute does; the launch is counted."""
    t = perf_counter()
    try:
        try:
            if st.device_stream is None:
                res = run()
            else:
                with s.daemon.backend.stream_context(st.device_stream):
                    res = run()
        except Exception as e:  # noqa: BLE001 - the client's error, reported like a queued launch's
            s.fail(r.user_data, r.sync, st, _failed(op, outs, e))
        else:
            if bind is not None:
                bind(res)
            if r[1] & P.FLAG_SYNC:
                s.reply_sync(r[3], st)
    except Exception as e:  # noqa: BLE001 - reporting failed: drop this client alone (as execute)
        _cannot_report(s, e)
    _ran(s, st, t)


def _p_launch(s: Session, st: StreamState | None, r: R.Launch) -> Cmd | None:
    payload = s.payload_bytes(r[4], r[5])  # (payload_offset, payload_len) copied out before parsing
    be = s.daemon.backend
    # structure -> its plan; None: seen once; False: it has none
    plans: dict[bytes, Any] | None = getattr(be, "plans", None)
    split = sized = None
    # Captured streams take the generic path: graph compilation reads the decoded launch.
    if plans is not None and st is not None and not st.capturing and len(payload) <= PLAN_MAX_PAYLOAD:
        # the op name's first bytes (after its u16 length): the native front end's operators
        # key their plans without tensor offsets (protocol.split_launch_offsets)
        table = payload[2:9] in _TABLE_PREFIXES
        split = launch_split(payload, table)
        if split is not None:
            plan = plans.get(split[0])
            if plan:
                if table:
                    if s.daemon.inline and not st.queue:
                        _run_table_now(s, st, r, plan, split[1], split[2])
                        return None
                    return _p_table_planned(s, r, plan, split[1], split[2])
                if s.daemon.inline and not st.queue:
                    _run_now(s, st, r, plan, split[1])
                    return None
                return _p_planned(s, r, plan, split[1])
            if s.daemon.inline and not st.queue and (table or plan is not False):
                # a structure without a plan of its own: one without sizes may have one
                if table:
                    sized = _try_sized(s, st, r, be, payload, plans, split[0])
                else:
                    sized = _try_aten_sized(s, st, r, be, payload, plans, split[0])
                if sized is True:
                    return None
    try:
        launch = P.decode_launch(payload, be.device)
    except P.DecodeError as e:
        raise InvalidArgument(f"malformed launch: {e}") from None
    if not be.op_allowed(launch.op):
        raise OpNotSupported(f"operator {launch.op} is not supported by the {be.name} backend")
    allocs: dict[int, Alloc] = {}
    for ref in tensor_refs(launch.args, launch.kwargs):
        if ref.handle not in allocs:
            allocs[ref.handle] = s.alloc_of(ref.handle)
    outs, created = _new_outputs(s, launch.op, launch.outputs, lambda _i, ref: ref.handle, allocs)
    undo = _undo(s, created, outs)
    cmd = Cmd(Op.LAUNCH, r.user_data, r.sync, _run_launch, (launch, allocs, outs), undo=undo)
    try:
        s.daemon.launch_limits.check(cmd)
    except BaseException:
        undo()
        raise
    if split is not None:
        _remember_plan(be, plans, split, launch, cmd)  # type: ignore[arg-type]  # plans is set with split
    if sized is not None:
        _remember_sized(be, sized, launch)
    return cmd


class _Twice:
    """The plan cache's mark of a structure seen twice on the sized path (falsy, like None)."""

    def __bool__(self) -> bool:
        return False


_TWICE = _Twice()
# An aten structure run from its plan without sizes is marked once per sighting; the fifth time
# it takes the generic path, which makes its exact plan. Not sooner: a decode step repeats one
# shape several times (each layer's key and value cache grow alike), and a plan made for that
# step's shape would run once and never again.
_SIGHTINGS = (None, _TWICE, _Twice(), _Twice())
_NEXT_SIGHTING = {id(a): b for a, b in zip(_SIGHTINGS, _SIGHTINGS[1:])}


def _try_sized(
    s: Session, st: StreamState, r: R.Launch, be: Any, payload: bytes, plans: dict[bytes, Any], key: bytes
) -> Any:
    """Run a table launch from the plan of its structure without sizes, if there is one and the
    launch ceilings allow it without the full check: True. Otherwise the split (for
    _remember_sized), or None (no such plans, or a payload the splitter refuses). `key`: the
    launch's structure with sizes, which has no plan yet: the third time it comes this way, the
    sized plan makes it one (the exact plan is the faster one: cached view keys, results written
    in place). Not the second, as the generic path does: a growing tensor's structure comes once
    per layer and token, so in a 2-layer model a plan made the second time would never run."""
    sized_plans: dict[bytes, Any] | None = getattr(be, "sized_plans", None)
    if sized_plans is None:
        return None
    sp = launch_split(payload, 2)
    if sp is None:
        return None
    plan = sized_plans.get(sp[0])
    # (check_sized raises over the byte ceiling)
    if plan and s.daemon.launch_limits.check_sized(plan.op, plan.dtypes, sp[3]):
        _run_table_now(s, st, r, plan, sp[1], sp[2], sp[3])
        if not _first_sighting(be, plans, key):
            seen = plans[key]
            if seen is None:
                plans[key] = _TWICE
            elif seen is _TWICE:
                exact = plan.exact(sp[3])
                if exact is not None:
                    metas = [(shape, dt) for dt, (shape, _) in zip(plan.dtypes, sp[3])]
                    exact.cost = launch_cost(plan.op, metas, [])
                plans[key] = exact if exact is not None else False
        return True
    return sp


def _remember_sized(be: Any, sp: Any, launch: Any) -> None:
    """_remember_plan for the structure without sizes: a plan the second time it comes. `sp`:
    its launch_split (mode 2, a table operator's; mode 3, an aten launch's, which also returns
    its outputs' byte counts: their handles follow the plan's n_in input handles)."""
    sized_plans: dict[bytes, Any] = be.sized_plans
    key = sp[0]
    if _first_sighting(be, sized_plans, key):
        return
    if sized_plans[key] is not None:
        return  # it has its plan (this launch needed the full ceiling check), or has none
    plan = be.make_sized_plan(launch) if sized_plan_allowed(launch.op) else None
    n = len(sp[1]) - (len(sp[4]) if len(sp) == 5 else 0)
    sized_plans[key] = plan if plan is not None and plan.n_in == n else False


def _try_aten_sized(
    s: Session, st: StreamState, r: R.Launch, be: Any, payload: bytes, plans: dict[bytes, Any], key: bytes
) -> Any:
    """_try_sized for the Python front end's aten launches (torch_exec.SizedLaunchPlan): True if
    the plan of the launch's structure without sizes ran it; else the split for _remember_sized
    (mode 3), or None. The fifth time an exact structure comes it takes the generic path, which
    makes its exact plan (_remember_plan): a shape that repeats gets the faster one."""
    sized_plans: dict[bytes, Any] | None = getattr(be, "sized_plans", None)
    if sized_plans is None or not hasattr(be, "prepare_sized_plan"):
        return None
    if plans.get(key, 0) is _SIGHTINGS[-1]:
        return None
    sp = launch_split(payload, 3)
    if sp is None:
        return None
    plan = sized_plans.get(sp[0])
    if not plan:
        return sp
    prepared = be.prepare_sized_plan(plan, sp[1], sp[2], sp[3], sp[4])
    # (check_sized raises over the byte ceiling)
    if prepared is None or not s.daemon.launch_limits.check_sized(plan.op, plan.dtypes, sp[3]):
        return None  # the generic path runs and reports it (and keeps the plan)
    _run_sized_now(s, st, r, plan, sp[1], prepared)
    if not _first_sighting(be, plans, key):
        seen = plans[key]
        nxt = _NEXT_SIGHTING.get(id(seen))
        if nxt is not None:
            plans[key] = nxt
    return True


def _run_sized_now(
    s: Session, st: StreamState, r: R.Launch, plan: Any, handles: tuple[int, ...], prepared: Any
) -> None:
    """_run_now for an aten launch from its plan without sizes: its declared output is entered
    and charged as a generic launch's is, then the operator runs on bounds-checked views."""
    if s.dead:
        return
    n = plan.n_in
    table = s.handles
    ins = [table.get(h) for h in handles[:n]]  # InvalidHandle (another client's, freed): nothing made
    outs, _ = _new_outputs(s, plan.op, prepared[1], lambda _i, ref: ref.handle, handles[:n])
    be: PlanningBackend = s.daemon.backend  # type: ignore[assignment]  # it made the plan

    refs = prepared[0]

    def run() -> Any:
        keys = [(ref.dtype, ref.shape, ref.stride, ref.offset) for ref in refs]  # layout_key
        bufs = _input_bufs(ins, handles, plan.plan.slots, keys)
        return be.run_sized_plan(plan, bufs, prepared, be.alloc, [al.view for al in ins])

    def bind(ran: Any) -> None:
        _bind_planned(outs, handles[n:], ran[0], ran[1])

    _run_inline(s, st, r, plan.op, outs, run, bind)


def _remember_plan(
    be: Any, plans: dict[bytes, Any], split: tuple[bytes, tuple[int, ...]], launch: Any, cmd: Cmd
) -> None:
    """Validate `launch`'s structure when it comes a second time and keep it: later launches of
    that structure take _p_planned. A launch that cannot have a plan keeps taking this path
    (which reports its errors)."""
    key = split[0]
    if plans.get(key, 0) is False:
        return  # no plan for this structure (see below)
    if _first_sighting(be, plans, key):
        return
    plan = be.make_plan(launch)
    if plan is None or plan.n_in + len(plan.outputs) != len(split[1]):
        plans[key] = False
        return
    plan.cost = command_cost(cmd)  # cached on cmd too: the scheduler reads the same object
    plans[key] = plan


def _first_sighting(be: Any, plans: dict[bytes, Any], key: bytes) -> bool:
    """Mark `key` seen (None) if it is new, making room first: True then. Structures that never
    come back (an attention whose sequence length grows every token) cost an entry, not a plan
    and a cost model."""
    if key in plans:
        return False
    if len(plans) >= be.PLAN_CACHE_MAX:
        _evict(plans, be.PLAN_CACHE_MAX)
    plans[key] = None
    return True


def _evict(plans: dict[bytes, Any], limit: int) -> None:
    """Make room in a full plan cache. The entries of structures seen only once go first: a
    decode loop whose cache grows adds ~10 of them a token, and clearing everything with them
    would make each of its ~150 repeating structures take the generic path twice again every
    few hundred tokens. Only if plans alone fill half the cache does everything go."""
    once = [k for k, v in plans.items() if v is None or type(v) is _Twice]
    if len(plans) - len(once) > limit // 2:
        plans.clear()
        return
    for k in once:
        del plans[k]


PREPARE: dict[Op, Any] = {
    Op.LAUNCH: _p_launch,
}


# ---- the hot path in C (hotpath.c) ------------------------------------------------------------


def _hot_failed(
    s: Session, st: StreamState, rec: Any, plan: Any, out_h: int, al: Alloc, e: Exception
) -> None:
    """hotpath.c's failed launch: _run_now's report of it (its output marked failed)."""
    s.fail(rec[3], rec[1] & P.FLAG_SYNC != 0, st, _failed(plan.op, {out_h: al}, e))


def _hot_bind(plan: Any, handles: tuple[int, ...], out_h: int, al: Alloc, results: Any) -> None:
    """hotpath.c's results other than one pending tensor: _run_now's binding of them."""
    _bind_planned({out_h: al}, handles[plan.n_in :], results, plan.out_keys)


def _install_hot() -> Callable[[Session, Any, int], None] | None:
    """Session.drain's loop in C with run_hot's launches in it (hotpath.c drain_batch), or None
    (Session.prepare then takes run_hot above) when $FLEXNPU_DAEMON_HOTPATH is 0 or the module
    is not built."""
    if os.environ.get("FLEXNPU_DAEMON_HOTPATH", "1").strip() == "0":
        return None
    try:
        from .._hot_core import lib
    except ImportError:
        return None
    from ..session import MAX_ALLOC

    ns: dict[str, Any] = {}
    if lib.fxh_install(id(ns)) != 0:  # id() is the dict's address in CPython
        return None
    ns["configure"](
        {
            "launch_split": launch_split,
            "run_now": _run_now,
            "failed": _hot_failed,
            "bind": _hot_bind,
            "cannot_report": _cannot_report,
            "ready_buf": ready_buf,
            "alloc_type": Alloc,
            "account_type": MemoryAccount,
            "plan_max_payload": PLAN_MAX_PAYLOAD,
            "max_handles": MAX_HANDLES,
            "max_handle": MAX_HANDLE,
            "handle_cost": HANDLE_COST,
            "max_alloc": MAX_ALLOC,
            "flag_sync": P.FLAG_SYNC,
            "launch_op": int(Op.LAUNCH),
            "sqe_size": P.SQE_SIZE,
            "unpack": P.SQE.unpack_from,
        }
    )
    drain: Callable[[Session, Any, int], None] = ns["drain_batch"]
    return drain


HOT_DRAIN = _install_hot()
