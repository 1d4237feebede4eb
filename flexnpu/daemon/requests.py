"""Typed requests: one class per opcode, its fields named as the wire table names them.

A submission record carries five untyped u64 arguments (a0..a4). A handler receives them as a
`Request` subclass whose attributes are the names `protocol.OPS[op].args` gives those slots, so
handler code reads `r.stream_id`, never `a[0]`. The classes are written out (so type checkers
see every field) and checked against the wire table at import: a renamed, reordered or missing
argument fails loudly instead of silently reading the wrong slot.

Construction is one slotted object per record (the daemon's hot path); fields are descriptors
over the raw argument tuple, so nothing is copied or converted until a handler reads it.
"""

from __future__ import annotations

from typing import ClassVar, overload

from .. import protocol as P
from ..protocol import Op

__all__ = ["Request", "REQUEST_TYPES"]


class _Arg:
    """Slot `index` of the record's arguments, as an int attribute of the request."""

    __slots__ = ("index", "name")

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _Arg: ...
    @overload
    def __get__(self, obj: Request, owner: type | None = None) -> int: ...
    def __get__(self, obj: Request | None, owner: type | None = None) -> int | _Arg:
        return self if obj is None else obj.args[self.index]


class Request:
    """One decoded submission record: what every handler gets besides its named arguments."""

    __slots__ = ("user_data", "sync", "payload_offset", "payload_len", "flags", "args")
    op: ClassVar[Op]

    def __init__(
        self,
        user_data: int,
        sync: bool,
        payload_offset: int,
        payload_len: int,
        flags: int,
        args: tuple[int, ...],
    ) -> None:
        self.user_data = user_data  # echoed in the reply (CQE) so the client can match it
        self.sync = sync  # FLAG_SYNC: the client waits for a reply
        self.payload_offset = payload_offset  # out-of-line data in the client's arena, if any
        self.payload_len = payload_len
        self.flags = flags
        self.args = args  # the raw a0..a4; read them through the named fields

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        fields = [v for k in dir(cls) if isinstance(v := getattr(cls, k), _Arg)]
        return tuple(f.name for f in sorted(fields, key=lambda f: f.index))


# --------------------------------------------------------------------------- device, streams, events
class Nop(Request):
    __slots__ = ()
    op = Op.NOP


class DeviceInfo(Request):
    __slots__ = ()
    op = Op.DEVICE_INFO


class DeviceSync(Request):
    __slots__ = ()
    op = Op.DEVICE_SYNC


class StreamCreate(Request):
    __slots__ = ()
    op = Op.STREAM_CREATE
    stream_id = _Arg(0)
    priority = _Arg(1)


class StreamDestroy(Request):
    __slots__ = ()
    op = Op.STREAM_DESTROY


class StreamSync(Request):
    __slots__ = ()
    op = Op.STREAM_SYNC


class StreamQuery(Request):
    __slots__ = ()
    op = Op.STREAM_QUERY
    stream_id = _Arg(0)


class EventCreate(Request):
    __slots__ = ()
    op = Op.EVENT_CREATE
    event_id = _Arg(0)
    flags_ = _Arg(1)  # the event's creation flags; `flags` is the record's own


class EventDestroy(Request):
    __slots__ = ()
    op = Op.EVENT_DESTROY
    event_id = _Arg(0)


class EventRecord(Request):
    __slots__ = ()
    op = Op.EVENT_RECORD
    event_id = _Arg(0)


class StreamWaitEvent(Request):
    __slots__ = ()
    op = Op.STREAM_WAIT_EVENT
    event_id = _Arg(0)


class EventSync(Request):
    __slots__ = ()
    op = Op.EVENT_SYNC
    event_id = _Arg(0)


class EventQuery(Request):
    __slots__ = ()
    op = Op.EVENT_QUERY
    event_id = _Arg(0)


class EventElapsed(Request):
    __slots__ = ()
    op = Op.EVENT_ELAPSED
    start_id = _Arg(0)
    end_id = _Arg(1)


# --------------------------------------------------------------------------- memory and IPC
class Malloc(Request):
    __slots__ = ()
    op = Op.MALLOC
    handle = _Arg(0)
    nbytes = _Arg(1)


class Free(Request):
    __slots__ = ()
    op = Op.FREE
    handle = _Arg(0)


class Memset(Request):
    __slots__ = ()
    op = Op.MEMSET
    handle = _Arg(0)
    offset = _Arg(1)
    value = _Arg(2)
    nbytes = _Arg(3)


class MemcpyH2D(Request):
    __slots__ = ()
    op = Op.MEMCPY_H2D
    handle = _Arg(0)
    offset = _Arg(1)
    nbytes = _Arg(2)


class MemcpyD2H(Request):
    __slots__ = ()
    op = Op.MEMCPY_D2H
    handle = _Arg(0)
    offset = _Arg(1)
    nbytes = _Arg(2)


class MemcpyD2D(Request):
    __slots__ = ()
    op = Op.MEMCPY_D2D
    dst = _Arg(0)
    dst_offset = _Arg(1)
    src = _Arg(2)
    src_offset = _Arg(3)
    nbytes = _Arg(4)


class MemStats(Request):
    __slots__ = ()
    op = Op.MEM_STATS


class IpcExport(Request):
    __slots__ = ()
    op = Op.IPC_EXPORT
    handle = _Arg(0)
    flags_ = _Arg(1)  # IPC_EXPORT_* flags; `flags` is the record's own


class IpcSetPids(Request):
    __slots__ = ()
    op = Op.IPC_SET_PIDS
    key = _Arg(0)


class IpcImport(Request):
    __slots__ = ()
    op = Op.IPC_IMPORT
    key = _Arg(0)
    handle = _Arg(1)


# --------------------------------------------------------------------------- operators and graphs
class Launch(Request):
    __slots__ = ()
    op = Op.LAUNCH


class GraphBegin(Request):
    __slots__ = ()
    op = Op.GRAPH_BEGIN
    graph_id = _Arg(0)


class GraphEnd(Request):
    __slots__ = ()
    op = Op.GRAPH_END
    graph_id = _Arg(0)


class GraphReplay(Request):
    __slots__ = ()
    op = Op.GRAPH_REPLAY
    graph_id = _Arg(0)


class GraphDestroy(Request):
    __slots__ = ()
    op = Op.GRAPH_DESTROY
    graph_id = _Arg(0)


# --------------------------------------------------------------------------- scheduling hints
class SetPhase(Request):
    __slots__ = ()
    op = Op.SET_PHASE
    phase = _Arg(0)
    stream_id = _Arg(1)


class StepMark(Request):
    __slots__ = ()
    op = Op.STEP_MARK


# --------------------------------------------------------------------------- collectives
class CommInit(Request):
    __slots__ = ()
    op = Op.COMM_INIT
    comm = _Arg(0)
    rank = _Arg(1)
    size = _Arg(2)
    timeout_ms = _Arg(3)


class CommDestroy(Request):
    __slots__ = ()
    op = Op.COMM_DESTROY
    comm = _Arg(0)


class Collective(Request):
    __slots__ = ()
    op = Op.COLLECTIVE
    comm = _Arg(0)
    kind = _Arg(1)
    reduce_op = _Arg(2)
    root = _Arg(3)


def _wire_name(field: str) -> str:
    # A field that would shadow the record's own `flags` carries a trailing underscore.
    return field.removesuffix("_")


REQUEST_TYPES: dict[Op, type[Request]] = {cls.op: cls for cls in Request.__subclasses__()}


def _check() -> None:
    missing = set(P.OPS) - set(REQUEST_TYPES)
    assert not missing, f"no request type for {sorted(o.name for o in missing)}"
    for op, cls in REQUEST_TYPES.items():
        names = tuple(_wire_name(n) for n in cls.field_names())
        assert names == P.OPS[op].args, f"{cls.__name__} fields {names} != wire table {P.OPS[op].args}"


_check()
