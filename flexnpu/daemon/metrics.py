"""Prometheus metrics of one daemon (`flexnpu daemon --metrics-port N`).

Nothing here takes a lock or allocates in the serving loop. The loop only bumps plain integers
(per-session counters, the counters of DaemonMetrics) and observes two kinds of latency into
FastHistogram (a bisect and an increment). Everything else is read from the daemon's state when
Prometheus scrapes, by DaemonCollector in the HTTP server's thread; a torn read of a dict the
loop is changing is retried, like `status`.

Names follow the Prometheus conventions: `flexnpu_` prefix, base units (`_bytes`, `_seconds`),
`_total` on counters. Per-client series carry `client` (the daemon's client id), `pid`,
`command` (program name only: full command lines may hold secrets) and `phase`.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Any
from collections.abc import Iterable

from ..protocol import Op

# The collector reads the daemon (server.Daemon) at scrape time. It is typed as Any, not as
# Daemon: the server imports this module, and metrics must stay below it in the layering.
DaemonLike = Any

log = logging.getLogger("flexnpu.daemon")

# launch -> complete: from 10 us (a CPU elementwise op) to 10 s (a huge prefill on a busy device)
LATENCY_BUCKETS = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
# engine iterations (TPOT for decode): 1 ms .. 10 s
STEP_BUCKETS = (1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 7.5e-2, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 10.0)

COPY_DIRECTION: dict[int, str] = {Op.MEMCPY_H2D: "h2d", Op.MEMCPY_D2H: "d2h", Op.MEMCPY_D2D: "d2d"}


def copied_bytes(cmd: Any) -> int:
    """Bytes a copy command moves (the argument layout of session.py's copy handlers)."""
    op = cmd.op
    if op == Op.MEMCPY_H2D:
        return len(cmd.a[3])
    if op == Op.MEMCPY_D2H:
        return int(cmd.a[3])
    return int(cmd.a[6])


class FastHistogram:
    """Cumulative-at-scrape histogram: observe() is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v

    def buckets(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        counts = list(self.counts)  # one snapshot
        for b, c in zip(self.bounds, counts):
            acc += c
            out.append((repr(float(b)), acc))
        out.append(("+Inf", acc + counts[-1]))
        return out


def reason_label(why: str) -> str:
    """A bounded label value for why a client left (the text itself may quote client data)."""
    w = why.lower()
    for key, label in (
        ("client exited", "exited"),
        ("daemon stopping", "daemon_stopping"),
        ("corrupt ring", "corrupt_ring"),
        ("completion ring", "cq_not_consumed"),
        ("internal error", "internal_error"),
    ):
        if key in w:
            return label
    return "other"


class DaemonMetrics:
    """Counters the serving loop bumps; the collector turns them and the daemon's live state
    into metric families at scrape time."""

    def __init__(self) -> None:
        self.launch_latency = FastHistogram(LATENCY_BUCKETS)
        self.step_seconds: dict[str, FastHistogram] = {}  # by phase
        self.attaches = 0
        self.refused: dict[str, int] = {}  # by error code
        self.detaches: dict[str, int] = {}  # by reason label
        # counters of clients that left, so device totals never go down
        self.retired_requests = 0
        self.retired_launches = 0
        self.retired_copied: dict[str, int] = {"h2d": 0, "d2h": 0, "d2d": 0}
        self.retired_busy: dict[str, float] = {}  # device-busy seconds by phase
        self.retired_overflows = 0

    def step(self, phase: str, seconds: float) -> None:
        h = self.step_seconds.get(phase)
        if h is None:
            h = self.step_seconds[phase] = FastHistogram(STEP_BUCKETS)
        h.observe(seconds)

    def detached(self, s: Any, why: str) -> None:
        label = reason_label(why)
        self.detaches[label] = self.detaches.get(label, 0) + 1
        self.retired_requests += s.ops_total
        self.retired_launches += s.launches
        for k, v in s.copied.items():
            self.retired_copied[k] += v
        for st in list(s.streams.values()):
            self.retired_busy[st.phase] = self.retired_busy.get(st.phase, 0.0) + st.busy_s
        self.retired_overflows += s.cq_overflows


def command_name(cmdline: str) -> str:
    """`python3 serve.py --token=...` -> `python3 serve.py`: program and script, no arguments."""
    words = cmdline.split()
    if not words:
        return "?"
    out = [os.path.basename(words[0])]
    if out[0].startswith("python") and len(words) > 1:
        nxt = words[1]
        if nxt == "-m" and len(words) > 2:
            out += ["-m", words[2]]
        elif nxt == "-c":
            out.append("-c")
        elif not nxt.startswith("-"):
            out.append(os.path.basename(nxt))
    return " ".join(out)[:64]


class DaemonCollector:
    """A prometheus_client custom collector over one Daemon."""

    def __init__(self, daemon: DaemonLike) -> None:
        self.d = daemon

    def describe(self) -> Iterable[Any]:
        return []  # the families depend on live state; no up-front description

    def collect(self) -> Iterable[Any]:
        for _ in range(5):
            try:
                return self._collect()
            except RuntimeError:  # a dict changed size under us: take a new snapshot
                continue
        return []

    def _collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        d, m = self.d, self.d.metrics
        dev = str(d.device)
        sessions = list(d.sessions.values())
        out: list[Any] = []

        info = GaugeMetricFamily(
            "flexnpu_daemon_info",
            "Daemon identity (value 1)",
            labels=["device", "backend", "policy", "embedded", "version"],
        )
        from .. import __version__

        info.add_metric([dev, d.backend.name, d.policy_name, str(d.embedded).lower(), __version__], 1)
        out.append(info)
        g = GaugeMetricFamily("flexnpu_clients", "Clients attached", labels=["device"])
        g.add_metric([dev], len(sessions))
        out.append(g)
        g = GaugeMetricFamily(
            "flexnpu_device_memory_used_bytes", "Device memory held by all clients", labels=["device"]
        )
        g.add_metric([dev], d.device_memory.used)
        out.append(g)
        if d.device_memory.limit is not None:
            g = GaugeMetricFamily(
                "flexnpu_device_memory_limit_bytes", "Device memory all clients may hold", labels=["device"]
            )
            g.add_metric([dev], d.device_memory.limit)
            out.append(g)

        cl = ["device", "client", "pid", "command", "phase"]
        used = GaugeMetricFamily(
            "flexnpu_client_memory_used_bytes", "Device memory a client holds", labels=cl
        )
        limit = GaugeMetricFamily(
            "flexnpu_client_memory_limit_bytes", "A client's device memory limit", labels=cl
        )
        reqs = CounterMetricFamily(
            "flexnpu_client_requests", "Requests a client submitted (ring records)", labels=cl
        )
        launches = CounterMetricFamily(
            "flexnpu_client_operators", "Operators (kernel launches) run for a client", labels=cl
        )
        copied = CounterMetricFamily(
            "flexnpu_client_copied_bytes", "Bytes copied for a client", labels=cl + ["direction"]
        )
        depth = GaugeMetricFamily(
            "flexnpu_client_queue_depth", "Commands waiting in a client's streams", labels=cl
        )
        overflow = CounterMetricFamily(
            "flexnpu_client_ring_overflows",
            "Completions that found the client's completion ring full",
            labels=cl,
        )
        busy = dict(m.retired_busy)
        tot_req, tot_launch, tot_over = m.retired_requests, m.retired_launches, m.retired_overflows
        tot_copy = dict(m.retired_copied)
        for s in sessions:
            lv = [dev, str(s.cid), str(s.pid), command_name(s.cmdline), s.phase]
            used.add_metric(lv, s.mem.used)
            if s.mem.limit is not None:
                limit.add_metric(lv, s.mem.limit)
            reqs.add_metric(lv, s.ops_total)
            launches.add_metric(lv, s.launches)
            for k, v in list(s.copied.items()):
                copied.add_metric(lv + [k], v)
                tot_copy[k] += v
            depth.add_metric(lv, s.queue_depth())
            overflow.add_metric(lv, s.cq_overflows)
            tot_req += s.ops_total
            tot_launch += s.launches
            tot_over += s.cq_overflows
            for st in list(s.streams.values()):
                busy[st.phase] = busy.get(st.phase, 0.0) + st.busy_s
        out += [used, limit, reqs, launches, copied, depth, overflow]

        c = CounterMetricFamily(
            "flexnpu_requests", "Requests of all clients, including departed ones", labels=["device"]
        )
        c.add_metric([dev], tot_req)
        out.append(c)
        c = CounterMetricFamily("flexnpu_operators", "Operators run for all clients", labels=["device"])
        c.add_metric([dev], tot_launch)
        out.append(c)
        c = CounterMetricFamily(
            "flexnpu_copied_bytes", "Bytes copied for all clients", labels=["device", "direction"]
        )
        for k, v in tot_copy.items():
            c.add_metric([dev, k], v)
        out.append(c)
        c = CounterMetricFamily(
            "flexnpu_ring_overflows", "Completions that found a completion ring full", labels=["device"]
        )
        c.add_metric([dev], tot_over)
        out.append(c)
        # share of the device per phase = rate(busy{phase}) / sum(rate(busy))
        c = CounterMetricFamily(
            "flexnpu_device_busy_seconds",
            "Time the daemon spent executing commands, by stream phase",
            labels=["device", "phase"],
        )
        for phase, v in sorted(busy.items()):
            c.add_metric([dev, phase], v)
        out.append(c)
        sched = d._scheduler_status()
        if "prefill_slots" in sched:
            g = GaugeMetricFamily(
                "flexnpu_scheduler_prefill_slots",
                "Flex policy: prefill slots per decode step",
                labels=["device"],
            )
            g.add_metric([dev], float(sched["prefill_slots"]))
            out.append(g)
            g = GaugeMetricFamily(
                "flexnpu_scheduler_decode_weight", "Flex policy: decode weight", labels=["device"]
            )
            g.add_metric([dev], float(sched["decode_weight"]))
            out.append(g)

        h = HistogramMetricFamily(
            "flexnpu_launch_latency_seconds",
            "Operator launch: arrival in the daemon to completion of its execution",
            labels=["device"],
        )
        h.add_metric([dev], m.launch_latency.buckets(), m.launch_latency.sum)
        out.append(h)
        h = HistogramMetricFamily(
            "flexnpu_step_seconds",
            "Engine iteration time between step marks (decode: time per output token)",
            labels=["device", "phase"],
        )
        for phase, hist in sorted(m.step_seconds.items()):
            h.add_metric([dev, phase], hist.buckets(), hist.sum)
        out.append(h)

        c = CounterMetricFamily("flexnpu_client_attaches", "Clients attached", labels=["device"])
        c.add_metric([dev], m.attaches)
        out.append(c)
        c = CounterMetricFamily(
            "flexnpu_client_detaches", "Clients that left, by reason", labels=["device", "reason"]
        )
        for reason, n in sorted(m.detaches.items()):
            c.add_metric([dev, reason], n)
        out.append(c)
        c = CounterMetricFamily(
            "flexnpu_client_attach_refusals", "Attaches refused, by error code", labels=["device", "code"]
        )
        for code, n in sorted(m.refused.items()):
            c.add_metric([dev, code], n)
        out.append(c)
        return out


def serve(daemon: DaemonLike, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve /metrics on addr:port in a background thread; returns the HTTP server."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    ProcessCollector(registry=registry)  # RSS, CPU seconds, open fds of the daemon
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    log.info("Prometheus metrics on http://%s:%d/metrics", addr, server.server_port)
    return server
