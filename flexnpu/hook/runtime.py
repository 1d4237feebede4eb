"""Per-process state of the npu front-end: virtual devices, their clients, streams, deferred frees.

Virtual device ``npu:i`` maps to daemon device ``FLEXNPU_DEVICES.split(",")[i]`` (default "0").
A client is attached lazily, on the first command for that device, so importing torch under
``flexnpu run`` costs no round trip until the program actually uses an npu.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

if TYPE_CHECKING:  # pragma: no cover
    from flexnpu.client import Client

_lock = threading.Lock()
_client_factory: Callable[[int], Any] | None = None


def set_client_factory(factory: Callable[[int], Any] | None) -> None:
    """Use ``factory(daemon_device_index)`` instead of ``flexnpu.client.get_client`` (tests)."""
    global _client_factory
    _client_factory = factory
    reset()


def device_map() -> list[int]:
    raw = os.environ.get("FLEXNPU_DEVICES", "0").strip() or "0"
    try:
        out = [int(x) for x in raw.split(",") if x.strip() != ""]
    except ValueError:
        raise RuntimeError(
            f"FLEXNPU_DEVICES={raw!r}: expected a comma-separated list of device numbers"
        ) from None
    if not out or any(d < 0 for d in out):
        raise RuntimeError(f"FLEXNPU_DEVICES={raw!r}: expected a comma-separated list of device numbers")
    return out


class Device:
    """One virtual npu device: its client plus the hook's bookkeeping for it."""

    __slots__ = (
        "index",
        "daemon_index",
        "_client",
        "pending",
        "pending_bytes",
        "flush_due",
        "allocated",
        "peak",
        "stream",
        "capture",
        "lock",
        "phase_set",
    )

    def __init__(self, index: int, daemon_index: int):
        self.index = index
        self.daemon_index = daemon_index
        self._client: Client | None = None
        # Handles whose last tensor died. Freed in batches (each free is a ring command): when
        # FREE_BATCH handles or FREE_BYTES bytes are pending (flush_due), and at every sync point.
        self.pending: list[int] = []
        self.pending_bytes = 0
        self.flush_due = False
        self.allocated = 0  # bytes held by live npu tensors of this process
        self.peak = 0
        self.stream = 0  # current stream id (client stream handle; 0 = default)
        # the npu_module.NPUGraph being captured, if any (Any: npu_module sits above this module)
        self.capture: Any = None
        self.lock = threading.Lock()
        self.phase_set = False

    @property
    def client(self):
        c = self._client
        if c is None:
            with _lock:
                if self._client is None:
                    if _client_factory is not None:
                        self._client = _client_factory(self.daemon_index)
                    else:
                        from flexnpu.client import get_client

                        self._client = get_client(self.daemon_index)
                    phase = os.environ.get("FLEXNPU_PHASE")
                    if phase and phase != "auto":
                        try:
                            self._client.set_phase(phase)
                        except Exception:  # noqa: BLE001 - a hint; never fatal
                            pass
                c = self._client
        return c

    def flush_frees(self) -> None:
        """Free handles released by tensor destructors (deferred: destructors may run anywhere)."""
        pending = self.pending
        self.flush_due = False
        self.pending_bytes = 0
        if not pending:
            return
        # Destructors on other threads may append meanwhile: take what is there, atomically.
        n = len(pending)
        batch = pending[:n]
        del pending[:n]
        self.client.free_many(batch)


FREE_BATCH = 64
FREE_BYTES = 64 << 20

_devices: list[Device] | None = None
_current = threading.local()


def devices() -> list[Device]:
    global _devices
    d = _devices
    if d is None:
        with _lock:
            if _devices is None:
                _devices = [Device(i, di) for i, di in enumerate(device_map())]
            d = _devices
    return d


def get(index: int | None) -> Device:
    devs = devices()
    if index is None:
        index = current_index()
    if index < 0 or index >= len(devs):
        raise RuntimeError(
            f"npu:{index} is not available: this process has {len(devs)} npu device(s) "
            f"(FLEXNPU_DEVICES={os.environ.get('FLEXNPU_DEVICES', '0')!r})"
        )
    return devs[index]


def current_index() -> int:
    return getattr(_current, "index", 0)


def set_current_index(index: int) -> None:
    get(index)  # validates
    _current.index = index


def _after_fork_in_child() -> None:
    # The parent's attachment (and its device memory) is not the child's: attach anew on first use.
    for d in _devices or ():
        d._client = None
        d.pending.clear()
        d.pending_bytes = 0
        d.flush_due = False
        d.capture = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def reset() -> None:
    """Forget all devices and clients (tests; after fork)."""
    global _devices
    with _lock:
        _devices = None
    _current.__dict__.clear()
