"""A peer SIGKILLed mid-stream is reported as PeerDead within the documented bound, in both
directions and with both liveness sources (pidfd, control-socket EOF)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from flexnpu.ring import LIVENESS_INTERVAL_S, PeerDead, Segment, call, recv_fd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "_ringchild.py")
# documented bound: one liveness interval; allow scheduling noise on a loaded 2-core machine
BOUND = 4 * LIVENESS_INTERVAL_S + 0.3


def spawn(*args: object, fd: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen(
        [sys.executable, CHILD, *map(str, args)], env=env, pass_fds=(fd,), stdout=subprocess.PIPE, text=True
    )
    return p


def wait_ready(p: subprocess.Popen) -> None:
    t = threading.Timer(20, p.kill)
    t.start()
    line = p.stdout.readline()
    t.cancel()
    assert line.strip() == "ready", "child did not start"


def kill_later(p: subprocess.Popen, delay: float, box: list) -> threading.Timer:
    def k():
        box.append(time.monotonic())
        p.send_signal(signal.SIGKILL)

    t = threading.Timer(delay, k)
    t.start()
    return t


def test_attacher_detects_dead_creator_via_socket_eof():
    """Daemon side: attached through a real SCM_RIGHTS hand-over; the client dies mid-stream."""
    a, b = socket.socketpair()
    p = spawn("creator_stream", b.fileno(), fd=b.fileno())
    b.close()
    try:
        payload, fd = recv_fd(a)
        assert payload == b"attach"
        seg = Segment.attach(fd)
        os.close(fd)
        seg.set_peer(fd=a.fileno())
        wait_ready(p)
        for i in range(5):
            assert seg.sq.wait(5.0)
            assert struct.unpack_from("<Q", seg.sq.pop())[0] == i
        box: list = []
        kill_later(p, 0.2, box)
        with pytest.raises(PeerDead):
            seg.sq.wait(10.0)
        assert time.monotonic() - box[0] < BOUND
        seg.close()
    finally:
        p.kill()
        p.wait()
        a.close()


def test_creator_detects_dead_producer_via_pidfd():
    """Client side waiting on cq: the daemon-side producer dies after a partial stream."""
    seg = Segment.create(sq_entries=8, cq_entries=8, arena_bytes=0)
    p = spawn("stream_then_hang", seg.fd, fd=seg.fd)
    try:
        seg.set_peer(pid=p.pid)
        wait_ready(p)
        for i in range(5):
            assert seg.cq.wait(5.0)
            assert struct.unpack_from("<Q", seg.cq.pop())[0] == i
        box: list = []
        kill_later(p, 0.2, box)
        with pytest.raises(PeerDead):
            seg.cq.wait(None)
        assert time.monotonic() - box[0] < BOUND
    finally:
        p.kill()
        p.wait()
        seg.close()


def test_call_detects_dead_daemon_and_zombie_counts_as_dead():
    """call() blocked on its completion; the daemon dies and is NOT reaped (a zombie):
    pidfd reports it dead anyway."""
    seg = Segment.create(sq_entries=8, cq_entries=8, arena_bytes=0)
    p = spawn("consumer_waits", seg.fd, fd=seg.fd)
    try:
        seg.set_peer(pid=p.pid)
        wait_ready(p)
        box: list = []
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)  # no wait(): stays a zombie until the finally
        box.append(t0)
        with pytest.raises(PeerDead):
            call(seg.sq, seg.cq, b"request", 10.0)
        assert time.monotonic() - box[0] < BOUND
    finally:
        p.kill()
        p.wait()
        seg.close()


def test_producer_waiting_for_space_detects_dead_consumer():
    """The other direction: the client's SQ is full and the consumer dies."""
    seg = Segment.create(sq_entries=2, cq_entries=2, arena_bytes=0)
    a, b = socket.socketpair()
    p = spawn("consumer_waits", seg.fd, fd=seg.fd)
    try:
        seg.set_peer(pid=p.pid)
        wait_ready(p)
        assert seg.sq.push(b"1") and seg.sq.push(b"2") and not seg.sq.push(b"3")
        box: list = []
        kill_later(p, 0.2, box)
        with pytest.raises(PeerDead):
            seg.sq.push_wait(b"3", 10.0)
        assert time.monotonic() - box[0] < BOUND
    finally:
        p.kill()
        p.wait()
        seg.close()
        a.close()
        b.close()


def test_wait_without_dead_peer_times_out_normally():
    seg = Segment.create(arena_bytes=0)
    seg.set_peer(pid=os.getpid())
    t = time.monotonic()
    assert seg.cq.wait(3 * LIVENESS_INTERVAL_S) is False  # several liveness checks, all alive
    assert time.monotonic() - t >= 3 * LIVENESS_INTERVAL_S * 0.9
    seg.close()
