"""Seeded request workloads: Poisson arrivals, per-request prompt and output lengths.

Output lengths are fixed per request (the engine stops after exactly that many tokens) so every
system serves the identical work. Length statistics (lognormal, clipped):
- ``chat``: Azure LLM inference trace 2023, "conversation" (published with Splitwise, Patel et
  al., ISCA 2024): median prompt ~1020 tokens, median output ~129 tokens. Balanced mix.
- ``long``: long-prompt summarization in the style of LongBench / arXiv-summarization
  (LongBench, Bai et al. 2023, averages several thousand tokens per input; summaries are a few
  hundred tokens): median prompt 6000 (clipped to 16k), median output 200. Prefill-heavy.
- ``reasoning``: short prompt, long generated chain of thought as DeepSeek-R1 produces: median
  prompt 300, median output 1500 (clipped to 4k). Decode-heavy. These medians are ESTIMATES
  chosen to represent the class, not fitted to a specific trace.
The lognormal sigmas (spread) are ESTIMATES as well.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LengthDist:
    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: random.Random) -> int:
        v = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(self.hi, max(self.lo, round(v))))


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt: LengthDist
    output: LengthDist
    kind: str  # balanced | prefill-heavy | decode-heavy


WORKLOADS = {
    "chat": WorkloadSpec("chat", LengthDist(1020, 0.8, 16, 8192), LengthDist(129, 0.9, 4, 1024), "balanced"),
    "long": WorkloadSpec(
        "long", LengthDist(6000, 0.5, 1024, 16384), LengthDist(200, 0.6, 16, 1024), "prefill-heavy"
    ),
    "reasoning": WorkloadSpec(
        "reasoning", LengthDist(300, 0.7, 16, 4096), LengthDist(1500, 0.6, 64, 4096), "decode-heavy"
    ),
}


@dataclass
class Request:
    id: int
    arrival: float
    prompt: int
    output: int
    # filled in by the simulator
    prefilled: int = 0
    generated: int = 0
    first_token: float | None = None
    finish: float | None = None
    admitted: bool = False

    @property
    def context(self) -> int:
        return self.prompt + self.generated

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.output <= 1:
            return None
        return (self.finish - self.first_token) / (self.output - 1)


def generate(workload: str | WorkloadSpec, rate: float, n: int, seed: int = 0) -> list[Request]:
    """n requests with Poisson arrivals at `rate` req/s. The lengths depend only on the seed (not
    on the rate), so runs at different rates serve the same requests, just closer together."""
    spec = WORKLOADS[workload] if isinstance(workload, str) else workload
    if rate <= 0 or n <= 0:
        raise ValueError("rate and n must be positive")
    lengths = random.Random(seed)
    gaps = random.Random(seed + 7919)
    t, out = 0.0, []
    for i in range(n):
        t += gaps.expovariate(1.0) / rate
        out.append(Request(i, t, spec.prompt.sample(lengths), spec.output.sample(lengths)))
    return out
