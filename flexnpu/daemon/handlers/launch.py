"""Operator launches: decode the payload, resolve every tensor handle at prepare time (so a later
free cannot pull memory from under queued work), bind fresh outputs, run on the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ... import protocol as P
from ...errors import FlexNPUError, InvalidArgument, InvalidHandle, OpNotSupported, code_of, error_for
from ...ops import tensor_refs
from ...protocol import Op
from .. import requests as R
from ..objects import Alloc, Cmd, StreamState, ready_buf

if TYPE_CHECKING:
    from ..session import Session


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


def _p_launch(s: Session, st: StreamState | None, r: R.Launch) -> Cmd:
    payload = bytes(s._payload(r.payload_offset, r.payload_len))  # copy out before parsing
    try:
        launch = P.decode_launch(payload, s.daemon.backend.device)
    except P.DecodeError as e:
        raise InvalidArgument(f"malformed launch: {e}") from None
    if not s.daemon.backend.op_allowed(launch.op):
        raise OpNotSupported(f"operator {launch.op} is not supported by the {s.daemon.backend.name} backend")
    allocs: dict[int, Alloc] = {}
    for ref in tensor_refs(launch.args, launch.kwargs):
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

    cmd = Cmd(Op.LAUNCH, r.user_data, r.sync, _run_launch, (launch, allocs, outs), undo=undo)
    try:
        s.daemon.launch_limits.check(cmd)
    except BaseException:
        undo()
        raise
    return cmd


PREPARE: dict[Op, Any] = {
    Op.LAUNCH: _p_launch,
}
