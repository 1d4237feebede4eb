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

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def ready_queues(self) -> list[tuple[Any, Any]]:
        out = []
        for s in self.daemon.sessions.values():
            for st in s.streams.values():
                if st.queue:
                    out.append((s, st))
        return out

    def run_round(self) -> int:
        ran = 0
        for s, st in self.ready_queues():
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
        return ran

    def idle_timeout(self) -> float | None:
        return None


_SCHEDULERS = {"fifo": FifoScheduler}


def make_scheduler(name: str, daemon: "Daemon") -> Any:
    try:
        return _SCHEDULERS[name](daemon)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(_SCHEDULERS))}") from None
