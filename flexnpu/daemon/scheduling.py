"""How the daemon picks the next commands to run from all clients' stream queues.

A scheduler sees every (session, stream) queue. `run_round()` executes some ready commands and
returns how many ran; `idle_timeout()` says how long the loop may sleep when nothing is ready
(None = until a request arrives).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Daemon

ROUND_QUANTUM = 64   # commands one stream may run per round before others get a turn


class FifoScheduler:
    """Passthrough baseline: round-robin over ready streams, in each stream's order."""

    name = "fifo"

    inline = True   # commands may run at drain time when nothing is queued ahead of them

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon
        self.active: dict[tuple[int, int], tuple[Any, Any]] = {}   # queues with work, by (client, stream)

    def activate(self, s: Any, st: Any) -> None:
        self.active[(s.cid, st.sid)] = (s, st)

    def run_round(self) -> int:
        if not self.active:
            return 0
        ran = 0
        for key, (s, st) in list(self.active.items()):
            q = st.queue
            for _ in range(ROUND_QUANTUM):
                if not q or s.dead:
                    break
                cmd = q[0]
                if cmd.ready is not None and not cmd.ready():
                    break
                q.popleft()
                s.execute(st, cmd)
                ran += 1
            if not q or s.dead or s.streams.get(st.sid) is not st:
                self.active.pop(key, None)
        return ran

    def idle_timeout(self) -> float | None:
        return None


_SCHEDULERS = {"fifo": FifoScheduler}


def make_scheduler(name: str, daemon: "Daemon") -> Any:
    try:
        return _SCHEDULERS[name](daemon)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(_SCHEDULERS))}") from None
