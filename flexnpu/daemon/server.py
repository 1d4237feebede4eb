"""The per-device daemon: control socket, the poll loop over every client's rings, execution.

Threads:
  control  accepts connections, runs the attach handshake (SO_PEERCRED, version, segment
           validation) and status queries, and watches each attached client's socket: EOF means
           the client died or detached. It never touches sessions; it hands events to the loop.
  main     drains SQ rings in batches, prepares requests (session.py), lets the scheduler run
           queued commands on the backend, posts completions, and sleeps in wait_any() when
           there is nothing to do.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from .. import __version__
from .. import protocol as P
from ..paths import check_dir, socket_path
from ..ring import Doorbell, RingError, RingSet, Segment
from ..control import MessageReader, ProtocolError, peer_credentials, send_msg
from .interfaces import Backend
from .limits import LaunchLimits
from .metrics import DaemonMetrics
from .objects import IpcExport, MemoryAccount
from .collectives import LIVENESS_SLICE_S, Collectives
from .scheduling import make_scheduler
from .handlers import HOT_DRAIN, HOT_LAUNCH
from .handlers import TABLE as HANDLERS
from .session import Session

log = logging.getLogger("flexnpu.daemon")

MAILBOX_MIN = 256
HANDSHAKE_TIMEOUT_S = 5.0  # a connection must have sent its request by then
MAX_PENDING_PER_UID = 16  # connections still in their handshake, per peer uid
MAX_PENDING = 256  # ... and in all
MAX_SESSIONS_PER_UID = 256  # attached clients per uid (--max-sessions-per-uid)
CLIENT_HOST_MEMORY = 256 << 20  # daemon memory one client's objects may use (--client-host-memory)
HOT_RINGS = 120  # rings woken by futex (the rest are polled): recently active first
FD_RESERVE = 16  # descriptors kept free for the daemon's own use (status, logs)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (one socket per client); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def rss_bytes() -> int:
    """This process's resident memory (VmRSS), 0 if unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Trimmer:
    """Gives freed heap memory back to the system (glibc keeps it: an idle daemon's RSS grew
    228 -> 1629 MB over repeated client runs). malloc_trim walks the heap, so it runs only
    when the loop is idle and after a client left or the daemon's allocations shrank by
    TRIM_STEP since the last trim. FLEXNPU_MALLOC_TRIM=0 turns it off (for measurements)."""

    TRIM_STEP = 64 << 20

    def __init__(self) -> None:
        self._fn = None
        if os.environ.get("FLEXNPU_MALLOC_TRIM", "1") != "0":
            try:
                import ctypes
                import ctypes.util

                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                self._fn = libc.malloc_trim
                self._fn.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                self._fn = None  # not glibc
        self.mark = 0
        self.due = False
        self.count = 0
        self.seconds = 0.0

    def note(self, used: int) -> None:
        if used > self.mark:
            self.mark = used
        elif self.mark - used >= self.TRIM_STEP:
            self.due = True

    def maybe(self, used: int) -> None:
        self.note(used)
        if not self.due or self._fn is None:
            return
        t0 = time.perf_counter()
        self._fn(0)
        self.seconds += time.perf_counter() - t0
        self.count += 1
        self.due = False
        self.mark = used


def open_fds() -> int:
    """Descriptors open in this process (-1 if unknown; the limit if none is left to count)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError as e:
        if e.errno == errno.EMFILE:
            import resource

            return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return -1


IDLE_STARTUP_S = 10.0  # --exit-when-idle: the least wait for a new daemon's first client


def _cmdline(pid: int) -> str:
    """The client's command line as the kernel reports it, made safe for one log line."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:256]


# How long the daemon's wait for client records spins before it futex-sleeps. A sleeping daemon
# makes each client push that finds it asleep pay a FUTEX_WAKE and the daemon a wake-up; on
# virtual machines both cost ~100 us (the wake-up of a halted vCPU: `flexnpu bench call`'s
# round trip after an idle pause), several times an eager operator's whole cost. Eager clients
# submit every few tens to hundreds of microseconds, so the daemon stays awake across those
# gaps and sleeps only when its clients pause (--spin-us; 0 = sleep at once).
DAEMON_SPIN_S = 500e-6


class Daemon:
    def __init__(
        self,
        device: int,
        backend: Backend,
        *,
        runtime_dir: Path | None = None,
        policy: str = "fifo",
        memory_limit: int | None = None,
        memory_limit_max: int | None = None,
        device_memory: int | None = None,
        allow_uids: set[int] | None = None,
        socket_mode: int = 0o660,
        batch: int = P.MAX_DRAIN_BATCH,
        notify: Any = None,
        tpot_budget_s: float | None = None,
        max_sessions_per_uid: int = MAX_SESSIONS_PER_UID,
        exit_when_idle: float | None = None,
        embedded: bool = False,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        max_launch_gflop: float | None = None,
        max_launch_bytes: int | None = None,
        client_host_memory: int | None = CLIENT_HOST_MEMORY,
        spin_s: float = DAEMON_SPIN_S,
    ) -> None:
        self.device = device
        self.spin_s = max(0.0, spin_s)
        self.client_host_memory = client_host_memory
        self.fd_limit = raise_fd_limit()[0]
        self.max_sessions_per_uid = max_sessions_per_uid
        self.metrics = DaemonMetrics()
        self.metrics_port, self.metrics_addr = metrics_port, metrics_addr
        self._metrics_server: Any = None
        # Embedded daemons (started by `flexnpu run`) exit this long after the last client or
        # holder (a `flexnpu run` waiting for its program to attach) left; None: never.
        self.exit_when_idle = exit_when_idle
        self.embedded = embedded
        self._conns = 0  # attached clients + holders (control thread only)
        self._ever_connected = False
        self._idle_since = time.monotonic()
        self._sock_ino: int | None = None
        self.backend = backend
        self.backend_info = backend.info()
        self.log = log
        self.batch = batch
        self.policy_name = policy
        self.scheduler = make_scheduler(policy, self, tpot_budget_s)
        self.inline = getattr(self.scheduler, "inline", False)
        # Straight-line compiled graph replay needs a backend that executes aten ops itself.
        self.compile_graphs = (
            backend.supports_compiled_graphs and os.environ.get("FLEXNPU_COMPILE_GRAPHS", "1") != "0"
        )
        self.memory_limit = memory_limit
        # What all clients together may hold: the device's memory, or for the cpu backend half of
        # the host's RAM (a client must not make the host kill the daemon that serves everyone).
        if device_memory is None:
            total = int(self.backend_info.get("total_memory") or 0) or None
            device_memory = total // 2 if (total and self.backend_info.get("device_type") == "cpu") else total
        self.device_memory = MemoryAccount(device_memory)
        # per-launch work ceiling (None = default, 0 = none): one operator must not monopolise
        self.launch_limits = LaunchLimits.make(max_launch_gflop, max_launch_bytes, device_memory)
        self.memory_limit_max = memory_limit_max
        self.allow_uids = allow_uids  # None = anyone who can open the socket
        self.socket_mode = socket_mode
        self.path = socket_path(device, runtime_dir)
        self.sessions: dict[int, Session] = {}
        self.doomed: set[Session] = set()  # condemned: drop at the next step of the loop
        self.backlogged: set[Session] = set()  # replies waiting for room in their CQ
        self.waiting: set[Session] = set()  # device syncs waiting for the client to go idle
        self.fired: list[tuple[Session, Callable[[], None]]] = []  # event waiters whose event completed
        self._ringset: RingSet | None = None  # every client's SQ, rebuilt when clients change
        self._order: list[Session] = []  # sessions in _ringset order (recently active first)
        self._uid_sessions: dict[int, int] = {}  # control thread: attached sessions per uid
        self._cid_uid: dict[int, int] = {}  # control thread: cid -> uid of attached sessions
        self._fd_reserve: int | None = None
        self.trimmer = _Trimmer()
        self.exports: dict[int, IpcExport] = {}
        self.collectives = Collectives(self)
        self.started_at = time.time()
        # the main loop's time in its wait for requests (spinning included); the rest of its time
        # since loop_started is work: `flexnpu status --json` reports both (loop)
        self.loop_started = time.perf_counter()
        self.loop_wait_s = 0.0
        self.notify = notify
        # ("attach", Session) | ("dead", client id), from the control thread to the loop
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._doorbell = Doorbell()
        self._stop = threading.Event()
        self._next_cid = 1
        self._listener: socket.socket | None = None
        self._ctl_thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()

    # ================================================================== lifecycle
    def bind(self) -> None:
        # Never bind into a folder another user controls (they could swap our socket).
        check_dir(self.path.parent, create=True)
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink()  # stale socket of a dead daemon
            else:
                probe.close()
                if not self._displace_embedded():
                    raise RuntimeError(f"a daemon for device {self.device} is already running at {self.path}")
            finally:
                probe.close()
        # Bind under a private name and rename into place once listening: a client (or a
        # launcher waiting for the path to appear) never finds a socket that refuses connections.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        s.bind(str(tmp))
        os.chmod(tmp, self.socket_mode)
        s.listen(128)
        os.rename(tmp, self.path)
        self._sock_ino = os.stat(self.path).st_ino
        s.setblocking(False)
        self._listener = s
        if self.metrics_port is not None and self._metrics_server is None:
            from .metrics import serve

            try:
                self._metrics_server = serve(self, self.metrics_port, self.metrics_addr)
            except OSError as e:
                self._unlink_socket()
                s.close()
                raise RuntimeError(
                    f"cannot serve metrics on {self.metrics_addr}:{self.metrics_port}: {e}"
                ) from None

    def _displace_embedded(self) -> bool:
        """A system daemon always wins over an embedded one (`flexnpu run`'s) at its path: ask
        that one to retire (give up the socket now, exit when its clients have left)."""
        if self.embedded:
            return False
        from ..control import query

        try:
            other = query(str(self.path), {"op": "status"})["daemon"]
            if not other.get("embedded"):
                return False
            if not query(str(self.path), {"op": "retire"}).get("ok"):
                return False
        except (OSError, ValueError, KeyError, ConnectionError):
            return False
        deadline = time.monotonic() + 10
        while self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.warning(
            "the embedded daemon pid %s for device %d retired in our favour; it serves its %d "
            "clients until they leave",
            other.get("pid"),
            self.device,
            len(other.get("clients", [])),
        )
        return not self.path.exists()

    def request_stop(self, *_: Any) -> None:
        self._stop.set()
        self._doorbell.ring()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        self._idle_since = time.monotonic()
        # What exists now (torch, the backend, these tables: ~220k objects) lives as long as the
        # daemon. Out of the collector's reach, a full collection no longer rescans it: 45-86 ms
        # each before (measured), a stall whenever one lands in mid-launch; 22 ms after.
        gc.collect()
        gc.freeze()
        self.loop_started = time.perf_counter()
        self.loop_wait_s = 0.0
        self._ctl_thread = threading.Thread(target=self._control_loop, name="flexnpu-control", daemon=True)
        self._ctl_thread.start()
        log.info(
            "serving device %d with backend %s (%s) at %s, policy %s",
            self.device,
            self.backend.name,
            self.backend_info.get("name"),
            self.path,
            self.policy_name,
        )
        if self.notify:
            self.notify.ready(f"serving device {self.device} ({self.backend.name})")
        try:
            self._main_loop()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.notify:
            self.notify.stopping()
        deadline = time.monotonic() + 10.0
        # Drain what clients already queued, so no accepted work is lost.
        while time.monotonic() < deadline and self._run_round():
            self._run_waiters()
            self._flush_backlog()
        for s in list(self.sessions.values()):
            try:
                s.seg.close_notify()
                send_msg(s.conn, {"event": "shutdown", "reason": "daemon stopping"})
            except Exception:  # noqa: BLE001
                pass
            self._drop(s, "daemon stopping")
        self.collectives.close()
        if self._listener is not None:
            self._unlink_socket()
            self._listener.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("stopped")

    def _unlink_socket(self) -> None:
        """Remove our socket file, unless it is already another daemon's (one started after an
        idle exit unlinked ours)."""
        try:
            if os.stat(self.path).st_ino == self._sock_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _check_idle(self) -> None:
        """Control thread: exit when idle for exit_when_idle seconds. The socket is unlinked
        first, in the thread that accepts, so no client can attach to a daemon that is leaving:
        a late `flexnpu run` finds no socket and starts a new daemon."""
        if self.exit_when_idle is None or self._conns or self._stop.is_set():
            return
        # Until the first client or holder came, wait at least IDLE_STARTUP_S: the `flexnpu run`
        # that started us connects only once we answer.
        grace = self.exit_when_idle if self._ever_connected else max(self.exit_when_idle, IDLE_STARTUP_S)
        if time.monotonic() - self._idle_since >= grace:
            log.info("no clients for %.1f s; exiting (--exit-when-idle)", self.exit_when_idle)
            self._unlink_socket()
            self._sock_ino = None
            if self._listener is not None:
                self._listener.close()  # refuse the backlog now, not after the drain
            self._stop.set()
            self._doorbell.ring()

    def _conn_added(self) -> None:
        self._conns += 1
        self._ever_connected = True

    def _conn_gone(self) -> None:
        self._conns -= 1
        if self._conns == 0:
            self._idle_since = time.monotonic()

    # ================================================================== main loop
    def _main_loop(self) -> None:
        """One iteration: drain requests, run what the scheduler picks, drop condemned clients,
        complete waiters, flush replies. Every step touches only clients with something to do
        there, and every per-client failure condemns that client only (Session.condemn): no
        step raises for a client's fault, so nothing here can stop the loop or fail others."""
        last_rate = time.monotonic()
        while not self._stop.is_set():
            self._service_events()
            got = self._drain_ready()
            ran = self._run_round()
            self._drop_doomed()
            self._run_waiters()
            self._flush_backlog()
            now = time.monotonic()
            if now - last_rate >= 0.5:
                last_rate = now
                for s in self.sessions.values():
                    s.update_rate(now)
                if self.notify:
                    self.notify.tick()
            if got or ran or self.fired:
                continue
            self.trimmer.maybe(self.device_memory.used)  # idle now: a good time to give memory back
            timeout = self.scheduler.idle_timeout()
            timeout = 0.5 if timeout is None else timeout
            if self.collectives.watching:  # a collective waits in the loop: check its peers' liveness
                timeout = min(timeout, LIVENESS_SLICE_S)
            t = time.perf_counter()
            self._rings().wait(timeout, self._doorbell)
            self.loop_wait_s += time.perf_counter() - t

    def _rings(self) -> RingSet:
        if self._ringset is None:
            self._order = sorted(self.sessions.values(), key=lambda s: -s.last_active)
            self._ringset = RingSet([s.seg.sq for s in self._order])
        return self._ringset

    def _drain_ready(self) -> int:
        """Drain the clients whose SQ has records: one C pass finds them, so idle clients cost
        the loop nothing per iteration but a few loads of shared memory."""
        rs = self._rings()
        order = self._order
        got = 0
        cold = False
        now = time.monotonic()
        ready = rs.ready()
        if len(ready) > 1:
            ready.sort(key=lambda i: order[i].cid)  # in attach order, as clients always were
        for i in ready:
            s = order[i]
            if s.kill is not None or s.dead:
                continue
            n = self._drain(s)
            if n:
                got += n
                s.last_active = now
                cold = cold or i >= HOT_RINGS
        if cold:
            self._ringset = None  # a client beyond the futex-woken rings became busy: reorder
        return got

    def _drain(self, s: Session) -> int:
        try:
            return s.drain()
        except RingError as e:
            s.condemn(f"corrupt ring: {e}")
        except Exception as e:  # noqa: BLE001 - a daemon bug must cost one client, not all
            log.error("client pid %d: internal error while serving it; disconnecting it", s.pid, exc_info=e)
            s.condemn(f"internal error: {e}")
        return 0

    def _run_round(self) -> int:
        try:
            return self.scheduler.run_round()
        except Exception as e:  # noqa: BLE001
            # Client work cannot get here (Session.execute never raises): this is a scheduler
            # bug. Keep serving; nobody's queued work is dropped for it.
            log.error("scheduler error (a daemon bug); continuing", exc_info=e)
            return 0

    def _drop_doomed(self) -> None:
        while self.doomed:
            s = self.doomed.pop()
            if s.cid in self.sessions:
                log.warning("client pid %d: disconnecting it: %s", s.pid, s.kill)
                self._drop(s, s.kill or "condemned")

    def _flush_backlog(self) -> None:
        for s in list(self.backlogged):
            s.flush_replies()
        self._drop_doomed()

    def _run_waiters(self) -> None:
        """Completions that wait on a condition: fired event waiters (queued by the event's
        record when it ran: no scan), and device syncs of the clients that have one."""
        while self.fired:
            batch, self.fired = self.fired, []
            for s, done in batch:
                s.run_waiter(done)
        for s in list(self.waiting):
            s.poll_waiters()
        self._drop_doomed()

    def _service_events(self) -> None:
        if self._events.empty():
            return
        while True:
            try:
                kind, obj = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "attach":
                self.sessions[obj.cid] = obj
                self._ringset = None
                self.metrics.attaches += 1
                log.info("client %d attached: pid %d uid %d %s", obj.cid, obj.pid, obj.uid, obj.cmdline)
            elif kind == "dead":
                s = self.sessions.get(obj)
                if s is not None:
                    self._drop(s, "client exited")

    def _drop(self, s: Session, why: str) -> None:
        self._ringset = None  # before the segment is unmapped: the set points into it
        self.sessions.pop(s.cid, None)
        self.doomed.discard(s)
        self.backlogged.discard(s)
        self.waiting.discard(s)
        for key in [k for k, e in self.exports.items() if e.owner_client == s.cid]:
            del self.exports[key]  # importers keep their references; new imports are refused
        used = s.mem.used
        self.metrics.detached(s, why)
        s.close()
        try:
            # The control thread owns the socket's registration; shutting it down makes that
            # thread see EOF and close it.
            s.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.trimmer.due = True
        log.info("client %d (pid %d) detached: %s; reclaimed %d bytes", s.cid, s.pid, why, used)

    # ================================================================== services for sessions
    def export(self, s: Session, handle: int, alloc: Any, same_uid: bool = False) -> int:
        import secrets

        for key, e in self.exports.items():
            if e.alloc is alloc and e.owner_client == s.cid:
                if same_uid:
                    e.same_uid = s.uid
                return key
        key = secrets.randbits(63) | 1  # unguessable: a key alone is not a capability without the pid list
        self.exports[key] = IpcExport(alloc, s.cid, same_uid=s.uid if same_uid else None)
        return key

    def status(self, viewer: int | None = None) -> dict[str, Any]:
        """The daemon's state. For `viewer` (a uid) other than root and the daemon's own uid,
        other users' command lines are redacted: they may hold secrets."""
        admin = viewer is None or viewer in (0, os.geteuid())
        for _ in range(5):  # sessions change under us (main thread); retry a torn snapshot
            try:
                clients = [s.status() for s in list(self.sessions.values())]
                if not admin:
                    for c in clients:
                        if c["uid"] != viewer:
                            c["cmdline"] = "(another user's)"
                break
            except RuntimeError:
                continue
        else:
            clients = []
        return {
            "device": self.device,
            "backend": self.backend.name,
            "device_type": self.backend_info.get("device_type"),
            "name": self.backend_info.get("name"),
            "scrub": self.backend_info.get("scrub"),
            "pid": os.getpid(),
            "uid": os.geteuid(),
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "policy": self.policy_name,
            "socket": str(self.path),
            "version": __version__,
            "layout_version": P.LAYOUT_VERSION,
            "memory_limit_default": self.memory_limit,
            "device_memory_limit": self.device_memory.limit,
            "fd_limit": self.fd_limit,
            "open_fds": open_fds(),
            "rss_bytes": rss_bytes(),
            "malloc_trims": self.trimmer.count,
            "malloc_trim_s": round(self.trimmer.seconds, 4),
            "max_sessions_per_uid": self.max_sessions_per_uid,
            "device_memory_used": self.device_memory.used,
            # every request it has run: its clients' now, and those of clients gone
            "ops_total": self.metrics.retired_requests + sum(c["ops_total"] for c in clients),
            "clients": clients,
            "scheduler": self._scheduler_status(),
            "embedded": self.embedded,
            "exit_when_idle_s": self.exit_when_idle,
            "holders": max(0, self._conns - len(clients)),
            "metrics_port": self._metrics_server.server_port if self._metrics_server is not None else None,
            "communicators": self.collectives.status(),
            "plans": self._plan_status(),
            "loop": self._loop_status(),
        }

    def _loop_status(self) -> dict[str, float]:
        """How busy the daemon's one thread is: seconds of work and of waiting since it started
        serving. A client whose work takes as long as the daemon's busy time is waiting on the
        daemon, not on its own front end."""
        total = time.perf_counter() - self.loop_started
        wait = min(self.loop_wait_s, total)
        return {"busy_s": round(total - wait, 6), "wait_s": round(wait, 6)}

    def _plan_status(self) -> dict[str, Any] | None:
        """How many launch structures have plans, and how many of those the compiled executor
        runs (daemon/compiled.py), with the launches it ran; None: a backend without plans."""
        plans = getattr(self.backend, "plans", None)
        if plans is None:
            return None
        for _ in range(5):  # the main thread adds plans; retry a torn snapshot
            try:
                ps = [p for p in list(plans.values()) if p]
                sized = [p for p in list(getattr(self.backend, "sized_plans", {}).values()) if p]
                break
            except RuntimeError:
                continue
        else:
            return None
        cx = [c for p in ps for c in (getattr(p, "cx", None),) if c]
        scx = [c for p in sized for c in (getattr(p, "cx", None),) if c]
        python_ops = sorted({str(p.op) for p in ps if not getattr(p, "cx", None)})
        return {
            "plans": len(ps),
            "sized_plans": len(sized),
            "compiled": len(cx),
            "compiled_launches": sum(c.runs for c in cx),
            # plans without sizes whose launches the compiled executor runs (AtenExec.run_sized)
            "compiled_sized": len(scx),
            "compiled_sized_launches": sum(c.runs for c in scx),
            "compiled_executor": _compiled_executor_loaded(),
            # the operators of plans that run in Python (the first 32): where compiling pays next
            "python_ops": python_ops[:32],
            # how planned launches are dispatched: "c" (hotpath.c), "python" (launch.run_hot), or
            # None (a policy that reorders commands queues every launch)
            "hot_path": ("c" if HOT_DRAIN is not None else "python") if self.inline else None,
        }

    def _scheduler_status(self) -> dict[str, Any]:
        for _ in range(5):  # the main thread mutates the queues; retry a torn snapshot
            try:
                return self.scheduler.status()
            except RuntimeError:
                continue
        return {"policy": self.policy_name}

    # ================================================================== control thread
    def _control_loop(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._listener is not None
        sel.register(self._listener, selectors.EVENT_READ, ("listen", None))
        sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._handshakes: dict[socket.socket, tuple[int, float, MessageReader]] = {}
        try:
            self._fd_reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd_reserve = None
        while not self._stop.is_set():
            self._check_idle()
            if self._stop.is_set():
                return
            try:
                events = sel.select(timeout=0.25 if self.exit_when_idle is not None else 1.0)
            except OSError:
                continue
            now = time.monotonic()
            for conn, (uid, t0, reader) in list(self._handshakes.items()):
                if now - t0 > HANDSHAKE_TIMEOUT_S:
                    log.info(
                        "closing a connection from uid %d that sent no request in %.0f s",
                        uid,
                        HANDSHAKE_TIMEOUT_S,
                    )
                    self._close_conn(sel, conn, reader)
            for key, _ in events:
                kind, state = key.data
                if kind == "wake":
                    return
                sock = cast(socket.socket, key.fileobj)  # every other registration is a socket
                try:
                    if kind == "listen":
                        self._accept(sel)
                    elif kind == "conn":
                        self._on_conn(sel, sock, state)
                    elif kind == "client":
                        self._on_client(sel, sock, state)
                    elif kind == "hold":
                        self._on_hold(sel, sock)
                except Exception as e:  # noqa: BLE001 - one connection's trouble must not end attaching
                    log.error("control connection failed: %s", e, exc_info=e)
                    if kind == "conn":
                        self._close_conn(sel, sock, state)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._refuse_no_fds()
                    return
                log.warning("accept failed: %s", e)
                return
            try:
                _pid, uid, _gid = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            busy = sum(1 for u, _, _ in self._handshakes.values() if u == uid)
            if busy >= MAX_PENDING_PER_UID or len(self._handshakes) >= MAX_PENDING:
                # Bounded per uid, so one user's idle connections cannot use up the daemon's fds.
                self._reply_blocking(
                    conn, {"ok": False, "code": "EBUSY", "error": "too many connections in their handshake"}
                )
                conn.close()
                continue
            conn.setblocking(False)
            reader = MessageReader(conn)
            self._handshakes[conn] = (uid, time.monotonic(), reader)
            sel.register(conn, selectors.EVENT_READ, ("conn", reader))

    def _refuse_no_fds(self) -> None:
        """Out of descriptors: accept with the one kept in reserve, say why, close. (Else the
        listener stays readable and the client waits for a handshake that never comes.)"""
        if self._fd_reserve is None:
            time.sleep(0.01)
            return
        os.close(self._fd_reserve)
        self._fd_reserve = None
        try:
            conn, _ = self._listener.accept()  # type: ignore[union-attr]
        except OSError:
            conn = None
        if conn is not None:
            log.warning(
                "refused a connection: the daemon is out of file descriptors (limit %d)", self.fd_limit
            )
            self._reply_blocking(conn, {"ok": False, "code": "EMFILE", "error": self._no_fds_text()})
            conn.close()
        try:
            self._fd_reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd_reserve = None

    def _no_fds_text(self) -> str:
        return (
            f"the daemon is out of file descriptors ({open_fds()} open, limit {self.fd_limit}); "
            f"raise its RLIMIT_NOFILE (LimitNOFILE= in the unit) or lower --max-sessions-per-uid"
        )

    def _close_conn(self, sel: selectors.BaseSelector, conn: socket.socket, reader: MessageReader) -> None:
        self._handshakes.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        reader.close()
        conn.close()

    def _reply_blocking(self, conn: socket.socket, obj: dict[str, Any]) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            send_msg(conn, obj)
        except ProtocolError:
            # too large (e.g. a status of very many clients): say so instead of dying
            try:
                send_msg(conn, {"ok": False, "error": "reply too large", "code": "E2BIG"})
            except (OSError, ProtocolError):
                pass
        except OSError:
            pass

    def _on_conn(self, sel: selectors.BaseSelector, conn: socket.socket, reader: MessageReader) -> None:
        try:
            msgs = reader.feed()
        except ProtocolError as e:
            text, code = str(e), "EINVAL"
            if "file descriptors" in text and open_fds() >= self.fd_limit - FD_RESERVE:
                # the kernel dropped the descriptors because we have no room: say so
                text, code = self._no_fds_text(), "EMFILE"
            self._reply_blocking(conn, {"ok": False, "error": text, "code": code})
            self._close_conn(sel, conn, reader)
            return
        if msgs is None:
            self._close_conn(sel, conn, reader)
            return
        for msg, fds in msgs:
            op = msg.get("op")
            if op == "status":
                for fd in fds:
                    os.close(fd)
                uid = self._handshakes.get(conn, (-1,))[0]
                if self.allow_uids is not None and uid not in self.allow_uids:
                    # the same list as attach: who may not use the device may not watch it
                    self._reply_blocking(
                        conn,
                        {
                            "ok": False,
                            "code": "EPERM",
                            "error": f"uid {uid} may not use device {self.device}",
                        },
                    )
                else:
                    self._reply_blocking(conn, {"ok": True, "daemon": self.status(uid)})
                self._close_conn(sel, conn, reader)
                return
            if op == "retire" and self.embedded:
                for fd in fds:
                    os.close(fd)
                _pid, uid, _gid = peer_credentials(conn)
                if uid not in (0, os.geteuid()):
                    self._reply_blocking(
                        conn,
                        {
                            "ok": False,
                            "error": "only root or the daemon's user may retire it",
                            "code": "EPERM",
                        },
                    )
                    self._close_conn(sel, conn, reader)
                    return
                log.info(
                    "retiring in favour of a system daemon: no new clients; exiting when the "
                    "current ones have left"
                )
                self._unlink_socket()
                self._sock_ino = None
                assert self._listener is not None  # set while the control thread runs
                sel.unregister(self._listener)
                self._listener.close()
                self.exit_when_idle = 0.0
                self._reply_blocking(conn, {"ok": True})
                self._close_conn(sel, conn, reader)
                return
            if op == "hold":
                for fd in fds:
                    os.close(fd)
                self._hold(sel, conn, reader)
                return
            if op == "attach":
                self._handshakes.pop(conn, None)
                sel.unregister(conn)
                self._attach(sel, conn, msg, fds)
                return
            for fd in fds:
                os.close(fd)
            self._reply_blocking(conn, {"ok": False, "error": f"unknown request {op!r}", "code": "EINVAL"})
            self._close_conn(sel, conn, reader)
            return

    def _hold(self, sel: selectors.BaseSelector, conn: socket.socket, reader: MessageReader) -> None:
        """A `flexnpu run` keeps this connection open while its program lives, so an idle-exit
        daemon does not leave between the run's start and its program's attach."""
        _pid, uid, _gid = peer_credentials(conn)
        if self.allow_uids is not None and uid not in self.allow_uids:
            self._reply_blocking(
                conn, {"ok": False, "error": f"uid {uid} may not use device {self.device}", "code": "EPERM"}
            )
            return self._close_conn(sel, conn, reader)
        self._handshakes.pop(conn, None)
        sel.unregister(conn)
        reader.close()
        self._reply_blocking(
            conn,
            {
                "ok": True,
                "daemon_pid": os.getpid(),
                "backend": self.backend.name,
                "policy": self.policy_name,
                "embedded": self.embedded,
            },
        )
        conn.setblocking(False)
        self._conn_added()
        sel.register(conn, selectors.EVENT_READ, ("hold", None))

    def _on_hold(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        try:
            if conn.recv(4096):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        sel.unregister(conn)
        conn.close()
        self._conn_gone()

    def _attach(
        self, sel: selectors.BaseSelector, conn: socket.socket, msg: dict[str, Any], fds: list[int]
    ) -> None:
        def refuse(text: str, code: str) -> None:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            log.warning("refused attach: %s", text)
            self.metrics.refused[code] = self.metrics.refused.get(code, 0) + 1
            self._reply_blocking(conn, {"ok": False, "error": text, "code": code})
            conn.close()

        pid, uid, _gid = peer_credentials(conn)
        if self.allow_uids is not None and uid not in self.allow_uids:
            return refuse(f"uid {uid} may not use device {self.device}", "EPERM")
        if msg.get("layout_version") != P.LAYOUT_VERSION:
            return refuse(
                f"protocol version {msg.get('layout_version')!r} does not match the daemon's "
                f"{P.LAYOUT_VERSION}; upgrade the client or the daemon",
                "EVERSION",
            )
        if self._uid_sessions.get(uid, 0) >= self.max_sessions_per_uid:
            return refuse(
                f"uid {uid} already has {self._uid_sessions[uid]} clients attached to device "
                f"{self.device} (the daemon's --max-sessions-per-uid); close some first",
                "EUSERS",
            )
        if open_fds() >= self.fd_limit - FD_RESERVE:
            # refused while a few are left, so the daemon can still accept and explain
            return refuse(self._no_fds_text(), "EMFILE")
        if len(fds) != 1:
            return refuse("attach must carry exactly one segment file descriptor", "EINVAL")
        if self._stop.is_set():
            return refuse("daemon is stopping", "ESHUTDOWN")
        fd = fds.pop()
        try:
            seg = Segment.attach(fd)
            seg.set_spin(self.spin_s)
        except (RingError, OSError, ValueError) as e:
            if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                return refuse(self._no_fds_text(), "EMFILE")
            return refuse(f"bad segment: {e}", "EINVAL")
        finally:
            os.close(fd)
        mbox = msg.get("mailbox")
        if (
            not isinstance(mbox, list)
            or len(mbox) != 2
            or not all(type(x) is int for x in mbox)
            or mbox[1] < MAILBOX_MIN
        ):
            seg.close()
            return refuse("attach needs a mailbox [offset, length] in the arena", "EINVAL")
        try:
            seg.arena_view(mbox[0], mbox[1])
        except Exception:  # noqa: BLE001
            seg.close()
            return refuse("mailbox lies outside the arena", "EINVAL")
        limit = self.memory_limit
        req = msg.get("memory_limit")
        if type(req) is int and req > 0:
            cap = self.memory_limit_max if self.memory_limit_max is not None else limit
            limit = req if cap is None else min(req, cap)
        phase = msg["phase"] if msg.get("phase") in P.PHASES else "auto"
        cid = self._next_cid
        self._next_cid += 1
        try:
            sess = Session(
                self,
                cid,
                seg,
                conn,
                pid,
                uid,
                (mbox[0], mbox[1]),
                limit,
                phase,
                _cmdline(pid),
                HANDLERS,
                HOT_LAUNCH,
                HOT_DRAIN,
            )
        except Exception as e:  # noqa: BLE001
            seg.close()
            return refuse(f"cannot create session: {e}", "EINTERNAL")
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            send_msg(
                conn,
                {
                    "ok": True,
                    "client_id": cid,
                    "device": self.device,
                    "info": self.backend_info,
                    "memory_limit": limit,
                    "policy": self.policy_name,
                    "daemon_pid": os.getpid(),
                },
            )
            conn.setblocking(False)
        except OSError:
            sess.close()
            conn.close()
            return
        sel.register(conn, selectors.EVENT_READ, ("client", cid))
        self._uid_sessions[uid] = self._uid_sessions.get(uid, 0) + 1
        self._cid_uid[cid] = uid
        self._conn_added()
        self._events.put(("attach", sess))
        self._doorbell.ring()

    def _on_client(self, sel: selectors.BaseSelector, conn: socket.socket, cid: int) -> None:
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # attached clients have nothing more to say on the control socket
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()
        uid = self._cid_uid.pop(cid, None)
        if uid is not None:
            n = self._uid_sessions.get(uid, 1) - 1
            if n > 0:
                self._uid_sessions[uid] = n
            else:
                self._uid_sessions.pop(uid, None)
        self._conn_gone()
        self._events.put(("dead", cid))
        self._doorbell.ring()


def install_signal_handlers(d: Daemon) -> None:
    signal.signal(signal.SIGTERM, d.request_stop)
    signal.signal(signal.SIGINT, d.request_stop)


def _compiled_executor_loaded() -> bool:
    # (imported here: only backends with plans have torch, which the executor needs)
    from . import compiled

    return compiled.module() is not None
