"""Typed requests: one class per opcode, its fields named as the wire table names them.

A submission record carries five untyped u64 arguments (a0..a4). A handler receives them as a
`Request` subclass whose attributes are the names `protocol.OPS[op].args` gives those slots, so
handler code reads `r.stream_id`, never `a[0]`. The classes are written out (so type checkers
see every field) and checked against the wire table at import: a renamed, reordered or missing
argument fails loudly instead of silently reading the wrong slot.

A request is the unpacked record itself (a tuple subclass: one C call to make, on the daemon's
hot path); fields are C-level getters over it, so nothing is copied or converted until read.
"""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING, Any, ClassVar

from .. import protocol as P
from ..protocol import Op

__all__ = ["Request", "REQUEST_TYPES"]

_ARG0 = 6  # index of a0 in a submission record (protocol.SQE field order)


class _ArgProperty(property):
    """Argument word `index` of the record, as an int attribute (a C-level getter: the daemon
    reads these on its hot path)."""

    index: int


def _arg(index: int) -> Any:  # Any: type checkers see the field as the int it returns
    prop = _ArgProperty(itemgetter(_ARG0 + index))
    prop.index = index
    return prop


class Request(tuple):  # type: ignore[type-arg]  # the record's own 11 integers
    """One submission record, exactly as unpacked from the SQ (protocol.SQE: opcode, flags,
    stream, user_data, payload offset, payload length, a0..a4), seen through named fields.

    A tuple subclass, so making one is a single C call over the unpacked record (no per-field
    copies on the daemon's hot path)."""

    __slots__ = ()
    op: ClassVar[Op]

    if TYPE_CHECKING:
        flags: int  # the record's flags (FLAG_SYNC, FLAG_DEFERRED)
        user_data: int  # echoed in the reply (CQE) so the client can match it
        payload_offset: int  # out-of-line data in the client's arena, if any
        payload_len: int

        @property
        def sync(self) -> bool: ...  # FLAG_SYNC: the client waits for a reply
    else:
        flags = property(itemgetter(1))
        user_data = property(itemgetter(3))
        payload_offset = property(itemgetter(4))
        payload_len = property(itemgetter(5))
        sync = property(lambda self: self[1] & P.FLAG_SYNC != 0)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        fields = [(v.index, k) for k in dir(cls) if isinstance(v := getattr(cls, k), _ArgProperty)]
        return tuple(name for _, name in sorted(fields))


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
    stream_id = _arg(0)
    priority = _arg(1)


class StreamDestroy(Request):
    __slots__ = ()
    op = Op.STREAM_DESTROY


class StreamSync(Request):
    __slots__ = ()
    op = Op.STREAM_SYNC


class StreamQuery(Request):
    __slots__ = ()
    op = Op.STREAM_QUERY
    stream_id = _arg(0)


class EventCreate(Request):
    __slots__ = ()
    op = Op.EVENT_CREATE
    event_id = _arg(0)
    flags_ = _arg(1)  # the event's creation flags; `flags` is the record's own


class EventDestroy(Request):
    __slots__ = ()
    op = Op.EVENT_DESTROY
    event_id = _arg(0)


class EventRecord(Request):
    __slots__ = ()
    op = Op.EVENT_RECORD
    event_id = _arg(0)


class StreamWaitEvent(Request):
    __slots__ = ()
    op = Op.STREAM_WAIT_EVENT
    event_id = _arg(0)


class EventSync(Request):
    __slots__ = ()
    op = Op.EVENT_SYNC
    event_id = _arg(0)


class EventQuery(Request):
    __slots__ = ()
    op = Op.EVENT_QUERY
    event_id = _arg(0)


class EventElapsed(Request):
    __slots__ = ()
    op = Op.EVENT_ELAPSED
    start_id = _arg(0)
    end_id = _arg(1)


# --------------------------------------------------------------------------- memory and IPC
class Malloc(Request):
    __slots__ = ()
    op = Op.MALLOC
    handle = _arg(0)
    nbytes = _arg(1)


class Free(Request):
    __slots__ = ()
    op = Op.FREE
    handle = _arg(0)


class FreeMany(Request):
    __slots__ = ()
    op = Op.FREE_MANY


class Memset(Request):
    __slots__ = ()
    op = Op.MEMSET
    handle = _arg(0)
    offset = _arg(1)
    value = _arg(2)
    nbytes = _arg(3)


class MemcpyH2D(Request):
    __slots__ = ()
    op = Op.MEMCPY_H2D
    handle = _arg(0)
    offset = _arg(1)
    nbytes = _arg(2)


class MemcpyD2H(Request):
    __slots__ = ()
    op = Op.MEMCPY_D2H
    handle = _arg(0)
    offset = _arg(1)
    nbytes = _arg(2)


class MemcpyD2D(Request):
    __slots__ = ()
    op = Op.MEMCPY_D2D
    dst = _arg(0)
    dst_offset = _arg(1)
    src = _arg(2)
    src_offset = _arg(3)
    nbytes = _arg(4)


class MemStats(Request):
    __slots__ = ()
    op = Op.MEM_STATS


class IpcExport(Request):
    __slots__ = ()
    op = Op.IPC_EXPORT
    handle = _arg(0)
    flags_ = _arg(1)  # IPC_EXPORT_* flags; `flags` is the record's own


class IpcSetPids(Request):
    __slots__ = ()
    op = Op.IPC_SET_PIDS
    key = _arg(0)


class IpcImport(Request):
    __slots__ = ()
    op = Op.IPC_IMPORT
    key = _arg(0)
    handle = _arg(1)


# --------------------------------------------------------------------------- operators and graphs
class Launch(Request):
    __slots__ = ()
    op = Op.LAUNCH


class GraphBegin(Request):
    __slots__ = ()
    op = Op.GRAPH_BEGIN
    graph_id = _arg(0)


class GraphEnd(Request):
    __slots__ = ()
    op = Op.GRAPH_END
    graph_id = _arg(0)


class GraphReplay(Request):
    __slots__ = ()
    op = Op.GRAPH_REPLAY
    graph_id = _arg(0)


class GraphDestroy(Request):
    __slots__ = ()
    op = Op.GRAPH_DESTROY
    graph_id = _arg(0)


# --------------------------------------------------------------------------- scheduling hints
class SetPhase(Request):
    __slots__ = ()
    op = Op.SET_PHASE
    phase = _arg(0)
    stream_id = _arg(1)


class StepMark(Request):
    __slots__ = ()
    op = Op.STEP_MARK


# --------------------------------------------------------------------------- collectives
class CommInit(Request):
    __slots__ = ()
    op = Op.COMM_INIT
    comm = _arg(0)
    rank = _arg(1)
    size = _arg(2)
    timeout_ms = _arg(3)


class CommDestroy(Request):
    __slots__ = ()
    op = Op.COMM_DESTROY
    comm = _arg(0)


class Collective(Request):
    __slots__ = ()
    op = Op.COLLECTIVE
    comm = _arg(0)
    kind = _arg(1)
    reduce_op = _arg(2)
    root = _arg(3)


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
