"""Child-process programs for the ring tests (run as: python tests/_ringchild.py MODE FD ...)."""

import os
import random
import struct
import sys
import time

from flexnpu.ring import Segment

K = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def producer(fd: int, total: int, seed: int) -> None:
    """Pushes `total` sequence-numbered, checksummed records in random batch sizes."""
    seg = Segment.attach(fd)
    seg.set_peer(pid=os.getppid())
    sq = seg.cq  # the attacher produces on cq
    rng = random.Random(seed)
    esz, cap = sq.entry_size, sq.capacity
    seq = 0
    while seq < total:
        n = min(total - seq, rng.choice((1, 2, 3, cap // 2 or 1, cap, rng.randint(1, cap))))
        buf = b"".join(struct.pack("<QQ", s, (s * K) & M64).ljust(esz, b"\0") for s in range(seq, seq + n))
        done = 0
        while done < n:
            k = sq.push_batch(memoryview(buf)[done * esz :], n - done)
            done += k
            if k == 0 and not sq.wait_space(10.0):
                sys.exit("producer: timed out waiting for space")
        seq += n
    seg.close()


def echo_random(fd: int, n: int, seed: int) -> None:
    """Echo with random pauses (some long enough to futex-sleep on either side)."""
    seg = Segment.attach(fd)
    seg.set_peer(pid=os.getppid())
    seg.set_spin(0.000002)
    rng = random.Random(seed)
    for _ in range(n):
        if not seg.sq.wait(10.0):
            sys.exit("echo: lost wake-up (timed out)")
        r = seg.sq.pop()
        if rng.random() < 0.1:
            time.sleep(rng.random() * 0.0005)
        seg.cq.push(r[: seg.cq.entry_size])


def stream_then_hang(fd: int) -> None:
    """Push a few records then block forever (the test SIGKILLs us mid-stream)."""
    seg = Segment.attach(fd)
    for i in range(5):
        seg.cq.push(struct.pack("<Q", i))
    print("ready", flush=True)
    time.sleep(60)


def consumer_waits(fd: int) -> None:
    """Attach and sleep: the test kills us while the creator waits for a completion."""
    Segment.attach(fd)
    print("ready", flush=True)
    time.sleep(60)


def creator_stream(sockfd: int) -> None:
    """Create a segment, pass it over the socket, push 5 requests, then hang (to be killed)."""
    import socket

    from flexnpu.ring import send_fd

    sock = socket.socket(fileno=sockfd)
    seg = Segment.create(sq_entries=8, cq_entries=8, arena_bytes=0)
    send_fd(sock, seg.fd, b"attach")
    for i in range(5):
        seg.sq.push(struct.pack("<Q", i))
    print("ready", flush=True)
    time.sleep(60)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {
        "producer": producer,
        "echo_random": echo_random,
        "stream_then_hang": stream_then_hang,
        "consumer_waits": consumer_waits,
        "creator_stream": creator_stream,
    }[mode](*map(int, args))
