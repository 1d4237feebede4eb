"""`flexnpu status` against real Unix-socket peers speaking the control-socket framing (flexnpu/control.py)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flexnpu import cmd_status

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("eof")
        buf += chunk
    return buf


class PeerDaemon:
    """A socket peer answering {"op": "status"} the way the daemon does (or misbehaving)."""

    def __init__(self, path: Path, reply: dict | bytes | None, delay: float = 0.0):
        self.path, self.reply, self.delay = path, reply, delay
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    (n,) = struct.unpack("<I", _recv_exact(conn, 4))
                    self.requests.append(json.loads(_recv_exact(conn, n)))
                    if self.reply is None:  # accepts, never answers
                        self._stop.wait(5)
                        continue
                    if self.delay:
                        time.sleep(self.delay)
                    body = (
                        self.reply
                        if isinstance(self.reply, bytes)
                        else struct.pack("<I", len(json.dumps(self.reply).encode()))
                        + json.dumps(self.reply).encode()
                    )
                    conn.sendall(body)
                except (OSError, ConnectionError):
                    pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(5)


def daemon_obj(device: int, sock: Path, clients: list[dict]) -> dict:
    return {
        "device": device,
        "backend": "cpu",
        "device_type": "cpu",
        "pid": 4242 + device,
        "uid": 0,
        "started_at": time.time() - 3700,
        "uptime_s": 3700.0,
        "policy": "flex",
        "socket": str(sock),
        "version": "0.1.0",
        "memory_limit_default": 8 * GiB,
        "ops_total": 1234,
        "rss_bytes": 300 << 20,
        "clients": clients,
    }


CLIENT = {
    "pid": 5001,
    "uid": 1000,
    "cmdline": "python app.py --model\nllama",
    "phase": "decode",
    "memory_bytes": 3 * GiB // 2,
    "memory_peak_bytes": 2 * GiB,
    "memory_limit": 8 * GiB,
    "ops_per_s": 1523.44,
    "ops_total": 99,
    "queue_depth": 3,
    "streams": 2,
    "attached_at": time.time(),
}


@pytest.fixture
def rundir(tmp_path):
    # Short path: AF_UNIX names are limited to 108 bytes.
    d = Path(f"/tmp/fnpu-st-{os.getpid()}-{time.monotonic_ns()}")
    d.mkdir()
    peers: list[PeerDaemon] = []
    yield d, peers
    for p in peers:
        p.close()
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves behind


def test_collect_daemons_clients_and_stale(rundir):
    d, peers = rundir
    peers.append(
        PeerDaemon(d / "npu0.sock", {"ok": True, "daemon": daemon_obj(0, d / "npu0.sock", [CLIENT])})
    )
    d1 = daemon_obj(1, d / "npu1.sock", [])
    d1["plans"] = {
        "plans": 208,
        "sized_plans": 71,
        "compiled": 55,
        "compiled_launches": 4302,
        "compiled_sized": 30,
        "compiled_sized_launches": 900,
        "compiled_executor": False,
        "hot_path": "c",
    }
    d1["loop"] = {"busy_s": 45.0, "wait_s": 15.0}
    peers.append(PeerDaemon(d / "npu1.sock", {"ok": True, "daemon": d1}))
    _stale_socket(d / "npu2.sock")
    (d / "notasocket.txt").write_text("ignored")
    report = cmd_status.collect(d, timeout=2.0)
    assert set(report) == {"daemons", "stale"}
    assert [x["device"] for x in report["daemons"]] == [0, 1]
    assert report["daemons"][0]["clients"][0]["memory_bytes"] == 3 * GiB // 2
    assert report["stale"] == [str(d / "npu2.sock")]
    assert peers[0].requests == [{"op": "status"}]

    text = cmd_status.format_text(report, d)
    assert f"FlexNPU daemons in {d}" in text
    assert "1.5 GiB / 8.0 GiB" in text
    assert "python app.py --model llama" in text and "decode" in text and "1523.4" in text
    assert "1h01m" in text  # uptime 3700 s
    assert "RSS" in text and "300.0 MiB" in text  # the daemon's own host memory
    assert "stale sockets" in text and str(d / "npu2.sock") in text
    # launch plans: a line for the daemon that reports them (device 1), none for the other
    assert (
        "device 1 plans: 208 (55 compiled, 4302 launches run compiled; 71 without sizes, 30 compiled, "
        "900 launches); hot path c; main loop busy 75 % of 1m00s"
    ) in text
    assert "compiled executor not built" in text and "device 0 plans" not in text


def test_unresponsive_and_broken_daemons_are_reported_not_fatal(rundir):
    d, peers = rundir
    peers.append(PeerDaemon(d / "npu0.sock", None))  # never answers
    peers.append(PeerDaemon(d / "npu1.sock", {"ok": False, "error": "not allowed", "code": "EPERM"}))
    peers.append(PeerDaemon(d / "npu2.sock", struct.pack("<I", 1 << 30)))  # absurd length
    peers.append(PeerDaemon(d / "npu3.sock", struct.pack("<I", 5) + b"[1,2]"))  # not an object
    peers.append(PeerDaemon(d / "npu4.sock", {"ok": True, "daemon": daemon_obj(4, d / "npu4.sock", [])}))
    t0 = time.monotonic()
    report = cmd_status.collect(d, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, "sockets must be queried in parallel with a bounded timeout"
    by_dev = {x["device"]: x for x in report["daemons"]}
    assert "no reply within 0.5 s" in by_dev[0]["error"]
    assert "not allowed" in by_dev[1]["error"] and "EPERM" in by_dev[1]["error"]
    assert "too large" in by_dev[2]["error"]
    assert "must be a JSON object" in by_dev[3]["error"]
    assert "error" not in by_dev[4] and by_dev[4]["pid"] == 4246
    assert all(x["clients"] == [] for x in report["daemons"])
    assert report["stale"] == []
    text = cmd_status.format_text(report, d)
    assert "error: no reply" in text


def test_cli_json_and_device_filter(rundir):
    d, peers = rundir
    peers.append(
        PeerDaemon(d / "npu0.sock", {"ok": True, "daemon": daemon_obj(0, d / "npu0.sock", [CLIENT])})
    )
    _stale_socket(d / "npu1.sock")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "flexnpu", "status", "--json", "--runtime-dir", str(d)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert list(out) == ["daemons", "stale"]
    assert out["daemons"][0]["clients"][0]["pid"] == 5001
    assert out["stale"] == [str(d / "npu1.sock")]

    p = subprocess.run(
        [sys.executable, "-m", "flexnpu", "status", "--runtime-dir", str(d), "--device", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode == 1 and "no answering daemon for device 1" in p.stderr


def test_cli_no_daemons_exit_zero(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLEXNPU_RUNTIME_DIR=str(tmp_path / "none"))
    p = subprocess.run(
        [sys.executable, "-m", "flexnpu", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=ROOT,
    )
    assert p.returncode == 0
    assert f"no FlexNPU daemons running in {tmp_path / 'none'}" in p.stdout


def test_human_durations():
    assert cmd_status.human_duration(59) == "59s"
    assert cmd_status.human_duration(90061) == "1d01h"


def test_real_daemon_and_client(start_daemon, runtime_dir):
    """A real `flexnpu daemon` with a real attached client, seen through `flexnpu status`."""
    from flexnpu.client import Client

    d = runtime_dir
    daemon = start_daemon("--memory-limit", "1GiB")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with Client(0, path=str(daemon.socket)) as client:
        h = client.malloc(3 << 20)
        client.memcpy_h2d(h, 0, b"\x01" * (3 << 20))
        client.synchronize()
        out = subprocess.run(
            [sys.executable, "-m", "flexnpu", "status", "--json", "--runtime-dir", str(d)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["stale"] == []
        (info,) = report["daemons"]
        assert info["pid"] == daemon.pid and info["device"] == 0 and info["backend"] == "cpu"
        assert info["memory_limit_default"] == 1 << 30
        (me,) = info["clients"]
        assert me["pid"] == os.getpid() and me["uid"] == os.geteuid()
        assert me["memory_bytes"] >= 3 << 20 and me["memory_limit"] == 1 << 30
        text = subprocess.run(
            [sys.executable, "-m", "flexnpu", "status", "--runtime-dir", str(d)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=ROOT,
        ).stdout
        assert f"\n  {os.getpid()} " in text and "/ 1.0 GiB" in text, text
        ops = me["ops_total"]
        assert ops >= 3 and info["ops_total"] == ops
    # a client that left still counts in the daemon's total (its clients' list is empty now)
    from flexnpu.control import query

    for _ in range(100):
        info = query(str(daemon.socket), {"op": "status"})["daemon"]
        if not info["clients"]:
            break
        time.sleep(0.05)
    assert not info["clients"] and info["ops_total"] >= ops
    assert daemon.stop() == 0
    # The daemon removed its socket: nothing running, nothing stale.
    assert cmd_status.collect(d) == {"daemons": [], "stale": []}


def test_default_dirs_include_the_systemd_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXNPU_RUNTIME_DIR", str(tmp_path))
    assert cmd_status.default_dirs() == [tmp_path]  # an explicit choice is respected
    monkeypatch.delenv("FLEXNPU_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    dirs = cmd_status.default_dirs()
    assert dirs[-1] == Path("/run/flexnpu")
    assert dirs[0] == (Path("/run/flexnpu") if os.geteuid() == 0 else tmp_path / "flexnpu")
