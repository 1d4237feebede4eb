"""systemd service-manager protocol (sd_notify and the watchdog), without python-systemd.

The daemon runs as a ``Type=notify`` unit: it says READY=1 once its control socket accepts
clients, pings WATCHDOG=1 while its loop makes progress, and says STOPPING=1 when it begins
to drain. Outside systemd (NOTIFY_SOCKET unset) every call is a cheap no-op returning False,
so the daemon calls these helpers unconditionally.

Protocol (sd_notify(3)): one datagram per message on the AF_UNIX SOCK_DGRAM socket named by
$NOTIFY_SOCKET; a name starting with '@' is in the abstract namespace. The payload is
newline-separated KEY=VALUE assignments.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = [
    "notify",
    "ready",
    "stopping",
    "reloading",
    "watchdog",
    "status",
    "extend_timeout",
    "watchdog_interval",
    "Watchdog",
    "Notifier",
    "booted",
]


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        # Abstract namespace: a leading NUL instead of '@', no filesystem entry.
        return b"\0" + name[1:].encode()
    return name


def notify(state: str, *, unset_environment: bool = False) -> bool:
    """Send ``state`` (e.g. "READY=1\\nSTATUS=serving") to the service manager.

    Returns True when the datagram was sent, False when NOTIFY_SOCKET is unset or the send
    failed (logged at debug: a notify failure must never take the daemon down).
    ``unset_environment`` removes NOTIFY_SOCKET afterwards so child processes cannot
    impersonate us (they would be refused under NotifyAccess=main anyway).
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if unset_environment:
        os.environ.pop("NOTIFY_SOCKET", None)
    if not name:
        return False
    if not (name.startswith("/") or name.startswith("@")):
        log.debug("NOTIFY_SOCKET=%r is neither a path nor an abstract name; ignored", name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(_address(name))
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.debug("sd_notify(%r) to %s failed: %s", state, name, e)
        return False


def _with_status(first: str, text: str | None) -> str:
    return first if text is None else f"{first}\nSTATUS={_one_line(text)}"


def _one_line(text: str) -> str:
    # A newline would start a new assignment; systemd would read the rest as a bogus key.
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Startup finished: the control socket is listening. Also reports our MAINPID."""
    return notify(_with_status(f"READY=1\nMAINPID={os.getpid()}", status))


def stopping(status: str | None = None) -> bool:
    """Shutdown began (SIGTERM received, draining clients)."""
    return notify(_with_status("STOPPING=1", status))


def reloading(status: str | None = None) -> bool:
    return notify(_with_status("RELOADING=1", status))


def watchdog() -> bool:
    """Keep-alive ping; systemd kills and restarts us if these stop for WatchdogSec."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for more time for the current start/stop phase (e.g. a long drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1e6))}")


def booted() -> bool:
    """True when systemd is the init system (sd_booted(3))."""
    return os.path.isdir("/run/systemd/system")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds that systemd expects us to honour, or None.

    From WATCHDOG_USEC; WATCHDOG_PID, when set, must name this process (otherwise the
    variables were inherited from a parent that is the real watched service). Ping at half
    this interval, as sd_watchdog_enabled(3) recommends.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    if value <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring malformed WATCHDOG_PID=%r", pid)
            return None
    return value / 1e6


class Watchdog:
    """Sends WATCHDOG=1 at half the interval, but only while the daemon makes progress.

    Two ways to drive it:
    - call :meth:`tick` from the daemon loop (each call sends when a ping is due) and bound
      the loop's idle sleep by :meth:`next_due`;
    - or :meth:`start` a helper thread and call :meth:`beat` from the loop; the thread pings
      only if the last beat is younger than the interval, so a wedged loop is still caught
      by systemd instead of being kept alive by a healthy thread.
    """

    def __init__(self, interval: float | None = None, *, send: Callable[[], bool] = watchdog) -> None:
        self.interval = watchdog_interval() if interval is None else interval
        self._send = send
        self._last_ping = 0.0  # monotonic; 0 = never, so the first tick pings at once
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0

    @property
    def enabled(self) -> bool:
        return bool(self.interval)

    @property
    def period(self) -> float | None:
        return self.interval / 2 if self.interval else None

    def next_due(self, now: float | None = None) -> float | None:
        """Seconds until the next ping is due (0 if overdue); None when disabled."""
        if not self.interval:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._last_ping + self.interval / 2 - now)

    def tick(self, now: float | None = None) -> bool:
        """Ping if half the interval passed since the last ping. Returns True if it pinged."""
        if not self.interval:
            return False
        now = time.monotonic() if now is None else now
        self._last_beat = now
        if now - self._last_ping < self.interval / 2:
            return False
        self._last_ping = now
        self.pings += 1
        self._send()
        return True

    def beat(self) -> None:
        """The loop is alive (cheap: one clock read); used with the helper thread."""
        self._last_beat = time.monotonic()

    def start(self) -> bool:
        """Start the helper thread; returns False (and starts nothing) when disabled."""
        if not self.interval or self._thread is not None:
            return False
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        assert self.interval
        period = self.interval / 2
        while not self._stop.wait(period / 2):
            now = time.monotonic()
            if now - self._last_beat > self.interval:
                # The loop stalled: stay silent so systemd's watchdog fires and restarts us.
                log.warning("daemon loop silent for %.1fs; withholding watchdog ping", now - self._last_beat)
                continue
            if now - self._last_ping >= period:
                self._last_ping = now
                self.pings += 1
                self._send()


class Notifier:
    """The object the daemon holds (``Daemon(notify=Notifier())``): lifecycle messages plus the
    watchdog, driven by :meth:`tick` from the daemon's main loop.

    The loop must call tick() at least every WatchdogSec/2 (it does every ~0.5 s), so a
    wedged loop stops the pings and systemd restarts the daemon.
    """

    def __init__(self, watchdog: Watchdog | None = None) -> None:
        self.watchdog = watchdog or Watchdog()
        if self.watchdog.enabled:
            log.info(
                "systemd watchdog: %.1fs, pinging every %.1fs", self.watchdog.interval, self.watchdog.period
            )

    def ready(self, status_text: str | None = None) -> bool:
        sent = ready(status_text)
        self.watchdog.tick()  # the first ping right away: startup may have used up the interval
        return sent

    def stopping(self, status_text: str | None = None) -> bool:
        return stopping(status_text)

    def status(self, text: str) -> bool:
        return status(text)

    def tick(self) -> bool:
        return self.watchdog.tick()
