"""The daemon's request handlers, one module per concern, and the table that dispatches to them.

A handler is ``prepare(session, stream, request) -> Cmd | None``: it runs when the daemon drains
the client's SQ, validates the typed request (flexnpu/daemon/requests.py: fields named as the
wire table names them), resolves handles to objects, and either answers at once (returns None)
or returns the command to queue on the stream (stream-ordered opcodes only; `stream` is None for
the others). Whatever it raises becomes that client's error (Session.prepare/Session.fail).

| module | opcodes |
| --- | --- |
| device.py | NOP, DEVICE_INFO, DEVICE_SYNC, MEM_STATS, SET_PHASE, STEP_MARK |
| streams.py | STREAM_*, EVENT_*, STREAM_WAIT_EVENT |
| memory.py | MALLOC, FREE, FREE_MANY, MEMSET, MEMCPY_*, IPC_* |
| launch.py | LAUNCH |
| capture.py | GRAPH_* |
| ../collectives.py | COMM_INIT, COMM_DESTROY, COLLECTIVE (next to the engine they drive) |

Adding an opcode: its row in protocol.OPS, its request class in requests.py, its handler here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import protocol as P
from ...protocol import Op
from ..collectives import PREPARE as _COLLECTIVES
from ..requests import REQUEST_TYPES, Request
from . import capture, device, launch, memory, streams

if TYPE_CHECKING:
    from ..objects import Cmd, StreamState
    from ..session import Session

__all__ = ["HOT_DRAIN", "HOT_LAUNCH", "Handler", "HandlerEntry", "TABLE"]

Handler = Callable[["Session", "StreamState | None", Any], "Cmd | None"]
# (handler, its request type, stream ordered?)
HandlerEntry = tuple[Handler, type[Request], bool]


def _table() -> list[HandlerEntry | None]:
    prepare: dict[Op, Handler] = {}
    for part in (
        device.PREPARE,
        streams.PREPARE,
        memory.PREPARE,
        launch.PREPARE,
        capture.PREPARE,
        _COLLECTIVES,
    ):
        dup = set(prepare) & set(part)
        assert not dup, f"two handlers for {sorted(o.name for o in dup)}"
        prepare.update(part)
    missing = set(P.OPS) - set(prepare)
    assert not missing, f"every opcode in the wire table needs a handler: {sorted(o.name for o in missing)}"
    # indexed by the raw u16 opcode, so dispatch needs no enum lookup
    table: list[HandlerEntry | None] = [None] * (max(prepare) + 1)
    for op, fn in prepare.items():
        table[op] = (fn, REQUEST_TYPES[op], P.OPS[op].stream_ordered)
    return table


TABLE: list[HandlerEntry | None] = _table()
# The daemon's hot path, planned launches run without the generic dispatch: in C where built
# (hotpath.c: Session.drain's loop, launch.HOT_DRAIN), else Session.prepare's shortcut run_hot
HOT_DRAIN = launch.HOT_DRAIN
HOT_LAUNCH = None if HOT_DRAIN is not None else launch.run_hot
