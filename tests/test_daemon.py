"""The daemon with real clients in real processes: memory, copies, streams, events, IPC,
isolation, client death, daemon death, and hostile input."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flexnpu import protocol as P
from flexnpu.client import Client
from flexnpu.errors import AttachError, DaemonLost, InvalidArgument, InvalidHandle, NotFound, OutOfMemory

from conftest import child_env


def run_py(code: str, runtime_dir, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=child_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def test_copies_in_all_directions(client):
    data = bytes(random.Random(0).randbytes(100_000))
    h = client.malloc(len(data))
    client.memcpy_h2d(h, 0, data)
    assert client.memcpy_d2h(h, 0, len(data)) == data
    h2 = client.malloc(len(data))
    client.memcpy_d2d(h2, 10, h, 0, len(data) - 10)
    client.memset(h2, 0, 0xAB, 10)
    out = client.memcpy_d2h(h2, 0, len(data))
    assert out[:10] == b"\xab" * 10 and out[10:] == data[:-10]
    # bigger than one arena chunk, through the zero-extra-copy path
    big = random.Random(1).randbytes(40 << 20)
    hb = client.malloc(len(big))
    client.memcpy_h2d(hb, 0, big)
    assert client.memcpy_d2h(hb, 0, len(big)) == big
    client.free(hb)
    client.synchronize()


def test_host_buffers_in_the_arena_are_zero_copy(client):
    h = client.malloc(4096)
    off = client.host_alloc(4096)
    view = client.host_view(off, 4096)
    view[:] = bytes(range(256)) * 16
    client.memcpy_h2d_host(h, 0, off, 4096)
    view[:] = b"\0" * 4096
    client.memcpy_d2h_host(h, 0, off, 4096, sync=False)
    client.synchronize(0)
    assert bytes(view) == bytes(range(256)) * 16
    client.host_free(off)


def test_errors_are_clear_and_per_call(client):
    with pytest.raises(InvalidHandle, match="unknown or freed device handle 4242"):
        client.memcpy_d2h(4242, 0, 8)
    h = client.malloc(16)
    with pytest.raises(InvalidArgument, match="outside allocation of 16 bytes"):
        client.memcpy_d2h(h, 8, 16)
    client.free(h)
    client.free(h)  # double free: async error, reported at the next sync
    with pytest.raises(InvalidHandle, match="already freed"):
        client.synchronize()
    client.synchronize()  # the error was reported once; the client keeps working
    assert client.memcpy_d2h(client.malloc(4), 0, 4) is not None


def test_streams_and_events_order_work(client):
    s1, s2 = client.create_stream(), client.create_stream(priority=-1)
    h = client.malloc(8)
    client.memset(h, 0, 1, 8, stream=s1)
    ev = client.create_event()
    client.record_event(ev, s1)
    client.stream_wait_event(s2, ev)
    client.memset(h, 0, 2, 4, stream=s2)
    client.synchronize(s2)
    assert client.memcpy_d2h(h, 0, 8, stream=s2) == b"\x02" * 4 + b"\x01" * 4
    e0, e1 = client.create_event(), client.create_event()
    client.record_event(e0, s1)
    client.record_event(e1, s1)
    client.event_synchronize(e1)
    assert client.event_query(e1)
    assert client.event_elapsed_ms(e0, e1) >= 0.0
    client.destroy_stream(s1)
    client.synchronize()
    with pytest.raises(InvalidHandle, match="unknown stream"):
        client.memset(h, 0, 0, 1, stream=s1)
        client.synchronize(0)


def test_ipc_export_import_is_zero_copy_and_pid_checked(daemon, runtime_dir):
    owner = Client(0)
    h = owner.malloc(1 << 20)
    owner.memset(h, 0, 7, 1 << 20)
    key = owner.ipc_export(h)
    # a process not on the list is refused
    r = run_py(
        f"""
        from flexnpu.client import Client
        from flexnpu.errors import PermissionDenied
        c = Client(0)
        try:
            c.ipc_import({key})
        except PermissionDenied as e:
            print("REFUSED", e)
        """,
        runtime_dir,
    )
    assert "REFUSED" in r.stdout, r.stderr
    # an allowed process sees the owner's bytes and its writes are visible to the owner
    code = f"""
        import os, sys
        from flexnpu.client import Client
        c = Client(0)
        sys.stdout.write("PID %d\\n" % os.getpid()); sys.stdout.flush()
        sys.stdin.readline()
        h, n = c.ipc_import({key})
        assert n == 1 << 20
        assert c.memcpy_d2h(h, 0, 4) == b"\\x07" * 4
        c.memset(h, 0, 9, 4)
        c.synchronize()
        print("OK", c.memory_stats()["allocated"])
        """
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=child_env(runtime_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid = int(p.stdout.readline().split()[1])
    owner.ipc_set_pids(key, [pid])
    out, err = p.communicate("go\n", timeout=60)
    assert "OK 0" in out, err  # imported memory is not charged to the importer
    assert owner.memcpy_d2h(h, 0, 8) == b"\x09" * 4 + b"\x07" * 4
    with pytest.raises(NotFound):
        owner.ipc_import(12345)
    owner.close()


def test_memory_limit_hits_only_the_offender(start_daemon):
    start_daemon("--memory-limit", "1MiB")
    a, b = Client(0), Client(0)
    a.malloc(2 << 20)
    with pytest.raises(OutOfMemory, match="limit"):
        a.synchronize()
    hb = b.malloc(512 << 10)
    b.memset(hb, 0, 1, 512 << 10)
    b.synchronize()
    assert b.memory_stats()["allocated"] == 512 << 10
    a.close()
    b.close()


@pytest.mark.timing  # reclaimed within 1 s
def test_killed_client_is_reclaimed_and_survivor_unaffected(daemon, runtime_dir):
    victim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
        import sys
        from flexnpu.client import Client
        c = Client(0)
        hs = [c.malloc(1 << 20) for _ in range(32)]
        c.synchronize()
        print("READY", flush=True)
        while True:
            for h in hs:
                c.memset(h, 0, 3, 1 << 20)
        """),
        ],
        env=child_env(runtime_dir),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert victim.stdout.readline().strip() == "READY"
    survivor = Client(0)
    h = survivor.malloc(4096)
    survivor.synchronize()  # the survivor is registered once it has been served
    st = daemon.status()
    assert len(st["clients"]) == 2
    assert sum(c["memory_bytes"] for c in st["clients"]) >= 32 << 20
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        clients = daemon.status()["clients"]
        if len(clients) == 1:
            break
        time.sleep(0.02)
    reclaimed_after = time.monotonic() - t0
    assert len(clients) == 1 and clients[0]["pid"] == os.getpid(), clients
    assert reclaimed_after < 1.0
    survivor.memset(h, 0, 5, 4096)
    assert survivor.memcpy_d2h(h, 0, 4096) == b"\x05" * 4096
    survivor.close()


@pytest.mark.timing  # DaemonLost within 2 s
def test_daemon_death_raises_daemon_lost_promptly(daemon):
    c = Client(0)
    h = c.malloc(64)
    c.synchronize()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(DaemonLost):
        for _ in range(1000):
            c.memcpy_d2h(h, 0, 64)
    assert time.monotonic() - t0 < 2.0
    c.close()


def test_sigterm_tells_clients_and_exits_cleanly(daemon):
    c = Client(0)
    h = c.malloc(64)
    c.memset(h, 0, 1, 64)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    with pytest.raises(DaemonLost, match="stopped|died"):
        c.memcpy_d2h(h, 0, 64)
    c.close()


def test_attach_refusals_are_explained(start_daemon, runtime_dir):
    with pytest.raises(AttachError, match="no FlexNPU daemon serves device 5"):
        Client(5)
    start_daemon("--allow-uid", "54321")
    with pytest.raises(AttachError, match="uid 0 may not use device 0|uid %d" % os.geteuid()):
        Client(0)


def test_garbage_on_the_control_socket_does_not_hurt(daemon):
    import socket as so

    for junk in (b"\xff\xff\xff\xff", b"\x05\x00\x00\x00nope!", b"\x02\x00\x00\x00[]", b""):
        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        s.connect(str(daemon.socket))
        s.sendall(junk)
        s.close()
    silent = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    silent.connect(str(daemon.socket))  # connects and says nothing: must not block others
    c = Client(0)
    c.nop()
    assert daemon.status()["clients"]
    silent.settimeout(15)
    assert silent.recv(1) == b""  # ... and is closed after the handshake timeout
    silent.close()
    # a flood of idle connections from one uid is refused beyond a bound; others still attach
    flood = []
    for _ in range(40):
        s = so.socket(so.AF_UNIX, so.SOCK_STREAM)
        s.connect(str(daemon.socket))
        flood.append(s)
    # Wait for the refusals themselves (not a fixed time): the daemon answers every connection
    # past the bound with EBUSY, and keeps the first 16 in their handshake, which say nothing.
    import selectors

    sel = selectors.DefaultSelector()
    for s in flood:
        sel.register(s, selectors.EVENT_READ)
    refused, deadline = 0, time.monotonic() + 30
    while refused < 40 - 16 and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            sel.unregister(key.fileobj)
            try:
                refused += b"EBUSY" in key.fileobj.recv(4096)
            except OSError:
                pass
    sel.close()
    assert refused >= 40 - 16
    for s in flood:
        s.close()
    c.nop()
    c.close()


def test_fuzzed_records_never_hurt_the_daemon_or_others(daemon):
    good = Client(0)
    hg = good.malloc(256)
    rng = random.Random(1234)
    fuzzer = Client(0)
    valid = [
        P.pack_sqe(
            op,
            *(rng.randrange(1 << 16) for _ in range(len(spec.args))),
            payload_off=rng.randrange(1 << 20),
            payload_len=rng.randrange(512),
        )
        for op, spec in P.OPS.items()
    ]
    sq = fuzzer.seg.sq
    for i in range(6000):
        if i % 3 == 0:
            rec = bytearray(rng.randbytes(64))
        else:
            rec = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 3)):
                rec[rng.randrange(64)] ^= 1 << rng.randrange(8)
        rec[2:4] = b"\0\0"  # never claim FLAG_SYNC: the fuzzer does not read completions
        if not sq.push(bytes(rec)):
            sq.push_wait(bytes(rec), 5)
        if i % 500 == 0:
            good.memset(hg, 0, i & 0xFF, 256)
            assert good.memcpy_d2h(hg, 0, 256) == bytes([i & 0xFF]) * 256
    # the daemon is alive and still serves both
    good.nop()
    assert daemon.proc.poll() is None
    try:
        fuzzer.synchronize()
    except Exception:
        pass  # whatever errors the garbage produced are its own
    good.close()
    fuzzer.close()


def test_corrupt_ring_indices_disconnect_only_that_client(daemon):
    good = Client(0)
    bad = Client(0)
    bad.nop()
    # Scribble over the SQ's control lines (right after the header page) as a hostile client would.
    m = mmap.mmap(bad.seg.fd, 0)
    m[4096 : 4096 + 512] = b"\xff" * 512
    m.close()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        if len(daemon.status()["clients"]) == 1:
            break
        time.sleep(0.05)
    assert len(daemon.status()["clients"]) == 1
    assert "corrupt" in daemon.log_text()
    good.nop()
    good.close()


def test_sync_malloc_and_stream_query(start_daemon):
    start_daemon("--memory-limit", "1MiB")
    c = Client(0)
    with pytest.raises(OutOfMemory):
        c.malloc(4 << 20, sync=True)
    h = c.malloc(1024, sync=True)
    c.memset(h, 0, 1, 1024)
    c.synchronize()
    assert c.stream_query(0) is True
    assert c.host_addr(c.host_alloc(64)) > 0
    c.close()


def test_device_memory_is_shared_by_all_clients(start_daemon):
    start_daemon("--device-memory", "64MiB")
    a, b = Client(0), Client(0)
    ha = a.malloc(48 << 20, sync=True)
    with pytest.raises(OutOfMemory, match="device out of memory"):
        b.malloc(32 << 20, sync=True)
    a.free(ha)
    a.synchronize()
    b.malloc(32 << 20, sync=True)  # the space came back
    a.close()
    b.close()


def test_client_ignoring_its_completions_is_dropped_alone(daemon):
    good = Client(0)
    bad = Client(0)
    sq = bad.seg.sq
    # thousands of synchronous requests whose replies it never reads: its CQ (256) overflows
    for i in range(6000):
        rec = P.pack_sqe(P.Op.NOP, user_data=i + 1, flags=P.FLAG_SYNC)
        if not sq.push(rec):
            try:
                sq.push_wait(rec, 2)
            except Exception:
                break
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and len(daemon.status()["clients"]) > 1:
        time.sleep(0.05)
    assert len(daemon.status()["clients"]) == 1
    assert "does not consume its completion ring" in daemon.log_text()
    good.nop()
    assert daemon.proc.poll() is None
    good.close()


def test_launches_on_two_streams_with_an_event_match_torch(client):
    import numpy as np
    import torch

    from flexnpu.protocol import TensorRef

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 16), dtype=np.float32), rng.standard_normal((16, 4), dtype=np.float32)

    def upload(x):
        h = client.malloc(x.nbytes)
        client.memcpy_h2d(h, 0, x.tobytes())
        return TensorRef(h, torch.float32, x.shape, tuple(s // 4 for s in x.strides), 0)

    ra, rb = upload(a), upload(b)
    s1, s2 = client.create_stream(), client.create_stream()
    mm = TensorRef(client.alloc_handle(), torch.float32, (8, 4), (4, 1), 0)
    client.launch("aten::mm.default", (ra, rb), {}, [(8 * 4 * 4, mm)], stream=s1)
    ev = client.create_event()
    client.record_event(ev, s1)
    client.stream_wait_event(s2, ev)  # s2's work needs s1's product
    out = TensorRef(client.alloc_handle(), torch.float32, (8, 4), (4, 1), 0)
    client.launch("aten::add.Tensor", (mm, mm), {"alpha": 2}, [(8 * 4 * 4, out)], stream=s2)
    client.launch("aten::relu_.default", (out,), {}, [], stream=s2)
    client.synchronize(s2)
    got = np.frombuffer(client.memcpy_d2h(out.handle, 0, 8 * 4 * 4, stream=s2), dtype=np.float32).reshape(
        8, 4
    )
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    want = torch.relu(torch.add(ta @ tb, ta @ tb, alpha=2)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_freed_exports_cannot_keep_uncharged_memory_alive(client):
    h = client.malloc(1 << 20)
    key = client.ipc_export(h)
    client.free(h)
    client.synchronize()
    assert client.memory_stats()["allocated"] == 0
    with pytest.raises(NotFound):
        client.ipc_import(key)  # the export went with the allocation
