"""Helpers for tests where one client attacks the daemon through its own shared memory.

An attacker is an ordinary `Client` whose segment a test also maps raw, so it can write ring
indices and records exactly as a hostile process could (it owns that memory).
"""

from __future__ import annotations

import mmap
import struct
import time
from typing import Any
from collections.abc import Callable

from flexnpu import protocol as P

HEAD, TAIL = 0, 128  # offsets of a ring's index lines from its control block


class Raw:
    """A client's segment, mapped raw: ring indices and the arena, as the process sees them."""

    def __init__(self, client: Any) -> None:
        self.c = client
        self.mm = mmap.mmap(client.seg.fd, client.seg.size)
        self.sq_off, self.cq_off = struct.unpack_from("<QQ", self.mm, 32)

    def u32(self, off: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<I", self.mm, off, value & 0xFFFFFFFF)
        return struct.unpack_from("<I", self.mm, off)[0]

    def scribble_cq_head(self, value: int = 0x7FFFFFF0) -> None:
        """The client's own CQ head (it consumes the CQ): the daemon must never follow it."""
        self.u32(self.cq_off + HEAD, value)

    def push(self, rec: bytes, timeout: float = 5.0) -> bool:
        """Push one raw record without reading any completion; False if the SQ stayed full."""
        sq = self.c.seg.sq
        if sq.push(rec):
            return True
        try:
            sq.push_wait(rec, timeout)
            return True
        except Exception:  # noqa: BLE001 - the daemon may have dropped us already
            return False

    def payload(self, data: bytes) -> int:
        """Place bytes in the arena; returns the offset (never freed: tests are short)."""
        off = self.c.seg.alloc(max(1, len(data)))
        self.c.seg.arena_view(off, len(data))[:] = data
        return off

    def close(self) -> None:
        try:
            self.mm.close()
        except Exception:  # noqa: BLE001
            pass


def sync_nop(ud: int) -> bytes:
    return P.pack_sqe(P.Op.NOP, user_data=ud, flags=P.FLAG_SYNC)


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > end:
            return v
        time.sleep(step)


def client_ids(daemon: Any) -> set[int]:
    return {c["client_id"] for c in daemon.status()["clients"]}
