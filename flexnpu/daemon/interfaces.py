"""The daemon's internal seams, as typing Protocols.

The server owns sessions and a scheduler; sessions and the scheduler call back into the
server and into each other. Each side names here the little it uses of the others, and imports
this module instead of the concrete classes: scheduling.py and session.py never import
server.py, which keeps the daemon's import graph acyclic (server -> session, scheduling ->
interfaces). The concrete classes satisfy these structurally; nothing registers or subclasses.

- ``Backend``: what executes commands on one device (backends/torch_backend.py, backends/emu.py).
- ``Scheduler``: what the server and sessions call on the scheduler (scheduling.py).
- ``ClientView`` / ``CommandView``: the slice of a session and of a queued command the
  scheduler touches.
- ``DaemonServices``: what a session asks of the daemon that owns it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..protocol import Launch
    from ..sched.emu import EmuDevice
    from .objects import IpcExport, MemoryAccount, StreamState


class Backend(Protocol):
    """One device's executor. Buffers, streams and event tokens are opaque to the daemon: it
    only hands back what the backend gave it."""

    name: str  # shown in status and logs, e.g. "cpu", "emu:910b+cpu"
    device_type: str  # "cpu" | "cuda" | "npu" | "emu"
    device: torch.device  # where decoded launch arguments (dtypes, devices) are placed

    # Capabilities: what the daemon may do beyond the command set every backend implements.
    #: launches run aten ops directly on this backend's torch tensors, with no per-kernel
    #: accounting, so a captured straight-line graph may be compiled into one replay.
    supports_compiled_graphs: bool

    @property
    def emu(self) -> EmuDevice | None:
        """The emulated accelerator whose clock the scheduler drives; None for a real device."""

    def info(self) -> dict[str, Any]: ...

    # memory
    def alloc(self, nbytes: int) -> Any: ...
    def memset(self, buf: Any, offset: int, value: int, nbytes: int) -> None: ...
    def h2d(self, buf: Any, offset: int, src: Any) -> None: ...
    def d2h(self, buf: Any, offset: int, nbytes: int, dst: Any) -> None: ...
    def d2d(self, dst: Any, dst_off: int, src: Any, src_off: int, nbytes: int) -> None: ...

    # operators
    def launch(
        self, launch: Launch, resolve: Callable[[int], Any], allocate: Callable[[int], Any]
    ) -> Sequence[tuple[int, Any]]: ...
    def op_allowed(self, op: str) -> bool: ...

    # streams and events
    def new_stream(self, priority: int = 0) -> Any: ...
    def stream_context(self, stream: Any) -> Any: ...
    def sync_stream(self, stream: Any) -> None: ...
    def synchronize(self) -> None: ...
    def record_event(self, stream: Any) -> Any: ...
    def event_done(self, token: Any) -> bool: ...
    def event_sync(self, token: Any) -> None: ...
    def wait_event(self, stream: Any, token: Any) -> None: ...
    def elapsed_ms(self, start: Any, end: Any) -> float: ...


class PlanningBackend(Backend, Protocol):
    """A backend that can run launches from cached plans (handlers/launch.py). Optional: the
    daemon looks for a ``plans`` attribute; a backend without one runs every launch generically."""

    plans: dict[bytes, Any]  # launch structure (protocol.split_launch) -> plan, None or False
    # optional: the native front end's structures without sizes (protocol.split_launch_dims)
    sized_plans: dict[bytes, Any]
    PLAN_CACHE_MAX: int

    def make_plan(self, launch: Launch) -> Any: ...  # None: this launch has no plan
    def make_sized_plan(self, launch: Launch) -> Any: ...  # None: no plan without sizes
    # -> [(buffer, tensor over it in the declared layout)] per output (buffer None: the tensor is
    # the output's pending result, Alloc.set_result); hints: Alloc.view of each input
    def run_plan(
        self, plan: Any, bufs: Any, handles: Any, allocate: Callable[[int], Any], hints: Any
    ) -> list[tuple[Any, Any]]: ...
    # a plan of the native front end's operators (aclnn::/aclop::): no fresh outputs, and each
    # tensor's storage offset comes with the launch (protocol.split_launch_offsets); for a plan
    # from sized_plans (make_sized_plan) its sizes and strides too (dims: split_launch_dims)
    def run_table_plan(self, plan: Any, bufs: Any, handles: Any, offsets: Any, dims: Any = None) -> None: ...
    # an aten plan from sized_plans (launch_split mode 3): this launch's layouts checked against
    # the operator's shape rule -> (input layouts, declared outputs), or None (the generic path)
    def prepare_sized_plan(
        self, plan: Any, handles: Any, offsets: Any, dims: Any, out_nbytes: Any
    ) -> tuple[Any, Any] | None: ...
    # -> (run_plan's bound results, each output's layout key for Alloc.view); hints as run_plan's
    def run_sized_plan(
        self,
        plan: Any,
        bufs: Any,
        prepared: tuple[Any, Any],
        allocate: Callable[[int], Any],
        hints: Any = None,
    ) -> tuple[list[tuple[Any, Any]], list[Any]]: ...


class CommandView(Protocol):
    """A validated request waiting in its stream's queue (session.Cmd), as the scheduler sees it."""

    op: int
    sync: bool
    a: tuple[Any, ...]
    ready: Callable[[], bool] | None
    cost: Any  # the scheduler's annotation, cached across graph replays


class ClientView(Protocol):
    """One attached client (session.Session), as the scheduler sees it."""

    cid: int
    dead: bool
    streams: dict[int, StreamState]
    #: while not None, replies are collected here instead of posted (emulated kernels in flight)
    held: list[tuple[Any, ...]] | None

    def execute(self, st: StreamState, cmd: Any) -> None: ...
    def reply(self, user_data: int, status: int = 0, value: int = 0, aux: int = 0, msg: str = "") -> None: ...


class Scheduler(Protocol):
    """Picks the next commands to run from all clients' stream queues (scheduling.py)."""

    name: str
    #: commands may run at drain time when nothing is queued ahead of them (the sync fast path)
    inline: bool

    def activate(self, s: ClientView, st: StreamState) -> None:
        """The stream has queued work."""

    def run_round(self) -> int:
        """Execute some ready commands; how many ran."""

    def idle_timeout(self) -> float | None:
        """How long the loop may sleep when nothing is ready (None: until a request arrives)."""

    def busy(self, s: ClientView) -> bool:
        """True while device work of this client is queued in the scheduler or in flight."""

    def status(self) -> dict[str, Any]: ...


class SchedulerHost(Protocol):
    """What a scheduler needs of the daemon that owns it."""

    @property
    def backend(self) -> Backend: ...


class DaemonServices(Protocol):
    """What a session asks of the daemon that owns it (server.Daemon)."""

    device: int
    batch: int  # SQ records drained per session per round
    inline: bool
    compile_graphs: bool
    policy_name: str
    log: logging.Logger
    device_memory: MemoryAccount
    client_host_memory: int | None  # each client's budget for what it makes the daemon hold
    exports: dict[int, IpcExport]
    # The daemon's parts that build on these interfaces are typed loosely here, so that the
    # interfaces stay below them in the import layering (scripts/layers.py).
    metrics: Any  # metrics.DaemonMetrics
    launch_limits: Any  # limits.LaunchLimits
    collectives: Any  # collectives.Collectives
    # the loop's work sets, which sessions add themselves to
    doomed: set[Any]  # session.Session objects condemned: dropped at the next step of the loop
    backlogged: set[Any]  # replies waiting for room in their CQ
    waiting: set[Any]  # device syncs waiting for the client to go idle
    fired: list[tuple[Any, Callable[[], None]]]  # event waiters whose event completed

    @property
    def backend(self) -> Backend: ...
    @property
    def backend_info(self) -> dict[str, Any]: ...
    @property
    def scheduler(self) -> Scheduler: ...

    def export(self, s: Any, handle: int, alloc: Any, same_uid: bool = False) -> int: ...


__all__ = ["Backend", "ClientView", "CommandView", "DaemonServices", "Scheduler", "SchedulerHost"]
