"""One daemon per device however started (issue 15 item 1): `flexnpu run` programs of one user
share the embedded daemon in the user's runtime folder, which `flexnpu status` sees and which
exits a grace period after its last client left. Real processes throughout."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

from conftest import ROOT, child_env

FLEXNPU = [sys.executable, "-m", "flexnpu"]
PROGRAM = """
import os, sys, time
from flexnpu.client import Client
c = Client(0)
print("ATTACHED", c.daemon_pid, flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
c.close()
"""


def _runs(n: int, rdir, go, grace: float = 1.0) -> list[subprocess.Popen]:
    env = child_env(rdir)
    return [
        subprocess.Popen(
            FLEXNPU
            + [
                "run",
                "--backend",
                "cpu",
                "--idle-grace",
                str(grace),
                "--",
                sys.executable,
                "-c",
                PROGRAM,
                str(go),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(n)
    ]


def _attached_pids(procs: list[subprocess.Popen]) -> list[int]:
    pids = []
    for p in procs:
        line = p.stdout.readline()
        assert line.startswith("ATTACHED"), (line, p.stderr.read() if p.poll() is not None else "")
        pids.append(int(line.split()[1]))
    return pids


def _status(rdir) -> dict:
    r = subprocess.run(
        FLEXNPU + ["status", "--json"],
        env=child_env(rdir),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _daemons_serving(rdir) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "daemon" in cmd and str(rdir) in cmd:
            out.append(p)
    return out


def _finish(procs, go, timeout: float = 120) -> None:
    go.write_text("go")
    for p in procs:
        assert p.wait(timeout) == 0, p.stderr.read()
        p.stdout.close()
        p.stderr.close()


def test_two_runs_share_one_embedded_daemon_that_exits_after_both(tmp_path):
    rdir, go = tmp_path / "run", tmp_path / "go"
    procs = _runs(2, rdir, go)
    try:
        pids = _attached_pids(procs)
        assert pids[0] == pids[1]
        report = _status(rdir)
        assert len(report["daemons"]) == 1
        d = report["daemons"][0]
        assert d["embedded"] is True and d["pid"] == pids[0]
        assert len(d["clients"]) == 2
        text = subprocess.run(
            FLEXNPU + ["status"], env=child_env(rdir), capture_output=True, text=True, timeout=60, cwd=ROOT
        ).stdout
        assert "embedded" in text
        _finish(procs, go)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    daemon = psutil.Process(pids[0]) if psutil.pid_exists(pids[0]) else None
    if daemon is not None:
        daemon.wait(60)  # the grace period is 1 s; the drain at exit takes a moment
    assert not (rdir / "npu0.sock").exists()
    assert _status(rdir)["daemons"] == []


def test_start_race_of_eight_runs_ends_with_one_daemon(tmp_path):
    rdir, go = tmp_path / "run", tmp_path / "go"
    procs = _runs(8, rdir, go, grace=2.0)
    try:
        pids = _attached_pids(procs)
        assert len(set(pids)) == 1, pids
        assert [p.pid for p in _daemons_serving(rdir)] == [pids[0]]
        d = _status(rdir)["daemons"]
        assert len(d) == 1 and len(d[0]["clients"]) == 8
        _finish(procs, go)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    deadline = time.monotonic() + 60
    while _daemons_serving(rdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _daemons_serving(rdir) == []


def test_later_run_reuses_the_daemon_within_its_grace(tmp_path):
    rdir = tmp_path / "run"
    env = child_env(rdir)
    code = "from flexnpu.client import Client; print(Client(0).daemon_pid)"
    first = subprocess.run(
        FLEXNPU + ["run", "--backend", "cpu", "--idle-grace", "30", "--", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    second = subprocess.run(
        FLEXNPU + ["run", "--backend", "cpu", "--", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() == second.stdout.strip()
    for p in _daemons_serving(rdir):
        p.terminate()
        p.wait(30)


def test_system_daemon_wins_over_an_embedded_one(tmp_path, monkeypatch):
    """A non-embedded daemon started where an embedded one serves takes the socket over; the
    embedded one keeps serving its client and exits when that client leaves."""
    from flexnpu.client import Client
    from flexnpu.daemon_process import DaemonProcess

    rdir = tmp_path / "run"
    rdir.mkdir(mode=0o700)
    monkeypatch.setenv("FLEXNPU_RUNTIME_DIR", str(rdir))
    emb = DaemonProcess(0, rdir, ["--backend", "cpu", "--embedded", "--exit-when-idle", "30"], detach=False)
    old = Client(0)
    try:
        assert old.daemon_pid == emb.pid
        system = DaemonProcess(0, rdir, ["--backend", "cpu"], detach=False, env=child_env(rdir))
        try:
            new = Client(0)
            assert new.daemon_pid == system.pid
            h = old.malloc(64)  # the old client is still served
            old.memcpy_h2d(h, 0, b"\x07" * 64)
            assert old.memcpy_d2h(h, 0, 64) == b"\x07" * 64
            old.close()
            emb.proc.wait(60)  # retired: exits once its last client left
            new.close()
        finally:
            system.stop()
    finally:
        emb.stop()
