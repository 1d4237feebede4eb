"""Child-process sides of `flexnpu bench ring` (python -m flexnpu.bench._ringpeers KIND ARGS...).

Every peer runs the same script: an echo phase (each 32-byte message is sent straight back)
that ends with a message starting with b"S" (echoed too), then a sink phase that reads COUNT
messages and answers one ack. The flexnpu child adds a batched sink, a second echo phase
while it is allowed to fall asleep between messages (wake-up latency), and an idle wait.
"""

from __future__ import annotations

import os
import sys

MSG = 32


def _pin(cpu: int) -> None:
    if cpu >= 0:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _stream(recv, send) -> None:
    """Generic echo then sink over message-oriented recv()/send()."""
    while True:
        m = recv()
        send(m)
        if m[:1] == b"S":
            count = int(m[1:].split(b"\0", 1)[0])
            break
    got = 0
    while got < count:
        recv()
        got += 1
    send(b"A" * MSG)


def peer_pipe(rfd: int, wfd: int) -> None:
    rfd, wfd = int(rfd), int(wfd)
    # echo: fixed 32-byte frames; sink: count bytes (stream semantics, reads coalesce)
    while True:
        m = _read_exact(rfd, MSG)
        os.write(wfd, m)
        if m[:1] == b"S":
            count = int(m[1:].split(b"\0", 1)[0])
            break
    need = count * MSG
    while need > 0:
        chunk = os.read(rfd, min(need, 1 << 16))
        if not chunk:
            raise EOFError
        need -= len(chunk)
    os.write(wfd, b"A" * MSG)


def peer_socket(fd: int) -> None:
    import socket

    s = socket.socket(fileno=int(fd))
    while True:
        m = s.recv(MSG, socket.MSG_WAITALL)
        s.sendall(m)
        if m[:1] == b"S":
            count = int(m[1:].split(b"\0", 1)[0])
            break
    need = count * MSG
    while need > 0:
        chunk = s.recv(min(need, 1 << 16))
        if not chunk:
            raise EOFError
        need -= len(chunk)
    s.sendall(b"A" * MSG)


def peer_posix_mq(name_in: str, name_out: str) -> None:
    import posix_ipc

    qi, qo = posix_ipc.MessageQueue(name_in), posix_ipc.MessageQueue(name_out)
    _stream(lambda: qi.receive()[0], qo.send)


def peer_zmq(addr: str) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PAIR)
    s.connect(addr)
    _stream(s.recv, s.send)
    s.close(linger=1000)
    ctx.term()


def peer_flexnpu(fd: str) -> None:
    """Echo with the public Python API: the shape of the daemon's loop."""
    from flexnpu.ring import PeerClosed, PeerDead, Segment

    seg = Segment.attach(int(fd))
    seg.set_peer(pid=os.getppid())  # the parent is our client: its death ends every wait
    sq, cq = seg.sq, seg.cq
    pop, push, wait = sq.pop, cq.push, sq.wait
    esz = cq.entry_size

    def echo() -> int:
        while True:
            r = pop()
            if r is None:
                wait(None)
                continue
            push(r[:esz])
            if r[:1] == b"S":
                return int(r[1:].split(b"\0", 1)[0])

    def sink(count: int) -> None:
        got = 0
        while got < count:
            if pop() is None:
                wait(None)
            else:
                got += 1
        push(b"A" * MSG)

    def sink_batched(count: int) -> None:
        buf = bytearray(sq.capacity * sq.entry_size)
        got, cap = 0, sq.capacity
        pop_into = sq.pop_into
        while got < count:
            n = pop_into(buf, cap)
            if n == 0:
                wait(None)
            got += n
        push(b"A" * MSG)

    sink(echo())  # awake round trips, then single-record throughput
    sink_batched(echo())  # (a stop message carries the batched count)
    echo()  # wake-up round trips: the client pauses between calls
    try:
        while True:  # idle: the parent measures our CPU, then closes
            if pop() is None:
                wait(None)
    except (PeerClosed, PeerDead):
        pass
    seg.close()


def main(argv: list[str]) -> int:
    kind, cpu, *args = argv
    _pin(int(cpu))
    {
        "pipe": peer_pipe,
        "socketpair": peer_socket,
        "posix-mq": peer_posix_mq,
        "zmq": peer_zmq,
        "flexnpu": peer_flexnpu,
    }[kind](*args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def mp_queue_child(qin, qout, cpu: int) -> None:
    """multiprocessing.Queue peer (started by multiprocessing, not via main())."""
    _pin(cpu)
    _stream(qin.get, qout.put)
