"""LOOPBACK CLIENT FOR FAST UNIT TESTS ONLY: an in-process stand-in for flexnpu.client.Client.

It implements the flexnpu.client.Client methods the hook calls by running ``execute_launch`` on CPU torch in the
same process (no daemon, no rings). Commands execute immediately; errors are held and raised at
the next synchronizing call, as the real client does for asynchronous errors. Graph capture
records the commands of the capturing stream without running them; replay runs them again.

End-to-end tests use the real client and daemon; this exists so pure hook logic (dispatch,
caching, views, refcounting) can be tested quickly and without the daemon.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import torch

from flexnpu.daemon.backends.torch_exec import execute_launch


class LoopbackError(RuntimeError):
    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


class LoopbackClient:
    def __init__(self, device_index: int = 0, limit: int = 1 << 34):
        self.device_index = device_index
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self.mem: dict[int, torch.Tensor] = {}
        self.error: Exception | None = None
        self.allocated = 0
        self.peak = 0
        self.limit = limit
        self.launches: list[str] = []  # op names, for tests that count launches
        self.commands = 0
        self.capturing: dict[int, list] = {}
        self.graphs: dict[int, list] = {}
        self._streams = itertools.count(1)
        self._events: dict[int, bool] = {}
        self.closed = False

    # -- helpers ---------------------------------------------------------------------------
    def _cmd(self, stream: int | None, fn, *a) -> None:
        self.commands += 1
        if stream is not None and stream in self.capturing:
            self.capturing[stream].append((fn, a))
            return
        self._run(fn, a)

    def _run(self, fn, a) -> None:
        if self.error is not None:
            return  # a failed stream stops executing, as on a device
        try:
            fn(*a)
        except Exception as e:  # noqa: BLE001 - surfaces at the next sync
            self.error = e

    def _resolve(self, handle: int) -> torch.Tensor:
        t = self.mem.get(handle)
        if t is None:
            raise LoopbackError(f"invalid or freed handle {handle}")
        return t

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.allocated + nbytes > self.limit:
            raise LoopbackError("out of memory", code=2)
        return torch.empty(nbytes, dtype=torch.uint8)

    def _bind(self, handle: int, t: torch.Tensor) -> None:
        old = self.mem.get(handle)
        if old is not None:
            self.allocated -= old.numel()
        self.mem[handle] = t
        self.allocated += t.numel()
        self.peak = max(self.peak, self.allocated)

    # -- API -------------------------------------------------------------------------------
    def alloc_handle(self) -> int:
        return next(self._ids)

    def malloc(self, nbytes: int, handle: int | None = None) -> int:
        h = self.alloc_handle() if handle is None else handle
        self._cmd(None, lambda: self._bind(h, self._allocate(nbytes)))
        return h

    def free(self, handle: int) -> None:
        def do():
            t = self.mem.pop(handle, None)
            if t is None:
                raise LoopbackError(f"free of invalid handle {handle}")
            self.allocated -= t.numel()

        self._cmd(None, do)

    def launch_payload(self, payload, stream: int = 0) -> None:
        from flexnpu import protocol as P

        l = P.decode_launch(bytes(payload), torch.device("cpu"))
        self.launch(l.op, l.args, l.kwargs, l.outputs, stream)

    def free_many(self, handles: list[int]) -> None:
        for h in handles:  # through free(): tests count frees there
            self.free(h)

    def memcpy_h2d(self, handle: int, offset: int, data, stream: int = 0) -> None:
        buf = bytes(memoryview(data).cast("B"))

        def do():
            t = self._resolve(handle)
            if offset < 0 or offset + len(buf) > t.numel():
                raise LoopbackError(f"memcpy_h2d out of range on handle {handle}")
            if buf:
                t[offset : offset + len(buf)].copy_(torch.frombuffer(bytearray(buf), dtype=torch.uint8))

        self._cmd(stream, do)

    def memcpy_d2h(self, handle: int, offset: int, nbytes: int, stream: int = 0) -> bytearray:
        self.commands += 1
        if stream in self.capturing:
            raise LoopbackError("memcpy_d2h not permitted while capturing")
        self._raise()
        t = self._resolve(handle)
        if offset < 0 or offset + nbytes > t.numel():
            raise LoopbackError(f"memcpy_d2h out of range on handle {handle}")
        return bytearray(t[offset : offset + nbytes].numpy().tobytes())

    def memcpy_d2d(
        self, dst: int, dst_off: int, src: int, src_off: int, nbytes: int, stream: int = 0
    ) -> None:
        def do():
            d, s = self._resolve(dst), self._resolve(src)
            d[dst_off : dst_off + nbytes].copy_(s[src_off : src_off + nbytes])

        self._cmd(stream, do)

    def memset(self, handle: int, offset: int, value: int, nbytes: int, stream: int = 0) -> None:
        self._cmd(stream, lambda: self._resolve(handle)[offset : offset + nbytes].fill_(value))

    def launch(self, op: str, args: tuple, kwargs: dict, outputs: list, stream: int = 0) -> None:
        self.launches.append(op)

        def do():
            try:
                bound = execute_launch(
                    torch.device("cpu"), op, args, kwargs, outputs, self._resolve, self._allocate
                )
            except Exception as e:
                raise LoopbackError(f"{op}: {e}") from e
            for h, t in bound:
                self._bind(h, t)

        self._cmd(stream, do)

    def _raise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise LoopbackError(str(e), getattr(e, "code", 1))

    def synchronize(self, stream: int | None = None) -> None:
        self.commands += 1
        self._raise()

    def create_stream(self, priority: int = 0) -> int:
        return next(self._streams)

    def destroy_stream(self, stream: int) -> None:
        pass

    def create_event(self) -> int:
        e = next(self._ids)
        self._events[e] = False
        return e

    def record_event(self, ev: int, stream: int = 0) -> None:
        self._cmd(stream, lambda: self._events.__setitem__(ev, True))

    def stream_wait_event(self, stream: int, ev: int) -> None:
        pass

    def event_synchronize(self, ev: int) -> None:
        self._raise()

    def event_elapsed_ms(self, start: int, end: int) -> float:
        return 0.0

    def destroy_event(self, ev: int) -> None:
        self._events.pop(ev, None)

    def graph_begin_capture(self, stream: int = 0) -> int:
        self.capturing[stream] = []
        return next(self._ids)

    def graph_end_capture(self, graph: int, stream: int = 0) -> int:
        self.graphs[graph] = self.capturing.pop(stream)
        return len(self.graphs[graph])

    def graph_replay(self, graph: int, stream: int = 0) -> None:
        cmds = self.graphs[graph]

        def do():
            for fn, a in cmds:
                fn(*a)

        self._cmd(stream, do)

    def graph_destroy(self, graph: int) -> None:
        self.graphs.pop(graph, None)

    def memory_stats(self) -> dict[str, Any]:
        return {
            "allocated": self.allocated,
            "peak": self.peak,
            "limit": self.limit,
            "reserved": self.allocated,
        }

    def set_phase(self, phase: str, stream: int | None = None) -> None:
        pass

    def mark_step(self, stream: int = 0) -> None:
        pass

    def device_info(self) -> dict[str, Any]:
        return {"backend": "cpu", "device_type": "cpu", "name": "loopback", "total_memory": self.limit}

    def close(self) -> None:
        self.closed = True
