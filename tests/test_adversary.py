"""The continuous adversary (issue 9): a bystander does valid, checked work while an attacker on
the same daemon sends hostile records through its own shared memory. Hypothesis drives the
interleaving (stateful); after every run:

- the daemon is alive and still serves the bystander;
- every byte the bystander stored reads back exactly (and its launches' results match torch);
- the bystander is charged exactly its own allocations, nothing for the attacker's objects;
- the attacker's charges cover what the daemon holds for it (handles x HANDLE_COST within its
  host budget, device memory within its limit, all device memory charged to someone);
- nothing the attacker can read contains the bystander's data (each bystander block carries
  a marker the attacker's reads are searched for).

Index attacks on operators are covered by the operator tests (allow list, validators); here
launches use valid handles with adversarial shapes, strides, offsets and declared outputs.

Default: a few examples, well under a minute. `pytest --soak tests/test_adversary.py` runs
hundreds of longer ones.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from flexnpu import protocol as P
from flexnpu.client import Client
from flexnpu.daemon.objects import HANDLE_COST
from flexnpu.protocol import TensorRef

from _hostile import HEAD, TAIL, Raw
from conftest import DaemonProc

MARK = b"\xb7BYSTANDER-DATA\xb7"  # 16 bytes opening every 64-byte block the bystander stores
LIMIT = 64 << 20
HOST_LIMIT = 16 << 20
BARRIER_UD = 0xFEEDFACE_00000000
OPS = (
    "aten::add.Tensor",
    "aten::mul.Tensor",
    "aten::relu_.default",
    "aten::sum.default",
    "aten::mm.default",
    "aten::copy_.default",
    "aten::fill_.Scalar",
    "aten::cat.default",
    "aten::neg.default",
    "aten::clone.default",
)


def _marked(n: int, rng: random.Random) -> bytes:
    out = bytearray(rng.randbytes(n))
    for i in range(0, n - len(MARK) + 1, 64):
        out[i : i + len(MARK)] = MARK
    return bytes(out)


class _World:
    """One daemon per test (examples share it, as clients share a real daemon)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="flexnpu-adv-"))
        self.d = DaemonProc(
            self.dir,
            0,
            ["--backend", "cpu", "--memory-limit", str(LIMIT), "--client-host-memory", str(HOST_LIMIT)],
        )
        self.path = str(self.d.socket)

    def close(self) -> None:
        self.d.stop()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


WORLD: _World | None = None
SCRUBS: bool | None = None  # does the daemon scrub memory that changes owner? (probed)
LEAKS: list = []


def _daemon_scrubs(status: dict) -> bool:
    """Does the daemon say it scrubs memory that changes owner (issue 9 item 3, done on
    another branch)? Until it does, the attacker finding bystander bytes in *fresh*
    allocations is that known leak: reported as an expected failure (xfail) instead of hiding
    this suite's other findings. FLEXNPU_TEST_EXPECT_SCRUB=1 makes it a failure regardless."""
    if os.environ.get("FLEXNPU_TEST_EXPECT_SCRUB") == "1":
        return True
    return bool(status.get("scrub") or status.get("scrubs") or status.get("memory_scrub"))


class Adversary(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = WORLD
        self.rng = random.Random()
        self.by = Client(0, path=self.w.path)
        self.by_data: dict[int, bytes] = {}  # handle -> bytes it must hold
        self.by_bytes = 0
        self.by_stream = self.by.create_stream()
        self.att: Client | None = None
        self.raw: Raw | None = None
        self.att_handles: dict[int, int] = {}  # handle -> nbytes (its own, as far as it knows)
        self.att_new()

    # ------------------------------------------------------------------ attacker plumbing
    def att_new(self) -> None:
        if self.att is not None:
            self.att_close()
        self.att = Client(0, path=self.w.path, sq_entries=1024, cq_entries=1024, arena_bytes=4 << 20)
        self.raw = Raw(self.att)
        self.att_handles = {}

    def att_close(self) -> None:
        try:
            self.raw.close()
        finally:
            self.att.close()
            self.att = None

    def barrier(self) -> bool:
        """Drain the attacker's CQ up to a marker NOP, so its Client API can be used again.
        False if the daemon dropped it (then a fresh attacker replaces it)."""
        try:
            if not self.raw.push(P.pack_sqe(P.Op.NOP, user_data=BARRIER_UD, flags=P.FLAG_SYNC), 5):
                raise TimeoutError
            end = time.monotonic() + 20
            while time.monotonic() < end:
                r = self.att.seg.cq.pop()
                if r is None:
                    if not self.att.seg.cq.wait(0.05) and self.dropped():
                        raise ConnectionError
                    continue
                if P.CQE.unpack(r)[0] == BARRIER_UD:
                    return True
            raise TimeoutError
        except Exception:  # noqa: BLE001 - dropped, or it broke its own view of its ring: a new one
            self.att_new()
            return False

    def dropped(self) -> bool:
        ids = {c["client_id"] for c in self.w.d.status()["clients"]}
        return self.att.client_id not in ids

    def att_call(self, fn, *a, **kw):
        """A Client call of the attacker whose failure is its own business."""
        try:
            return fn(*a, **kw)
        except Exception:  # noqa: BLE001
            return None

    # ------------------------------------------------------------------ bystander
    @rule(n=st.integers(1, 64 << 10), seed=st.integers(0, 1 << 30))
    def bystander_store(self, n, seed):
        if self.by_bytes + n > LIMIT // 2:
            return
        h = self.by.malloc(n)
        data = _marked(n, random.Random(seed))
        self.by.memcpy_h2d(h, 0, data, stream=self.by_stream)
        self.by_data[h] = data
        self.by_bytes += n

    @rule(k=st.integers(1, 256), seed=st.integers(0, 1 << 30))
    def bystander_compute(self, k, seed):
        a = np.random.default_rng(seed).standard_normal(k, dtype=np.float32)
        ha = self.by.malloc(a.nbytes)
        self.by.memcpy_h2d(ha, 0, a.tobytes())
        ra = TensorRef(ha, torch.float32, (k,), (1,), 0)
        out = TensorRef(self.by.alloc_handle(), torch.float32, (k,), (1,), 0)
        self.by.launch("aten::mul.Tensor", (ra, ra), {}, [(a.nbytes, out)])
        self.by_data[ha] = a.tobytes()
        self.by_data[out.handle] = (a * a).tobytes()
        self.by_bytes += 2 * a.nbytes

    @rule()
    def bystander_check_some(self):
        if not self.by_data:
            return
        h = self.rng.choice(list(self.by_data))
        assert self.by.memcpy_d2h(h, 0, len(self.by_data[h])) == self.by_data[h]

    # ------------------------------------------------------------------ attacker
    @rule(
        recs=st.lists(
            st.tuples(
                st.sampled_from([int(o) for o in P.OPS] + [0, 5, 99, 0xFFFF]),
                st.integers(0, 3),
                st.lists(st.integers(0, (1 << 64) - 1), min_size=5, max_size=5),
                st.binary(max_size=256),
                st.integers(0, 2),
            ),
            min_size=1,
            max_size=40,
        )
    )
    def attacker_raw_records(self, recs):
        for op, flags, args, payload, sid_kind in recs:
            args = [a if self.rng.random() < 0.5 else a & 0xFFFF for a in args]
            if self.att_handles and self.rng.random() < 0.5:
                args[0] = self.rng.choice(list(self.att_handles))
            sid = (0, 1, self.rng.randrange(1 << 32))[sid_kind]
            off = self.raw.payload(payload) if payload else self.rng.randrange(1 << 32)
            rec = P.SQE.pack(op, flags, sid, self.rng.randrange(1 << 63), off, len(payload), *args)
            if not self.raw.push(rec, 2):
                break
        self.barrier()

    @rule(
        which=st.sampled_from(["sq_tail", "cq_head", "sq_head", "cq_tail"]),
        value=st.integers(0, (1 << 32) - 1),
        pending=st.integers(0, 40),
    )
    def attacker_corrupts_its_ring(self, which, value, pending):
        for i in range(pending):  # replies in flight while the index goes bad
            self.raw.push(P.pack_sqe(P.Op.NOP, user_data=i + 1, flags=P.FLAG_SYNC), 1)
        off = {
            "sq_tail": self.raw.sq_off + TAIL,
            "cq_head": self.raw.cq_off + HEAD,
            "sq_head": self.raw.sq_off + HEAD,
            "cq_tail": self.raw.cq_off + TAIL,
        }[which]
        self.raw.u32(off, value)
        self.bystander_check_some()  # the bystander keeps going meanwhile
        self.barrier()

    @rule(n=st.integers(0, 1 << 16), k=st.integers(1, 20))
    def attacker_frees_race_launches(self, n, k):
        a = self.att
        h = self.att_call(a.malloc, n)
        if h is None:
            return self.barrier()
        ref = TensorRef(h, torch.uint8, (n,), (1,), 0)
        for _ in range(k):
            out = TensorRef(a.alloc_handle(), torch.uint8, (n,), (1,), 0)
            self.att_call(a.launch, "aten::neg.default", (ref,), {}, [(n, out)])
            if self.rng.random() < 0.3:
                self.att_call(a.free, h)
            ref = out if self.rng.random() < 0.5 else ref
        self.att_call(a.free, h)
        self.att_call(a.synchronize)
        self.barrier()

    @rule(
        steps=st.lists(
            st.sampled_from(
                ["begin", "end", "record_sync", "record", "evsync", "launch", "replay", "destroy", "wait"]
            ),
            max_size=25,
        )
    )
    def attacker_abuses_events_and_graphs(self, steps):
        a = self.att
        s = self.att_call(a.create_stream) or 0
        ev = self.att_call(a.create_event) or 1
        h = self.att_call(a.malloc, 256)
        x = TensorRef(h or 1, torch.float32, (64,), (1,), 0)
        graphs = []
        for step in steps:
            if step == "begin":
                graphs.append(a.graph_begin_capture(s))
            elif step == "end" and graphs:
                self.att_call(a.graph_end_capture, graphs[-1], s)
            elif step == "record_sync":
                self.att_call(a._sync, P.Op.EVENT_RECORD, ev, stream=s)
            elif step == "record":
                self.att_call(a.record_event, ev, s)
            elif step == "evsync":
                self.raw.push(P.pack_sqe(P.Op.EVENT_SYNC, ev, user_data=7, flags=P.FLAG_SYNC), 1)
            elif step == "launch":
                self.att_call(a.launch, "aten::relu_.default", (x,), {}, [], stream=s)
            elif step == "replay" and graphs:
                self.att_call(a.graph_replay, self.rng.choice(graphs), s)
            elif step == "destroy" and graphs:
                self.att_call(a.graph_destroy, self.rng.choice(graphs))
            elif step == "wait":
                self.att_call(a.stream_wait_event, 0, ev)
        if self.barrier():
            for g in graphs:
                self.att_call(a.graph_end_capture, g, s)
            self.barrier()

    @rule(
        pids=st.lists(st.sampled_from(["bystander", "self", "daemon", "random", "dead"]), max_size=4),
        keys=st.lists(st.integers(0, (1 << 63) - 1), max_size=4),
    )
    def attacker_plays_ipc(self, pids, keys):
        a = self.att
        h = self.att_call(a.malloc, 4096)
        key = self.att_call(a.ipc_export, h) if h else None
        if key:
            choice = {
                "bystander": os.getpid(),
                "self": os.getpid(),
                "daemon": self.w.d.pid,
                "random": self.rng.randrange(1, 1 << 22),
                "dead": 0x3FFFFFFF,
            }
            self.att_call(a.ipc_set_pids, key, [choice[p] for p in pids])
            self.att_call(a.ipc_import, key)
            self.att_call(a.free, h)
            self.att_call(a.ipc_import, key)
        for k in keys:
            self.att_call(a.ipc_import, k)
        self.barrier()

    @rule(
        op=st.sampled_from(OPS),
        shape=st.lists(st.sampled_from([0, 1, 3, 64, 1 << 31, (1 << 62)]), max_size=3),
        stride=st.lists(st.sampled_from([0, 1, -1, 7, 1 << 40, -(1 << 40)]), max_size=3),
        offset=st.sampled_from([0, 1, 255, -1, 1 << 60]),
        declared=st.sampled_from([0, 1, 64, 1 << 20]),
    )
    def attacker_launches_with_adversarial_layouts(self, op, shape, stride, offset, declared):
        a = self.att
        h = self.att_call(a.malloc, 1024)
        if h is None:
            return self.barrier()
        n = min(len(shape), len(stride))
        x = TensorRef(h, torch.float32, tuple(shape[:n]), tuple(stride[:n]), offset)
        y = TensorRef(h, torch.float32, (16, 16), (16, 1), 0)
        out = TensorRef(a.alloc_handle(), torch.float32, tuple(shape[:n]), tuple(stride[:n]), 0)
        args = {
            "aten::mm.default": (x, y),
            "aten::cat.default": ([x, y],),
            "aten::fill_.Scalar": (x, 1.5),
            "aten::copy_.default": (y, x),
        }.get(op, (x, x) if op in ("aten::add.Tensor", "aten::mul.Tensor") else (x,))
        outs = [] if op.endswith("_.default") or op.endswith("_.Scalar") else [(declared, out)]
        self.att_call(a.launch, op, args, {}, outs)
        if outs:
            self.att_handles[out.handle] = declared
        self.att_handles[h] = 1024
        self.att_call(a.synchronize)
        self.barrier()

    @rule()
    def attacker_reads_what_it_can(self):
        a = self.att
        for _ in range(3):
            n = self.rng.choice([1, 64, 4096, 1 << 16])
            h = self.att_call(a.malloc, n)
            if h is None:
                continue
            self.att_handles[h] = n
        for h, n in list(self.att_handles.items())[:20]:
            got = self.att_call(a.memcpy_d2h, h, 0, n) if 0 < n <= (1 << 20) else None
            if got is not None and MARK in bytes(got):
                LEAKS.append((h, n))
                assert SCRUBS is False, "the attacker read the bystander's data"
        self.barrier()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def daemon_alive(self):
        assert self.w.d.proc.poll() is None, self.w.d.log_text()[-3000:]

    def teardown(self):
        try:
            self.final_checks()
        finally:
            if self.att is not None:
                self.att_close()
            self.by.close()

    def final_checks(self):
        self.daemon_alive()
        self.by.synchronize()
        for h, data in self.by_data.items():
            assert self.by.memcpy_d2h(h, 0, len(data)) == data, f"bystander handle {h} changed"
        stats = self.by.memory_stats()
        assert stats["allocated"] == self.by_bytes, "the bystander was charged for others' objects"
        assert stats["host_bytes"] == HANDLE_COST * len(self.by_data)
        if self.barrier():
            self.attacker_reads_what_it_can()
        st_ = self.w.d.status()
        clients = {c["client_id"]: c for c in st_["clients"]}
        att = clients.get(self.att.client_id)
        if att is not None:
            assert att["host_bytes"] >= HANDLE_COST * att["handles"]
            assert att["host_bytes"] <= HOST_LIMIT
            assert att["memory_bytes"] <= LIMIT
        assert sum(c["memory_bytes"] for c in clients.values()) <= st_["device_memory_used"]
        # the bystander scrubs what it stored before letting it go (scrubbing freed blocks is
        # the daemon's job too, issue 9 item 3; this keeps the check about live data)
        for h, data in self.by_data.items():
            self.by.memset(h, 0, 0, len(data))
            self.by.free(h)
        self.by.synchronize()
        assert self.by.memory_stats()["allocated"] == 0


def test_adversary(request):
    global WORLD
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(
        900 if request.config.getoption("--soak") else 150, file=sys.stderr
    )  # where it hangs, if it ever does
    soak = request.config.getoption("--soak")
    WORLD = _World()
    try:
        global SCRUBS
        SCRUBS = _daemon_scrubs(WORLD.d.status())
        LEAKS.clear()
        run_state_machine_as_test(
            Adversary,
            settings=settings(
                max_examples=300 if soak else 6,
                stateful_step_count=60 if soak else 12,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=not soak,
                print_blob=True,
            ),
        )
        assert WORLD.d.proc.poll() is None
        c = Client(0, path=WORLD.path)  # still serving a newcomer
        c.nop()
        c.close()
        if LEAKS:
            pytest.xfail(
                f"the attacker read bystander bytes in {len(LEAKS)} fresh allocations: the "
                f"daemon does not scrub memory that changes owner yet (issue 9 item 3)"
            )
    finally:
        faulthandler.cancel_dump_traceback_later()
        WORLD.close()
        WORLD = None
