"""Real-time serving comparison: engines as real client processes on real FlexNPU daemons.

Each device is a daemon with the emulated backend (`--backend emu:<spec>`, shape-only), so every
kernel takes, in real time, what the cost model predicts (EMULATED figures, not hardware). The
engines are real processes that attach with flexnpu.client and issue aten launches; the
scheduling is done by the daemon's policy, the batching by flexnpu.sched.sim.BatchEngine (the
same engine logic as the virtual-time simulator).

Systems (same requests, same emulated devices of the same spec):
- static-coloc: one engine process on one device doing prefill and decode (vLLM-V1-style
  continuous batching, chunked prefill with a 2048-token budget), one stream, policy fifo.
- flexnpu: a prefill-instance process (phase prefill, 2048-token chunks) and a decode-instance
  process (phase decode) on one device with `--policy flex`. The prefill process allocates the
  weights and the KV-cache pool and exports them; the decode process imports them (zero-copy:
  the daemon charges the pool once, the importer's own allocations stay small, both numbers
  are reported). A request is handed over by id; no KV bytes move.
- static-disagg: two daemons (two emulated devices); prefill process on one (8192-token
  batches), decode process on the other (no co-location: half the devices each). The KV of each
  prompt moves device->host->device: a device-to-host copy on the prefill device and a
  host-to-device copy on the decode device, each charged by the emulator at the spec's link
  bandwidth (910B: 196 GB/s x 0.8), generous to this baseline. In shape-only mode the host bytes
  are zeros, so they are not shipped between the two processes.

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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BF_ITEMSIZE = 2


# ---------------------------------------------------------------- daemons

class Daemon:
    def __init__(self, runtime_dir: Path, device: int, backend: str, policy: str, tpot_ms: float) -> None:
        self.sock = runtime_dir / f"npu{device}.sock"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   FLEXNPU_RUNTIME_DIR=str(runtime_dir))
        self.log = open(runtime_dir / f"daemon{device}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "flexnpu", "daemon", "--device", str(device),
                                      "--backend", backend, "--policy", policy, "--tpot-budget-ms", str(tpot_ms),
                                      "--runtime-dir", str(runtime_dir), "--log-level", "warning"],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.runtime_dir, self.device = runtime_dir, device

    def wait_ready(self) -> "Daemon":
        runtime_dir, device = self.runtime_dir, self.device
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulated daemon did not start: {(runtime_dir / f'daemon{device}.log').read_text()}")
            time.sleep(0.02)
        return self

    def status(self) -> dict:
        from flexnpu.daemon.control import query

        return query(str(self.sock), {"op": "status"})["daemon"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


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

    def __init__(self, c: Any, model: Any, groups: int, max_tokens: int, kv_tokens: int,
                 shared: dict | None = None) -> None:
        self.c, self.m = c, model
        self.groups = max(1, min(groups, model.n_layers))
        L, H = model.n_layers, model.hidden
        self.layers = [(g + 1) * L // self.groups - g * L // self.groups for g in range(self.groups)]
        self.cols = (model.n_heads + 2 * model.n_kv_heads) * model.head_dim + model.n_heads * model.head_dim \
            + 3 * model.intermediate
        lmax = max(self.layers)
        self.kv_bytes = kv_tokens * model.kv_bytes_per_token
        if shared is None:   # owner: weights and KV pool live here
            self.w = [c.malloc(H * n * self.cols * BF_ITEMSIZE) for n in self.layers]
            self.head = c.malloc(H * model.vocab * BF_ITEMSIZE)
            self.kv = c.malloc(int(self.kv_bytes))
        else:                # importer: the same allocations, by exported key
            self.w = [c.ipc_import(k)[0] for k in shared["w"]]
            self.head = c.ipc_import(shared["head"])[0]
            self.kv, n = c.ipc_import(shared["kv"])
            assert n == int(self.kv_bytes), "imported KV pool has another size"
        self.x = c.malloc(max_tokens * H * BF_ITEMSIZE)
        self.q = c.malloc(max_tokens * model.n_heads * model.head_dim * lmax * BF_ITEMSIZE)
        self.max_tokens = max_tokens

    def export(self, pids: list[int]) -> dict:
        keys = {"w": [self.c.ipc_export(h) for h in self.w], "head": self.c.ipc_export(self.head),
                "kv": self.c.ipc_export(self.kv)}
        for k in keys["w"] + [keys["head"], keys["kv"]]:
            self.c.ipc_set_pids(k, pids)
        return keys

    def _launch(self, op: str, args: tuple, kwargs: dict, out_shape: tuple) -> None:
        o = self.c.alloc_handle()
        self.c.launch(op, args, kwargs, [(_numel(out_shape) * BF_ITEMSIZE, _ref(o, out_shape))])
        self.c.free(o)    # stream-ordered: the queued launch keeps its output alive

    def _attn(self, lg: int, b: int, q_len: int, kv_len: int, causal: bool) -> None:
        m = self.m
        qs = (b, m.n_heads * lg, q_len, m.head_dim)
        ks = (b, m.n_kv_heads * lg, kv_len, m.head_dim)
        if _numel(ks) * BF_ITEMSIZE > self.kv_bytes:
            ks = (b, m.n_kv_heads * lg, max(1, int(self.kv_bytes // (BF_ITEMSIZE * b * m.n_kv_heads * lg * m.head_dim))),
                  m.head_dim)
        k = _ref(self.kv, ks)
        self._launch("aten::scaled_dot_product_attention", (_ref(self.q, qs), k, k, None, 0.0, causal),
                     {"enable_gqa": True}, qs)

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
        self._launch("aten::mm", (_ref(self.x, (rows, H)), _ref(self.head, (H, self.m.vocab))), {},
                     (rows, self.m.vocab))
        self.c.synchronize(0)


def engine_main(cfg: dict, arrivals: list, qs: dict, results: Any, ready: Any, go: Any) -> None:
    """One engine process. role: coloc | prefill | decode. qs: inbox/outbox (request hand-off),
    keys/pid (the flexnpu system's export of weights and KV pool to the decode instance)."""
    inbox, outbox = qs.get("inbox"), qs.get("outbox")
    os.environ["FLEXNPU_RUNTIME_DIR"] = cfg["runtime_dir"]
    from flexnpu.client import Client
    from flexnpu.sched.models import MODELS
    from flexnpu.sched.sim import BatchEngine, KVPool
    from flexnpu.sched.workload import Request

    role = cfg["role"]
    model = MODELS[cfg["model"]]
    c = Client(cfg["device"], phase={"coloc": "auto"}.get(role, role), arena_bytes=96 << 20)
    info: dict[str, Any] = {"role": role, "pid": os.getpid()}
    try:
        shared = None
        if "keys" in qs and role == "decode":
            qs["pid"].put(os.getpid())
            shared = qs["keys"].get(timeout=60)     # exported by the prefill instance
        dev = Device(c, model, cfg["groups"], cfg["budget"] if role != "decode" else cfg["max_seqs"],
                     cfg["kv_tokens"], shared)
        if "keys" in qs and role == "prefill":
            qs["keys"].put(dev.export([qs["pid"].get(timeout=60)]))
        # warm-up: the daemon's first meta inference of each op kind is slow (torch start-up)
        dev.step([(16, 0)], [64], 2)
        info["allocated_bytes"] = c.memory_stats()["allocated"]
        info["kv_pool_bytes"] = int(dev.kv_bytes)
        pool = KVPool(cfg["kv_tokens"])
        eng = BatchEngine(model, pool, role != "decode", role != "prefill", cfg["budget"], cfg["max_seqs"],
                          reserve_output=role != "prefill")
        done: list[Request] = []
        handed: list[Request] = []
        eng.on_finished = lambda r, now: done.append(r)
        eng.on_prefilled = lambda r, now: handed.append(r)
        host = c.host_alloc(32 << 20) if cfg.get("kv_link") else None
        reqs = [Request(*a) for a in arrivals]
        expect = cfg["expect"]
        ready.put(role)
        t0 = go.get(timeout=120)
        i = 0
        upstream_done = role != "decode"
        while True:
            now = time.monotonic() - t0
            while i < len(reqs) and reqs[i].arrival <= now:
                eng.add(reqs[i])
                i += 1
            if role == "decode":
                try:
                    while True:
                        m = inbox.get_nowait()
                        if m is None:
                            upstream_done = True
                            continue
                        r = Request(*m["req"])
                        r.prefilled, r.generated, r.first_token = r.prompt, 1, m["first_token"]
                        if cfg.get("kv_link"):
                            _move_kv(c, dev, host, r.prompt * model.kv_bytes_per_token, to_device=True)
                        eng.add(r)
                except queue.Empty:
                    pass
            p = eng.plan()
            if p is None:
                if len(done) + len(handed) >= expect and upstream_done:
                    break
                if time.monotonic() - t0 > cfg["deadline_s"]:
                    info["timed_out"] = True
                    break
                time.sleep(0.0005)
                continue
            fin = sum(1 for r, n in p.chunks if r.prefilled + n >= r.prompt)
            dev.step([(n, r.prefilled) for r, n in p.chunks], [r.context for r in p.decodes],
                     len(p.decodes) + fin)
            eng.finish(p, time.monotonic() - t0)
            for r in handed[len(info.setdefault("_sent", [])):]:
                pool.release(r.prompt)      # the prompt's KV leaves this engine
                if cfg.get("kv_link"):
                    _move_kv(c, dev, host, r.prompt * model.kv_bytes_per_token, to_device=False)
                outbox.put({"req": (r.id, r.arrival, r.prompt, r.output), "first_token": r.first_token})
                info["_sent"].append(r.id)
        if role == "prefill":
            outbox.put(None)
        info.pop("_sent", None)
        info["requests"] = [(r.id, r.arrival, r.prompt, r.output, r.first_token, r.finish)
                            for r in done if r.finish is not None]
        # prefill-only engines also report first tokens of what they handed on
        info["first_tokens"] = {r.id: r.first_token for r in handed}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the run
        import traceback

        info["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        try:
            ready.put(role)
        except Exception:  # noqa: BLE001
            pass
    finally:
        results.put(info)
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


# ---------------------------------------------------------------- one system run

def run_system(system: str, model_name: str, spec_name: str, requests: list, cfg: Any, slo: dict,
               groups: int, kv_tokens: int, deadline_s: float) -> dict:
    from flexnpu.sched.sim import metrics
    from flexnpu.sched.workload import Request

    rd = Path(tempfile.mkdtemp(prefix="flexnpu-rt-"))
    ctx = mp.get_context("fork")
    daemons: list[Daemon] = []
    procs = []
    try:
        arr = [(r.id, r.arrival, r.prompt, r.output) for r in requests]
        n_dec = sum(1 for r in requests if r.output > 1)
        base = {"runtime_dir": str(rd), "model": model_name, "groups": groups, "kv_tokens": kv_tokens,
                "max_seqs": cfg.max_seqs, "deadline_s": deadline_s}
        results, ready, go = ctx.Queue(), ctx.Queue(), ctx.Queue()
        if system == "static-coloc":
            daemons.append(Daemon(rd, 0, f"emu:{spec_name}", "fifo", slo["tpot"] * 1e3))
            roles = [(dict(base, role="coloc", device=0, budget=cfg.max_batched_tokens, expect=len(requests)),
                      arr, {})]
        else:
            disagg = system == "static-disagg"
            daemons.append(Daemon(rd, 0, f"emu:{spec_name}", "fifo" if disagg else "flex", slo["tpot"] * 1e3))
            if disagg:
                daemons.append(Daemon(rd, 1, f"emu:{spec_name}", "fifo", slo["tpot"] * 1e3))
            handoff = ctx.Queue()
            pre = dict(base, role="prefill", device=0, expect=len(requests),
                       budget=cfg.prefill_budget if disagg else cfg.flex_prefill_chunk, kv_link=disagg)
            dec = dict(base, role="decode", device=1 if disagg else 0, budget=cfg.max_seqs, expect=n_dec,
                       kv_link=disagg)
            share = {} if disagg else {"keys": ctx.Queue(), "pid": ctx.Queue()}
            roles = [(pre, arr, dict(share, outbox=handoff)), (dec, [], dict(share, inbox=handoff))]
        for d in daemons:
            d.wait_ready()
        for role_cfg, a, qs in roles:
            p = ctx.Process(target=engine_main, args=(role_cfg, a, qs, results, ready, go), daemon=True)
            p.start()
            procs.append(p)
        for _ in roles:
            ready.get(timeout=120)
        t_go = time.monotonic() + 0.2
        for _ in roles:
            go.put(t_go)
        infos = [results.get(timeout=deadline_s + 60) for _ in roles]
        status = [d.status() for d in daemons]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        for d in daemons:
            d.stop()
        shutil.rmtree(rd, ignore_errors=True)
    errs = [i["error"] for i in infos if "error" in i]
    if errs:
        raise RuntimeError(f"{system}: engine failed: {errs[0]}")
    if any(i.get("timed_out") for i in infos):
        raise RuntimeError(f"{system}: engines did not finish within {deadline_s} s")
    first = {}
    for i in infos:
        first.update(i.get("first_tokens", {}))
    out = []
    for i in infos:
        for rid, arrival, prompt, output, ft, fin in i["requests"]:
            r = Request(rid, arrival, prompt, output)
            r.first_token, r.finish = (ft if ft is not None else first.get(rid)), fin
            out.append(r)
    by_id = {r.id: r for r in out}
    if len(by_id) != len(requests):
        raise RuntimeError(f"{system}: {len(requests) - len(by_id)} requests never finished")
    m = metrics(list(by_id.values()), slo["ttft"], slo["tpot"])
    m["system"] = system
    if system == "flexnpu":
        pre_i = next(i for i in infos if i["role"] == "prefill")
        dec_i = next(i for i in infos if i["role"] == "decode")
        m["kv_handoff"] = {"zero_copy": dec_i["allocated_bytes"] < pre_i["kv_pool_bytes"],
                           "kv_pool_bytes": pre_i["kv_pool_bytes"],
                           "exporter_allocated_bytes": pre_i["allocated_bytes"],
                           "importer_allocated_bytes": dec_i["allocated_bytes"]}
    if system == "static-disagg":
        from flexnpu.sched.specs import get_spec

        s = get_spec(spec_name)
        m["kv_link_gb_s"] = round(s.link_bw * s.link_eff / 1e9, 1)
    m["daemon_policies"] = [st["policy"] for st in status]
    return m
