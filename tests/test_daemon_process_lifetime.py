"""A daemon started for a benchmark or a test (not detached) never outlives its starter."""

import os
import subprocess
import sys
import time

from flexnpu.daemon_process import ROOT, child_env

STARTER = """
import sys, tempfile, time
from flexnpu.daemon_process import DaemonProcess
d = DaemonProcess(0, tempfile.mkdtemp(), ["--backend", "cpu"], detach=False, start_timeout=120)
print(d.proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_undetached_daemon_dies_when_its_starter_is_killed():
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=child_env()
    )
    daemon_pid = int(starter.stdout.readline())
    assert _alive(daemon_pid)
    starter.kill()  # SIGKILL: no cleanup code of the starter runs
    starter.wait(30)
    deadline = time.monotonic() + 60
    while _alive(daemon_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(daemon_pid)
    if alive:
        os.kill(daemon_pid, 9)
    assert not alive, "the daemon outlived the process that started it"
