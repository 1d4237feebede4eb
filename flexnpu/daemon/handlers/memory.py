"""Device memory: allocation under client-chosen handles, copies and fills (every range checked
against its allocation before anything is queued), and IPC export/import between clients.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from ... import protocol as P
from ...errors import InvalidArgument, InvalidHandle, NotFound, PermissionDenied
from ...protocol import Op
from .. import requests as R
from ..objects import MAX_IMPORT_PIDS, Alloc, Cmd, StreamState, ready_buf

if TYPE_CHECKING:
    from ..session import Session


def _p_malloc(s: Session, st: StreamState | None, r: R.Malloc) -> None:
    h, nbytes = r.handle, r.nbytes
    if h in s.handles:
        raise InvalidHandle(f"handle {h} is already in use")
    al = s.new_alloc(nbytes)
    try:
        al.buf = s.daemon.backend.alloc(nbytes)
        s.handles.add(h, al)
    except BaseException:
        s.mem.uncharge(nbytes)
        raise
    if r.sync:
        s.reply(r.user_data)


def _free(s: Session, h: int) -> None:
    _drop_exports(s, [s.handles.remove(h)])


def _drop_exports(s: Session, freed: list[Alloc]) -> None:
    """The exports of freed allocations go too: otherwise the registry would keep memory alive
    that nobody is charged for. Processes that already imported one keep it (and it stays
    charged to its owner)."""
    exports = s.daemon.exports
    if exports and freed:
        gone = {id(al) for al in freed}
        for key in [k for k, e in exports.items() if id(e.alloc) in gone and e.owner_client == s.cid]:
            del exports[key]


def _p_free(s: Session, st: StreamState | None, r: R.Free) -> None:
    _free(s, r.handle)
    if r.sync:
        s.reply(r.user_data)


MAX_FREE_MANY = 4096


def _p_free_many(s: Session, st: StreamState | None, r: R.FreeMany) -> None:
    """Every handle of the list is freed; an unknown one is reported (the first), after the rest
    are freed, as separate FREEs would each have been."""
    n = r.payload_len
    if n % 4 or n > 4 * MAX_FREE_MANY:
        raise InvalidArgument(f"free list must be at most {MAX_FREE_MANY} u32 handles")
    removed, bad = s.handles.remove_many(struct.unpack(f"<{n // 4}I", s.payload_bytes(r.payload_offset, n)))
    _drop_exports(s, removed)
    if bad is not None:
        raise bad
    if r.sync:
        s.reply(r.user_data)


def _run_memset(s: Session, st: StreamState, c: Cmd) -> None:
    al, h, off, val, n = c.a
    s.daemon.backend.memset(ready_buf(al, h), off, val, n)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_memset(s: Session, st: StreamState | None, r: R.Memset) -> Cmd:
    al = s.alloc_of(r.handle)
    s._bounds(al, r.offset, r.nbytes, "memset")
    return Cmd(Op.MEMSET, r.user_data, r.sync, _run_memset, (al, r.handle, r.offset, r.value, r.nbytes))


def _run_h2d(s: Session, st: StreamState, c: Cmd) -> None:
    al, h, off, src = c.a
    s.daemon.backend.h2d(ready_buf(al, h), off, src)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_h2d(s: Session, st: StreamState | None, r: R.MemcpyH2D) -> Cmd:
    al = s.alloc_of(r.handle)
    n = r.nbytes
    s._bounds(al, r.offset, n, "memcpy host->device")
    if r.payload_len != n:
        raise InvalidArgument("memcpy host->device: payload length differs from the copy size")
    view = s._payload(r.payload_offset, r.payload_len)
    src = view if (r.flags & P.FLAG_DEFERRED) else bytes(view)  # copied out now unless deferred
    return Cmd(Op.MEMCPY_H2D, r.user_data, r.sync, _run_h2d, (al, r.handle, r.offset, src))


def _run_d2h(s: Session, st: StreamState, c: Cmd) -> None:
    al, h, off, n, dst = c.a
    s.daemon.backend.d2h(ready_buf(al, h), off, n, dst)
    if c.sync:
        s.daemon.backend.sync_stream(st.device_stream)
        s.reply_sync(c.user_data, st)


def _p_d2h(s: Session, st: StreamState | None, r: R.MemcpyD2H) -> Cmd:
    al = s.alloc_of(r.handle)
    n = r.nbytes
    s._bounds(al, r.offset, n, "memcpy device->host")
    if r.payload_len != n:
        raise InvalidArgument("memcpy device->host: destination length differs from the copy size")
    return Cmd(
        Op.MEMCPY_D2H,
        r.user_data,
        r.sync,
        _run_d2h,
        (al, r.handle, r.offset, n, s._payload(r.payload_offset, r.payload_len)),
    )


def _run_d2d(s: Session, st: StreamState, c: Cmd) -> None:
    dal, dh, doff, sal, sh, soff, n = c.a
    s.daemon.backend.d2d(ready_buf(dal, dh), doff, ready_buf(sal, sh), soff, n)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_d2d(s: Session, st: StreamState | None, r: R.MemcpyD2D) -> Cmd:
    dal, sal = s.alloc_of(r.dst), s.alloc_of(r.src)
    s._bounds(dal, r.dst_offset, r.nbytes, "memcpy device->device (destination)")
    s._bounds(sal, r.src_offset, r.nbytes, "memcpy device->device (source)")
    return Cmd(
        Op.MEMCPY_D2D,
        r.user_data,
        r.sync,
        _run_d2d,
        (dal, r.dst, r.dst_offset, sal, r.src, r.src_offset, r.nbytes),
    )


def _p_ipc_export(s: Session, st: StreamState | None, r: R.IpcExport) -> None:
    al = s.alloc_of(r.handle)
    if r.flags_ & ~P.IPC_EXPORT_SAME_UID:
        raise InvalidArgument(f"unknown IPC export flags {r.flags_:#x}")
    key = s.daemon.export(s, r.handle, al, same_uid=bool(r.flags_ & P.IPC_EXPORT_SAME_UID))
    s.reply(r.user_data, 0, key)


def _p_ipc_set_pids(s: Session, st: StreamState | None, r: R.IpcSetPids) -> None:
    if r.payload_len % 4 or r.payload_len > 4 * 4096:
        raise InvalidArgument("pid list must be at most 4096 u32 values")
    pids = struct.unpack(f"<{r.payload_len // 4}I", bytes(s._payload(r.payload_offset, r.payload_len)))
    exp = s.daemon.exports.get(r.key)
    if exp is None or exp.owner_client != s.cid:
        raise NotFound(f"no export with key {r.key:#x} owned by this client")
    exp.prune()
    missing = [p for p in pids if p not in exp.pids and not exp.grant(p)]
    if len(exp.pids) > MAX_IMPORT_PIDS:
        for p in pids:
            exp.pids.pop(p, None)
        raise InvalidArgument(f"an export may be granted to at most {MAX_IMPORT_PIDS} processes")
    if missing:
        # a grant names a running process; one for a pid that is not running would go to
        # whichever process gets that pid next
        raise InvalidArgument(
            f"pid {missing[0]} is not a running process; "
            f"{len(pids) - len(missing)} of {len(pids)} pids granted"
        )
    if r.sync:
        s.reply(r.user_data)


def _p_ipc_import(s: Session, st: StreamState | None, r: R.IpcImport) -> None:
    key, h = r.key, r.handle
    exp = s.daemon.exports.get(key)
    if exp is None:
        raise NotFound(f"no exported device memory with key {key:#x}")
    if exp.owner_client != s.cid and not exp.allows(s.pid, s.start_time) and exp.same_uid != s.uid:
        raise PermissionDenied(f"pid {s.pid} is not on the import list of key {key:#x}")
    s.handles.add(h, exp.alloc)
    s.reply(r.user_data, 0, exp.alloc.nbytes)


PREPARE: dict[Op, Any] = {
    Op.MALLOC: _p_malloc,
    Op.FREE: _p_free,
    Op.FREE_MANY: _p_free_many,
    Op.MEMSET: _p_memset,
    Op.MEMCPY_H2D: _p_h2d,
    Op.MEMCPY_D2H: _p_d2h,
    Op.MEMCPY_D2D: _p_d2d,
    Op.IPC_EXPORT: _p_ipc_export,
    Op.IPC_SET_PIDS: _p_ipc_set_pids,
    Op.IPC_IMPORT: _p_ipc_import,
}
