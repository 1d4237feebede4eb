"""`flexnpu run` and signals, and temp folders nobody leaves behind (issue 9 item 12).

A terminal ^C goes to the whole foreground process group, the program included; `flexnpu run`
must not deliver it a second time, or the program's `finally` is interrupted. Real processes: a
new session on a pseudo-terminal whose ^C the kernel's tty driver turns into SIGINT, and a
SIGINT sent to the process group as a shell's job control would.
"""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import subprocess
import sys
import tempfile
import termios
import time

import pytest

from conftest import child_env

PROGRAM = r"""
import sys, time
marker = sys.argv[1]
print("READY", flush=True)
try:
    time.sleep(120)
finally:
    # cleanup that takes a while: a second SIGINT here would abort it
    for i in range(20):
        time.sleep(0.05)
    open(marker, "w").write("clean")
"""


def _start(cmd: list[str], env: dict, use_pty: bool) -> tuple[subprocess.Popen, int | None]:
    if not use_pty:
        p = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return p, None
    master, slave = pty.openpty()

    def controlling_tty() -> None:  # new session, the pty as its controlling terminal
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    p = subprocess.Popen(cmd, env=env, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty)
    os.close(slave)
    return p, master


def _read_until(p: subprocess.Popen, master: int | None, word: bytes, timeout: float = 120) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while word not in buf:
        assert time.monotonic() < deadline, f"no {word!r} in {buf[-2000:]!r}"
        try:
            chunk = os.read(master, 4096) if master is not None else p.stdout.read1(4096)
        except OSError:
            chunk = b""
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.mark.parametrize("how", ["tty", "killpg"])
def test_interrupt_reaches_program_once(daemon, tmp_path, how):
    """3 of 3 runs complete the program's cleanup after one ^C."""
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    env = child_env(daemon.runtime_dir)
    for i in range(3):
        marker = tmp_path / f"clean{i}"
        p, master = _start(
            [
                sys.executable,
                "-m",
                "flexnpu",
                "run",
                "--daemon",
                str(daemon.runtime_dir),
                "--",
                sys.executable,
                str(prog),
                str(marker),
            ],
            env,
            use_pty=how == "tty",
        )
        try:
            out = _read_until(p, master, b"READY")
            time.sleep(0.2)
            if how == "tty":
                os.write(master, b"\x03")  # the tty driver sends SIGINT to the group
            else:
                os.killpg(p.pid, signal.SIGINT)  # as a shell's job control would
            rc = p.wait(60)
            if master is not None:
                try:
                    while True:
                        chunk = os.read(master, 4096)
                        if not chunk:
                            break
                        out += chunk
                except OSError:
                    pass
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            if master is not None:
                os.close(master)
            elif p.stdout:
                p.stdout.close()
        assert marker.exists() and marker.read_text() == "clean", (
            f"run {i}: cleanup interrupted: {out[-2000:]!r}"
        )
        assert rc in (1, 130), (rc, out[-2000:])


def test_sigterm_to_run_is_forwarded(daemon, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    marker = tmp_path / "clean"
    env = child_env(daemon.runtime_dir)
    p, _ = _start(
        [
            sys.executable,
            "-m",
            "flexnpu",
            "run",
            "--daemon",
            str(daemon.runtime_dir),
            "--",
            sys.executable,
            "-c",
            "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); "
            + PROGRAM.replace("\n", "\n"),
            str(marker),
        ],
        env,
        use_pty=False,
    )
    try:
        _read_until(p, None, b"READY")
        p.send_signal(signal.SIGTERM)  # to flexnpu run alone, not the group
        assert p.wait(60) == 7
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    assert marker.read_text() == "clean"


def test_unexecutable_program_leaves_no_temp_folder(tmp_path):
    """An embedded daemon starts, the program cannot be executed: exit 126, nothing left behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    rdir = tmp_path / "run"
    rdir.mkdir(mode=0o700)
    script = tmp_path / "notexec.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    env = child_env(rdir, TMPDIR=str(tmp), FLEXNPU_BACKEND="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "flexnpu", "run", "--", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 126, r.stdout + r.stderr
    assert "cannot start" in r.stderr
    assert [p.name for p in tmp.iterdir() if p.name.startswith("flexnpu-")] == []
    deadline = time.monotonic() + 60  # the shared embedded daemon leaves after its grace
    while list(rdir.glob("npu*.sock")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(rdir.glob("npu*.sock"))


def test_bench_call_socket_peer_leaves_no_temp_folder(tmp_path, monkeypatch):
    from flexnpu.bench import call

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    row = call._socket_call(200)
    assert row["p50_us"] > 0
    assert list(tmp_path.iterdir()) == []
