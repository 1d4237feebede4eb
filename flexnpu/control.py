"""The control plane: length-prefixed JSON over the daemon's Unix socket, plus SCM_RIGHTS.

Only attach, status and detach travel here; the data path is the shared-memory rings. Every
message is bounded (MAX_MSG) and parsed defensively: a connection that sends garbage is closed
with an error reply, nothing else happens.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any

MAX_MSG = 1 << 20
MAX_FDS = 4
_LEN = struct.Struct("<I")


class ProtocolError(ValueError):
    """A control message that is malformed or too large."""


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: tuple[int, ...] | list[int] = ()) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_MSG:
        raise ProtocolError("control message too large")
    data = _LEN.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:
        sock.sendall(data)


def _close_fds(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """Blocking receive of one message (the client side and tests use this)."""
    fds: list[int] = []
    buf = bytearray()
    while len(buf) < _LEN.size:
        chunk, anc = _recv_some(sock, _LEN.size - len(buf))
        fds += anc
        if not chunk:
            _close_fds(fds)
            raise ConnectionError("control connection closed")
        buf += chunk
    (n,) = _LEN.unpack(buf[:4])
    if n > MAX_MSG:
        _close_fds(fds)
        raise ProtocolError("control message too large")
    body = bytearray()
    while len(body) < n:
        chunk, anc = _recv_some(sock, n - len(body))
        fds += anc
        if not chunk:
            _close_fds(fds)
            raise ConnectionError("control connection closed mid-message")
        body += chunk
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _close_fds(fds)
        raise ProtocolError(f"control message is not JSON: {e}") from None
    if not isinstance(obj, dict):
        _close_fds(fds)
        raise ProtocolError("control message must be a JSON object")
    return obj, fds


def _recv_some(sock: socket.socket, n: int) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(n, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    out: list[int] = []
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % fds.itemsize
            out += array.array("i", cdata[:usable]).tolist()
    if flags & socket.MSG_CTRUNC:
        _close_fds(out)
        raise ProtocolError("too many file descriptors in one message")
    return data, out


class MessageReader:
    """Incremental, non-blocking reader for the daemon's selector loop: never blocks on a slow
    or silent peer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []

    def feed(self) -> list[tuple[dict[str, Any], list[int]]] | None:
        """Read what is available; returns complete messages, or None at EOF.
        Raises ProtocolError on garbage."""
        try:
            data, fds = _recv_some(self.sock, 65536)
        except (BlockingIOError, InterruptedError):
            return []
        except (ConnectionResetError, OSError):
            return None
        self.fds += fds
        if len(self.fds) > MAX_FDS:
            raise ProtocolError("too many file descriptors")
        if not data:
            return None
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack(self.buf[:4])
            if n > MAX_MSG:
                raise ProtocolError("control message too large")
            if len(self.buf) < 4 + n:
                break
            body = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            try:
                obj = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ProtocolError(f"control message is not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ProtocolError("control message must be a JSON object")
            out.append((obj, self.fds))
            self.fds = []
        if len(self.buf) > MAX_MSG + 4:
            raise ProtocolError("control message too large")
        return out

    def close(self) -> None:
        _close_fds(self.fds)
        self.fds = []


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED): never what the peer claims."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def query(path: str, request: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """One request/reply exchange with a daemon (status and friends)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        send_msg(s, request)
        obj, fds = recv_msg(s)
        _close_fds(fds)
        return obj
