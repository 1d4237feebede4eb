"""Device specifications for the cost model and the emulated accelerator.

Every figure carries its source. "Dense" peak figures are used (no 2:4 sparsity): LLM serving
kernels are dense. Where a vendor does not publish a figure, the value is marked ESTIMATE with
the reasoning. Achievable fractions of peak (``gemm_eff``, ``bw_eff``) are ESTIMATES for
well-tuned kernels; ``flexnpu calibrate`` replaces guesswork with measured corrections
on a backend that is actually present.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field, replace

TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_flops: dict[str, float]  # dtype name -> dense FLOP/s
    hbm_bw: float  # device memory bandwidth, bytes/s
    mem_bytes: float  # device memory capacity, bytes
    launch_s: float  # per-kernel launch/dispatch overhead, seconds
    link_bw: float  # inter-device scale-up link, bytes/s, one direction
    gemm_eff: float = 0.75  # achievable fraction of peak FLOP/s on large GEMMs
    bw_eff: float = 0.85  # achievable fraction of peak bandwidth on streaming kernels
    link_eff: float = 0.8  # achievable fraction of link bandwidth for collectives
    # Share of the compute units a kernel needs per unit of memory bandwidth it draws. A
    # memory-bound kernel still occupies cores to issue loads: on GPUs/NPUs full HBM bandwidth
    # needs a sizeable fraction of SMs / AI cores (ESTIMATE 0.25: decode attention kernels reach
    # most of the bandwidth on roughly a quarter to a third of the SMs, per published kernel
    # studies such as NanoFlow/POD-Attention). This is what makes co-running not free.
    issue_frac: float = 0.25
    # Extra launch latency of the first kernel of a stream after its core share changed
    # (ESTIMATE 20 us: torch_npu set_stream_limit is a host-side runtime call before the next
    # launch; with CUDA green contexts a change is an event record + wait to move the stream's
    # work to a pre-made stream of another green context). scripts/device-check.sh measures it.
    repartition_s: float = 20e-6
    sources: dict[str, str] = field(default_factory=dict)

    def flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for dtype; unknown dtypes fall back to the fp32 figure."""
        d = canonical_dtype(dtype)
        if d in self.peak_flops:
            return self.peak_flops[d]
        if d in ("float16", "bfloat16") and "float16" in self.peak_flops:
            return self.peak_flops["float16"]
        return self.peak_flops.get("float32", min(self.peak_flops.values()))

    def ridge(self, dtype: str = "bfloat16") -> float:
        """Arithmetic intensity (FLOP/byte) where compute and memory time are equal."""
        return (self.flops(dtype) * self.gemm_eff) / (self.hbm_bw * self.bw_eff)


_DTYPE_ALIASES = {
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "torch.float16": "float16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "torch.float32": "float32",
    "tf32": "tf32",
    "double": "float64",
    "fp64": "float64",
    "torch.float64": "float64",
    "fp8": "float8",
    "float8_e4m3fn": "float8",
    "torch.float8_e4m3fn": "float8",
    "float8_e5m2": "float8",
    "int8": "int8",
    "torch.int8": "int8",
    "uint8": "uint8",
    "torch.int32": "int32",
    "torch.int64": "int64",
    "long": "int64",
    "int": "int32",
    "torch.bool": "bool",
}

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "tf32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
    "complex64": 8,
}


def canonical_dtype(dtype: object) -> str:
    s = str(dtype)
    return _DTYPE_ALIASES.get(s, s.replace("torch.", ""))


def dtype_bytes(dtype: object) -> int:
    d = canonical_dtype(dtype)
    if d not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[d]


ASCEND_910B = DeviceSpec(
    name="910b",
    peak_flops={"float16": 313 * TERA, "bfloat16": 313 * TERA, "float32": 78 * TERA, "int8": 626 * TERA},
    hbm_bw=1.6e12,
    mem_bytes=64 * 2**30,
    launch_s=15e-6,
    link_bw=196 * GIGA,
    sources={
        "peak_flops": "910B3 as shipped in Atlas 800T A2: ~313 TFLOPS FP16 (Huawei Atlas 800T A2 "
        "datasheet as reported by third parties; variants B1/B2/B4 range 280-376). "
        "FP32 = 1/4 of FP16 is an ESTIMATE from the Da Vinci cube ratios. INT8 = 2x FP16.",
        "hbm_bw": "64 GB HBM2e, 1.6 TB/s (widely reported for 910B; Huawei publishes no official "
        "per-chip figure) - ESTIMATE-grade",
        "mem_bytes": "64 GB HBM2e (Atlas 800T A2 datasheet)",
        "launch_s": "ESTIMATE: ~15 us per eager operator through CANN/aclnn host dispatch",
        "link_bw": "HCCS 392 GB/s bidirectional per chip in an 8-NPU Atlas 800T A2 node -> 196 GB/s "
        "per direction (third-party reports of the HCCS full mesh) - ESTIMATE-grade",
    },
)

ASCEND_910C = DeviceSpec(
    name="910c",
    peak_flops={"float16": 781 * TERA, "bfloat16": 781 * TERA, "float32": 195 * TERA, "int8": 1562 * TERA},
    hbm_bw=3.2e12,
    mem_bytes=128 * 2**30,
    launch_s=15e-6,
    link_bw=392 * GIGA,
    sources={
        "peak_flops": "CloudMatrix384: ~300 PFLOPS dense BF16 over 384 Ascend 910C (Huawei WAIC 2025 "
        "/ SemiAnalysis, Tom's Hardware) -> ~781 TFLOPS per chip (two dies). FP32 and "
        "INT8 by the 1/4 and 2x ratios: ESTIMATE",
        "hbm_bw": "CloudMatrix384 memory bandwidth 2.1x GB200 NVL72 (576 TB/s) -> ~1229 TB/s / 384 "
        "= 3.2 TB/s per chip (two 1.6 TB/s dies)",
        "mem_bytes": "48 TB HBM over 384 chips -> 128 GB per chip (CloudMatrix384 reports)",
        "launch_s": "ESTIMATE: same host dispatch path as 910B",
        "link_bw": "Unified Bus: 392 GB/s unidirectional per chip (CloudMatrix384 paper "
        "arXiv:2506.12708 reports 196 GB/s per die x 2 dies) - ESTIMATE-grade",
    },
)

H100_SXM = DeviceSpec(
    name="h100",
    peak_flops={
        "float16": 989.4 * TERA,
        "bfloat16": 989.4 * TERA,
        "tf32": 494.7 * TERA,
        "float32": 66.9 * TERA,
        "float8": 1978.9 * TERA,
        "int8": 1978.9 * TERA,
        "float64": 66.9 * TERA,
    },
    hbm_bw=3.35e12,
    mem_bytes=80 * 2**30,
    launch_s=4e-6,
    link_bw=450 * GIGA,
    sources={
        "peak_flops": "NVIDIA H100 SXM5 datasheet (dense, i.e. the sparsity figures halved): "
        "BF16/FP16 989.4, TF32 494.7, FP8 1978.9, FP32 66.9 TFLOPS",
        "hbm_bw": "NVIDIA H100 SXM5 datasheet: 3.35 TB/s HBM3",
        "mem_bytes": "NVIDIA H100 SXM5 datasheet: 80 GB",
        "launch_s": "ESTIMATE: ~4 us CUDA kernel launch latency (typical measured figure)",
        "link_bw": "NVLink 4: 900 GB/s bidirectional -> 450 GB/s per direction (datasheet)",
    },
)

A100_SXM = DeviceSpec(
    name="a100",
    peak_flops={
        "float16": 312 * TERA,
        "bfloat16": 312 * TERA,
        "tf32": 156 * TERA,
        "float32": 19.5 * TERA,
        "int8": 624 * TERA,
        "float64": 19.5 * TERA,
    },
    hbm_bw=2.039e12,
    mem_bytes=80 * 2**30,
    launch_s=5e-6,
    link_bw=300 * GIGA,
    sources={
        "peak_flops": "NVIDIA A100 80GB SXM datasheet (dense): BF16/FP16 312, TF32 156, FP32 19.5, "
        "INT8 624 TOPS",
        "hbm_bw": "NVIDIA A100 80GB SXM datasheet: 2,039 GB/s HBM2e",
        "mem_bytes": "NVIDIA A100 80GB SXM datasheet: 80 GB",
        "launch_s": "ESTIMATE: ~5 us CUDA kernel launch latency",
        "link_bw": "NVLink 3: 600 GB/s bidirectional -> 300 GB/s per direction (datasheet)",
    },
)

# Conservative CPU figure used when measuring is not wanted (tests, --no-measure): a few cores
# of a modern x86 server core with AVX2 FMA and one DDR4 channel's worth of bandwidth.
CPU_ESTIMATE = DeviceSpec(
    name="cpu",
    peak_flops={"float32": 50 * GIGA, "float64": 25 * GIGA, "bfloat16": 25 * GIGA, "float16": 10 * GIGA},
    hbm_bw=10e9,
    mem_bytes=8 * 2**30,
    launch_s=5e-6,
    link_bw=5e9,
    gemm_eff=1.0,
    bw_eff=1.0,
    issue_frac=0.5,
    sources={
        "all": "ESTIMATE: conservative figure for a few x86 cores (AVX2 FMA, DDR4); "
        "use cpu_spec(measure=True) or `flexnpu calibrate` for this machine"
    },
)

SPECS: dict[str, DeviceSpec] = {s.name: s for s in (ASCEND_910B, ASCEND_910C, H100_SXM, A100_SXM)}
ALIASES = {
    "ascend910b": "910b",
    "ascend-910b": "910b",
    "ascend910c": "910c",
    "ascend-910c": "910c",
    "h100-sxm": "h100",
    "h100_sxm": "h100",
    "a100-sxm": "a100",
    "a100-80g": "a100",
}


@functools.lru_cache(maxsize=1)
def _measure_cpu(budget_s: float = 0.3) -> DeviceSpec:
    """Measure this machine's fp32 matmul rate and copy bandwidth in a fraction of a second.

    Measured figures are already "achievable", so efficiencies are 1.0. Falls back to the
    conservative estimate when torch is missing."""
    try:
        import torch
    except ImportError:
        return CPU_ESTIMATE
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best_mm = float("inf")
    deadline = time.perf_counter() + budget_s / 2
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best_mm = min(best_mm, time.perf_counter() - t0)
    src = torch.empty(8 * 2**20 // 4 * 4)  # 32 MiB: beyond most L2/L3 slices
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_cp = float("inf")
    deadline = time.perf_counter() + budget_s / 2
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        dst.copy_(src)
        best_cp = min(best_cp, time.perf_counter() - t0)
    fl = 2 * n**3 / best_mm
    bw = 2 * src.numel() * 4 / best_cp
    try:
        import psutil

        mem = float(psutil.virtual_memory().total)
    except ImportError:
        mem = CPU_ESTIMATE.mem_bytes
    return replace(
        CPU_ESTIMATE,
        peak_flops={"float32": fl, "float64": fl / 2, "bfloat16": fl / 2, "float16": fl / 5},
        hbm_bw=bw,
        mem_bytes=mem,
        link_bw=bw / 2,
        sources={
            "peak_flops": f"measured: 512^3 fp32 torch.mm best of runs on {os.cpu_count()} cpus; "
            "bf16/fp16 ratios ESTIMATE",
            "hbm_bw": "measured: 32 MiB tensor copy (read+write bytes)",
            "mem_bytes": "psutil total memory",
            "launch_s": "ESTIMATE",
            "link_bw": "ESTIMATE: half of memory bandwidth (shared-memory copy)",
        },
    )


def cpu_spec(measure: bool = True) -> DeviceSpec:
    return _measure_cpu() if measure else CPU_ESTIMATE


def get_spec(name: str, measure_cpu: bool = True) -> DeviceSpec:
    """Look up a spec by name (910b, 910c, h100, a100, cpu; case-insensitive, aliases allowed)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return cpu_spec(measure_cpu)
    if key not in SPECS:
        raise ValueError(f"unknown device spec {name!r}; choose from: {', '.join(sorted(SPECS) + ['cpu'])}")
    return SPECS[key]
