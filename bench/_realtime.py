"""Real-time serving comparison: engines as real client processes on real FlexNPU daemons.

Each device is a daemon with the emulated backend (`--backend emu:<spec>`, shape-only), so every
kernel takes, in real time, what the cost model predicts (EMULATED figures, not hardware). The
engines are real processes that attach with flexnpu.client and issue aten launches; the
scheduling is done by the daemon's policy, the batching by flexnpu.sched.sim.BatchEngine (the
same engine logic as the virtual-time simulator).

Systems (same seeded requests, same number N >= 2 of emulated devices of the same spec, one daemon
per device; a router in the parent dispatches each arrival in real time to the least-loaded target,
load = prompt tokens still waiting for a first token + 64 per outstanding request, the simulator's
rule):
- static-coloc: N engine replicas, one per device, each doing prefill and decode (vLLM-V1-style
  continuous batching, chunked prefill with a 2048-token budget), one stream, policy fifo.
- flexnpu: on every device a prefill-instance process (phase prefill, chunks of
  ServingConfig.flex_prefill_chunk tokens, 1024 by default) and a
  decode-instance process (phase decode) under `--policy flex`. The prefill process allocates the
  weights and the KV-cache pool and exports them; the decode process imports them (zero-copy:
  the daemon charges the pool once, the importer's own allocations stay small, both numbers are
  reported per device). A request is handed over by id to the decode instance on the same device;
  no KV bytes move. The router balances whole devices.
- static-partition: the same prefill and decode instances on every device as flexnpu (same
  zero-copy hand-off), under the daemon's `--policy partition:ALPHA`: prefill-phase streams on a
  fixed ALPHA of the device's cores and decode streams on 1 - ALPHA (the backend's partition
  capability; emu: a hard compute cap), fifo within each. The caller searches ALPHA.
- naive-coloc: the same two instances per device under `--policy fifo`: no partition, no
  ordering (what two processes on one device get without a virtualization layer).
- static-disagg: p prefill devices and N-p decode devices, one engine each (prefill 8192-token
  batches); the caller runs every split p = 1..N-1 and compares the best. The KV of each prompt
  moves device->host->device: a device-to-host copy on the prefill device and a host-to-device
  copy on the decode device (chosen by the router: fewest outstanding requests), each charged by
  the emulator at the spec's link bandwidth (910B: 196 GB/s x 0.8 = 156.8 GB/s), generous to this
  baseline. In shape-only mode the host bytes are zeros, so they are not shipped between the two
  processes. Both legs run on the engine's compute stream (serial with its iterations): for
  Qwen2.5-7B, 57 KiB/token, a 1k-token prompt costs ~0.4 ms per leg.

Kernel granularity (so Python overhead stays small next to emulated kernel time): the model's
layers are cut into `groups` groups; per group one aten::mm carrying all projections of those
layers (x[T, hidden] @ W[hidden, layers*65024]: same FLOPs and weight bytes as QKV, O, gate/up,
down) and one aten::scaled_dot_product_attention per prefill chunk and one for the decode batch
(GQA, heads x layers), then the LM head mm. Norms, RoPE and residual adds are left out (<2% of
the time). An iteration ends with a stream synchronisation, which the flex policy uses as the
iteration boundary for its TPOT control.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from flexnpu.sched.systems import System
from flexnpu.daemon_process import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
BF_ITEMSIZE = 2


# ---------------------------------------------------------------- daemons


def Daemon(runtime_dir: Path, device: int, backend: str, policy: str, tpot_ms: float) -> DaemonProcess:
    """An emulated-device daemon, started without waiting (call wait_ready())."""
    return DaemonProcess(
        device,
        runtime_dir,
        [
            "--backend",
            backend,
            "--policy",
            policy,
            "--tpot-budget-ms",
            str(tpot_ms),
            "--log-level",
            "warning",
        ],
        detach=False,
        start_timeout=None,
    )


# ---------------------------------------------------------------- the engine process


def _ref(h: int, shape: tuple, offset: int = 0):
    import torch

    from flexnpu.protocol import TensorRef

    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return TensorRef(h, torch.bfloat16, tuple(shape), tuple(reversed(stride)), offset)


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Device:
    """An engine's view of its device: weights, KV pool, scratch, and the per-step launches."""

    def __init__(
        self, c: Any, model: Any, groups: int, max_tokens: int, kv_tokens: int, shared: dict | None = None
    ) -> None:
        self.c, self.m = c, model
        self.groups = max(1, min(groups, model.n_layers))
        L, H = model.n_layers, model.hidden
        self.layers = [(g + 1) * L // self.groups - g * L // self.groups for g in range(self.groups)]
        self.cols = (
            (model.n_heads + 2 * model.n_kv_heads) * model.head_dim
            + model.n_heads * model.head_dim
            + 3 * model.intermediate
        )
        lmax = max(self.layers)
        self.kv_bytes = kv_tokens * model.kv_bytes_per_token
        if shared is None:  # owner: weights and KV pool live here
            self.w = [c.malloc(H * n * self.cols * BF_ITEMSIZE) for n in self.layers]
            self.head = c.malloc(H * model.vocab * BF_ITEMSIZE)
            self.kv = c.malloc(int(self.kv_bytes))
        else:  # importer: the same allocations, by exported key
            self.w = [c.ipc_import(k)[0] for k in shared["w"]]
            self.head = c.ipc_import(shared["head"])[0]
            self.kv, n = c.ipc_import(shared["kv"])
            assert n == int(self.kv_bytes), "imported KV pool has another size"
        self.x = c.malloc(max_tokens * H * BF_ITEMSIZE)
        self.q = c.malloc(max_tokens * model.n_heads * model.head_dim * lmax * BF_ITEMSIZE)
        self.max_tokens = max_tokens

    def export(self, pids: list[int]) -> dict:
        keys = {
            "w": [self.c.ipc_export(h) for h in self.w],
            "head": self.c.ipc_export(self.head),
            "kv": self.c.ipc_export(self.kv),
        }
        for k in keys["w"] + [keys["head"], keys["kv"]]:
            self.c.ipc_set_pids(k, pids)
        return keys

    def _launch(self, op: str, args: tuple, kwargs: dict, out_shape: tuple) -> None:
        o = self.c.alloc_handle()
        self.c.launch(op, args, kwargs, [(_numel(out_shape) * BF_ITEMSIZE, _ref(o, out_shape))])
        self.c.free(o)  # stream-ordered: the queued launch keeps its output alive

    def _attn(self, lg: int, b: int, q_len: int, kv_len: int, causal: bool) -> None:
        m = self.m
        qs = (b, m.n_heads * lg, q_len, m.head_dim)
        ks = (b, m.n_kv_heads * lg, kv_len, m.head_dim)
        if _numel(ks) * BF_ITEMSIZE > self.kv_bytes:
            ks = (
                b,
                m.n_kv_heads * lg,
                max(1, int(self.kv_bytes // (BF_ITEMSIZE * b * m.n_kv_heads * lg * m.head_dim))),
                m.head_dim,
            )
        k = _ref(self.kv, ks)
        self._launch(
            "aten::scaled_dot_product_attention",
            (_ref(self.q, qs), k, k, None, 0.0, causal),
            {"enable_gqa": True},
            qs,
        )

    def step(self, chunks: list[tuple[int, int]], decode_ctx: list[int], logits_rows: int) -> None:
        """Launch one iteration: chunks = (tokens, tokens cached before), decodes by context."""
        tokens = sum(n for n, _ in chunks) + len(decode_ctx)
        H = self.m.hidden
        for g, lg in enumerate(self.layers):
            n = lg * self.cols
            self._launch("aten::mm", (_ref(self.x, (tokens, H)), _ref(self.w[g], (H, n))), {}, (tokens, n))
            for q, before in chunks:
                self._attn(lg, 1, q, before + q, True)
            if decode_ctx:
                mean = max(1, round(sum(decode_ctx) / len(decode_ctx)))
                self._attn(lg, len(decode_ctx), 1, mean, False)
        rows = max(1, logits_rows)
        self._launch(
            "aten::mm",
            (_ref(self.x, (rows, H)), _ref(self.head, (H, self.m.vocab))),
            {},
            (rows, self.m.vocab),
        )
        self.c.mark_step(0)  # the flex policy's iteration clock (the sync alone would do too)
        self.c.synchronize(0)


def engine_main(cfg: dict, qs: dict, events: Any, ready: Any, go: Any) -> None:
    """One engine process. role: coloc | prefill | decode.

    qs["inbox"]: requests from the router (new prompts, or prefilled ones for a decode engine);
    None means stop. qs["peer"] (flexnpu prefill only): the inbox of the decode instance on the same
    device. qs["keys"]/qs["pid"] (flexnpu only): the export of weights and KV pool to that decode
    instance. events: ("first"|"done", engine, request id, seconds since t0), ("handoff", engine,
    message) from a static-disagg prefill engine, ("info", engine, dict) once at the end and
    ("error", engine, text) on failure; the router (parent) reads them."""
    inbox, peer = qs["inbox"], qs.get("peer")
    idx = cfg["engine"]
    os.environ["FLEXNPU_RUNTIME_DIR"] = cfg["runtime_dir"]
    from flexnpu.client import Client
    from flexnpu.sched.models import MODELS
    from flexnpu.sched.sim import BatchEngine, KVPool
    from flexnpu.sched.workload import Request

    role = cfg["role"]
    model = MODELS[cfg["model"]]
    info: dict[str, Any] = {"role": role, "device": cfg["device"], "pid": os.getpid()}
    c = None
    try:
        c = Client(cfg["device"], phase={"coloc": "auto"}.get(role, role), arena_bytes=96 << 20)
        shared = None
        if "keys" in qs and role == "decode":
            qs["pid"].put(os.getpid())
            shared = qs["keys"].get(timeout=60)  # exported by the prefill instance
        dev = Device(
            c,
            model,
            cfg["groups"],
            cfg["budget"] if role != "decode" else cfg["max_seqs"],
            cfg["kv_tokens"],
            shared,
        )
        if "keys" in qs and role == "prefill":
            qs["keys"].put(dev.export([qs["pid"].get(timeout=60)]))
        # warm-up: the daemon's first meta inference of each op kind is slow (torch start-up)
        dev.step([(16, 0)], [64], 2)
        info["allocated_bytes"] = c.memory_stats()["allocated"]
        info["kv_pool_bytes"] = int(dev.kv_bytes)
        pool = KVPool(cfg["kv_tokens"])
        eng = BatchEngine(
            model,
            pool,
            role != "decode",
            role != "prefill",
            cfg["budget"],
            cfg["max_seqs"],
            reserve_output=role != "prefill",
        )
        handed: list[Request] = []
        eng.on_finished = lambda r, now: events.put(("done", idx, r.id, now))
        eng.on_prefilled = lambda r, now: handed.append(r)
        host = c.host_alloc(32 << 20) if cfg.get("kv_link") else None
        ready.put(idx)
        t0 = go.get(timeout=120)
        stop = False
        while not (stop and not eng.has_work()):
            try:  # an idle engine sleeps on its inbox: no polling next to the emulated devices
                m = inbox.get_nowait() if eng.has_work() else inbox.get(timeout=0.05)
                while True:
                    if m is None:
                        stop = True
                    else:
                        r = Request(*m["req"])
                        if "first_token" in m:  # prefilled elsewhere: decode from token 2
                            r.prefilled, r.generated, r.first_token = r.prompt, 1, m["first_token"]
                            if cfg.get("kv_link"):
                                _move_kv(c, dev, host, r.prompt * model.kv_bytes_per_token, to_device=True)
                        eng.add(r)
                    m = inbox.get_nowait()
            except queue.Empty:
                pass
            if time.monotonic() - t0 > cfg["deadline_s"]:
                info["timed_out"] = True
                break
            p = eng.plan()
            if p is None:
                if eng.has_work():  # nothing admissible (KV pool full): wait for the next message
                    time.sleep(0.001)
                continue
            fin = sum(1 for r, n in p.chunks if r.prefilled + n >= r.prompt)
            dev.step(
                [(n, r.prefilled) for r, n in p.chunks], [r.context for r in p.decodes], len(p.decodes) + fin
            )
            now = time.monotonic() - t0
            first = [r for r, n in p.chunks if r.prefilled + n >= r.prompt]
            eng.finish(p, now)
            for r in first:
                events.put(("first", idx, r.id, now))
                if r.finish is not None:  # a one-token answer ends at its prefill
                    events.put(("done", idx, r.id, now))
            for r in handed:
                pool.release(r.prompt)  # the prompt's KV leaves this engine
                msg = {"req": (r.id, r.arrival, r.prompt, r.output), "first_token": r.first_token}
                if cfg.get("kv_link"):  # static-disagg: out over the link, the router picks the decoder
                    _move_kv(c, dev, host, r.prompt * model.kv_bytes_per_token, to_device=False)
                    events.put(("handoff", idx, msg))
                else:  # flexnpu: same device, KV stays where it is
                    peer.put(msg)
            handed.clear()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the run
        import traceback

        info["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        events.put(("error", idx, info["error"]))
        try:
            ready.put(idx)
        except Exception:  # noqa: BLE001
            pass
    finally:
        events.put(("info", idx, info))
        if c is not None:
            c.close()


def _move_kv(c: Any, dev: Device, host: int, nbytes: int, to_device: bool) -> None:
    """One leg of a KV transfer through a host buffer, charged by the emulated device."""
    chunk = 32 << 20
    pos = 0
    while pos < nbytes:
        n = min(chunk, nbytes - pos)
        off = pos % max(1, int(dev.kv_bytes) - chunk)
        if to_device:
            c.memcpy_h2d_host(dev.kv, off, host, n, sync=False)
        else:
            c.memcpy_d2h_host(dev.kv, off, host, n, sync=False)
        pos += n
    c.synchronize(0)


# ---------------------------------------------------------------- the router


class Router:
    """Least-loaded dispatch, run by the parent in real time.

    Load of a target = prompt tokens of its requests still waiting for their first token + 64 per
    outstanding request: the simulator's BatchEngine.load() (outstanding work in tokens), but
    counted from what the router sent and the engines' first-token/finish events, as a real router
    (vLLM/SGLang-style least-outstanding) does without looking inside the engines. Targets are
    devices for static-coloc and flexnpu (prefill + decode instance together), prefill engines for
    static-disagg's new prompts and decode engines for its prefilled requests."""

    def __init__(self, entry: list[list[int]], decoders: list[int], prompts: dict[int, int]) -> None:
        self.entry = entry  # per target: engines; a request enters at the first one
        self.decoders = decoders  # static-disagg decode engines (hand-off targets)
        self.prompts = prompts
        self.target_of: dict[int, int] = {}  # engine -> its entry target
        for t, engines in enumerate(entry):
            for e in engines:
                self.target_of[e] = t
        self.out: dict[int, set[int]] = {t: set() for t in range(len(entry))}
        self.waiting_first: dict[int, set[int]] = {t: set() for t in range(len(entry))}
        self.dec_out: dict[int, set[int]] = {e: set() for e in decoders}
        self.decoder_of: dict[int, int] = {}

    def _load(self, t: int) -> int:
        return sum(self.prompts[r] for r in self.waiting_first[t]) + 64 * len(self.out[t])

    def pick_entry(self, rid: int) -> int:
        t = min(range(len(self.entry)), key=lambda t: (self._load(t), t))
        self.out[t].add(rid)
        self.waiting_first[t].add(rid)
        return self.entry[t][0]

    def pick_decoder(self, rid: int) -> int:
        e = min(self.decoders, key=lambda e: (len(self.dec_out[e]), e))
        self.dec_out[e].add(rid)
        self.decoder_of[rid] = e
        return e

    def first(self, engine: int, rid: int) -> None:
        t = self.target_of.get(engine)
        if t is not None:
            self.waiting_first[t].discard(rid)
            if self.decoders:  # static-disagg: the prefill engine is done with it
                self.out[t].discard(rid)

    def done(self, engine: int, rid: int) -> None:
        for t in self.out:
            self.out[t].discard(rid)
            self.waiting_first[t].discard(rid)
        if rid in self.decoder_of:
            self.dec_out[self.decoder_of[rid]].discard(rid)


# ---------------------------------------------------------------- one system run

COLOCATED = tuple(
    s for s in System if s.colocated and s != System.FLEXNPU_TPOT
)  # P + D per device; tpot: simulator only


def daemon_policy(system: str, alpha: float = 0.5) -> str:
    """The daemon --policy a system runs under."""
    return {System.FLEXNPU: "flex", System.STATIC_PARTITION: f"partition:{alpha}"}.get(system, "fifo")


def plan_engines(
    system: str, n_devices: int, n_prefill: int
) -> tuple[list[dict], list[list[int]], list[int]]:
    """Engines of a system on n_devices: [{role, device}], the router's entry targets, decoders."""
    if system == System.STATIC_COLOC:
        engines = [{"role": "coloc", "device": d} for d in range(n_devices)]
        return engines, [[d] for d in range(n_devices)], []
    if system in COLOCATED:
        engines = [{"role": r, "device": d} for d in range(n_devices) for r in ("prefill", "decode")]
        return engines, [[2 * d, 2 * d + 1] for d in range(n_devices)], []
    if system == System.STATIC_DISAGG:
        if not 0 < n_prefill < n_devices:
            raise ValueError(f"static-disagg needs 0 < prefill devices < {n_devices}, not {n_prefill}")
        engines = [{"role": "prefill" if d < n_prefill else "decode", "device": d} for d in range(n_devices)]
        return engines, [[d] for d in range(n_prefill)], list(range(n_prefill, n_devices))
    raise ValueError(f"unknown system {system!r}")


class DaemonSet:
    """N emulated-device daemons with one policy, in their own runtime directory.

    Started once and reused by every run that wants that policy: a daemon is a long-lived service,
    and its one-off start-up (torch import, first meta inference of each op, ~3 s per daemon on 2
    busy cores) would otherwise be most of a --quick run. Engines attach fresh per run and warm up
    before the clock starts, so a reused daemon measures the same as a new one (all memory is freed
    at detach; the emulated device is idle between runs)."""

    def __init__(
        self, n_devices: int, spec_name: str, policy: str, tpot_ms: float, backend: str | None = None
    ) -> None:
        self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"flexnpu-rt-{policy}-"))
        self.policy = policy
        self.daemons: list[Daemon] = []
        try:
            # backend: emu:<spec> by default; `cuda` (or npu) runs the same engines on real kernels
            self.daemons = [
                Daemon(self.runtime_dir, d, backend or f"emu:{spec_name}", policy, tpot_ms)
                for d in range(n_devices)
            ]
            for dp in self.daemons:
                dp.wait_ready(120)  # torch start-up on a busy shared host can take a minute
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def run_system(
    system: str,
    model_name: str,
    spec_name: str,
    requests: list,
    cfg: Any,
    slo: dict,
    groups: int,
    kv_tokens: int,
    deadline_s: float,
    n_devices: int = 2,
    n_prefill: int = 0,
    daemons: DaemonSet | None = None,
    alpha: float = 0.5,
) -> dict:
    """Run one system on n_devices emulated devices (one daemon each) over `requests`; metrics dict.
    `daemons`: a started DaemonSet of the system's policy (``daemon_policy``) to reuse; without it
    the run starts and stops its own. `alpha`: static-partition's prefill core share."""
    from flexnpu.sched.sim import metrics
    from flexnpu.sched.workload import Request

    if n_devices < 2 and system == System.STATIC_DISAGG:
        raise ValueError("static-disagg needs at least 2 devices (a prefill and a decode device)")
    engines, entry, decoders = plan_engines(system, n_devices, n_prefill)
    policy = daemon_policy(system, alpha)
    if daemons is not None and (daemons.policy != policy or len(daemons.daemons) != n_devices):
        raise ValueError(f"{system} needs {n_devices} daemons with policy {policy}")
    ctx = mp.get_context("fork")
    own = daemons is None
    procs = []
    infos: dict[int, dict] = {}
    times: dict[int, list] = {r.id: [None, None] for r in requests}
    try:
        if own:
            daemons = DaemonSet(n_devices, spec_name, policy, slo["tpot"] * 1e3)
        assert daemons is not None
        rd = daemons.runtime_dir
        base = {
            "runtime_dir": str(rd),
            "model": model_name,
            "groups": groups,
            "kv_tokens": kv_tokens,
            "max_seqs": cfg.max_seqs,
            "deadline_s": deadline_s,
        }
        budget = {
            System.STATIC_COLOC: {"coloc": cfg.max_batched_tokens},
            System.STATIC_DISAGG: {"prefill": cfg.prefill_budget, "decode": cfg.max_seqs},
        }.get(system, {"prefill": cfg.flex_prefill_chunk, "decode": cfg.max_seqs})
        events, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue()
        inboxes = [ctx.Queue() for _ in engines]
        qss: list[dict] = [{"inbox": inboxes[i]} for i in range(len(engines))]
        if system in COLOCATED:
            for d in range(n_devices):
                keys, pid = ctx.Queue(), ctx.Queue()
                qss[2 * d].update(keys=keys, pid=pid, peer=inboxes[2 * d + 1])
                qss[2 * d + 1].update(keys=keys, pid=pid)
        for i, e in enumerate(engines):
            ecfg = dict(
                base,
                engine=i,
                role=e["role"],
                device=e["device"],
                budget=budget[e["role"]],
                kv_link=system == System.STATIC_DISAGG,
            )
            pr = ctx.Process(target=engine_main, args=(ecfg, qss[i], events, ready, go), daemon=True)
            pr.start()
            procs.append(pr)
        for _ in engines:
            ready.get(timeout=120)
        t0 = time.monotonic() + 0.2
        for _ in engines:
            go.put(t0)
        router = Router(entry, decoders, {r.id: r.prompt for r in requests})
        _route(router, requests, inboxes, events, infos, times, procs, t0, deadline_s)
        for q in inboxes:
            q.put(None)
        end = time.monotonic() + 30
        while len(infos) < len(engines) and time.monotonic() < end:
            try:
                ev = events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if ev[0] == "info":
                infos[ev[1]] = ev[2]
        status = [d.status() for d in daemons.daemons]
    finally:
        for pr in procs:
            pr.join(10)
            if pr.is_alive():
                pr.kill()
        if own and daemons is not None:
            daemons.stop()
    errs = [i["error"] for i in infos.values() if "error" in i]
    if errs:
        raise RuntimeError(f"{system}: engine failed: {errs[0]}")
    if any(i.get("timed_out") for i in infos.values()):
        raise RuntimeError(f"{system}: engines did not finish within {deadline_s} s")
    out = []
    for r in requests:
        rr = Request(r.id, r.arrival, r.prompt, r.output)
        rr.first_token, rr.finish = times[r.id]
        out.append(rr)
    missing = sum(1 for r in out if r.finish is None or r.first_token is None)
    if missing:
        raise RuntimeError(f"{system}: {missing} of {len(out)} requests never finished")
    m = metrics(out, slo["ttft"], slo["tpot"])
    m["system"] = system
    m["dispatch"] = "least-loaded"
    if system == System.STATIC_PARTITION:
        m["alpha"] = alpha
    if system in COLOCATED:
        per_dev = []
        for d in range(n_devices):
            pre_i, dec_i = infos[2 * d], infos[2 * d + 1]
            per_dev.append(
                {
                    "device": d,
                    "zero_copy": dec_i["allocated_bytes"] < pre_i["kv_pool_bytes"],
                    "kv_pool_bytes": pre_i["kv_pool_bytes"],
                    "exporter_allocated_bytes": pre_i["allocated_bytes"],
                    "importer_allocated_bytes": dec_i["allocated_bytes"],
                }
            )
        m["kv_handoff"] = {
            "zero_copy": all(p["zero_copy"] for p in per_dev),
            "kv_pool_bytes": per_dev[0]["kv_pool_bytes"],
            "importer_allocated_bytes": max(p["importer_allocated_bytes"] for p in per_dev),
            "per_device": per_dev,
        }
    if system == System.STATIC_DISAGG:
        from flexnpu.sched.specs import get_spec

        s = get_spec(spec_name)
        m["kv_link_gb_s"] = round(s.link_bw * s.link_eff / 1e9, 1)
        m["prefill_devices"], m["decode_devices"] = n_prefill, n_devices - n_prefill
    m["engines"] = [f"{e['role']}@{e['device']}" for e in engines]
    m["daemon_policies"] = [st["policy"] for st in status]
    return m


def _route(
    router: Router,
    requests: list,
    inboxes: list,
    events: Any,
    infos: dict,
    times: dict,
    procs: list,
    t0: float,
    deadline_s: float,
) -> None:
    """Dispatch arrivals at their times and hand-offs as they come, until every request finished."""
    reqs = sorted(requests, key=lambda r: r.arrival)
    i = finished = 0
    while finished < len(reqs):
        now = time.monotonic() - t0
        while i < len(reqs) and reqs[i].arrival <= now:
            r = reqs[i]
            inboxes[router.pick_entry(r.id)].put({"req": (r.id, r.arrival, r.prompt, r.output)})
            i += 1
        if now > deadline_s:
            raise RuntimeError(f"{len(reqs) - finished} requests unfinished after {deadline_s} s")
        wait = (reqs[i].arrival - now) if i < len(reqs) else 0.5
        try:
            ev = events.get(timeout=min(0.5, max(0.0002, wait)))
        except queue.Empty:
            dead = [p.pid for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"engine processes {dead} exited early")
            continue
        kind, eng = ev[0], ev[1]
        if kind == "first":
            times[ev[2]][0] = ev[3]
            router.first(eng, ev[2])
        elif kind == "done":
            times[ev[2]][1] = ev[3]
            router.done(eng, ev[2])
            finished += 1
        elif kind == "handoff":
            rid = ev[2]["req"][0]
            times[rid][0] = ev[2]["first_token"]
            inboxes[router.pick_decoder(rid)].put(ev[2])
        elif kind == "info":
            infos[eng] = ev[2]
            if "error" in ev[2]:
                raise RuntimeError(f"engine {eng} failed: {ev[2]['error']}")
        elif kind == "error":
            raise RuntimeError(f"engine {eng} failed: {ev[2]}")


def best_split(runs: list[dict], attainment: float = 0.9) -> int:
    """static-disagg's split to compare: highest throughput among its runs at >= `attainment` SLO
    attainment (best over rates), ties to the lower TTFT p50; the simulated mode's rule."""
    splits = sorted({r["prefill_devices"] for r in runs if r["system"] == System.STATIC_DISAGG})

    def key(p: int) -> tuple:
        rs = [r for r in runs if r.get("prefill_devices") == p and r["system"] == System.STATIC_DISAGG]
        ok = [r["throughput_tok_s"] for r in rs if r["slo_attainment"] >= attainment]
        return (max(ok) if ok else 0.0, -sum(r["ttft_p50_ms"] for r in rs))

    return max(splits, key=key)


def best_alpha(runs: list[dict], attainment: float = 0.9) -> float | None:
    """static-partition's alpha to compare, by best_split's rule."""
    alphas = sorted({r["alpha"] for r in runs if r["system"] == System.STATIC_PARTITION})
    if not alphas:
        return None

    def key(a: float) -> tuple:
        rs = [r for r in runs if r["system"] == System.STATIC_PARTITION and r["alpha"] == a]
        ok = [r["throughput_tok_s"] for r in rs if r["slo_attainment"] >= attainment]
        return (max(ok) if ok else 0.0, -sum(r["ttft_p50_ms"] for r in rs))

    return max(alphas, key=key)
