"""FREE_MANY (the front end's deferred frees in one record): every handle of the list is freed,
an unknown one is reported after the others are freed, and a malformed list is refused without
freeing anything. Real clients against a real daemon."""

from __future__ import annotations

import struct

import pytest

from flexnpu.errors import FlexNPUError, InvalidArgument, InvalidHandle
from flexnpu.protocol import Op


def _used(c) -> int:
    return int(c.memory_stats()["allocated"])


def test_free_many_frees_every_handle_and_reports_an_unknown_one(client):
    base = _used(client)
    hs = [client.malloc(4096) for _ in range(100)]
    assert _used(client) == base + 100 * 4096
    client.free_many(hs[:50])
    client.synchronize()
    assert _used(client) == base + 50 * 4096
    client.free_many([hs[50], 999_999, hs[51]])  # the unknown one in the middle
    with pytest.raises(InvalidHandle, match="999999"):
        client.synchronize()
    assert _used(client) == base + 48 * 4096  # both known handles were freed
    client.free_many(hs[52:])
    client.synchronize()
    assert _used(client) == base
    with pytest.raises(FlexNPUError):
        client.memcpy_d2h(hs[0], 0, 4)


def test_free_many_refuses_malformed_lists(client):
    h = client.malloc(64)
    for payload in (b"\x01\x02\x03", struct.pack("<4097I", *range(1, 4098))):
        with client._lock:
            off = client._stage(payload, len(payload))
        with pytest.raises(InvalidArgument, match="free list"):
            client._sync(Op.FREE_MANY, payload=(off, len(payload)))
    assert bytes(client.memcpy_d2h(h, 0, 4)) == b"\0\0\0\0"  # nothing was freed
