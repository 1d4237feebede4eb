"""Streams and events: a client's queues and the marks that order work across them.

Event records count: `requested` grows when a record is submitted, `completed` when it runs, so
a wait or sync targets exactly the records issued before it (as CUDA and AscendCL define it).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from ...errors import BadState, InvalidArgument, InvalidHandle
from ...protocol import Op
from .. import requests as R
from ..objects import Cmd, EventState, StreamState

if TYPE_CHECKING:
    from ..session import Session

MAX_STREAMS = 1024  # per client
MAX_EVENTS = 1 << 16  # per client


def _p_stream_create(s: Session, st: StreamState | None, r: R.StreamCreate) -> None:
    sid, prio = r.stream_id, r.priority
    if not 0 < sid < 1 << 32:
        raise InvalidArgument(f"stream id {sid} out of range")
    if sid in s.streams:
        raise InvalidHandle(f"stream {sid} already exists")
    if len(s.streams) >= MAX_STREAMS:
        raise InvalidArgument(f"too many streams (limit {MAX_STREAMS})")
    prio = struct.unpack("<q", struct.pack("<Q", prio))[0]
    s.streams[sid] = s._new_stream(sid, max(-8, min(8, prio)))
    if r.sync:
        s.reply(r.user_data)


def _run_stream_destroy(s: Session, st: StreamState, c: Cmd) -> None:
    s.daemon.backend.sync_stream(st.device_stream)
    s.streams.pop(st.sid, None)  # the scheduler drops a stream once it is gone from the table
    if c.sync:
        s.reply(c.user_data)


def _p_stream_destroy(s: Session, st: StreamState | None, r: R.StreamDestroy) -> Cmd:
    assert st is not None  # stream-ordered: prepare resolved it
    if st.sid == 0:
        raise InvalidArgument("the default stream cannot be destroyed")
    return Cmd(Op.STREAM_DESTROY, r.user_data, r.sync, _run_stream_destroy)


def _run_stream_sync(s: Session, st: StreamState, c: Cmd) -> None:
    s.daemon.backend.sync_stream(st.device_stream)
    s.reply_sync(c.user_data, st)


def _p_stream_sync(s: Session, st: StreamState | None, r: R.StreamSync) -> Cmd:
    return Cmd(Op.STREAM_SYNC, r.user_data, True, _run_stream_sync)


def _p_stream_query(s: Session, st: StreamState | None, r: R.StreamQuery) -> None:
    target = s.stream(r.stream_id)
    s.reply(r.user_data, 0, int(not target.queue))


def _event(s: Session, eid: int) -> EventState:
    ev = s.events.get(eid)
    if ev is None:
        raise InvalidHandle(f"unknown event {eid}")
    return ev


def _p_event_create(s: Session, st: StreamState | None, r: R.EventCreate) -> None:
    eid = r.event_id
    if not 0 < eid < 1 << 32 or eid in s.events:
        raise InvalidHandle(f"event id {eid} invalid or in use")
    if len(s.events) >= MAX_EVENTS:
        raise InvalidArgument("too many events")
    s.events[eid] = EventState()
    if r.sync:
        s.reply(r.user_data)


def _p_event_destroy(s: Session, st: StreamState | None, r: R.EventDestroy) -> None:
    _event(s, r.event_id)
    del s.events[r.event_id]
    if r.sync:
        s.reply(r.user_data)


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


def _p_event_record(s: Session, st: StreamState | None, r: R.EventRecord) -> Cmd:
    ev = _event(s, r.event_id)
    ev.requested += 1
    n = ev.requested

    def undo() -> None:
        if ev.requested == n:
            ev.requested -= 1

    return Cmd(Op.EVENT_RECORD, r.user_data, r.sync, _run_event_record, (ev, n), undo=undo)


def _run_wait_event(s: Session, st: StreamState, c: Cmd) -> None:
    ev: EventState = c.a[0]
    if ev.token is not None:
        s.daemon.backend.wait_event(st.device_stream, ev.token)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_stream_wait_event(s: Session, st: StreamState | None, r: R.StreamWaitEvent) -> Cmd:
    ev = _event(s, r.event_id)
    target = ev.requested  # waits for the latest record issued before this call, as in CUDA
    return Cmd(
        Op.STREAM_WAIT_EVENT,
        r.user_data,
        r.sync,
        _run_wait_event,
        (ev,),
        ready=lambda: ev.completed >= target,
    )


def _p_event_sync(s: Session, st: StreamState | None, r: R.EventSync) -> None:
    ev = _event(s, r.event_id)
    target = ev.requested
    s.add_waiter()

    def done() -> None:
        if ev.token is not None:
            s.daemon.backend.event_sync(ev.token)
        s.reply(r.user_data)

    # Kept on the event, in target order (targets only grow): the record that reaches the
    # target fires it, so waiting costs nothing per loop however many waiters there are.
    ev.waiters.append((target, done))
    s.fire_event(ev)


def _p_event_query(s: Session, st: StreamState | None, r: R.EventQuery) -> None:
    ev = _event(s, r.event_id)
    done = ev.completed >= ev.requested and (ev.token is None or s.daemon.backend.event_done(ev.token))
    s.reply(r.user_data, 0, int(done))


def _p_event_elapsed(s: Session, st: StreamState | None, r: R.EventElapsed) -> None:
    e0, e1 = _event(s, r.start_id), _event(s, r.end_id)
    if e0.token is None or e1.token is None or e0.completed < e0.requested or e1.completed < e1.requested:
        raise BadState("elapsed time needs two completed events")
    ms = s.daemon.backend.elapsed_ms(e0.token, e1.token)
    s.reply(r.user_data, 0, struct.unpack("<Q", struct.pack("<d", ms))[0])


PREPARE: dict[Op, Any] = {
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
}
