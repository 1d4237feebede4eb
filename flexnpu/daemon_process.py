"""Start, watch and stop a `flexnpu daemon` process: the one launcher used by `flexnpu run`,
the benchmarks and the tests.

    with DaemonProcess(0, rdir, ["--backend", "cpu"]) as d:
        ...                       # d.socket answers; d.status() is its status object

child_env() is the environment a subprocess needs to import this checkout (PYTHONPATH) and
find the daemons of a runtime folder (FLEXNPU_RUNTIME_DIR).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any
from collections.abc import Sequence

ROOT = Path(__file__).resolve().parent.parent


def child_env(
    runtime_dir: Path | str | None = None, base: dict[str, str] | None = None, **extra: str
) -> dict[str, str]:
    """Environment for a subprocess that must import this checkout and find the daemons in
    `runtime_dir` (when given); `extra` entries are set last."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    if runtime_dir is not None:
        env["FLEXNPU_RUNTIME_DIR"] = str(runtime_dir)
    env.update(extra)
    return env


def answers(path: Path | str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at the socket `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _die_with_parent(then: Any = None) -> Any:
    """preexec_fn for a daemon that must not outlive the process that started it (benchmarks,
    tests): the kernel sends it SIGTERM when we die, however we die (a killed benchmark or a
    test run stopped by its timeout must not leave daemons behind)."""
    ppid = os.getpid()

    def setup() -> None:
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != ppid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        if then is not None:
            then()

    return setup


class DaemonStartError(RuntimeError):
    """The daemon exited or did not come up; the message holds the end of its log."""


class DaemonProcess:
    """One `python -m flexnpu daemon --device N --runtime-dir DIR ARGS...` process.

    The constructor starts it and returns once its control socket answers (or raises
    DaemonStartError with its log); with start_timeout=None it returns at once and the caller
    calls wait_ready() (to start several in parallel). `log`: None writes DIR/daemon<N>.log, "inherit" shares our
    stderr. `detach`: a new session, so our terminal's ^C does not reach it (always true for
    daemons that outlive us)."""

    def __init__(
        self,
        device: int,
        runtime_dir: Path | str,
        args: Sequence[str] = (),
        *,
        log: str | None = None,
        detach: bool = True,
        start_timeout: float | None = 60.0,
        env: dict[str, str] | None = None,
        preexec_fn: Any = None,
    ) -> None:
        self.device = device
        self.runtime_dir = Path(runtime_dir)
        self.socket = self.runtime_dir / f"npu{device}.sock"
        self.log = self.runtime_dir / f"daemon{device}.log"
        self._logf: IO[bytes] | None = None
        if log != "inherit":
            self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flexnpu",
                "daemon",
                "--device",
                str(device),
                "--runtime-dir",
                str(self.runtime_dir),
                *args,
            ],
            env=env if env is not None else child_env(self.runtime_dir),
            stdin=subprocess.DEVNULL,
            stdout=self._logf or sys.stderr,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=preexec_fn if detach else _die_with_parent(preexec_fn),
        )
        if start_timeout is not None:
            self.wait_ready(start_timeout)

    def wait_ready(self, timeout: float = 60.0) -> DaemonProcess:
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._serving():
            if self.proc.poll() is not None:
                raise DaemonStartError(
                    f"the daemon for device {self.device} exited with status "
                    f"{self.proc.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise DaemonStartError(
                    f"the daemon for device {self.device} did not come up within "
                    f"{timeout:g} s:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def _serving(self) -> bool:
        """Our process answers at the socket (not another daemon it is about to replace)."""
        if not self.socket.exists():
            return False
        from .control import query

        try:
            reply = query(str(self.socket), {"op": "status"}, 2.0)
        except (OSError, ValueError, ConnectionError):
            return False
        if not reply.get("ok"):
            return answers(self.socket)  # status not allowed for us: the socket answers
        return reply["daemon"].get("pid") == self.proc.pid

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        from .control import query

        return query(str(self.socket), {"op": "status"}, timeout)["daemon"]

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Stop it (SIGTERM drains queued work; SIGKILL after `timeout`); its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        return self.proc.returncode

    def release(self) -> None:
        """Let it outlive us (an embedded daemon that exits when idle): close our copy of its log."""
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
