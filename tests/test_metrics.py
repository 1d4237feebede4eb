"""Prometheus metrics (issue 15 item 2): scrape a live daemon with two client processes and check
the figures against `flexnpu status --json`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from conftest import ROOT, child_env

prom = pytest.importorskip("prometheus_client.parser", reason="prometheus_client is not installed")

CLIENT = r"""
import os, sys, torch
from flexnpu.client import Client
from flexnpu.protocol import TensorRef
c = Client(0, phase=sys.argv[1])
n = int(sys.argv[2])
a = c.malloc(n * 4)
c.memcpy_h2d(a, 0, b"\x01" * (n * 4))
ref = TensorRef(a, torch.float32, (n,), (1,), 0)
for i in range(3):
    out = TensorRef(c.alloc_handle(), torch.float32, (n,), (1,), 0)
    c.launch("aten::add.Tensor", (ref, ref), {}, [(n * 4, out)])
    c.mark_step()
c.memcpy_d2h(a, 0, n * 4)
c.synchronize()
print("READY", flush=True)
sys.stdin.readline()
c.close()
"""


def _families(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f for f in prom.text_string_to_metric_families(text)}


def _samples(fams: dict, family: str, name: str | None = None) -> list:
    return [s for s in fams[family].samples if name is None or s.name == name]


def test_scrape_two_clients_matches_status(start_daemon):
    d = start_daemon("--metrics-port", "0")
    port = d.status()["metrics_port"]
    assert port
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, phase, str(n)],
            env=child_env(d.runtime_dir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for phase, n in (("prefill", 1024), ("decode", 4096))
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "READY"
        fams = _families(port)
        st = json.loads(
            subprocess.run(
                [sys.executable, "-m", "flexnpu", "status", "--json"],
                env=child_env(d.runtime_dir),
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            ).stdout
        )["daemons"][0]
        clients = {c["pid"]: c for c in st["clients"]}
        assert len(clients) == 2
        assert _samples(fams, "flexnpu_clients")[0].value == 2
        assert _samples(fams, "flexnpu_device_memory_used_bytes")[0].value == st["device_memory_used"]
        mem = {int(s.labels["pid"]): s for s in _samples(fams, "flexnpu_client_memory_used_bytes")}
        reqs = {
            int(s.labels["pid"]): s.value
            for s in _samples(fams, "flexnpu_client_requests", "flexnpu_client_requests_total")
        }
        ops = {
            int(s.labels["pid"]): s.value
            for s in _samples(fams, "flexnpu_client_operators", "flexnpu_client_operators_total")
        }
        assert set(mem) == set(clients) == {p.pid for p in procs}
        for pid, c in clients.items():
            assert mem[pid].value == c["memory_bytes"]
            assert mem[pid].labels["phase"] == c["phase"]
            assert mem[pid].labels["command"] == "python3 -c" or mem[pid].labels["command"].endswith(" -c")
            assert reqs[pid] == c["ops_total"]
            assert ops[pid] == 3
        copied = {
            (int(s.labels["pid"]), s.labels["direction"]): s.value
            for s in _samples(fams, "flexnpu_client_copied_bytes", "flexnpu_client_copied_bytes_total")
        }
        assert copied[(procs[0].pid, "h2d")] == 4096 and copied[(procs[0].pid, "d2h")] == 4096
        assert copied[(procs[1].pid, "h2d")] == 16384
        lat_count = _samples(fams, "flexnpu_launch_latency_seconds", "flexnpu_launch_latency_seconds_count")[
            0
        ].value
        assert lat_count == 6
        steps = {
            s.labels["phase"]: s.value
            for s in _samples(fams, "flexnpu_step_seconds", "flexnpu_step_seconds_count")
        }
        assert steps == {"prefill": 2, "decode": 2}  # 3 marks each: 2 intervals
        busy = {s.labels["phase"] for s in _samples(fams, "flexnpu_device_busy_seconds")}
        assert {"prefill", "decode"} <= busy
        assert _samples(fams, "flexnpu_client_attaches", "flexnpu_client_attaches_total")[0].value == 2
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.wait(60) == 0
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            fams = _families(port)
            if _samples(fams, "flexnpu_clients")[0].value == 0:
                break
            time.sleep(0.1)
        gone = {
            s.labels["reason"]: s.value
            for s in _samples(fams, "flexnpu_client_detaches", "flexnpu_client_detaches_total")
        }
        assert gone == {"exited": 2}
        # device totals keep what departed clients did
        assert _samples(fams, "flexnpu_operators", "flexnpu_operators_total")[0].value == 6
        assert not _samples(fams, "flexnpu_client_memory_used_bytes")
        assert _samples(fams, "process_resident_memory_bytes")[0].value > 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_metrics_port_in_use_is_a_clear_error(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "flexnpu",
                "daemon",
                "--backend",
                "cpu",
                "--runtime-dir",
                str(tmp_path),
                "--metrics-port",
                str(port),
            ],
            env=child_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        s.close()
    assert r.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in r.stderr
    assert not (tmp_path / "npu0.sock").exists()


def test_histogram_and_command_names():
    from flexnpu.daemon.metrics import FastHistogram, command_name, reason_label

    h = FastHistogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert command_name("/usr/bin/python3 serve.py --api-key=SECRET") == "python3 serve.py"
    assert command_name("python -m vllm.entrypoints --token x") == "python -m vllm.entrypoints"
    assert reason_label("corrupt ring: head index out of range") == "corrupt_ring"
