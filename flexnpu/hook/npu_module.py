"""``torch.npu``: the torch_npu-style Python surface, backed by FlexNPU clients.

Streams and events are client streams/events of the daemon; the current stream is per virtual
device (shared by all threads, so autograd's device thread launches on the stream the forward
pass used, as with CUDA's current stream for a device). ``NPUGraph`` records the launches of a
capture once in the daemon and replays them with one command.
"""

from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Iterator

import os

import torch

from flexnpu.hook import runtime

__all__ = [
    "is_available",
    "is_initialized",
    "init",
    "device_count",
    "current_device",
    "set_device",
    "device",
    "synchronize",
    "Stream",
    "Event",
    "current_stream",
    "default_stream",
    "set_stream",
    "stream",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "mem_get_info",
    "empty_cache",
    "reset_peak_memory_stats",
    "memory_stats",
    "NPUGraph",
    "graph",
    "get_device_name",
    "get_device_properties",
    "manual_seed",
    "manual_seed_all",
    "seed",
    "initial_seed",
    "get_rng_state",
    "set_rng_state",
    "is_bf16_supported",
    "get_amp_supported_dtype",
    "set_phase",
    "mark_step",
    "ipc_export",
    "ipc_allow",
    "ipc_import",
]


def _idx(device: Any = None) -> int:
    if device is None:
        return runtime.current_index()
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "npu":
            raise ValueError(f"expected an npu device, got {device}")
        return runtime.current_index() if device.index is None else device.index
    raise TypeError(f"invalid device {device!r}")


def _dev(device: Any = None) -> runtime.Device:
    return runtime.get(_idx(device))


def is_available() -> bool:
    try:
        return len(runtime.devices()) > 0
    except RuntimeError:
        return False


def is_initialized() -> bool:
    return True


def init() -> None:
    pass


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    return len(runtime.devices())


def current_device() -> int:
    return runtime.current_index()


def set_device(device: Any) -> None:
    runtime.set_current_index(_idx(device))


class device:
    """Context manager that changes the current npu device."""

    def __init__(self, device: Any):
        self.idx = _idx(device) if device is not None else -1
        self.prev = -1

    def __enter__(self):
        self.prev = runtime.current_index()
        if self.idx >= 0:
            runtime.set_current_index(self.idx)

    def __exit__(self, *exc):
        if self.idx >= 0:
            runtime.set_current_index(self.prev)
        return False


def synchronize(device: Any = None) -> None:
    d = _dev(device)
    if d.capture is not None:
        raise RuntimeError("synchronize is not permitted while capturing an NPU graph")
    d.flush_frees()
    d.client.synchronize()
    from flexnpu.hook.pinned import reap

    reap()  # every asynchronous copy from pinned memory has completed: free dead blocks


class Stream:
    """A FlexNPU client stream on an npu device (``torch.npu.Stream``)."""

    def __init__(self, device: Any = None, priority: int = 0, _id: int | None = None, **_: Any):
        self._dev = _dev(device)
        self.device = torch.device("npu", self._dev.index)
        self.priority = priority
        self.npu_stream = self.stream_id = (
            _id if _id is not None else self._dev.client.create_stream(priority)
        )
        self._owned = _id is None

    def synchronize(self) -> None:
        self._dev.flush_frees()
        self._dev.client.synchronize(self.stream_id)

    def wait_event(self, event: Event) -> None:
        event._ensure(self._dev)
        self._dev.client.stream_wait_event(self.stream_id, event._id)

    def wait_stream(self, stream: Stream) -> None:
        self.wait_event(stream.record_event())

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event

    def query(self) -> bool:
        self.synchronize()
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other._dev is self._dev and other.stream_id == self.stream_id

    def __hash__(self) -> int:
        return hash((self._dev.index, self.stream_id))

    def __repr__(self) -> str:
        return f"<torch.npu.Stream device={self.device} npu_stream={self.stream_id}>"

    def __enter__(self):
        self._prev = current_stream(self._dev.index)
        set_stream(self)
        return self

    def __exit__(self, *exc):
        set_stream(self._prev)
        return False

    def __del__(self):
        try:
            if self._owned and self.stream_id:
                self._dev.client.destroy_stream(self.stream_id)
        except Exception:  # noqa: BLE001
            pass


def current_stream(device: Any = None) -> Stream:
    d = _dev(device)
    return Stream(d.index, _id=d.stream)


def default_stream(device: Any = None) -> Stream:
    return Stream(_dev(device).index, _id=0)


def set_stream(stream: Stream) -> None:
    if stream is None:
        return
    stream._dev.stream = stream.stream_id


@contextlib.contextmanager
def stream(s: Stream | None) -> Iterator[None]:
    """Make ``s`` the current stream of its device for the body (``torch.npu.stream``)."""
    if s is None:
        yield
        return
    prev = s._dev.stream
    s._dev.stream = s.stream_id
    try:
        yield
    finally:
        s._dev.stream = prev


class Event:
    """A FlexNPU client event (``torch.npu.Event``)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        if interprocess:
            raise NotImplementedError("interprocess npu events are not supported by FlexNPU")
        self.enable_timing = enable_timing
        self._dev: runtime.Device | None = None
        self._id = 0

    def _ensure(self, dev: runtime.Device) -> None:
        if self._dev is None:
            self._dev = dev
            self._id = dev.client.create_event()

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or current_stream()
        self._ensure(stream._dev)
        stream._dev.flush_frees()
        stream._dev.client.record_event(self._id, stream.stream_id)

    def wait(self, stream: Stream | None = None) -> None:
        (stream or current_stream()).wait_event(self)

    def synchronize(self) -> None:
        if self._dev is not None:
            self._dev.client.event_synchronize(self._id)

    def query(self) -> bool:
        if self._dev is None:
            return True
        q = getattr(self._dev.client, "event_query", None)
        if q is None:
            self.synchronize()
            return True
        return bool(q(self._id))

    def elapsed_time(self, end_event: Event) -> float:
        if self._dev is None or end_event._dev is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return float(self._dev.client.event_elapsed_ms(self._id, end_event._id))

    def __del__(self):
        try:
            if self._dev is not None:
                self._dev.client.destroy_event(self._id)
        except Exception:  # noqa: BLE001
            pass


# -- memory -----------------------------------------------------------------------------------


def memory_allocated(device: Any = None) -> int:
    """Bytes held by this process's live npu tensors (client-side count, no round trip)."""
    return _dev(device).allocated


def max_memory_allocated(device: Any = None) -> int:
    return _dev(device).peak


def reset_peak_memory_stats(device: Any = None) -> None:
    d = _dev(device)
    d.peak = d.allocated


def memory_stats(device: Any = None) -> dict[str, Any]:
    d = _dev(device)
    d.flush_frees()
    s = dict(d.client.memory_stats())
    s.update({"allocated_bytes.all.current": d.allocated, "allocated_bytes.all.peak": d.peak})
    return s


def memory_reserved(device: Any = None) -> int:
    d = _dev(device)
    d.flush_frees()
    return int(d.client.memory_stats().get("reserved", 0))


def max_memory_reserved(device: Any = None) -> int:
    d = _dev(device)
    return int(d.client.memory_stats().get("peak", 0))


def mem_get_info(device: Any = None) -> tuple[int, int]:
    """(free, total) bytes of this client's share of the device, as the daemon accounts it."""
    d = _dev(device)
    d.flush_frees()
    s = d.client.memory_stats()
    total = int(s.get("limit") or d.client.device_info().get("total_memory", 0))
    return max(total - int(s.get("reserved", s.get("allocated", 0))), 0), total


def empty_cache() -> None:
    for d in runtime.devices():
        if d._client is not None:
            d.flush_frees()


def get_device_name(device: Any = None) -> str:
    info = _dev(device).client.device_info()
    return f"FlexNPU ({info.get('name', info.get('backend', '?'))})"


class _Props:
    def __init__(self, info: dict):
        self.name = f"FlexNPU ({info.get('name', info.get('backend', '?'))})"
        self.total_memory = int(info.get("total_memory", 0))
        self.backend = info.get("backend")

    def __repr__(self) -> str:
        return f"_NPUDeviceProperties(name='{self.name}', total_memory={self.total_memory >> 20}MB)"


def get_device_properties(device: Any = None) -> _Props:
    return _Props(_dev(device).client.device_info())


def is_bf16_supported() -> bool:
    return True


def get_amp_supported_dtype() -> list[torch.dtype]:
    """Dtypes torch.autocast("npu", ...) may cast to (the backend runs them all)."""
    return [torch.float16, torch.bfloat16]


def set_phase(phase: str, stream_obj: Stream | None = None) -> None:
    """FlexNPU extension: declare the phase (prefill/decode/auto) of a stream's work."""
    d = stream_obj._dev if stream_obj else _dev()
    d.client.set_phase(phase, stream_obj.stream_id if stream_obj else None)


def mark_step(stream_obj: Stream | None = None) -> None:
    """FlexNPU extension: one engine iteration (one output token) ends here on the stream (the
    current one by default). The flex scheduler keeps decode iterations within their TPOT
    budget; engines that do not synchronise every token call this instead."""
    s = stream_obj if stream_obj is not None else current_stream()
    s._dev.client.mark_step(s.stream_id)


# -- zero-copy sharing between processes (aclrtIpcMemGetExportKey / SetImportPid / ImportByKey) --
_IPC_PREFIX = "flexnpu-ipc:1:"


def ipc_export(t: torch.Tensor, pids: Any = ()) -> str:
    """FlexNPU extension: share the device memory behind npu tensor `t` with other processes on
    the same device, without a copy. Returns a descriptor string (key and layout) to hand to the
    other process, which calls ipc_import(); only processes whose pids are allowed (here or with
    ipc_allow) may import. The memory stays valid while any importer still holds it."""
    from flexnpu.hook import tensor as T

    if not isinstance(t, T.NPUTensor):
        raise TypeError(f"ipc_export needs an npu tensor, got a tensor on {t.device}")
    d = t._a.dev
    key = d.client.ipc_export(t._a.handle)
    if pids:
        d.client.ipc_set_pids(key, [int(p) for p in pids])
    layout = {
        "key": key,
        "device": d.daemon_index,
        "dtype": str(t.dtype).split(".")[-1],
        "shape": list(t.shape),
        "stride": list(t.stride()),
        "offset": t.storage_offset(),
    }
    import json

    return _IPC_PREFIX + json.dumps(layout, separators=(",", ":"))


def _ipc_layout(desc: str) -> dict:
    import json

    if not isinstance(desc, str) or not desc.startswith(_IPC_PREFIX):
        raise ValueError("not a FlexNPU IPC descriptor (expected the string ipc_export returned)")
    return json.loads(desc[len(_IPC_PREFIX) :])


def ipc_allow(desc: str, pids: Any) -> None:
    """Allow more processes to import an exported tensor (owner only)."""
    lay = _ipc_layout(desc)
    _dev_for_daemon(lay["device"]).client.ipc_set_pids(int(lay["key"]), [int(p) for p in pids])


def _dev_for_daemon(daemon_index: int) -> runtime.Device:
    for d in runtime.devices():
        if d.daemon_index == daemon_index:
            return d
    raise RuntimeError(
        f"this process has no npu device served by daemon device {daemon_index} "
        f"(FLEXNPU_DEVICES={os.environ.get('FLEXNPU_DEVICES', '0')!r})"
    )


def ipc_import(desc: str) -> torch.Tensor:
    """The npu tensor another process exported with ipc_export: same device memory, no copy."""
    from flexnpu.hook import tensor as T

    lay = _ipc_layout(desc)
    d = _dev_for_daemon(int(lay["device"]))
    dtype = getattr(torch, lay["dtype"])
    h, nbytes = d.client.ipc_import(int(lay["key"]))
    return T.wrap(T.Alloc(d, h, nbytes), tuple(lay["shape"]), tuple(lay["stride"]), int(lay["offset"]), dtype)


# -- random numbers: generated on the host (see tensor.py), so they follow the CPU generator ----


def manual_seed(seed: int) -> None:
    pass


def manual_seed_all(seed: int) -> None:
    pass


def seed() -> None:
    pass


def initial_seed() -> int:
    return torch.initial_seed()


def get_rng_state(device: Any = None) -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
    torch.set_rng_state(state)


# -- graphs -----------------------------------------------------------------------------------


class NPUGraph:
    """Capture a sequence of npu launches once; ``replay()`` re-runs them as one command.

    As with CUDA graphs, tensors used by the capture are static: copy new inputs into them before
    ``replay()``, read outputs from the tensors the capture produced. Allocations made during the
    capture stay reserved until ``reset()`` (or the graph is garbage collected).
    """

    def __init__(self):
        self._graph: int | None = None
        self._dev: runtime.Device | None = None
        self._stream = 0
        self._held: list[int] = []

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
        d = _dev()
        if d.capture is not None:
            raise RuntimeError("an NPU graph capture is already in progress on this device")
        if self._graph is not None:
            raise RuntimeError("this NPUGraph already holds a capture; call reset() first")
        d.flush_frees()
        self._dev = d
        self._stream = d.stream
        self._gid = d.client.graph_begin_capture(self._stream)
        d.capture = self

    def capture_end(self) -> None:
        d = self._dev
        if d is None or d.capture is not self:
            raise RuntimeError("capture_end without capture_begin")
        d.capture = None
        d.client.graph_end_capture(self._gid, self._stream)
        self._graph = self._gid

    def replay(self) -> None:
        d = self._dev
        if self._graph is None or d is None:  # _dev is set whenever _graph is
            raise RuntimeError("replay() before a capture")
        if d.pending:
            d.flush_frees()
        d.client.graph_replay(self._graph, d.stream)

    def reset(self) -> None:
        d = self._dev
        if d is None:
            return
        if self._graph is not None:
            d.client.graph_destroy(self._graph)
            self._graph = None
        held, self._held = self._held, []
        d.pending.extend(held)
        d.flush_due = True

    def pool(self) -> Any:
        return id(self)

    def debug_dump(self, path: str) -> None:
        raise NotImplementedError("NPUGraph.debug_dump is not supported by FlexNPU")

    def __del__(self):
        try:
            if self._dev is not None and self._dev.capture is not self:
                self.reset()
        except Exception:  # noqa: BLE001
            pass


class graph:
    """``with torch.npu.graph(g):`` captures the body's npu work into ``g`` (like torch.cuda.graph).

    The capture runs on a side stream (``stream`` or a fresh one) after synchronizing, as CUDA
    does, so work queued before the capture is not recorded.
    """

    def __init__(
        self,
        npu_graph: NPUGraph,
        pool: Any = None,
        stream: Stream | None = None,
        capture_error_mode: str = "global",
    ):
        self.g = npu_graph
        self.stream = stream
        self._ctx: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self):
        synchronize()
        s = self.stream or Stream()
        self._side = s
        s.wait_stream(current_stream())
        self._ctx = stream(s)
        self._ctx.__enter__()
        self.g.capture_begin()
        return self.g

    def __exit__(self, *exc):
        try:
            self.g.capture_end()
        finally:
            assert self._ctx is not None  # set by __enter__
            self._ctx.__exit__(*exc)
        return False
