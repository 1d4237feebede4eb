"""The client library: attach to a device's daemon and use the virtual device runtime.

    from flexnpu.client import get_client
    c = get_client(0)
    h = c.malloc(1024)
    c.memcpy_h2d(h, 0, b"\\x01" * 1024)
    data = c.memcpy_d2h(h, 0, 1024)

Asynchronous calls (malloc, free, copies into the device, launches) return as soon as their
request is in the ring; their errors surface at the next synchronization of the stream, as in
CUDA and AscendCL. Synchronous calls wait for their reply in C with the GIL released.
The torch `npu` device and the `acl` module are built on this API.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import os
import socket
import struct
import threading
import weakref
from pathlib import Path
from typing import Any

from . import protocol as P
from .errors import AttachError, DaemonLost, FlexNPUError, InvalidArgument, error_for
from .paths import UnsafeRuntimeDir, check_dir, check_peer, socket_path
from .protocol import FLAG_DEFERRED, FLAG_SYNC, Op, TensorRef, pack_sqe
from .ring import PeerClosed, PeerDead, RingError, Segment, Stager, call as ring_call

__all__ = ["Client", "get_client", "TensorRef", "FlexNPUError", "DaemonLost"]

MAILBOX = 64 << 10
DIRECT_COPY_MIN = 256 << 10  # H2D chunks at least this big skip the extra copy (sync, deferred)
RECLAIM_MARGIN = 2 * P.MAX_DRAIN_BATCH
# Waits for replies spin this long before they futex-sleep: a sleeping client costs the daemon a
# FUTEX_WAKE on the reply, ~100 us on virtual machines (see daemon/server.py DAEMON_SPIN_S).
SPIN_S = float(os.environ.get("FLEXNPU_SPIN_US") or 200) * 1e-6
_SQE_PACK = P.SQE.pack
_OP_LAUNCH = int(Op.LAUNCH)
_ZEROS = [(0,) * (5 - i) for i in range(6)]


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if not v:
        return default
    from .units import parse_bytes

    return int(parse_bytes(v) or default)


class Client:
    """One attachment of this process to one device's daemon. Thread-safe."""

    def __init__(
        self,
        device_index: int = 0,
        *,
        path: str | None = None,
        phase: str | None = None,
        memory_limit: int | None = None,
        arena_bytes: int | None = None,
        sq_entries: int = 4096,
        cq_entries: int = 256,
        connect_timeout: float = 5.0,
    ) -> None:
        self.device_index = device_index
        self.path = str(path or socket_path(device_index))
        self._lock = threading.RLock()
        self._closed = False
        arena = arena_bytes or _env_int("FLEXNPU_ARENA", 64 << 20)
        self.seg = Segment.create(
            sq_entries=sq_entries,
            cq_entries=cq_entries,
            sqe_size=P.SQE_SIZE,
            cqe_size=P.CQE_SIZE,
            arena_bytes=arena,
        )
        self._mbox = self.seg.alloc(MAILBOX)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(connect_timeout)
        try:
            # Our segment (all our device data) goes to whoever listens there: only to a daemon
            # in a folder nobody else controls, run by root, us, or a uid we named.
            if os.path.isdir(os.path.dirname(self.path)):
                check_dir(Path(os.path.dirname(self.path)))
            self.sock.connect(self.path)
            peer_pid = check_peer(self.sock, self.path)
        except UnsafeRuntimeDir as e:
            self.seg.close()
            self.sock.close()
            raise AttachError(f"not attaching to device {device_index}: {e}") from None
        except (FileNotFoundError, ConnectionRefusedError) as e:
            self.seg.close()
            self.sock.close()
            raise AttachError(
                f"no FlexNPU daemon serves device {device_index} (nothing listening at "
                f"{self.path}: {e.strerror}). Start one with `flexnpu daemon --device "
                f"{device_index}`, or run the program under `flexnpu run`, which starts "
                f"one when needed."
            ) from None
        except PermissionError:
            self.seg.close()
            self.sock.close()
            raise AttachError(
                f"permission denied opening {self.path}: ask the administrator to add "
                f"your uid to the daemon's --allow-uid list or its socket group"
            ) from None
        from .control import recv_msg, send_msg

        phase = phase or os.environ.get("FLEXNPU_PHASE", "auto")
        if memory_limit is None and os.environ.get("FLEXNPU_CLIENT_MEMORY_LIMIT"):
            memory_limit = _env_int("FLEXNPU_CLIENT_MEMORY_LIMIT", 0) or None
        try:
            send_msg(
                self.sock,
                {
                    "op": "attach",
                    "layout_version": P.LAYOUT_VERSION,
                    "mailbox": [self._mbox, MAILBOX],
                    "phase": phase,
                    "memory_limit": memory_limit,
                },
                [self.seg.fd],
            )
            reply, fds = recv_msg(self.sock)
        except (OSError, ValueError) as e:
            self.seg.close()
            self.sock.close()
            raise AttachError(f"attach to the daemon at {self.path} failed: {e}") from None
        for fd in fds:
            os.close(fd)
        if not reply.get("ok"):
            self.seg.close()
            self.sock.close()
            raise AttachError(
                f"the daemon at {self.path} refused to attach this process: "
                f"{reply.get('error', 'no reason given')}"
            )
        self.sock.settimeout(None)
        self.client_id = reply["client_id"]
        self.info: dict[str, Any] = reply.get("info", {})
        self.memory_limit = reply.get("memory_limit")
        self.daemon_pid = int(reply.get("daemon_pid", 0))
        # The kernel's view of the daemon's pid in our pid namespace (0 when the daemon is outside
        # it, e.g. a container's): the pid the daemon reports may name another process here.
        self.seg.set_peer(fd=self.sock.fileno(), pid=peer_pid or None)
        self.seg.set_spin(SPIN_S)
        self._pid = os.getpid()
        self._forked = False
        _all_clients.add(self)
        self._ud = itertools.count(1)
        self._handles = itertools.count(1)
        self._streams = itertools.count(1)
        self._events = itertools.count(1)
        self._graphs = itertools.count(1)
        self._comms = itertools.count(1)
        self._pushed = 0
        self._staged: collections.deque[tuple[int, int]] = collections.deque()  # (push seq, offset)
        self._arena = self.seg.arena_view(0, self.seg.arena_size)
        # Small request payloads (launch arguments, host data of small copies) go through a bump
        # allocator over one arena region: the daemon copies them out when it drains the
        # request, so a payload's space is reusable once the SQ head is RECLAIM_MARGIN records
        # past it, or after any synchronous reply. FIFO, so the space in use is one circular span.
        stg = min(4 << 20, self.seg.arena_size // 8)
        self._stg = Stager(self.seg.alloc(stg), stg)
        self._stg_max = stg // 4
        self._stg.bind(
            self.seg.sq._fast,
            self._arena,
            _SQE_PACK(_OP_LAUNCH, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            P.SQE_AT_STREAM,
            P.SQE_AT_PAYLOAD_OFF,
            P.SQE_AT_PAYLOAD_LEN,
        )
        self._submit = self._stg.submit
        self.launches = 0
        self._coll_templates: dict[tuple[Any, ...], tuple[bytes, tuple[int, ...]]] = {}

    # ================================================================== transport
    def _lost(self, e: BaseException) -> DaemonLost:
        why = "stopped" if isinstance(e, PeerClosed) else "died or closed the connection"
        return DaemonLost(
            f"the FlexNPU daemon for device {self.device_index} (pid {self.daemon_pid}) {why}; "
            f"device state of this process is gone ({e})"
        )

    def _check(self) -> None:
        if self._closed or self._forked:
            if self._forked:
                raise FlexNPUError(
                    "a FlexNPU client cannot be used across fork(); call get_client() in the child"
                )
            raise FlexNPUError("this FlexNPU client is closed")

    def _push(self, rec: bytes) -> None:
        """Submit one async record. Caller holds the lock."""
        sq = self.seg.sq
        try:
            if not sq.push(rec):
                # The daemon is the bottleneck: sleep at once instead of spinning on a core it
                # may need (on a machine with fewer cores than busy processes it would).
                self.seg.set_spin(0)
                try:
                    sq.push_wait(rec, None)
                finally:
                    self.seg.set_spin(SPIN_S)
        except (PeerDead, PeerClosed) as e:
            raise self._lost(e) from None
        self._pushed += 1

    def _sync(
        self, op: Op, *args: int, stream: int = 0, payload: tuple[int, int] = (0, 0), flags: int = 0
    ) -> tuple[int, int, str]:
        """One synchronous request: returns (value, aux, mailbox text) or raises its error."""
        with self._lock:
            self._check()
            ud = next(self._ud)
            rec = _SQE_PACK(
                op, flags | FLAG_SYNC, stream, ud, payload[0], payload[1], *(args + _ZEROS[len(args)])
            )
            try:
                reply = ring_call(self.seg.sq, self.seg.cq, rec, None)
            except (PeerDead, PeerClosed) as e:
                raise self._lost(e) from None
            except RingError as e:
                raise DaemonLost(f"completion ring from the daemon is corrupt: {e}") from None
            self._pushed += 1
            rud, status, mlen, value, aux = P.CQE.unpack(reply)
            if rud != ud:
                raise DaemonLost(f"protocol error: reply {rud} for request {ud}")
            text = (
                bytes(self.seg.arena_view(self._mbox, min(mlen, MAILBOX))).decode(errors="replace")
                if mlen
                else ""
            )
            # Everything submitted before this request has been prepared: staged payloads are free.
            if self._stg.live:
                self._stg.release_all()
            while self._staged:
                self.seg.free(self._staged.popleft()[1])
        if status:
            raise error_for(status, text)
        return value, aux, text

    def _stage(self, data: Any, n: int) -> int:
        """Copy n bytes into the arena for a request about to be pushed. Caller holds the lock."""
        if n <= self._stg_max:
            off = self._stg.alloc(n, self._pushed)
            if off is None:
                self._reclaim()
                off = self._stg.alloc(n, self._pushed)
                if off is None:
                    self._sync(Op.NOP)  # barrier: the daemon has copied every earlier payload
                    off = self._stg.alloc(n, self._pushed)
                    assert off is not None  # n <= _stg_max and the barrier emptied the ring
        else:
            self._reclaim()
            try:
                off = self.seg.alloc(n)
            except MemoryError:
                self._sync(Op.NOP)
                off = self.seg.alloc(n)
            self._staged.append((self._pushed, off))
        if n:
            self._arena[off : off + n] = data
        return int(off)

    def _reclaim(self) -> None:
        consumed = self._pushed - len(self.seg.sq)
        self._stg.release_before(consumed - RECLAIM_MARGIN)
        while self._staged and self._staged[0][0] + RECLAIM_MARGIN < consumed:
            self.seg.free(self._staged.popleft()[1])

    def _async(self, op: Op, *args: int, stream: int = 0, payload: bytes | None = None) -> None:
        with self._lock:
            self._check()
            if payload is None:
                self._push(_SQE_PACK(op, 0, stream, 0, 0, 0, *(args + _ZEROS[len(args)])))
            else:
                off = self._stage(payload, len(payload))
                self._push(pack_sqe(op, *args, stream=stream, payload_off=off, payload_len=len(payload)))

    # ================================================================== device
    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self._sync(Op.DEVICE_INFO)[2])
        return info

    def nop(self, sync: bool = True) -> None:
        if sync:
            self._sync(Op.NOP)
        else:
            self._async(Op.NOP)

    def synchronize(self, stream: int | None = None) -> None:
        if stream is None:
            self._sync(Op.DEVICE_SYNC)
        else:
            self._sync(Op.STREAM_SYNC, stream=stream)

    def set_phase(self, phase: str, stream: int | None = None) -> None:
        if phase not in P.PHASES:
            raise InvalidArgument(f"phase must be one of {P.PHASES}, not {phase!r}")
        self._async(Op.SET_PHASE, P.PHASES.index(phase), stream or 0)

    def mark_step(self, stream: int = 0) -> None:
        """End of one engine iteration (one output token) on `stream`, for the daemon's flex
        policy: it times decode iterations from the first kernel to the last one before the
        mark. Asynchronous and not a barrier; without marks the policy takes iteration ends from
        the client's synchronisations."""
        self._async(Op.STEP_MARK, stream=stream)

    # ================================================================== streams and events
    def create_stream(self, priority: int = 0) -> int:
        sid = next(self._streams)
        self._async(Op.STREAM_CREATE, sid, priority & 0xFFFFFFFFFFFFFFFF)
        return sid

    def stream_query(self, stream: int = 0) -> bool:
        """True if the stream has no queued work (non-blocking)."""
        return bool(self._sync(Op.STREAM_QUERY, stream)[0])

    def destroy_stream(self, stream: int) -> None:
        self._async(Op.STREAM_DESTROY, stream=stream)

    def create_event(self) -> int:
        eid = next(self._events)
        self._async(Op.EVENT_CREATE, eid)
        return eid

    def destroy_event(self, event: int) -> None:
        self._async(Op.EVENT_DESTROY, event)

    def record_event(self, event: int, stream: int = 0) -> None:
        self._async(Op.EVENT_RECORD, event, stream=stream)

    def stream_wait_event(self, stream: int, event: int) -> None:
        self._async(Op.STREAM_WAIT_EVENT, event, stream=stream)

    def event_synchronize(self, event: int) -> None:
        self._sync(Op.EVENT_SYNC, event)

    def event_query(self, event: int) -> bool:
        return bool(self._sync(Op.EVENT_QUERY, event)[0])

    def event_elapsed_ms(self, start: int, end: int) -> float:
        v = self._sync(Op.EVENT_ELAPSED, start, end)[0]
        ms: float = struct.unpack("<d", struct.pack("<Q", v))[0]
        return ms

    # ================================================================== memory
    def alloc_handle(self) -> int:
        return next(self._handles)

    def malloc(self, nbytes: int, handle: int | None = None, sync: bool = False) -> int:
        """Allocate device memory. Async by default (errors at the next sync, as CUDA's
        stream-ordered allocator); sync=True raises OutOfMemory here instead."""
        if nbytes < 0:
            raise InvalidArgument(f"cannot allocate {nbytes} bytes")
        h = handle if handle is not None else next(self._handles)
        if sync:
            self._sync(Op.MALLOC, h, nbytes)
        else:
            self._async(Op.MALLOC, h, nbytes)
        return h

    def free(self, handle: int) -> None:
        self._async(Op.FREE, handle)

    def free_many(self, handles: list[int]) -> None:
        """Free many handles with one record per 4096 (what deferred frees are flushed with)."""
        for i in range(0, len(handles), 4096):
            part = handles[i : i + 4096]
            self._async(Op.FREE_MANY, payload=struct.pack(f"<{len(part)}I", *part))

    def memset(self, handle: int, offset: int, value: int, nbytes: int, stream: int = 0) -> None:
        self._async(Op.MEMSET, handle, offset, value & 0xFF, nbytes, stream=stream)

    def _chunk(self) -> int:
        return max(4096, min(self.seg.arena_size // 4, 8 << 20))

    def memcpy_h2d(self, handle: int, offset: int, data: Any, stream: int = 0) -> None:
        """Copy host bytes to the device. `data` is copied before return."""
        mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        total = len(mv)
        chunk = self._chunk()
        pos = 0
        while pos < total or (total == 0 and pos == 0):
            n = min(chunk, total - pos)
            part = mv[pos : pos + n]
            if n >= DIRECT_COPY_MIN:
                with self._lock:
                    if not self._try_alloc(n):
                        self._sync(Op.NOP)  # frees staged payloads
                    off = self.seg.alloc(n)
                    try:
                        self.seg.arena_view(off, n)[:] = part
                        self._sync(
                            Op.MEMCPY_H2D,
                            handle,
                            offset + pos,
                            n,
                            stream=stream,
                            payload=(off, n),
                            flags=FLAG_DEFERRED,
                        )
                    finally:
                        self.seg.free(off)
            else:
                with self._lock:
                    self._check()
                    off = self._stage(part, n)
                    self._push(
                        pack_sqe(
                            Op.MEMCPY_H2D,
                            handle,
                            offset + pos,
                            n,
                            stream=stream,
                            payload_off=off,
                            payload_len=n,
                        )
                    )
            pos += n
            if total == 0:
                break

    def _try_alloc(self, n: int) -> bool:
        self._reclaim()
        return self.seg.arena_free_bytes >= n + 4096

    def memcpy_d2h(self, handle: int, offset: int, nbytes: int, stream: int = 0) -> bytearray:
        """Copy device bytes to a new host buffer (synchronous)."""
        out = bytearray(nbytes)
        self.memcpy_d2h_into(handle, offset, memoryview(out), stream)
        return out

    def memcpy_d2h_into(self, handle: int, offset: int, dst: Any, stream: int = 0) -> None:
        mv = memoryview(dst).cast("B")
        total = len(mv)
        chunk = self._chunk()
        pos = 0
        while pos < total:
            n = min(chunk, total - pos)
            with self._lock:
                if not self._try_alloc(n):
                    self._sync(Op.NOP)
                off = self.seg.alloc(n)
                try:
                    self._sync(
                        Op.MEMCPY_D2H,
                        handle,
                        offset + pos,
                        n,
                        stream=stream,
                        payload=(off, n),
                        flags=FLAG_DEFERRED,
                    )
                    mv[pos : pos + n] = self.seg.arena_view(off, n)
                finally:
                    self.seg.free(off)
            pos += n
        if total == 0:
            self._sync(Op.STREAM_SYNC, stream=stream)

    def memcpy_d2d(
        self, dst: int, dst_off: int, src: int, src_off: int, nbytes: int, stream: int = 0
    ) -> None:
        self._async(Op.MEMCPY_D2D, dst, dst_off, src, src_off, nbytes, stream=stream)

    # -- host buffers in the shared arena (zero-copy host side, like aclrtMallocHost) ----------
    def host_alloc(self, nbytes: int) -> int:
        """Reserve a host buffer the daemon can read/write directly; returns its arena offset.
        MemoryError unless one copy chunk stays free after it: host buffers that filled the
        arena would leave ordinary memcpy calls nowhere to stage (callers fall back to private
        host memory)."""
        with self._lock:
            self._reclaim()
            if self.seg.arena_free_bytes - max(nbytes, 1) < self._chunk() + 4096:
                raise MemoryError(
                    f"arena: {nbytes} bytes of host buffer would leave less than one copy "
                    f"chunk free ({self.seg.arena_free_bytes} bytes free)"
                )
            return self.seg.alloc(max(nbytes, 1))

    def host_free(self, offset: int) -> None:
        with self._lock:
            self.seg.free(offset)

    def host_view(self, offset: int, nbytes: int) -> memoryview:
        return self.seg.arena_view(offset, nbytes)

    def host_addr(self, offset: int) -> int:
        """The host virtual address of an arena offset (valid while this client lives)."""
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(self.seg.arena_view(offset, 1)))

    def memcpy_h2d_host(
        self, handle: int, offset: int, host_off: int, nbytes: int, stream: int = 0, sync: bool = True
    ) -> None:
        """Device <- arena host buffer. Async: the buffer must stay untouched until the stream syncs."""
        self._host_copy(Op.MEMCPY_H2D, handle, offset, host_off, nbytes, stream, sync)

    def memcpy_d2h_host(
        self, handle: int, offset: int, host_off: int, nbytes: int, stream: int = 0, sync: bool = True
    ) -> None:
        """Arena host buffer <- device. Async: valid after the stream syncs."""
        self._host_copy(Op.MEMCPY_D2H, handle, offset, host_off, nbytes, stream, sync)

    def _host_copy(
        self, op: Op, handle: int, offset: int, host_off: int, nbytes: int, stream: int, sync: bool
    ) -> None:
        # FLAG_DEFERRED: the daemon touches the host buffer when the copy executes, not at drain
        if sync:
            self._sync(
                op, handle, offset, nbytes, stream=stream, payload=(host_off, nbytes), flags=FLAG_DEFERRED
            )
            return
        with self._lock:
            self._check()
            self._push(
                pack_sqe(
                    op,
                    handle,
                    offset,
                    nbytes,
                    stream=stream,
                    flags=FLAG_DEFERRED,
                    payload_off=host_off,
                    payload_len=nbytes,
                )
            )

    def memory_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = json.loads(self._sync(Op.MEM_STATS)[2])
        return stats

    # ================================================================== IPC
    def ipc_export(self, handle: int) -> int:
        """Export an allocation; returns a key another process may import once allowed."""
        return self._sync(Op.IPC_EXPORT, handle)[0]

    def ipc_set_pids(self, key: int, pids: list[int]) -> None:
        payload = struct.pack(f"<{len(pids)}I", *pids)
        with self._lock:
            off = self._stage(payload, len(payload))
            self._sync(Op.IPC_SET_PIDS, key, payload=(off, len(payload)))

    def ipc_import(self, key: int, handle: int | None = None) -> tuple[int, int]:
        """Import exported memory (zero-copy): returns (handle, nbytes)."""
        h = handle if handle is not None else next(self._handles)
        nbytes = self._sync(Op.IPC_IMPORT, key, h)[0]
        return h, nbytes

    # ================================================================== operators and graphs
    def launch(
        self,
        op: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outputs: list[tuple[int, TensorRef]],
        stream: int = 0,
    ) -> None:
        self.launch_payload(P.encode_launch(op, args, kwargs, outputs), stream)

    def launch_payload(self, payload: bytes | bytearray, stream: int = 0) -> None:
        """Submit an encoded launch (protocol.encode_launch / fill_launch)."""
        with self._lock:
            if self._closed or self._forked:
                self._check()
            # the eager hot path (one launch per operator): staged and pushed in one C call
            if self._submit(payload, stream, self._pushed):
                self._pushed += 1
                self.launches += 1
                return
            n = len(payload)
            off = self._stage(payload, n)  # no staging room, the ring full or closed: wait or raise
            self._push(_SQE_PACK(_OP_LAUNCH, 0, stream, 0, off, n, 0, 0, 0, 0, 0))
            self.launches += 1

    def graph_begin_capture(self, stream: int = 0) -> int:
        gid = next(self._graphs)
        self._async(Op.GRAPH_BEGIN, gid, stream=stream)
        return gid

    def graph_end_capture(self, graph: int, stream: int = 0) -> int:
        """Ends capture; returns how many commands the graph holds (raises capture errors)."""
        return self._sync(Op.GRAPH_END, graph, stream=stream)[0]

    def graph_replay(self, graph: int, stream: int = 0) -> None:
        self._async(Op.GRAPH_REPLAY, graph, stream=stream)

    def graph_destroy(self, graph: int) -> None:
        self._async(Op.GRAPH_DESTROY, graph)

    # ================================================================== collectives
    def comm_init(
        self, comm_id: bytes, rank: int, size: int, devices: list[int] | None, timeout_s: float = 1800.0
    ) -> int:
        """Join the communicator `comm_id` (16 bytes all ranks agree on) as `rank` of `size`;
        `devices[r]` is the daemon device of rank r, or None: the daemons exchange the map among
        themselves (as for the native HcclCommInitRootInfo) and the first collective waits for
        every rank to join. Returns this client's handle for it."""
        if len(comm_id) != P.COMM_ID_BYTES or (devices is not None and len(devices) != size):
            raise InvalidArgument("comm_init needs a 16-byte id and one device per rank (or none)")
        payload = bytes(comm_id) + (b"" if devices is None else struct.pack(f"<{size}I", *devices))
        h = next(self._comms)
        with self._lock:
            off = self._stage(payload, len(payload))
            self._sync(Op.COMM_INIT, h, rank, size, int(timeout_s * 1000), payload=(off, len(payload)))
        return h

    def comm_destroy(self, comm: int) -> None:
        self._async(Op.COMM_DESTROY, comm)

    def collective(
        self,
        comm: int,
        kind: str,
        inp: TensorRef,
        out: TensorRef,
        op: str = "sum",
        root: int = 0,
        stream: int = 0,
    ) -> None:
        """Queue a collective on `stream` (asynchronous: errors surface at the next sync)."""
        # a program repeats a few collectives on buffers of a few layouts: encode each layout once
        key = (
            kind,
            inp.dtype,
            inp.shape,
            inp.stride,
            inp.offset,
            out.dtype,
            out.shape,
            out.stride,
            out.offset,
        )
        tpl = self._coll_templates.get(key)
        if tpl is None:
            if len(self._coll_templates) >= 256:
                self._coll_templates.clear()
            tpl = self._coll_templates[key] = P.encode_launch_template(kind, (inp, out), {}, [])
        payload = P.fill_launch(tpl, (inp.handle, out.handle))
        with self._lock:
            self._check()
            off = self._stage(payload, len(payload))
            self._push(
                _SQE_PACK(
                    Op.COLLECTIVE,
                    0,
                    stream,
                    0,
                    off,
                    len(payload),
                    comm,
                    P.COLL_KINDS.index(kind),
                    P.REDUCE_OPS.index(op),
                    root,
                    0,
                )
            )

    # ================================================================== lifecycle
    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.sock.close()
            finally:
                self.seg.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_clients: dict[int, Client] = {}
_all_clients: weakref.WeakSet[Client] = weakref.WeakSet()
_clients_lock = threading.Lock()


def get_client(device_index: int = 0) -> Client:
    """The process-wide client of a device (attached on first use)."""
    c = _clients.get(device_index)
    if c is not None and not c._closed:
        return c
    with _clients_lock:
        c = _clients.get(device_index)
        if c is None or c._closed:
            c = Client(device_index)
            _clients[device_index] = c
        return c


def _forget_after_fork() -> None:
    # The parent's segment and socket belong to the parent's attachment; the child attaches anew.
    _clients.clear()
    for c in list(_all_clients):
        c._forked = True


def _close_all() -> None:
    for c in list(_clients.values()):
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_close_all)
