"""A peer that scribbles on shared memory is detected and never followed: indices beyond
capacity, our own index overwritten, bad headers, unsealed or resized files, arena offsets."""

from __future__ import annotations

import mmap
import os
import struct

import pytest

from flexnpu.ring import RingCorrupt, Segment

HEAD, TAIL = 0, 128


class Scribbler:
    """A hostile peer's raw view of the segment."""

    def __init__(self, seg: Segment):
        self.mm = mmap.mmap(seg.fd, seg.size)
        self.sq_off, self.cq_off = struct.unpack_from("<QQ", self.mm, 32)

    def u32(self, off: int, value: int | None = None) -> int:
        if value is not None:
            struct.pack_into("<I", self.mm, off, value & 0xFFFFFFFF)
        return struct.unpack_from("<I", self.mm, off)[0]


@pytest.fixture
def seg():
    c = Segment.create(sq_entries=8, cq_entries=8, arena_bytes=4096)
    d = Segment.attach(c.fd)
    yield c, d, Scribbler(c)
    d.close()
    c.close()


def test_tail_beyond_capacity_is_reported_not_followed(seg):
    c, d, s = seg
    c.sq.push(b"a")
    s.u32(s.sq_off + TAIL, 1 + 9)  # claims 10 records in an 8-slot ring
    for op in (d.sq.pop, lambda: d.sq.wait(1.0), lambda: d.sq.pop_into(bytearray(64 * 8), 8), d.sq.__len__):
        with pytest.raises(RingCorrupt, match="tail-head exceeds capacity"):
            op()
    s.u32(s.sq_off + TAIL, 1)  # the creator's true index again
    assert d.sq.pop()[:1] == b"a"  # nothing was consumed while corrupt


def test_wrapped_tail_behind_head(seg):
    c, d, s = seg
    s.u32(s.sq_off + TAIL, 0xFFFFFFF0)  # "behind" head: huge unsigned distance
    with pytest.raises(RingCorrupt):
        d.sq.pop()


def test_scribbled_own_index_is_ignored(seg):
    c, d, s = seg
    for i in range(4):
        c.sq.push(bytes([65 + i]))
    assert d.sq.pop()[:1] == b"A"
    s.u32(s.sq_off + HEAD, 1234567)  # the peer overwrites OUR head ...
    assert d.sq.pop()[:1] == b"B"  # ... we never re-read it
    assert s.u32(s.sq_off + HEAD) == 2  # and our next store repairs it
    s.u32(s.sq_off + TAIL, 77)  # daemon scribbles the client's own tail
    assert c.sq.push(b"E")  # the producer keeps its private tail
    assert s.u32(s.sq_off + TAIL) == 5


def test_producer_detects_scribbled_head(seg):
    c, d, s = seg
    for i in range(8):
        c.sq.push(b"x")
    s.u32(s.sq_off + HEAD, 100)  # head ahead of our tail: nonsense
    with pytest.raises(RingCorrupt):
        c.sq.push(b"y")
    with pytest.raises(RingCorrupt):
        c.sq.push_wait(b"y", 0.1)


def test_arena_offsets_out_of_range(seg):
    c, d, s = seg
    for off, n in [(4096, 1), (4000, 97), (-8, 8), (0, 1 << 40)]:
        with pytest.raises(RingCorrupt, match="outside"):
            d.arena_view(off, n)
    assert len(d.arena_view(4095, 1)) == 1


def _bad_copy(mutate) -> int:
    """A sealed memfd holding a copy of a good segment with `mutate(mm)` applied."""
    good = Segment.create(sq_entries=8, cq_entries=8, arena_bytes=4096)
    size = good.size
    raw = bytes(mmap.mmap(good.fd, size))
    good.close()
    fd = os.memfd_create("bad", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size)
    mm[:] = raw
    grow = mutate(mm)
    if grow:
        os.ftruncate(fd, size + grow)
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize(
    "name,mutate,msg",
    [
        ("magic", lambda m: struct.pack_into("<Q", m, 0, 0xDEADBEEF), "bad magic"),
        ("version", lambda m: struct.pack_into("<I", m, 8, 99), "layout version"),
        ("entries", lambda m: struct.pack_into("<I", m, 16, 12), "powers of two"),
        ("huge entries", lambda m: struct.pack_into("<I", m, 16, 1 << 30), "powers of two"),
        ("entry size", lambda m: struct.pack_into("<I", m, 24, 3), "entry sizes"),
        ("sq offset", lambda m: struct.pack_into("<Q", m, 32, 8192), "inconsistent offsets"),
        ("arena size", lambda m: struct.pack_into("<Q", m, 56, 1 << 30), "sizes inconsistent"),
        ("file size", lambda m: 4096, "sizes inconsistent"),
    ],
)
def test_bad_header_rejected(name, mutate, msg):
    fd = _bad_copy(mutate)
    try:
        with pytest.raises(RingCorrupt, match=msg):
            Segment.attach(fd)
    finally:
        os.close(fd)


def test_unsealed_or_foreign_fd_rejected(tmp_path):
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    with pytest.raises(RingCorrupt, match="not sealed"):
        Segment.attach(fd)
    os.close(fd)
    r, w = os.pipe()
    with pytest.raises(RingCorrupt, match="not a memfd"):
        Segment.attach(r)
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        Segment.attach(9999)
