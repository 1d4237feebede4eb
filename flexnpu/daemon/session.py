"""One attached client: its segment, its object tables, and the handling of its requests.

Requests are handled in two steps. `prepare` runs when the daemon drains the client's SQ: it
copies and validates the record, resolves handles to objects (so later frees cannot pull memory
from under queued work) and either answers at once or queues a command on the stream. `execute`
runs when the scheduler picks that command. Anything a client sends that is wrong becomes an
error for that client only.
"""

from __future__ import annotations

import json
import struct
import time
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from .. import protocol as P
from ..errors import (
    BadState,
    FlexNPUError,
    error_for,
    InvalidArgument,
    InvalidHandle,
    NotFound,
    OpNotSupported,
    OutOfMemory,
    PermissionDenied,
    code_of,
)
from ..protocol import Op
from ..ring import RingError
from .metrics import COPY_DIRECTION, copied_bytes
from .objects import (
    MAX_IMPORT_PIDS,
    Alloc,
    Cmd,
    EventState,
    Graph,
    HandleTable,
    MemoryAccount,
    StreamState,
    process_start_time,
    ready_buf,
)

if TYPE_CHECKING:
    from .interfaces import DaemonServices as Daemon  # the daemon as a session sees it

MAX_ALLOC = 1 << 44
MAX_STREAMS = 1024
MAX_EVENTS = 1 << 16
MAX_GRAPHS = 4096
MAX_PENDING_REPLIES = 4096
MAX_GRAPH_OPS = 1 << 20
MAX_WAITERS = 4096  # unanswered DEVICE_SYNC/EVENT_SYNC per client
MAX_QUEUED = 1 << 18  # commands waiting in one stream: bounds a blocked stream's memory
# What a client's bad request or a failing operator may raise; anything else is logged as a bug.
_EXPECTED = (
    FlexNPUError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    MemoryError,
    NotImplementedError,
    RuntimeError,
    OverflowError,
)


CMD_COST = 256  # daemon memory of one prepared command (Cmd, closures, queue slot)
VALUE_COST = 96  # ... plus per decoded launch value (TensorRef, ints, lists)


def held_bytes(cmd: Cmd) -> int:
    """What keeping `cmd` costs the daemon: charged to the client while it is queued or captured."""
    n = CMD_COST
    if cmd.op == Op.LAUNCH:
        n += VALUE_COST * cmd.a[0].values
    elif cmd.op == Op.MEMCPY_H2D and isinstance(cmd.a[3], bytes):
        n += len(cmd.a[3])  # host data copied out at drain time
    return n


class Session:
    def __init__(
        self,
        daemon: Daemon,
        cid: int,
        seg: Any,
        conn: Any,
        pid: int,
        uid: int,
        mailbox: tuple[int, int],
        memory_limit: int | None,
        phase: str,
        cmdline: str,
    ) -> None:
        self.daemon = daemon
        self.cid = cid
        self.seg = seg
        self.conn = conn
        self.pid, self.uid = pid, uid
        self.cmdline = cmdline
        self.mailbox = mailbox
        self.phase = phase
        self.attached_at = time.time()
        self.last_active = time.monotonic()  # last drain that found records (ring order)
        self.start_time = process_start_time(pid)  # with pid: this process, not a later one
        self.mem = MemoryAccount(memory_limit, parent=daemon.device_memory)
        # What this client makes the daemon hold besides device memory (handles, queued and
        # captured commands, copied-out payloads): bounded per client (--client-host-memory).
        self.host = MemoryAccount(daemon.client_host_memory)
        self.handles = HandleTable(self.host)
        self.streams: dict[int, StreamState] = {0: self._new_stream(0, 0)}
        self.events: dict[int, EventState] = {}
        self.graphs: dict[int, Graph] = {}
        self.error: tuple[int, str] | None = None  # async error not tied to a stream
        # device syncs waiting for this client's work to finish (event syncs wait on their event)
        self.waiters: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        self.n_waiters = 0  # all waiters of this client, event syncs included
        self.pending_replies: list[bytes] = []
        self.held: list[tuple[Any, ...]] | None = None  # replies kept until an emulated kernel completes
        self.ops_total = 0
        self.ops_rate = 0.0
        self._rate_mark = (time.monotonic(), 0)
        self.dead = False
        self.kill: str | None = None  # set when the client must be disconnected (misbehaving)
        self.rec_buf = bytearray(P.SQE_SIZE * daemon.batch)
        # metrics (flexnpu/daemon/metrics.py reads them at scrape time)
        self.launches = 0
        self.copied = {"h2d": 0, "d2h": 0, "d2d": 0}
        self.cq_overflows = 0
        self.last_mark: dict[int, float] = {}  # stream -> perf_counter of its last STEP_MARK
        self._drain_t = 0.0

    # ------------------------------------------------------------------ helpers
    def _new_stream(self, sid: int, priority: int) -> StreamState:
        st = StreamState(sid, priority, self.phase if sid == 0 else "auto")
        st.device_stream = self.daemon.backend.new_stream(priority)
        return st

    def queue_depth(self) -> int:
        return sum(len(s.queue) for s in self.streams.values())

    def reply(self, user_data: int, status: int = 0, value: int = 0, aux: int = 0, msg: str = "") -> None:
        if self.held is not None:
            self.held.append((user_data, status, value, aux, msg))
            return
        n = 0
        if msg:
            off, cap = self.mailbox
            data = msg.encode()[:cap]
            self.seg.arena_view(off, len(data))[:] = data
            n = len(data)
        rec = P.CQE.pack(user_data, int(status), n, value & 0xFFFFFFFFFFFFFFFF, aux & 0xFFFFFFFFFFFFFFFF)
        # Never raise from here (error paths and the scheduler reply too): a client whose CQ is
        # corrupt or full is condemned, and the loop drops it alone.
        try:
            if not self.pending_replies and self.seg.cq.push(rec):
                return
        except RingError as e:
            self.condemn(f"corrupt completion ring: {e}")
            return
        if len(self.pending_replies) >= MAX_PENDING_REPLIES:
            self.condemn("it does not consume its completion ring")
            return
        if not self.pending_replies:
            self.daemon.backlogged.add(self)
        self.pending_replies.append(rec)
        self.cq_overflows += 1

    def flush_replies(self) -> None:
        n = 0
        try:
            while n < len(self.pending_replies) and self.seg.cq.push(self.pending_replies[n]):
                n += 1
        except RingError as e:
            self.condemn(f"corrupt completion ring: {e}")
        if n:
            del self.pending_replies[:n]
        if not self.pending_replies:
            self.daemon.backlogged.discard(self)

    def condemn(self, why: str) -> None:
        """Mark this client for disconnection (its own failure); the loop drops it next, and
        nothing more of its work runs meanwhile. Never raises."""
        if self.kill is None:
            self.kill = why
            self.daemon.doomed.add(self)

    def reply_json(self, user_data: int, obj: dict[str, Any]) -> None:
        self.reply(user_data, 0, msg=json.dumps(obj))

    def fail(self, user_data: int, sync: bool, stream: StreamState | None, exc: BaseException) -> None:
        code = code_of(exc)
        msg = str(exc) or type(exc).__name__
        if not isinstance(exc, _EXPECTED):
            self.daemon.log.error(
                "client %d: unexpected %s: %s", self.pid, type(exc).__name__, msg, exc_info=exc
            )
        if sync:
            self.reply(user_data, code, msg=msg)
        elif stream is not None:
            stream.set_error(code, msg)
        elif self.error is None:
            self.error = (code, msg)

    def stream(self, sid: int) -> StreamState:
        st = self.streams.get(sid)
        if st is None:
            raise InvalidHandle(f"unknown stream {sid}")
        return st

    def alloc_of(self, h: int) -> Alloc:
        return self.handles.get(h)

    def _bounds(self, a: Alloc, off: int, n: int, what: str) -> None:
        if off < 0 or n < 0 or off + n > a.nbytes:
            raise InvalidArgument(f"{what}: range [{off}, {off + n}) outside allocation of {a.nbytes} bytes")

    def _payload(self, off: int, n: int) -> memoryview:
        if n > P.MAX_PAYLOAD:
            raise InvalidArgument("payload too large")
        try:
            view: memoryview = self.seg.arena_view(off, n)
            return view
        except Exception as e:
            raise InvalidArgument(f"payload outside the arena: {e}") from None

    def new_alloc(self, nbytes: int) -> Alloc:
        if not 0 <= nbytes <= MAX_ALLOC:
            raise InvalidArgument(f"allocation size {nbytes} out of range")
        if not self.mem.charge(nbytes):
            dev = self.daemon.device_memory
            if self.mem.limit is not None and self.mem.used + nbytes > self.mem.limit:
                raise OutOfMemory(
                    f"device memory limit of this client exceeded: {self.mem.used} bytes in use, "
                    f"{nbytes} requested, limit {self.mem.limit}"
                )
            raise OutOfMemory(
                f"device out of memory: {dev.used} of {dev.limit} bytes in use by all clients, "
                f"{nbytes} requested"
            )
        return Alloc(nbytes, self.mem)

    # ------------------------------------------------------------------ drain
    def drain(self) -> int:
        """Prepare up to one batch of this client's requests. Returns how many."""
        n: int = self.seg.sq.pop_into(self.rec_buf, self.daemon.batch)
        if n:
            self.ops_total += n
            self._drain_t = time.perf_counter()
            buf, unpack, prep = self.rec_buf, P.SQE.unpack_from, self.prepare
            for i in range(n):
                prep(unpack(buf, i * P.SQE_SIZE))
        return n

    def prepare(self, rec: tuple[int, ...]) -> None:
        if self.kill is not None:
            return
        op, flags, sid, ud, poff, plen, a0, a1, a2, a3, a4 = rec
        sync = flags & P.FLAG_SYNC != 0
        st: StreamState | None = None
        cmd: Cmd | None = None
        try:
            entry = _HANDLERS[op] if op < len(_HANDLERS) else None
            if entry is None:
                raise InvalidArgument(f"unknown opcode {op}")
            handler, ordered = entry
            if ordered:
                st = self.streams.get(sid)
                if st is None:
                    raise InvalidHandle(f"unknown stream {sid}")
                if st.capturing and (sync or op == Op.STREAM_SYNC) and op not in _SYNC_IN_CAPTURE:
                    # refused before the handler runs, so a refused command leaves no trace
                    # (an EVENT_RECORD counted but never run would make its event never complete)
                    raise BadState(f"{Op(op).name} is not allowed while stream {sid} is being captured")
            cmd = handler(self, st, ud, sync, poff, plen, (a0, a1, a2, a3, a4), flags)
            if cmd is None:
                return
            cmd.t0 = self._drain_t
            assert st is not None, "only stream-ordered requests return a command"
            if st.capturing:
                g = self.graphs[st.capturing]
                if cmd.sync and op not in _SYNC_IN_CAPTURE and op != Op.GRAPH_BEGIN:
                    raise BadState(f"{Op(op).name} is not allowed while stream {sid} is being captured")
                if op != Op.GRAPH_BEGIN:
                    if len(g.ops) >= MAX_GRAPH_OPS:
                        raise BadState("graph too large")
                    self._charge_host(held_bytes(cmd), "captured graphs")
                    g.ops.append(cmd)
                    g.retain(cmd)
                    g.held += held_bytes(cmd)
            if self.daemon.inline and not st.queue and cmd.ready is None:
                # Nothing queued ahead on this stream and the policy does not reorder: run now.
                cmd.undo = None
                self.execute(st, cmd)
            else:
                if len(st.queue) >= MAX_QUEUED:
                    raise BadState(
                        f"stream {sid} has {MAX_QUEUED} commands waiting (is it blocked on an "
                        f"event that is never recorded?)"
                    )
                n = held_bytes(cmd)
                self._charge_host(n, "queued commands")
                cmd.held = n
                cmd.undo = None
                st.queue.append(cmd)
                self.daemon.scheduler.activate(self, st)
        except Exception as e:  # noqa: BLE001 - every failure is the client's error, never ours
            if cmd is not None and cmd.undo is not None:
                # prepared but refused: take back what preparing it did (counts, handles)
                try:
                    cmd.undo()
                except Exception:  # noqa: BLE001
                    pass
            self.fail(ud, sync, st, e)

    # ------------------------------------------------------------------ execute
    def _charge_host(self, n: int, what: str) -> None:
        if not self.host.charge(n):
            raise OutOfMemory(
                f"this client's {what} exceed its host memory budget in the daemon "
                f"({self.host.used} of {self.host.limit} bytes in use; synchronize, or "
                f"destroy graphs, handles or events it no longer needs)"
            )

    def execute(self, st: StreamState, cmd: Cmd) -> None:
        """Run one prepared command. Never raises: whatever goes wrong is this client's error
        (or, if even reporting it fails, this client's disconnection), never the caller's: the
        scheduler runs every client's commands and must not fail for all because of one."""
        if cmd.held:
            self.host.uncharge(cmd.held)
            cmd.held = 0
        if self.kill is not None or self.dead:
            return
        t0 = time.perf_counter()
        try:
            try:
                if st.device_stream is None:
                    cmd.run(self, st, cmd)
                else:
                    with self.daemon.backend.stream_context(st.device_stream):
                        cmd.run(self, st, cmd)
            except Exception as e:  # noqa: BLE001
                self.fail(cmd.user_data, cmd.sync, st, e)
        except Exception as e:  # noqa: BLE001 - reporting the error failed: drop the client alone
            self.daemon.log.error("client %d: cannot report an error: %s", self.pid, e, exc_info=e)
            self.condemn(f"internal error: {e}")
        t1 = time.perf_counter()
        st.busy_s += t1 - t0
        st.ops_done += 1
        op = cmd.op
        if op == Op.LAUNCH:
            self.launches += 1
            self.daemon.metrics.launch_latency.observe(t1 - cmd.t0)
        elif op in COPY_DIRECTION:
            self.copied[COPY_DIRECTION[op]] += copied_bytes(cmd)

    def take_error(self, st: StreamState | None) -> tuple[int, str] | None:
        err = None
        if st is not None and st.error is not None:
            err, st.error = st.error, None
        elif self.error is not None:
            err, self.error = self.error, None
        return err

    def reply_sync(self, ud: int, st: StreamState | None, value: int = 0) -> None:
        err = self.take_error(st)
        if err is None:
            self.reply(ud, 0, value)
        else:
            self.reply(ud, err[0], value, msg=err[1])

    # ------------------------------------------------------------------ waiters
    def add_waiter(self) -> None:
        """Count one more waiter (a DEVICE_SYNC or EVENT_SYNC not answered yet); bounded per client."""
        if self.n_waiters >= MAX_WAITERS:
            raise BadState(f"too many synchronizations waiting in this client (limit {MAX_WAITERS})")
        self.n_waiters += 1

    def run_waiter(self, done: Callable[[], None]) -> None:
        if self.dead or self.kill is not None:
            return
        self.n_waiters -= 1
        try:
            done()
        except Exception as e:  # noqa: BLE001
            self.daemon.log.warning("client pid %d: completion failed: %s", self.pid, e)

    def poll_waiters(self) -> None:
        if self.dead or not self.waiters:
            self.daemon.waiting.discard(self)
            return
        keep: list[tuple[Callable[[], bool], Callable[[], None]]] = []
        for ready, done in self.waiters:
            if ready():
                self.run_waiter(done)
            else:
                keep.append((ready, done))
        self.waiters = keep
        if not keep:
            self.daemon.waiting.discard(self)

    def fire_event(self, ev: EventState) -> None:
        """The event's completed count moved: its waiters up to it are due (no scan of others)."""
        w = ev.waiters
        while w and w[0][0] <= ev.completed:
            self.daemon.fired.append((self, w.popleft()[1]))

    def update_rate(self, now: float) -> None:
        t, n = self._rate_mark
        if now - t >= 0.5:
            self.ops_rate = (self.ops_total - n) / (now - t)
            self._rate_mark = (now, self.ops_total)

    def close(self) -> None:
        """Reclaim everything this client owned."""
        self.dead = True
        try:
            self.daemon.collectives.session_closed(self)  # its ranks fail their communicators
        except Exception as e:  # noqa: BLE001 - reclaiming the rest must still happen
            self.daemon.log.error("client %d: leaving its communicators failed: %s", self.pid, e)
        self.handles.clear()
        for st in self.streams.values():
            st.queue.clear()
        self.streams.clear()
        for g in self.graphs.values():
            g.release()
        self.graphs.clear()
        self.events.clear()
        self.waiters.clear()
        self.pending_replies.clear()
        try:
            self.seg.close()
        except Exception:  # noqa: BLE001
            pass

    def status(self) -> dict[str, Any]:
        return {
            "client_id": self.cid,
            "pid": self.pid,
            "uid": self.uid,
            "cmdline": self.cmdline,
            "phase": self.phase,
            "memory_bytes": self.mem.used,
            "memory_peak_bytes": self.mem.peak,
            "memory_limit": self.mem.limit,
            "ops_per_s": round(self.ops_rate, 1),
            "host_bytes": self.host.used,
            "host_limit": self.host.limit,
            "ops_total": self.ops_total,
            "queue_depth": self.queue_depth(),
            "streams": len(self.streams),
            "handles": len(self.handles),
            "attached_at": self.attached_at,
            "graphs": len(self.graphs),
            "graphs_compiled": sum(1 for g in self.graphs.values() if g.compiled),
        }


# ====================================================================== request handlers
# Each: (session, stream|None, user_data, sync, payload_off, payload_len, args, flags) -> Cmd|None.
# Returning None means it was answered (or needed no answer) at once. The stream is None only
# for requests that are not stream-ordered (P.OPS[op].stream_ordered).
Args = tuple[int, ...]  # a0..a4 of the record
Handler = Callable[[Session, StreamState | None, int, bool, int, int, Args, int], Cmd | None]


def _run_nop(s: Session, st: StreamState, c: Cmd) -> None:
    if c.sync:
        s.reply_sync(c.user_data, None)


def _p_nop(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    return Cmd(Op.NOP, ud, sync, _run_nop)


def _p_device_info(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    info = dict(s.daemon.backend_info)
    info.update(device=s.daemon.device, policy=s.daemon.policy_name, memory_limit=s.mem.limit)
    s.reply_json(ud, info)


def _all_idle(s: Session) -> bool:
    return all(not q.queue for q in s.streams.values()) and not s.daemon.scheduler.busy(s)


def _p_device_sync(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    def done() -> None:
        s.daemon.backend.synchronize()
        err = s.error
        for q in s.streams.values():
            err = err or q.error
            q.error = None
        s.error = None
        s.reply(ud, err[0] if err else 0, msg=err[1] if err else "")

    s.add_waiter()
    s.waiters.append((lambda: _all_idle(s), done))
    s.daemon.waiting.add(s)


def _p_stream_create(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    sid, prio = a[0], a[1]
    if not 0 < sid < 1 << 32:
        raise InvalidArgument(f"stream id {sid} out of range")
    if sid in s.streams:
        raise InvalidHandle(f"stream {sid} already exists")
    if len(s.streams) >= MAX_STREAMS:
        raise InvalidArgument(f"too many streams (limit {MAX_STREAMS})")
    prio = struct.unpack("<q", struct.pack("<Q", prio))[0]
    s.streams[sid] = s._new_stream(sid, max(-8, min(8, prio)))
    if sync:
        s.reply(ud)


def _run_stream_destroy(s: Session, st: StreamState, c: Cmd) -> None:
    s.daemon.backend.sync_stream(st.device_stream)
    s.streams.pop(st.sid, None)  # the scheduler drops a stream once it is gone from the table
    if c.sync:
        s.reply(c.user_data)


def _p_stream_destroy(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    assert st is not None  # stream-ordered: prepare resolved it
    if st.sid == 0:
        raise InvalidArgument("the default stream cannot be destroyed")
    return Cmd(Op.STREAM_DESTROY, ud, sync, _run_stream_destroy)


def _run_stream_sync(s: Session, st: StreamState, c: Cmd) -> None:
    s.daemon.backend.sync_stream(st.device_stream)
    s.reply_sync(c.user_data, st)


def _p_stream_sync(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    return Cmd(Op.STREAM_SYNC, ud, True, _run_stream_sync)


def _p_stream_query(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    target = s.stream(a[0])
    s.reply(ud, 0, int(not target.queue))


def _event(s: Session, eid: int) -> EventState:
    ev = s.events.get(eid)
    if ev is None:
        raise InvalidHandle(f"unknown event {eid}")
    return ev


def _p_event_create(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    eid = a[0]
    if not 0 < eid < 1 << 32 or eid in s.events:
        raise InvalidHandle(f"event id {eid} invalid or in use")
    if len(s.events) >= MAX_EVENTS:
        raise InvalidArgument("too many events")
    s.events[eid] = EventState()
    if sync:
        s.reply(ud)


def _p_event_destroy(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    _event(s, a[0])
    del s.events[a[0]]
    if sync:
        s.reply(ud)


def _run_event_record(s: Session, st: StreamState, c: Cmd) -> None:
    ev: EventState = c.a[0]
    try:
        ev.token = s.daemon.backend.record_event(st.device_stream)
    finally:  # a failed record still completes: its error goes to the stream, nobody hangs
        if c.a[1] > ev.completed:
            ev.completed = c.a[1]
            if ev.waiters:
                s.fire_event(ev)
    if c.sync:  # every FLAG_SYNC request is answered exactly once
        s.reply_sync(c.user_data, st)


def _p_event_record(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    ev = _event(s, a[0])
    ev.requested += 1
    n = ev.requested

    def undo() -> None:
        if ev.requested == n:
            ev.requested -= 1

    return Cmd(Op.EVENT_RECORD, ud, sync, _run_event_record, (ev, n), undo=undo)


def _run_wait_event(s: Session, st: StreamState, c: Cmd) -> None:
    ev: EventState = c.a[0]
    if ev.token is not None:
        s.daemon.backend.wait_event(st.device_stream, ev.token)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_stream_wait_event(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    ev = _event(s, a[0])
    target = ev.requested  # waits for the latest record issued before this call, as in CUDA
    return Cmd(Op.STREAM_WAIT_EVENT, ud, sync, _run_wait_event, (ev,), ready=lambda: ev.completed >= target)


def _p_event_sync(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    ev = _event(s, a[0])
    target = ev.requested
    s.add_waiter()

    def done() -> None:
        if ev.token is not None:
            s.daemon.backend.event_sync(ev.token)
        s.reply(ud)

    # Kept on the event, in target order (targets only grow): the record that reaches the
    # target fires it, so waiting costs nothing per loop however many waiters there are.
    ev.waiters.append((target, done))
    s.fire_event(ev)


def _p_event_query(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    ev = _event(s, a[0])
    done = ev.completed >= ev.requested and (ev.token is None or s.daemon.backend.event_done(ev.token))
    s.reply(ud, 0, int(done))


def _p_event_elapsed(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    e0, e1 = _event(s, a[0]), _event(s, a[1])
    if e0.token is None or e1.token is None or e0.completed < e0.requested or e1.completed < e1.requested:
        raise BadState("elapsed time needs two completed events")
    ms = s.daemon.backend.elapsed_ms(e0.token, e1.token)
    s.reply(ud, 0, struct.unpack("<Q", struct.pack("<d", ms))[0])


def _p_malloc(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    h, nbytes = a[0], a[1]
    if h in s.handles:
        raise InvalidHandle(f"handle {h} is already in use")
    al = s.new_alloc(nbytes)
    try:
        al.buf = s.daemon.backend.alloc(nbytes)
        s.handles.add(h, al)
    except BaseException:
        s.mem.uncharge(nbytes)
        raise
    if sync:
        s.reply(ud)


def _p_free(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    al = s.handles.remove(a[0])
    # Its exports go too: otherwise the registry would keep memory alive that nobody is charged
    # for. Processes that already imported it keep it (and it stays charged to its owner).
    for key in [k for k, e in s.daemon.exports.items() if e.alloc is al and e.owner_client == s.cid]:
        del s.daemon.exports[key]
    if sync:
        s.reply(ud)


def _run_memset(s: Session, st: StreamState, c: Cmd) -> None:
    al, h, off, val, n = c.a
    s.daemon.backend.memset(ready_buf(al, h), off, val, n)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_memset(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    al = s.alloc_of(a[0])
    s._bounds(al, a[1], a[3], "memset")
    return Cmd(Op.MEMSET, ud, sync, _run_memset, (al, a[0], a[1], a[2], a[3]))


def _run_h2d(s: Session, st: StreamState, c: Cmd) -> None:
    al, h, off, src = c.a
    s.daemon.backend.h2d(ready_buf(al, h), off, src)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_h2d(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    al = s.alloc_of(a[0])
    n = a[2]
    s._bounds(al, a[1], n, "memcpy host->device")
    if plen != n:
        raise InvalidArgument("memcpy host->device: payload length differs from the copy size")
    view = s._payload(poff, plen)
    src = view if (flags & P.FLAG_DEFERRED) else bytes(view)  # copied out now unless deferred
    return Cmd(Op.MEMCPY_H2D, ud, sync, _run_h2d, (al, a[0], a[1], src))


def _run_d2h(s: Session, st: StreamState, c: Cmd) -> None:
    al, h, off, n, dst = c.a
    s.daemon.backend.d2h(ready_buf(al, h), off, n, dst)
    if c.sync:
        s.daemon.backend.sync_stream(st.device_stream)
        s.reply_sync(c.user_data, st)


def _p_d2h(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    al = s.alloc_of(a[0])
    n = a[2]
    s._bounds(al, a[1], n, "memcpy device->host")
    if plen != n:
        raise InvalidArgument("memcpy device->host: destination length differs from the copy size")
    return Cmd(Op.MEMCPY_D2H, ud, sync, _run_d2h, (al, a[0], a[1], n, s._payload(poff, plen)))


def _run_d2d(s: Session, st: StreamState, c: Cmd) -> None:
    dal, dh, doff, sal, sh, soff, n = c.a
    s.daemon.backend.d2d(ready_buf(dal, dh), doff, ready_buf(sal, sh), soff, n)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_d2d(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    dal, sal = s.alloc_of(a[0]), s.alloc_of(a[2])
    s._bounds(dal, a[1], a[4], "memcpy device->device (destination)")
    s._bounds(sal, a[3], a[4], "memcpy device->device (source)")
    return Cmd(Op.MEMCPY_D2D, ud, sync, _run_d2d, (dal, a[0], a[1], sal, a[2], a[3], a[4]))


def _p_mem_stats(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    s.reply_json(
        ud,
        {
            "allocated": s.mem.used,
            "peak": s.mem.peak,
            "limit": s.mem.limit,
            "reserved": s.mem.used,
            "handles": len(s.handles),
            "host_bytes": s.host.used,
            "host_limit": s.host.limit,
            "total": s.daemon.backend_info.get("total_memory"),
        },
    )


def _p_ipc_export(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    al = s.alloc_of(a[0])
    if a[1] & ~P.IPC_EXPORT_SAME_UID:
        raise InvalidArgument(f"unknown IPC export flags {a[1]:#x}")
    key = s.daemon.export(s, a[0], al, same_uid=bool(a[1] & P.IPC_EXPORT_SAME_UID))
    s.reply(ud, 0, key)


def _p_ipc_set_pids(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    if plen % 4 or plen > 4 * 4096:
        raise InvalidArgument("pid list must be at most 4096 u32 values")
    pids = struct.unpack(f"<{plen // 4}I", bytes(s._payload(poff, plen)))
    exp = s.daemon.exports.get(a[0])
    if exp is None or exp.owner_client != s.cid:
        raise NotFound(f"no export with key {a[0]:#x} owned by this client")
    exp.prune()
    missing = [p for p in pids if p not in exp.pids and not exp.grant(p)]
    if len(exp.pids) > MAX_IMPORT_PIDS:
        for p in pids:
            exp.pids.pop(p, None)
        raise InvalidArgument(f"an export may be granted to at most {MAX_IMPORT_PIDS} processes")
    if missing:
        # a grant names a running process; one for a pid that is not running would go to
        # whichever process gets that pid next
        raise InvalidArgument(
            f"pid {missing[0]} is not a running process; "
            f"{len(pids) - len(missing)} of {len(pids)} pids granted"
        )
    if sync:
        s.reply(ud)


def _p_ipc_import(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    key, h = a[0], a[1]
    exp = s.daemon.exports.get(key)
    if exp is None:
        raise NotFound(f"no exported device memory with key {key:#x}")
    if exp.owner_client != s.cid and not exp.allows(s.pid, s.start_time) and exp.same_uid != s.uid:
        raise PermissionDenied(f"pid {s.pid} is not on the import list of key {key:#x}")
    s.handles.add(h, exp.alloc)
    s.reply(ud, 0, exp.alloc.nbytes)


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
        for al in outs.values():
            al.failed = f"{launch.op}: {e}"
        if isinstance(e, FlexNPUError):
            raise
        raise error_for(code_of(e), f"{launch.op} failed on the device: {e}") from e
    for h, buf in results:
        al = outs.get(h)
        if al is None:
            continue
        actual = buf.numel() * buf.element_size()
        if actual != al.nbytes and al.tables:
            al.owner.uncharge(al.nbytes)
            al.owner.charge(actual)  # may exceed the limit by rounding only: never refuse here
            al.nbytes = actual
        al.buf = buf
        al.result = None
        al.failed = None
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_launch(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    payload = bytes(s._payload(poff, plen))  # copy out before parsing
    try:
        launch = P.decode_launch(payload, s.daemon.backend.device)
    except P.DecodeError as e:
        raise InvalidArgument(f"malformed launch: {e}") from None
    if not s.daemon.backend.op_allowed(launch.op):
        raise OpNotSupported(f"operator {launch.op} is not supported by the {s.daemon.backend.name} backend")
    allocs: dict[int, Alloc] = {}
    for ref in _tensor_refs(launch.args, launch.kwargs):
        if ref.handle not in allocs:
            allocs[ref.handle] = s.alloc_of(ref.handle)
    outs: dict[int, Alloc] = {}
    created: list[int] = []
    try:
        for nbytes, ref in launch.outputs:
            h = ref.handle
            if h in outs or h in allocs:
                raise InvalidHandle(f"{launch.op}: output handle {h} is not fresh")
            al = s.new_alloc(nbytes)
            al.ref = ref
            s.handles.add(h, al)
            created.append(h)
            outs[h] = al
    except BaseException:
        for h in created:
            s.handles.remove(h)
        raise

    def undo() -> None:
        for h in created:
            if h in s.handles and s.handles.get(h) is outs[h]:
                s.handles.remove(h)

    cmd = Cmd(Op.LAUNCH, ud, sync, _run_launch, (launch, allocs, outs), undo=undo)
    try:
        s.daemon.launch_limits.check(cmd)
    except BaseException:
        undo()
        raise
    return cmd


def _tensor_refs(args: Any, kwargs: dict[str, Any]) -> list[P.TensorRef]:
    out: list[P.TensorRef] = []
    stack: list[Any] = [args, list(kwargs.values())]
    while stack:
        v = stack.pop()
        if isinstance(v, P.TensorRef):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def _run_graph_mark(s: Session, st: StreamState, c: Cmd) -> None:
    if c.sync:
        s.reply_sync(c.user_data, st, c.a[1] if len(c.a) > 1 else 0)


def _p_graph_begin(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    assert st is not None  # stream-ordered: prepare resolved it
    gid = a[0]
    if st.capturing:
        raise BadState(f"stream {st.sid} is already capturing graph {st.capturing}")
    if not 0 < gid < 1 << 32 or gid in s.graphs:
        raise InvalidHandle(f"graph id {gid} invalid or in use")
    if len(s.graphs) >= MAX_GRAPHS:
        raise InvalidArgument("too many graphs")
    s.graphs[gid] = Graph(gid, st.sid)
    st.capturing = gid

    def undo() -> None:
        if st.capturing == gid:
            st.capturing = 0
        g = s.graphs.pop(gid, None)
        if g is not None:
            s.host.uncharge(g.held)

    return Cmd(Op.GRAPH_BEGIN, ud, sync, _run_graph_mark, (gid,), undo=undo)


def _p_graph_end(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    assert st is not None  # stream-ordered: prepare resolved it
    gid = a[0]
    if st.capturing != gid:
        raise BadState(f"stream {st.sid} is not capturing graph {gid}")
    g = s.graphs[gid]
    g.complete = True
    st.capturing = 0
    return Cmd(Op.GRAPH_END, ud, sync, _run_graph_mark, (gid, len(g.ops)))


def _run_graph_replay(s: Session, st: StreamState, c: Cmd) -> None:
    g: Graph = c.a[0]
    if g.compiled is None and s.daemon.compile_graphs:
        from .graphs import compile_graph

        g.compiled = compile_graph(g.ops, s.daemon.backend.device) or False
    if g.compiled:
        try:
            g.compiled.run()
        except Exception as e:
            raise error_for(code_of(e), f"graph {g.gid} replay failed: {e}") from e
    else:
        for cmd in g.ops:
            cmd.run(s, st, cmd)
    st.ops_done += len(g.ops)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_graph_replay(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd:
    g = s.graphs.get(a[0])
    if g is None:
        raise NotFound(f"unknown graph {a[0]}")
    if not g.complete:
        raise BadState(f"graph {a[0]} is still being captured")
    return Cmd(Op.GRAPH_REPLAY, ud, sync, _run_graph_replay, (g,))


def _p_graph_destroy(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    g = s.graphs.get(a[0])
    if g is None:
        raise NotFound(f"unknown graph {a[0]}")
    if not g.complete:
        raise BadState(f"graph {a[0]} is still being captured")
    del s.graphs[a[0]]
    g.release()
    s.host.uncharge(g.held)
    if sync:
        s.reply(ud)


def _p_step_mark(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> Cmd | None:
    assert st is not None  # stream-ordered: prepare resolved it
    # A graph replays kernels, not iteration boundaries: the engine marks after the replay.
    if st.capturing:
        if sync:
            s.reply(ud)
        return None
    now = time.perf_counter()
    last = s.last_mark.get(st.sid)
    s.last_mark[st.sid] = now
    if last is not None:
        s.daemon.metrics.step(st.phase if st.phase != "auto" else s.phase, now - last)
    return Cmd(Op.STEP_MARK, ud, sync, _run_nop)


def _p_set_phase(
    s: Session, st: StreamState | None, ud: int, sync: bool, poff: int, plen: int, a: Args, flags: int
) -> None:
    if a[0] >= len(P.PHASES):
        raise InvalidArgument(f"unknown phase code {a[0]}")
    phase = P.PHASES[a[0]]
    target = s.streams.get(a[1]) if a[1] else None
    if a[1] and target is None:
        raise InvalidHandle(f"unknown stream {a[1]}")
    if target is None:
        s.phase = phase
        for q in s.streams.values():
            q.phase = phase
    else:
        target.phase = phase
    if sync:
        s.reply(ud)


_PREPARE: dict[int, Handler] = {
    Op.NOP: _p_nop,
    Op.DEVICE_INFO: _p_device_info,
    Op.DEVICE_SYNC: _p_device_sync,
    Op.STREAM_CREATE: _p_stream_create,
    Op.STREAM_DESTROY: _p_stream_destroy,
    Op.STREAM_SYNC: _p_stream_sync,
    Op.STREAM_QUERY: _p_stream_query,
    Op.EVENT_CREATE: _p_event_create,
    Op.EVENT_DESTROY: _p_event_destroy,
    Op.EVENT_RECORD: _p_event_record,
    Op.STREAM_WAIT_EVENT: _p_stream_wait_event,
    Op.EVENT_SYNC: _p_event_sync,
    Op.EVENT_QUERY: _p_event_query,
    Op.EVENT_ELAPSED: _p_event_elapsed,
    Op.MALLOC: _p_malloc,
    Op.FREE: _p_free,
    Op.MEMSET: _p_memset,
    Op.MEMCPY_H2D: _p_h2d,
    Op.MEMCPY_D2H: _p_d2h,
    Op.MEMCPY_D2D: _p_d2d,
    Op.MEM_STATS: _p_mem_stats,
    Op.IPC_EXPORT: _p_ipc_export,
    Op.IPC_SET_PIDS: _p_ipc_set_pids,
    Op.IPC_IMPORT: _p_ipc_import,
    Op.LAUNCH: _p_launch,
    Op.GRAPH_BEGIN: _p_graph_begin,
    Op.GRAPH_END: _p_graph_end,
    Op.GRAPH_REPLAY: _p_graph_replay,
    Op.GRAPH_DESTROY: _p_graph_destroy,
    Op.SET_PHASE: _p_set_phase,
    Op.STEP_MARK: _p_step_mark,
}
from .collectives import PREPARE as _COLLECTIVE_PREPARE  # noqa: E402 - collectives.py imports Cmd from here

_PREPARE.update(_COLLECTIVE_PREPARE)
assert set(_PREPARE) == set(P.OPS), "every opcode in the wire table needs a handler"

# Synchronous stream-ordered requests that are fine while the stream captures.
_SYNC_IN_CAPTURE = frozenset({Op.GRAPH_END, Op.STEP_MARK})

# opcode -> (handler, stream ordered?), indexed by the raw u16 so dispatch needs no enum lookup
_HANDLERS: list[tuple[Handler, bool] | None] = [None] * (max(_PREPARE) + 1)
for _op, _fn in _PREPARE.items():
    _HANDLERS[_op] = (_fn, P.OPS[Op(_op)].stream_ordered)
