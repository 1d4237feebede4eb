"""Collectives in the daemons (flexnpu/daemon/collectives.py) and the hccl torch.distributed
backend (flexnpu/hook/distributed.py), with real daemons and real processes.

The client-level tests drive several Clients from this process (each Client is a separate
attachment, i.e. a separate rank as far as the daemons know); the torch.distributed tests run
unmodified multi-process programs under `flexnpu run` (tests/_dist_prog.py).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, child_env
from flexnpu.client import Client
from flexnpu.errors import CollectiveError, InvalidArgument, InvalidHandle, PermissionDenied
from flexnpu.protocol import Op, TensorRef, pack_sqe

PROG = str(ROOT / "tests" / "_dist_prog.py")


def _upload(c: Client, t: torch.Tensor) -> tuple[int, TensorRef]:
    t = t.contiguous()
    h = c.malloc(t.numel() * t.element_size())
    c.memcpy_h2d(h, 0, t.view(torch.uint8).numpy().tobytes())
    return h, TensorRef(h, t.dtype, (t.numel(),), (1,), 0)


def _download(c: Client, ref: TensorRef) -> torch.Tensor:
    n = ref.shape[0] * ref.dtype.itemsize
    return torch.frombuffer(c.memcpy_d2h(ref.handle, 0, n), dtype=ref.dtype)


@pytest.fixture(scope="module")
def two_daemons(tmp_path_factory):
    """Daemons for devices 0 and 1 shared by this module's tests (starting one takes seconds)."""
    from conftest import DaemonProc

    d = tmp_path_factory.mktemp("coll-run")
    procs = [DaemonProc(d, 0, ["--backend", "cpu"]), DaemonProc(d, 1, ["--backend", "cpu"])]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FLEXNPU_RUNTIME_DIR", str(d))
            yield procs
    finally:
        for p in procs:
            p.stop()


def _ranks(devs: list[int], timeout_s: float = 30.0) -> tuple[list[Client], list[int]]:
    cs = [Client(d) for d in devs]
    cid = secrets.token_bytes(16)
    return cs, [c.comm_init(cid, r, len(devs), devs, timeout_s) for r, c in enumerate(cs)]


@pytest.mark.parametrize(
    "devs", [[0, 0], [0, 1], [0, 1, 1, 0]], ids=["same-daemon", "two-daemons", "4-ranks"]
)
def test_all_reduce_large_crosses_pipeline_chunks(two_daemons, devs):
    """More elements than one shared-memory slot holds: the chunked pipeline, exact for ints."""
    cs, hs = _ranks(devs)
    n = 3_000_007  # 24 MB of int64 per rank: three 8 MiB slots and a tail
    xs = [torch.arange(n, dtype=torch.int64) * (r + 1) - r for r in range(len(cs))]
    refs = [_upload(c, x)[1] for c, x in zip(cs, xs)]
    for c, h, ref in zip(cs, hs, refs):
        c.collective(h, "all_reduce", ref, ref, "sum")
    want = sum(xs)
    for c, ref in zip(cs, refs):
        c.synchronize()
        assert torch.equal(_download(c, ref), want)
    for c in cs:
        c.close()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("flexnpu-coll-")], (
        "segment name left behind"
    )


def _comm_status(d, cid: bytes) -> dict:
    from flexnpu.control import query

    comms = query(str(d.socket), {"op": "status"})["daemon"]["communicators"]
    return next(c for c in comms if c["id"] == cid.hex()[:8])


def test_small_collectives_across_daemons_run_in_the_main_loop(two_daemons):
    """A small collective whose peer daemon has not posted yet waits in the daemon's main loop,
    which sleeps on the communicator segment's bell as well as on its rings: no worker thread
    (a GIL hand-off and a doorbell wake per collective). Rank 1 comes late on purpose, so
    rank 0's daemon really waits; results are exact, and a large one still uses the worker."""
    cs = [Client(0), Client(1)]
    cid = secrets.token_bytes(16)
    hs = [c.comm_init(cid, r, 2, [0, 1], 30.0) for r, c in enumerate(cs)]
    xs = [torch.arange(100, dtype=torch.int64) * (r + 1) for r in range(2)]
    refs = [_upload(c, x)[1] for c, x in zip(cs, xs)]
    rounds = 20
    for i in range(rounds):
        cs[0].collective(hs[0], "all_reduce", refs[0], refs[0], "sum")
        if i % 4 == 0:
            time.sleep(0.02)  # rank 0's daemon has posted and waits in its loop
        cs[1].collective(hs[1], "all_reduce", refs[1], refs[1], "sum")
        cs[0].nop()  # the daemon still serves its clients while it waits
    want = (xs[0] + xs[1]) * 2 ** (rounds - 1)
    for c, ref in zip(cs, refs):
        c.synchronize()
        assert torch.equal(_download(c, ref), want)
    for d in two_daemons:
        st = _comm_status(d, cid)
        assert st["completed"] == rounds and st["by_worker"] == 0, st
    big = [_upload(c, torch.ones(1 << 20))[1] for c in cs]  # beyond the in-loop size
    for c, h, ref in zip(cs, hs, big):
        c.collective(h, "all_reduce", ref, ref, "sum")
    for c, ref in zip(cs, big):
        c.synchronize()
        assert torch.equal(_download(c, ref), torch.full((1 << 20,), 2.0))
    assert _comm_status(two_daemons[0], cid)["by_worker"] == 1
    for c in cs:
        c.close()


@pytest.mark.parametrize(
    "devs", [[0, 0], [0, 1], [1, 0, 0, 1]], ids=["same-daemon", "two-daemons", "4-ranks"]
)
def test_device_map_exchanged_by_the_daemons(two_daemons, devs):
    """A join with the id alone (the native HcclCommInitRootInfo): the daemons exchange the rank ->
    device map in a host rendezvous segment; joining never blocks, the first collective waits."""
    cs = [Client(d) for d in devs]
    cid = secrets.token_bytes(16)
    hs = [c.comm_init(cid, r, len(devs), None, 30.0) for r, c in enumerate(cs)]
    xs = [torch.arange(10, dtype=torch.int32) + r for r in range(len(cs))]
    refs = [_upload(c, x)[1] for c, x in zip(cs, xs)]
    for c, h, ref in zip(cs, hs, refs):
        c.collective(h, "all_reduce", ref, ref, "max")
    for c, ref in zip(cs, refs):
        c.synchronize()
        assert torch.equal(_download(c, ref), xs[-1])
    for c in cs:
        c.close()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("flexnpu-rdv-")], (
        "rendezvous name left behind"
    )


@pytest.mark.timing  # the exit is seen within 10 s
def test_device_map_exchange_refuses_and_fails_cleanly(two_daemons):
    a, b = Client(0), Client(1)
    cid = secrets.token_bytes(16)
    ha = a.comm_init(cid, 0, 3, None, 30.0)
    with pytest.raises(PermissionDenied, match="already joined"):
        b.comm_init(cid, 0, 3, None, 30.0)  # rank 0 is taken (by another daemon's client)
    with pytest.raises(InvalidArgument, match="created with 2 ranks, another with 3"):
        b.comm_init(cid, 1, 2, None, 30.0)
    hb = b.comm_init(cid, 1, 3, None, 30.0)
    x = _upload(a, torch.ones(4))[1]
    y = _upload(b, torch.ones(4))[1]
    a.collective(ha, "all_reduce", x, x)
    b.collective(hb, "all_reduce", y, y)
    c = Client(0)
    hc = c.comm_init(cid, 2, 3, None, 30.0)
    t0 = time.monotonic()
    c.close()  # rank 2 exits before its first collective: the others fail, at once
    for cl in (a, b):
        with pytest.raises(CollectiveError, match="rank 2 .*exited"):
            cl.synchronize()
    assert time.monotonic() - t0 < 10
    del hc
    # a rank that never joins: the first collective fails at the communicator's timeout
    cid2 = secrets.token_bytes(16)
    h2 = a.comm_init(cid2, 0, 2, None, 1.5)
    a.collective(h2, "all_reduce", x, x)
    with pytest.raises(CollectiveError, match=r"timed out.*\(1 of 2 joined\)"):
        a.synchronize()
    nop = Client(1)
    nop.nop()
    for cl in (a, b, nop):
        cl.close()
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("flexnpu-rdv-")], (
        "rendezvous name left behind"
    )


def test_membership_is_checked(two_daemons):
    a, b = Client(0), Client(0)
    cid = secrets.token_bytes(16)
    h = a.comm_init(cid, 0, 2, [0, 1])
    _, ref = _upload(a, torch.ones(4))
    with pytest.raises(PermissionDenied, match="belongs to device 1"):
        b.comm_init(cid, 1, 2, [0, 1])  # rank 1 is device 1's, not device 0's
    with pytest.raises(PermissionDenied, match="already joined"):
        b.comm_init(cid, 0, 2, [0, 1])
    with pytest.raises(InvalidArgument, match="exists with 2 ranks"):
        b.comm_init(cid, 1, 3, [0, 0, 1])
    _, bref = _upload(b, torch.ones(4))
    b.collective(h, "all_reduce", bref, bref)  # b never joined: a's handle means nothing to it
    with pytest.raises(InvalidHandle, match="only use communicators it joined"):
        b.synchronize()
    with pytest.raises(InvalidArgument):
        a._sync(Op.COMM_INIT, 7, 0, 2, 1000, payload=(0, 3))  # payload too short
    a.close()
    b.close()


def test_mismatch_and_bad_arguments_are_refused(two_daemons):
    cs, hs = _ranks([0, 0])
    f = _upload(cs[0], torch.ones(8))[1]
    i = _upload(cs[1], torch.ones(8, dtype=torch.int32))[1]
    cs[0].collective(hs[0], "all_reduce", f, f)
    cs[1].collective(hs[1], "all_reduce", i, i)
    for c in cs:
        with pytest.raises(
            CollectiveError, match="ranks disagree.*float32.*int32|ranks disagree.*int32.*float32"
        ):
            c.synchronize()
    cs[0].collective(hs[0], "all_reduce", f, f)  # the communicator is unusable afterwards
    with pytest.raises(CollectiveError):
        cs[0].synchronize()
    cs2, hs2 = _ranks([0, 1])
    g = _upload(cs2[0], torch.ones(8))[1]
    cs2[0].collective(hs2[0], "all_reduce", g, g, "band")  # bitwise op on floats
    with pytest.raises(InvalidArgument, match="band needs an integer"):
        cs2[0].synchronize()
    out = _upload(cs2[0], torch.ones(3))[1]
    cs2[0].collective(hs2[0], "all_gather", g, out)  # 2 x 8 elements do not fit in 3
    h1 = _upload(cs2[1], torch.ones(8))[1]
    o1 = _upload(cs2[1], torch.ones(16))[1]
    cs2[1].collective(hs2[1], "all_gather", h1, o1)
    for c in cs2:
        with pytest.raises(CollectiveError, match="do not fit|disagree"):
            c.synchronize()
    for c in cs + cs2:
        c.close()


def test_hostile_collective_requests(two_daemons):
    """Garbage payloads, wrong argument counts and strided views: errors for that client only."""
    cs, hs = _ranks([0, 0])
    c = cs[0]
    x = _upload(c, torch.ones(8))[1]
    with c._lock:
        off = c._stage(b"\xff" * 40, 40)
        c._push(pack_sqe(Op.COLLECTIVE, hs[0], 0, 0, 0, payload_off=off, payload_len=40))
    with pytest.raises(InvalidArgument, match="malformed collective"):
        c.synchronize()
    c.collective(hs[0], "broadcast", x, x, root=5)  # root out of range
    with pytest.raises(InvalidArgument, match="root 5 out of range"):
        c.synchronize()
    y = _upload(cs[1], torch.ones(8))[1]
    strided = TensorRef(y.handle, torch.float32, (4,), (2,), 0)
    cs[1].collective(hs[1], "all_reduce", strided, strided)
    c.collective(hs[0], "all_reduce", x, x)
    with pytest.raises(CollectiveError, match="contiguous"):
        cs[1].synchronize()
    with pytest.raises(CollectiveError, match="contiguous"):
        c.synchronize()  # its partner's mistake fails it too
    nop = Client(0)
    nop.nop()  # the daemon serves everyone still
    for cl in cs + [nop]:
        cl.close()


def test_slow_rank_does_not_block_the_daemon_and_times_out(two_daemons):
    """A collective waiting for a rank that never comes: other clients are served meanwhile,
    and the waiting rank gets an error after the communicator's timeout (never a hang)."""
    cs, hs = _ranks([0, 0], timeout_s=2.0)
    x = _upload(cs[0], torch.ones(16))[1]
    cs[0].collective(hs[0], "all_reduce", x, x)
    other = Client(0)
    t0 = time.monotonic()
    for _ in range(20):
        other.nop()  # served while rank 0's collective waits
    served = time.monotonic() - t0
    with pytest.raises(CollectiveError, match="timed out.*rank\\(s\\) \\[1\\]"):
        cs[0].synchronize()
    waited = time.monotonic() - t0
    assert served < waited / 2, (served, waited)
    for c in cs + [other]:
        c.close()


def test_dead_peer_daemon_fails_the_collective(start_daemon):
    d0, d1 = start_daemon(device=0), start_daemon(device=1)  # its own: one of them dies
    cs, hs = _ranks([0, 1], timeout_s=600)
    x = _upload(cs[0], torch.ones(16))[1]
    y = _upload(cs[1], torch.ones(16))[1]
    for c, h, r in zip(cs, hs, (x, y)):
        c.collective(h, "all_reduce", r, r)
    cs[0].synchronize()  # the shared segment is set up
    cs[0].collective(hs[0], "all_reduce", x, x)  # rank 1 never arrives: its daemon dies
    time.sleep(0.2)
    t0 = time.monotonic()
    d1.stop(signal.SIGKILL)
    with pytest.raises(CollectiveError, match="daemon of another device"):
        cs[0].synchronize()
    assert time.monotonic() - t0 < 30
    cs[0].close()


# ------------------------------------------------------------------ torch.distributed programs
def _flexnpu_run(rdir: Path, nproc: int, mode: str, out: Path, timeout: float) -> None:
    cmd = [
        sys.executable,
        "-m",
        "flexnpu",
        "run",
        "--daemon",
        str(rdir),
        "--device",
        "0,1",
        "--",
        sys.executable,
        PROG,
        "launch",
        str(nproc),
        mode,
        str(out),
    ]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]


def _results(out: Path, ranks: list[int]) -> list[dict]:
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in ranks]
    for r in res:
        assert "crash" not in r, r["crash"]
    return res


def test_hccl_backend_matches_gloo(two_daemons, tmp_path):
    """4 ranks: every collective x dtype (x reduce op) on hccl equals gloo on the same inputs,
    byte-exact for integers, with all 4 ranks on one virtual device, spread over two, and as
    2-rank sub-groups both ways; a 2-way tensor-parallel block equals the single-process result;
    mismatched shapes are refused with a clear error."""
    _flexnpu_run(two_daemons[0].runtime_dir, 4, "check", tmp_path, 900)
    res = _results(tmp_path, [0, 1, 2, 3])
    for r in res:
        assert r["fails"] == [], r["fails"][:10]
    # ranks 0/1 ran four layouts, ranks 2/3 the two 4-rank ones; 8 dtypes each
    assert res[0]["counts"]["all_reduce"] == 4 * (4 * 5 + 4 * 7) and res[2]["counts"]["send_recv"] == 2 * 8
    assert res[0]["tp_ok"] and res[1]["tp_ok"]
    for r in res[:2]:
        assert (
            "ranks disagree" in r["mismatch"]
            and "10 x float32" in r["mismatch"]
            and "11 x float32" in r["mismatch"]
        )


def test_rank_killed_mid_collective(two_daemons, tmp_path):
    """3 ranks on devices 0, 1, 0 (init_process_group("cpu:gloo,npu:hccl")) loop on all_reduce;
    rank 2 is SIGKILLed: ranks 0 (same daemon) and 1 (other daemon) raise a CollectiveError naming
    it within seconds."""
    _flexnpu_run(two_daemons[0].runtime_dir, 3, "kill", tmp_path, 600)
    killed = json.loads((tmp_path / "killed.json").read_text())
    for r in _results(tmp_path, [0, 1]):
        assert "CollectiveError" in r["error"] and "rank 2" in r["error"] and "exited" in r["error"], r
        assert r["iterations"] > 0
        assert r["cpu_ok"] and r["npu_ok"], r  # "cpu:gloo,npu:hccl": cpu tensors go to gloo
        assert r["raised_at"] - killed["at"] < 10.0, r
