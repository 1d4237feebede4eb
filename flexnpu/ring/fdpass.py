"""Passing the segment fd over a Unix socket with SCM_RIGHTS.

The receiving side is usually the daemon, so ancillary data is parsed defensively: any number
of SCM_RIGHTS messages and fds may arrive (or garbage, or a truncated control buffer); we keep
exactly one fd and close every other one we were handed, so a hostile peer cannot leak fds
into us.
"""

from __future__ import annotations

import array
import os
import socket

_MAX_FDS = 8


def send_fd(sock: socket.socket, fd: int, payload: bytes) -> None:
    """Send ``payload`` (at least one byte is sent) with ``fd`` attached as SCM_RIGHTS."""
    data = payload or b"\0"
    fds = array.array("i", [fd])
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent != len(data):
        # The fd went with the first byte; the rest must still arrive for the framing to hold.
        sock.sendall(data[sent:])


def recv_fd(sock: socket.socket, bufsize: int = 4096) -> tuple[bytes, int]:
    """Receive one message carrying exactly one fd. Returns ``(payload, fd)``; the caller owns fd.

    Raises EOFError on an orderly EOF, ValueError if the message carried no fd or a truncated
    control buffer (every fd received is closed before raising).
    """
    cmsg_space = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    data, ancdata, msg_flags, _addr = sock.recvmsg(bufsize, cmsg_space, flags)
    fds: list[int] = []
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            usable = len(cdata) - (len(cdata) % array.array("i").itemsize)
            a = array.array("i")
            a.frombytes(cdata[:usable])
            fds.extend(a)
    if msg_flags & getattr(socket, "MSG_CTRUNC", 0x8) or len(fds) != 1:
        for f in fds:
            try:
                os.close(f)
            except OSError:
                pass
        if not data and not fds:
            raise EOFError("control socket closed by the peer")
        raise ValueError(
            f"expected exactly one fd with the message, got {len(fds)}"
            + (" (control data truncated)" if msg_flags & 0x8 else "")
        )
    return data, fds[0]
