"""Runtime-folder squatting (issue 9 item 4): folders and daemons another user controls are refused.

Real processes: a daemon asked to bind into a hostile folder, a client attaching to a fake
daemon run under another uid, and a process whose effective uid is an unprivileged user looking
for its default folder in a shared temp directory someone else pre-created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import child_env

NOBODY = 65534
ATTACKER = 1000
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")


@pytest.fixture
def shared_tmp():
    """A world-writable sticky folder like /tmp, private to this test."""
    d = Path(tempfile.mkdtemp(prefix="flexnpu-trust-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_nobody(code: str, tmpdir: Path) -> subprocess.CompletedProcess:
    """Run `code` with effective uid nobody (imports done first: the interpreter lives where
    nobody cannot read) and no runtime folder configured, so the default one is used."""
    env = child_env()
    for k in ("FLEXNPU_RUNTIME_DIR", "XDG_RUNTIME_DIR", "FLEXNPU_DAEMON_UID"):
        env.pop(k, None)
    env["TMPDIR"] = str(tmpdir)
    prog = (
        textwrap.dedent(
            """
        import os, sys
        from flexnpu import paths
        os.setegid(%d); os.seteuid(%d)
        try:
    """
            % (NOBODY, NOBODY)
        )
        + textwrap.indent(textwrap.dedent(code), "    ")
        + textwrap.dedent("""
        except paths.UnsafeRuntimeDir as e:
            print("REFUSED", e); sys.exit(3)
    """)
    )
    return subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=60)


CHECK_DEFAULT = """
d = paths.runtime_dir()
print("DIR", d)
paths.check_dir(d, create=True)
print("OK", oct(os.stat(d).st_mode & 0o777), os.stat(d).st_uid)
"""


@root_only
def test_default_folder_created_private(shared_tmp):
    r = _as_nobody(CHECK_DEFAULT, shared_tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"DIR {shared_tmp}/flexnpu-{NOBODY}" in r.stdout
    assert f"OK 0o700 {NOBODY}" in r.stdout


@root_only
@pytest.mark.parametrize("case", ["other_owner", "world_writable", "symlink", "loose_mode"])
def test_squatted_default_folder_refused(shared_tmp, case):
    target = shared_tmp / f"flexnpu-{NOBODY}"
    if case == "other_owner":
        target.mkdir(mode=0o777)
        os.chmod(target, 0o777)
        os.chown(target, ATTACKER, ATTACKER)
        expect = f"belongs to uid {ATTACKER}"
    elif case == "world_writable":
        target.mkdir()
        os.chmod(target, 0o777)
        os.chown(target, NOBODY, NOBODY)
        expect = "writable by others"
    elif case == "symlink":
        real = shared_tmp / "elsewhere"
        real.mkdir(mode=0o700)
        os.chown(real, NOBODY, NOBODY)
        target.symlink_to(real)
        expect = "symbolic link"
    else:
        target.mkdir()
        os.chmod(target, 0o755)
        os.chown(target, NOBODY, NOBODY)
        expect = "mode 0700"
    r = _as_nobody(CHECK_DEFAULT, shared_tmp)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "REFUSED" in r.stdout and expect in r.stdout, r.stdout


@root_only
def test_daemon_refuses_to_bind_in_hostile_folder(shared_tmp):
    hostile = shared_tmp / "run"
    hostile.mkdir()
    os.chmod(hostile, 0o777)
    os.chown(hostile, ATTACKER, ATTACKER)
    r = subprocess.run(
        [sys.executable, "-m", "flexnpu", "daemon", "--backend", "cpu", "--runtime-dir", str(hostile)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"belongs to uid {ATTACKER}" in r.stderr
    assert not list(hostile.iterdir())


FAKE_DAEMON = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
os.setegid(%d); os.seteuid(%d)      # SO_PEERCRED reports the credentials at listen()
s.listen(1)
print("LISTENING", flush=True)
c, _ = s.accept()
c.settimeout(3)
got = 0
try:
    while True:
        b = c.recv(65536)
        if not b:
            break
        got += len(b)
except OSError:
    pass
print("GOT", got, flush=True)
""" % (NOBODY, NOBODY)


@root_only
@pytest.mark.parametrize("trusted", [False, True])
def test_client_checks_daemon_credentials(tmp_path, monkeypatch, trusted):
    from flexnpu.client import Client
    from flexnpu.errors import AttachError

    rdir = tmp_path / "run"
    rdir.mkdir(mode=0o755)
    sock = rdir / "npu0.sock"
    fake = subprocess.Popen(
        [sys.executable, "-c", FAKE_DAEMON, str(sock)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert fake.stdout.readline().strip() == "LISTENING"
        monkeypatch.setenv("FLEXNPU_RUNTIME_DIR", str(rdir))
        if trusted:
            monkeypatch.setenv("FLEXNPU_DAEMON_UID", str(NOBODY))
        else:
            monkeypatch.delenv("FLEXNPU_DAEMON_UID", raising=False)
        with pytest.raises(AttachError) as ei:
            Client(0, connect_timeout=2.0)
        out, _ = fake.communicate(timeout=30)
    finally:
        fake.kill()
        fake.wait()
    got = int(out.split("GOT")[1])
    if trusted:
        assert got > 0  # we named that uid, so the attach request went out
    else:
        assert got == 0, "the client sent bytes to a daemon run by another user"
        assert f"runs as uid {NOBODY}" in str(ei.value) and "FLEXNPU_DAEMON_UID" in str(ei.value)


def test_daemon_in_own_folder_still_attaches(client):
    assert client.client_id >= 1
