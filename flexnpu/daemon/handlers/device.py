"""Device-wide requests: information, synchronisation, memory statistics, and the scheduling hints
(phase, step marks) a client gives about its own work.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ... import protocol as P
from ...errors import InvalidArgument, InvalidHandle
from ...protocol import Op
from .. import requests as R
from ..objects import Cmd, StreamState

if TYPE_CHECKING:
    from ..session import Session


def _run_nop(s: Session, st: StreamState, c: Cmd) -> None:
    if c.sync:
        s.reply_sync(c.user_data, None)


def _p_nop(s: Session, st: StreamState | None, r: R.Nop) -> Cmd:
    return Cmd(Op.NOP, r.user_data, r.sync, _run_nop)


def _p_device_info(s: Session, st: StreamState | None, r: R.DeviceInfo) -> None:
    info = dict(s.daemon.backend_info)
    info.update(device=s.daemon.device, policy=s.daemon.policy_name, memory_limit=s.mem.limit)
    s.reply_json(r.user_data, info)


def _all_idle(s: Session) -> bool:
    return all(not q.queue for q in s.streams.values()) and not s.daemon.scheduler.busy(s)


def _p_device_sync(s: Session, st: StreamState | None, r: R.DeviceSync) -> None:
    def done() -> None:
        s.daemon.backend.synchronize()
        err = s.error
        for q in s.streams.values():
            err = err or q.error
            q.error = None
        s.error = None
        s.reply(r.user_data, err[0] if err else 0, msg=err[1] if err else "")

    s.add_waiter()
    s.waiters.append((lambda: _all_idle(s), done))
    s.daemon.waiting.add(s)


def _p_mem_stats(s: Session, st: StreamState | None, r: R.MemStats) -> None:
    s.reply_json(
        r.user_data,
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


def _p_set_phase(s: Session, st: StreamState | None, r: R.SetPhase) -> None:
    if r.phase >= len(P.PHASES):
        raise InvalidArgument(f"unknown phase code {r.phase}")
    phase = P.PHASES[r.phase]
    target = s.streams.get(r.stream_id) if r.stream_id else None
    if r.stream_id and target is None:
        raise InvalidHandle(f"unknown stream {r.stream_id}")
    if target is None:
        s.phase = phase
        for q in s.streams.values():
            q.phase = phase
    else:
        target.phase = phase
    if r.sync:
        s.reply(r.user_data)


def _p_step_mark(s: Session, st: StreamState | None, r: R.StepMark) -> Cmd | None:
    assert st is not None  # stream-ordered: prepare resolved it
    # A graph replays kernels, not iteration boundaries: the engine marks after the replay.
    if st.capturing:
        if r.sync:
            s.reply(r.user_data)
        return None
    now = time.perf_counter()
    last = s.last_mark.get(st.sid)
    s.last_mark[st.sid] = now
    if last is not None:
        s.daemon.metrics.step(st.phase if st.phase != "auto" else s.phase, now - last)
    return Cmd(Op.STEP_MARK, r.user_data, r.sync, _run_nop)


PREPARE: dict[Op, Any] = {
    Op.NOP: _p_nop,
    Op.DEVICE_INFO: _p_device_info,
    Op.DEVICE_SYNC: _p_device_sync,
    Op.MEM_STATS: _p_mem_stats,
    Op.SET_PHASE: _p_set_phase,
    Op.STEP_MARK: _p_step_mark,
}
