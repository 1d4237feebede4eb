"""One attached client: its segment, its object tables, and the handling of its requests.

Requests are handled in two steps. `prepare` runs when the daemon drains the client's SQ: it
turns the record into a typed request (requests.py) and hands it to the opcode's handler
(handlers/), which validates it, resolves handles to objects (so later frees cannot pull memory
from under queued work) and either answers at once or returns a command, which `prepare` queues
on the stream (or records into the graph the stream captures). `execute` runs when the scheduler
picks that command. Anything a client sends that is wrong becomes an
error for that client only.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Sequence

from .. import protocol as P
from ..errors import (
    Err,
    BadState,
    FlexNPUError,
    InvalidArgument,
    InvalidHandle,
    OutOfMemory,
    code_of,
)
from ..protocol import Op
from ..ring import RingError
from .metrics import COPY_DIRECTION, copied_bytes
from .objects import (
    Alloc,
    Cmd,
    EventState,
    Graph,
    HandleTable,
    MemoryAccount,
    StreamState,
    process_start_time,
)

if TYPE_CHECKING:
    from .interfaces import DaemonServices as Daemon  # the daemon as a session sees it

MAX_ALLOC = 1 << 44
MAX_PENDING_REPLIES = 4096
MAX_GRAPH_OPS = 1 << 20
MAX_WAITERS = 4096  # unanswered DEVICE_SYNC/EVENT_SYNC per client
MAX_QUEUED = 1 << 18  # commands waiting in one stream: bounds a blocked stream's memory
# What a client's bad request or a failing operator raises: the project's own errors (handlers
# and backends turn every foreseeable failure into one, with a message for the client) and host
# memory exhaustion. Anything else is a daemon bug: logged with its traceback, reported as INTERNAL.
_EXPECTED = (FlexNPUError, MemoryError)
_LAUNCH = int(Op.LAUNCH)


# (prepare function, request type, stream ordered?) per raw opcode: flexnpu/daemon/handlers/
DispatchEntry = tuple[Callable[..., "Cmd | None"], Callable[..., Any], bool]

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
        handlers: Sequence[DispatchEntry | None],
        hot_launch: Callable[[Session, StreamState, tuple[int, ...]], bool] | None = None,
        hot_drain: Callable[[Session, Any, int], None] | None = None,
    ) -> None:
        self.daemon = daemon
        self.handlers = handlers  # handlers.TABLE: passed in, so this module never imports them
        # The hot path (handlers.HOT_*): a planned launch on an idle stream of an in-order daemon,
        # run without the generic dispatch. hot_drain: drain's loop in C, with it; else
        # hot_launch, prepare's shortcut (False from it: the generic path).
        inline = getattr(daemon, "inline", False)
        self.hot_drain = hot_drain if inline else None
        self.hot_launch = hot_launch if inline else None
        # what the hot path reads per launch, looked up once
        self.plans: dict[bytes, Any] | None = getattr(daemon.backend, "plans", None)
        self.latency_observe: Callable[[float], None] = daemon.metrics.launch_latency.observe
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
        msg = str(exc) or type(exc).__name__
        if isinstance(exc, _EXPECTED):
            code = code_of(exc)
        else:
            self.daemon.log.error(
                "client %d: internal error (a daemon bug): %s: %s",
                self.pid,
                type(exc).__name__,
                msg,
                exc_info=exc,
            )
            code, msg = (
                Err.INTERNAL,
                f"internal error in the daemon ({type(exc).__name__}: {msg}); see its log",
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

    def payload_bytes(self, off: int, n: int) -> bytes:
        """_payload, copied out (before parsing: the client may rewrite its arena)."""
        if n <= P.MAX_PAYLOAD:
            try:
                data: bytes = self.seg.arena_bytes(off, n)
                return data
            except Exception:  # noqa: BLE001 - _payload reports it
                pass
        return bytes(self._payload(off, n))

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
            if self.hot_drain is not None:
                self.hot_drain(self, self.rec_buf, n)
                return n
            buf, unpack, prep = self.rec_buf, P.SQE.unpack_from, self.prepare
            for i in range(n):
                prep(unpack(buf, i * P.SQE_SIZE))
        return n

    def prepare(self, rec: tuple[int, ...]) -> None:
        if self.kill is not None:
            return
        op, flags, sid, ud = rec[0], rec[1], rec[2], rec[3]
        sync = flags & P.FLAG_SYNC != 0
        st: StreamState | None = None
        cmd: Cmd | None = None
        hot = self.hot_launch
        if op == _LAUNCH and hot is not None:
            st = self.streams.get(sid)
            if st is not None and not st.capturing and not st.queue:
                try:
                    if hot(self, st, rec):
                        return
                except Exception as e:  # noqa: BLE001 - the client's error, as below
                    self.fail(ud, sync, st, e)
                    return
        try:
            table = self.handlers
            entry = table[op] if op < len(table) else None
            if entry is None:
                raise InvalidArgument(f"unknown opcode {op}")
            handler, request_type, ordered = entry
            if ordered:
                st = self.streams.get(sid)
                if st is None:
                    raise InvalidHandle(f"unknown stream {sid}")
                if st.capturing and (sync or op == Op.STREAM_SYNC) and op not in _SYNC_IN_CAPTURE:
                    # refused before the handler runs, so a refused command leaves no trace
                    # (an EVENT_RECORD counted but never run would make its event never complete)
                    raise BadState(f"{Op(op).name} is not allowed while stream {sid} is being captured")
            cmd = handler(self, st, request_type(rec))
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
            "graphs_traced": sum(1 for g in self.graphs.values() if g.compiled and g.compiled.traced),
        }


# Synchronous stream-ordered requests that are fine while the stream captures.
_SYNC_IN_CAPTURE = frozenset({Op.GRAPH_END, Op.STEP_MARK})
