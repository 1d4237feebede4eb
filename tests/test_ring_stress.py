"""Two real processes over one segment: order and checksums across wrap-around, full and
empty rings and all batch sizes; sleep/wake with random pauses (a lost wake-up times out)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time

import pytest

from flexnpu.ring import Segment, call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "_ringchild.py")
K = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def spawn(*args: object, fd: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, CHILD, *map(str, args)], env=env, pass_fds=(fd,), stdout=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("cq_entries,total", [(16, 300_000), (1024, 2_000_000)])
def test_stream_order_checksum(cq_entries, total):
    """The daemon side produces (cq), we consume with random pop_into sizes incl. 1 and
    capacity; a small ring forces full/empty transitions and many wrap-arounds."""
    seg = Segment.create(sq_entries=1, cq_entries=cq_entries, sqe_size=16, cqe_size=16, arena_bytes=0)
    p = spawn("producer", seg.fd, total, cq_entries, fd=seg.fd)
    seg.set_peer(pid=p.pid)
    cq = seg.cq
    rng = random.Random(cq_entries)
    buf = bytearray(cq_entries * 16)
    expect = 0
    try:
        while expect < total:
            want = rng.choice((1, cq_entries, rng.randint(1, cq_entries)))
            n = cq.pop_into(buf, want)
            if n == 0:
                assert cq.wait(10.0), f"no data for 10 s at record {expect}"
                continue
            for i in range(n):
                s, c = struct.unpack_from("<QQ", buf, i * 16)
                if s != expect or c != (s * K) & M64:
                    pytest.fail(f"record {expect}: got seq={s} check={c:#x}")
                expect += 1
        assert p.wait(timeout=30) == 0
        assert cq.pop() is None
    finally:
        p.kill()
        p.wait()
        seg.close()


def test_sleep_wake_random_pauses_no_lost_wakeup():
    """Both sides spin only 2 us, then futex-sleep; random pauses make every interleaving of
    announce-sleep vs publish happen. A lost wake-up shows as a 10 s TimeoutError."""
    n = 3000
    seg = Segment.create(sq_entries=4, cq_entries=4, sqe_size=64, cqe_size=32, arena_bytes=0)
    seg.set_spin(0.000002)
    p = spawn("echo_random", seg.fd, n, 7, fd=seg.fd)
    seg.set_peer(pid=p.pid)
    rng = random.Random(3)
    try:
        for i in range(n):
            rec = struct.pack("<QQ", i, (i * K) & M64)
            if rng.random() < 0.1:
                time.sleep(rng.random() * 0.0005)
            out = call(seg.sq, seg.cq, rec, 10.0)
            assert out[:16] == rec
        assert p.wait(timeout=30) == 0
    finally:
        p.kill()
        p.wait()
        seg.close()
