"""Single-process behaviour of the ring API: roles, full/empty, batches across wrap-around,
arena views, fd passing, close/close_notify, wait_any."""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from flexnpu.ring import (
    Doorbell,
    PeerClosed,
    RingCorrupt,
    RingError,
    Segment,
    call,
    have_futex_waitv,
    recv_fd,
    send_fd,
    wait_any,
)


@pytest.fixture
def pair():
    c = Segment.create(sq_entries=8, cq_entries=8, sqe_size=64, cqe_size=32, arena_bytes=1 << 16)
    d = Segment.attach(c.fd)
    yield c, d
    d.close()
    c.close()


def test_header_and_roles(pair):
    c, d = pair
    assert c.is_creator and not d.is_creator
    assert c.generation == d.generation and c.generation != 0
    assert c.creator_pid == os.getpid() == d.creator_pid
    assert c.attacher_pid == os.getpid()
    assert c.sq.is_producer and not c.cq.is_producer
    assert not d.sq.is_producer and d.cq.is_producer
    assert (c.sq.capacity, c.sq.entry_size, c.cq.entry_size) == (8, 64, 32)
    with pytest.raises(RingError, match="producer"):
        c.sq.pop()
    with pytest.raises(RingError, match="consumer"):
        d.sq.push(b"x")
    c.beat()
    d.beat()
    assert c.heartbeat == d.heartbeat == 2


def test_full_empty_and_padding(pair):
    c, d = pair
    assert d.sq.pop() is None and len(d.sq) == 0
    for i in range(8):
        assert c.sq.push(bytes([i + 1]) * 3)
    assert not c.sq.push(b"overflow")
    assert len(c.sq) == len(d.sq) == 8
    for i in range(8):
        r = d.sq.pop()
        assert r == bytes([i + 1]) * 3 + b"\0" * 61
    assert d.sq.pop() is None
    with pytest.raises(ValueError, match="exceeds entry size"):
        c.sq.push(b"x" * 65)
    assert c.sq.push(bytearray(b"buf")) and d.sq.pop()[:3] == b"buf"
    assert c.sq.push(memoryview(b"mv")) and d.sq.pop()[:2] == b"mv"


@pytest.mark.parametrize("entries", [1, 2, 8, 64])
def test_all_batch_sizes_wraparound(entries):
    c = Segment.create(sq_entries=entries, cq_entries=1, sqe_size=16, cqe_size=8, arena_bytes=0)
    d = Segment.attach(c.fd)
    seq = expect = 0
    out = bytearray(entries * 16)

    def recs(n):
        nonlocal seq
        b = b"".join(struct.pack("<QQ", seq + i, (seq + i) * 7919) for i in range(n))
        seq += n
        return b

    for n in list(range(1, entries + 1)) * 3:  # every batch size, many wrap-arounds
        assert c.sq.push_batch(recs(n), n) == n
        extra = c.sq.push_batch(recs(1), 1)  # fills the ring when there is room, else 0
        if extra == 0:
            seq -= 1
            assert n == entries  # the ring was full: nothing was taken
        got = d.sq.pop_into(out, entries)
        assert got == n + extra
        for i in range(got):
            assert struct.unpack_from("<QQ", out, i * 16) == (expect, expect * 7919)
            expect += 1
    assert d.sq.pop() is None and expect == seq
    d.close()
    c.close()


def test_batch_partial_fit(pair):
    c, d = pair
    assert c.sq.push_batch(b"\1" * 64 * 5, 5) == 5
    assert c.sq.push_batch(b"\2" * 64 * 5, 5) == 3  # only 3 slots left: a prefix fits
    out = bytearray(64 * 8)
    assert d.sq.pop_into(out, 3) == 3
    assert d.sq.pop_into(out, 8) == 5
    assert bytes(out[64:128]) == b"\1" * 64 and bytes(out[128:192]) == b"\2" * 64
    with pytest.raises(ValueError):
        d.sq.pop_into(bytearray(10), 1)
    with pytest.raises(ValueError):
        c.sq.push_batch(b"short", 1)


def test_wait_timeout_and_close_notify(pair):
    c, d = pair
    t = time.monotonic()
    assert d.sq.wait(0.05) is False
    assert 0.04 < time.monotonic() - t < 1.0
    c.sq.push(b"x")
    assert d.sq.wait(0) is True
    d.sq.pop()
    threading.Timer(0.1, c.close_notify).start()
    t = time.monotonic()
    with pytest.raises(PeerClosed):
        d.sq.wait(5.0)
    assert time.monotonic() - t < 1.0
    assert d.closed_by_peer


def test_close_is_safe_and_idempotent():
    c = Segment.create(arena_bytes=1 << 16)
    v = c.arena_view(0, 16)
    a = c.arena_numpy(0, 16)
    c.close()
    c.close()
    v[0] = 7  # views keep their own mapping alive past close()
    assert a[0] == 7
    with pytest.raises(RingError, match="closed"):
        c.sq.push(b"x")
    with pytest.raises(RingError, match="closed"):
        c.cq.pop()
    with pytest.raises(RingError, match="closed"):
        c.cq.wait(0)
    with Segment.create() as s:
        assert s.sq.push(b"ok")


def test_arena_views_zero_copy(pair):
    torch = pytest.importorskip("torch")
    c, d = pair
    off = c.alloc(4096)
    a = c.arena_numpy(off, 4096, "float32", (32, 32))
    a[:] = np.arange(1024, dtype=np.float32).reshape(32, 32)
    t = d.arena_torch(off, 4096, torch.float32, (32, 32))
    assert float(t.sum()) == float(a.sum())
    t[0, 0] = -1.0  # write through the daemon's view ...
    assert a[0, 0] == -1.0  # ... shows in the client's array: zero copy
    assert bytes(d.arena_view(off, 4))[:4] == struct.pack("<f", -1.0)
    for bad in [(-1, 4), (0, c.arena_size + 1), (c.arena_size, 1), (2**62, 8)]:
        with pytest.raises(RingCorrupt):
            d.arena_view(*bad)
        with pytest.raises(RingCorrupt):  # the copying reader checks the same bounds
            d.arena_bytes(*bad)
    data = d.arena_bytes(off, 8)
    assert type(data) is bytes and data == bytes(d.arena_view(off, 8))
    a[0, 0] = 5.0  # a copy: what was read does not change under it
    assert data[:4] == struct.pack("<f", -1.0)
    with pytest.raises(ValueError):
        c.arena_numpy(off, 6, "float32")
    assert d.arena_torch(off, 0, torch.float32).numel() == 0
    c.free(off)
    with pytest.raises(ValueError):
        c.free(off)
    with pytest.raises(RingError):
        d.alloc(64)


def test_call_roundtrip_thread(pair):
    c, d = pair

    def echo():
        for _ in range(1000):
            assert d.sq.wait(5.0)
            r = d.sq.pop()
            d.cq.push(r[:32][::-1])

    th = threading.Thread(target=echo)
    th.start()
    for i in range(1000):
        rec = struct.pack("<Q", i).ljust(32, b"\0")
        assert call(c.sq, c.cq, rec, 5.0) == rec[::-1]
    th.join(10)
    with pytest.raises(TimeoutError):
        call(c.sq, c.cq, b"nobody home", 0.05)
    with pytest.raises(RingError):
        call(c.cq, c.sq, b"x", 0.01)  # wrong roles: the creator consumes cq


@pytest.mark.parametrize("fallback", [False, True])
def test_wait_any(fallback):
    if not fallback and not have_futex_waitv():
        pytest.skip("futex_waitv not available on this kernel")
    segs = [Segment.create(sq_entries=4, cq_entries=4, arena_bytes=0) for _ in range(5)]
    atts = [Segment.attach(s.fd) for s in segs]
    rings = [a.sq for a in atts]
    bell = Doorbell()
    assert wait_any(rings, 0.02, bell, fallback=fallback) is False
    threading.Timer(0.05, lambda: segs[3].sq.push(b"hi")).start()
    t = time.monotonic()
    assert wait_any(rings, 5.0, bell, fallback=fallback) is True
    assert time.monotonic() - t < 1.0
    assert rings[3].pop()[:2] == b"hi"
    threading.Timer(0.05, bell.ring).start()
    t = time.monotonic()
    assert wait_any(rings, 5.0, bell, fallback=fallback) is True
    assert time.monotonic() - t < 1.0
    assert wait_any(rings, 0.01, bell, fallback=fallback) is False  # the ring was consumed
    assert wait_any([], 0.01, None) is False
    for s in atts + segs:
        s.close()


def test_wait_any_many_rings_sliced():
    segs = [Segment.create(sq_entries=1, cq_entries=1, arena_bytes=0) for _ in range(130)]
    rings = [Segment.attach(s.fd).sq for s in segs]  # > 127: sliced fallback
    threading.Timer(0.05, lambda: segs[129].sq.push(b"z")).start()
    t = time.monotonic()
    assert wait_any(rings, 5.0) is True
    assert time.monotonic() - t < 1.0


def test_send_recv_fd_and_garbage():
    a, b = socket.socketpair()
    seg = Segment.create(arena_bytes=0)
    send_fd(a, seg.fd, b"hello")
    payload, fd = recv_fd(b)
    assert payload == b"hello"
    d = Segment.attach(fd)
    os.close(fd)
    assert d.generation == seg.generation
    # no fd attached
    a.send(b"plain")
    with pytest.raises(ValueError, match="exactly one fd"):
        recv_fd(b)
    # three fds: all closed by recv_fd, error raised
    r1, w1 = os.pipe()
    a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r1, w1, r1]))])
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError):
        recv_fd(b)
    assert len(os.listdir("/proc/self/fd")) == before
    a.close()
    with pytest.raises(EOFError):
        recv_fd(b)
    b.close()
    d.close()
    seg.close()
    os.close(r1)
    os.close(w1)


def test_create_rejects_bad_sizes():
    for kw in [
        dict(sq_entries=3),
        dict(cq_entries=0),
        dict(sqe_size=48),
        dict(cqe_size=4),
        dict(sq_entries=1 << 21),
        dict(arena_bytes=-1),
    ]:
        with pytest.raises(ValueError):
            Segment.create(**kw)


@pytest.mark.parametrize("fallback", [False, True])
def test_doorbell_watches_another_processes_bell(fallback):
    """wait_any also wakes when a watched shared word ("bell", a collective segment's) changes:
    a post from another process (fx_coll_post: bump the bell, wake if sleepers announced) ends
    the wait; the change is consumed; an unwatched bell no longer wakes it."""
    import mmap

    from flexnpu.ring._core import lib

    if not fallback and not have_futex_waitv():
        pytest.skip("futex_waitv not available on this kernel")
    mm = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: the forked child posts into it
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    word, bell, sleepers = base, base + 128, base + 256
    d = Doorbell()
    assert d.watch(bell, sleepers) and d.watch(bell, sleepers)  # a second watch is a no-op
    assert d.watching == 1
    assert wait_any([], 0.02, d, fallback=fallback) is False

    def post_later(delay: float) -> int:
        pid = os.fork()
        if pid == 0:  # the child: only the C call, then out
            time.sleep(delay)
            lib.fx_coll_post(word, 1, bell, sleepers)
            os._exit(0)
        return pid

    pid = post_later(0.1)
    t = time.monotonic()
    assert wait_any([], 5.0, d, fallback=fallback) is True
    assert 0.05 < time.monotonic() - t < 2.0
    os.waitpid(pid, 0)
    assert wait_any([], 0.02, d, fallback=fallback) is False  # the change was seen
    assert lib.fx_shm_load(sleepers) == 0  # the sleep announcement was withdrawn
    d.unwatch(bell)
    assert d.watching == 0
    pid = post_later(0.0)
    os.waitpid(pid, 0)
    assert wait_any([], 0.05, d, fallback=fallback) is False  # no longer watched


def test_doorbell_watch_list_is_bounded():
    import mmap

    mm = mmap.mmap(-1, 4096)
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    d = Doorbell()
    got = [d.watch(base + 8 * i, base + 2048) for i in range(12)]
    assert got == [True] * 8 + [False] * 4
    d.unwatch(base)
    assert d.watch(base + 8 * 11, base + 2048)
