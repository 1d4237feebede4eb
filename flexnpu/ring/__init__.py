"""flexnpu.ring: the lock-free shared-memory command ring between an app and the daemon.

A Segment is one sealed memfd: header page, SQ ring (client -> daemon), CQ ring (daemon ->
client), data arena. The client creates it and sends the fd over the control socket
(send_fd / recv_fd); the daemon attaches. All index and flag accesses are C11 atomics in C
(ring.c); waits spin briefly, then futex-sleep with the GIL released. See docs/ring.md.
"""

from .errors import PeerClosed, PeerDead, RingCorrupt, RingError
from .fdpass import recv_fd, send_fd
from .segment import (
    LIVENESS_INTERVAL_S,
    Doorbell,
    Ring,
    RingSet,
    Segment,
    Stager,
    call,
    have_futex_waitv,
    wait_any,
)

__all__ = [
    "RingError",
    "RingCorrupt",
    "PeerDead",
    "PeerClosed",
    "Segment",
    "Ring",
    "RingSet",
    "Stager",
    "call",
    "Doorbell",
    "wait_any",
    "have_futex_waitv",
    "send_fd",
    "recv_fd",
    "LIVENESS_INTERVAL_S",
]
