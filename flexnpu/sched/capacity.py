"""Capacity at an SLO (goodput) and the TTFT floor: the two yardsticks of the serving study.

Goodput is the highest Poisson request rate a system sustains while at least ``target`` of the
requests meet both the TTFT and the TPOT SLO (DistServe's "goodput", Zhong et al., OSDI 2024).
It replaces "tokens / (last finish - first arrival)" of a fixed request count as the throughput
figure, because the latter is dominated by the drain tail of short runs and, at high rates,
measures how large a burst a system absorbs within the SLO rather than what it sustains. Here
every probe offers the load for ``duration_s`` seconds of arrivals (so a queue that grows at all
eventually breaks the TTFT SLO) and the rate is found by geometric bisection.

The TTFT floor of a request is its prompt's prefill on an otherwise idle device (the sum of its
kernels' solo times, as one engine iteration). No scheduler can beat it, so
``1 - floor / baseline_ttft`` bounds the TTFT reduction any system can show over a baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

from flexnpu.sched.costmodel import CostModel
from flexnpu.sched.models import ModelShape, step_kernels
from flexnpu.sched.workload import Request


def requests_for(rate: float, n_devices: int, duration_s: float, min_requests: int = 100) -> int:
    """Requests that give `duration_s` seconds of arrivals at `rate` req/s per device."""
    return max(min_requests, int(math.ceil(rate * n_devices * duration_s)))


@dataclass
class CapacityResult:
    max_rate: float  # req/s per device at which the target was still met (0: never)
    probes: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment) tried
    bracketed: bool = True  # False: the search hit its bounds (max_rate is a bound)

    def as_dict(self) -> dict:
        return {
            "max_rate_per_device": self.max_rate,
            "bracketed": self.bracketed,
            "probes": [{"rate_per_device": r, "slo_attainment": a} for r, a in self.probes],
        }


def sustainable_rate(
    attainment: Callable[[float], float],
    lo: float,
    hi: float,
    steps: int = 6,
    target: float = 0.9,
    max_expand: int = 4,
) -> CapacityResult:
    """Highest rate with ``attainment(rate) >= target``, by geometric bisection of [lo, hi].

    SLO attainment falls with load (more load is never faster: tests check it), so the search
    brackets the crossing: hi is doubled while still attained, lo halved while missed, each at
    most ``max_expand`` times (then the result is a bound and ``bracketed`` is False).
    Resolution after ``steps`` halvings: a factor of (hi/lo) ** (1 / 2**steps).
    """
    if not 0 < lo < hi:
        raise ValueError("need 0 < lo < hi")
    res = CapacityResult(0.0)

    def ok(rate: float) -> bool:
        a = attainment(rate)
        res.probes.append((rate, a))
        return a >= target

    for i in range(max_expand + 1):
        if ok(lo):
            break
        if i == max_expand:
            res.bracketed = False
            return res
        hi, lo = lo, lo / 2
    for i in range(max_expand + 1):
        if not ok(hi):
            break
        if i == max_expand:
            res.max_rate, res.bracketed = hi, False
            return res
        lo, hi = hi, hi * 2
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    res.max_rate = lo
    return res


def ttft_floor(model: ModelShape, cm: CostModel, req: Request, slices: int = 2) -> float:
    """Seconds to prefill `req`'s whole prompt on an idle device (first token included)."""
    return sum(cm.predict(c) for c in step_kernels(model, [(req.prompt, 0)], [], slices, logits_rows=1))


def ttft_floors(model: ModelShape, cm: CostModel, reqs: Iterable[Request], slices: int = 2) -> list[float]:
    cache: dict[int, float] = {}
    out = []
    for r in reqs:
        if r.prompt not in cache:
            cache[r.prompt] = ttft_floor(model, cm, r, slices)
        out.append(cache[r.prompt])
    return out


def continuous_split_bound(split_rates: Iterable[tuple[int, float]], n_devices: int) -> float:
    """Goodput per device of static disaggregation if devices could be split continuously.

    From the searched integer splits, (prefill devices p, goodput per device r): a prefill device
    sustains at least Cp = max r*N/p req/s and a decode device at least Cd = max r*N/(N-p) (each
    split is limited by one side, so the maxima are the best per-device capacities observed).
    A fraction f of prefill devices sustains min(f*Cp, (1-f)*Cd) per device, largest at
    f = Cd/(Cp+Cd): Cp*Cd/(Cp+Cd). An upper estimate: it assumes per-device capacity does not
    depend on how many devices share the side (routing granularity is ignored)."""
    cp = cd = 0.0
    for p, r in split_rates:
        if 0 < p < n_devices and r > 0:
            cp = max(cp, r * n_devices / p)
            cd = max(cd, r * n_devices / (n_devices - p))
    return cp * cd / (cp + cd) if cp > 0 and cd > 0 else 0.0
