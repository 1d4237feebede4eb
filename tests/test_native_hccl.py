"""The native HCCL C API (flexnpu/hook/native/src/hccl.c) under the REAL torch_npu 2.13.0: its
C++ ProcessGroupHCCL (root info through the store, HcclCommInitRootInfoConfig, collectives on
its own streams, P2P communicators) runs unmodified under `flexnpu run --interpose native`, on
two virtual devices and on one, against expected values (tests/native/torch_npu_hccl.py).

Skips when the wheel is not installed for FlexNPU (`flexnpu install-torch-npu`). The native
front end runs no operators yet (issue 12), so the programs make npu tensors by copies only;
what torch_npu's ProcessGroupHCCL itself computes with operators (barrier's at::ones, avg's
division, the copy of a gathered list) runs only once it does.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from _native import ROOT, compile_program, flexnpu_run_cmd, native_libs, run_env

PROG = str(ROOT / "tests" / "native" / "torch_npu_hccl.py")
COPY_ONLY = "all_reduce,all_gather,reduce_scatter,reduce,broadcast,scatter,send_recv,batch_p2p,all_to_all,all_to_all_v"
NEED_OPERATORS = "barrier,all_gather_list"  # at::ones (barrier), the list copy after all_gather


def _daemons(tmp_path_factory, need_wheel: bool):
    from flexnpu.hook import native

    if need_wheel and not native.torch_npu_installed():
        pytest.skip(
            f"the real torch_npu is not installed for FlexNPU in {native.torch_npu_dir()}: "
            f"run `flexnpu install-torch-npu`"
        )
    native_libs()
    from conftest import DaemonProc

    d = tmp_path_factory.mktemp("hccl-run")
    procs = [DaemonProc(d, 0, ["--backend", "cpu"]), DaemonProc(d, 1, ["--backend", "cpu"])]
    try:
        yield d
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def two_daemons(tmp_path_factory):
    yield from _daemons(tmp_path_factory, need_wheel=True)


@pytest.fixture(scope="module")
def hccl_prog(tmp_path_factory):
    # hccl.h is C++ (the wheel's): cc compiles the .cc as C++; nothing needs the C++ runtime
    return str(compile_program("hccl_api.cc", tmp_path_factory.mktemp("hccl") / "hccl_api", ["-lhccl"]))


@pytest.mark.parametrize(
    "visible,devs", [("0,1", ["0", "1"]), ("0", ["0", "0"])], ids=["two-devices", "one-device"]
)
def test_hccl_c_api(two_daemons, hccl_prog, visible, devs):
    """A plain HCCL C++ program (two ranks, root info through a pipe): barrier, grouped and batched
    send/recv in opposite orders, all_to_all, sub-range buffers, and the error codes of forged,
    destroyed and malformed arguments."""
    r = subprocess.run(
        flexnpu_run_cmd(two_daemons, "--device", visible, "--") + [hccl_prog, *devs],
        env=run_env(two_daemons),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "rank 0 OK" in r.stdout and "rank 1 OK" in r.stdout, (
        r.stdout + r.stderr[-4000:]
    )


def _launch(runtime_dir, visible: str, n: int, devs: str, checks: str, timeout: int = 900):
    return subprocess.run(
        flexnpu_run_cmd(runtime_dir, "--device", visible, "--interpose", "native", "--")
        + [sys.executable, PROG, "launch", str(n), devs, checks],
        env=run_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _ok(r, n: int) -> None:
    out = r.stdout
    assert r.returncode == 0 and all(f"rank {q} OK" in out for q in range(n)), out + r.stderr[-4000:]


@pytest.mark.parametrize("visible,devs", [("0,1", "0,1"), ("0", "0,0")], ids=["two-devices", "one-device"])
def test_collectives_of_real_torch_npu(two_daemons, visible, devs):
    """all_reduce (sum/max/min/prod x 6 dtypes), all_gather_into_tensor, reduce_scatter_tensor,
    broadcast and scatter from every root, send/recv both ways, batch_isend_irecv (every rank sends and
    receives at once), all_to_all_single even and uneven: exact."""
    _ok(_launch(two_daemons, visible, 2, devs, COPY_ONLY), 2)


def test_four_ranks_on_two_devices(two_daemons):
    """Ranks of one communicator on both daemons and two per daemon; uneven all_to_all goes
    through HcclAlltoAllV's pairwise exchange on per-pair communicators derived from the root."""
    _ok(
        _launch(
            two_daemons,
            "0,1",
            4,
            "0,1,1,0",
            "reduce_scatter,reduce,broadcast,scatter,send_recv,batch_p2p,all_to_all_v",
        ),
        4,
    )


@pytest.mark.timing  # the others fail within 10 s
@pytest.mark.parametrize("n,devs", [(2, "0,1"), (3, "0,1,0")], ids=["2-ranks", "3-ranks"])
def test_rank_killed_mid_collective_fails_the_others_fast(two_daemons, n, devs):
    r = _launch(two_daemons, "0,1", n, devs, "die")
    times = [float(t) for t in re.findall(r"rank \d+ failed after ([0-9.]+)s", r.stdout)]
    assert len(times) == n - 1, r.stdout + r.stderr[-3000:]
    assert max(times) < 10.0, times  # seconds, never the communicator's 30-minute timeout
    assert f"rank {n - 1} exiting" in r.stdout


def test_what_needs_operators(two_daemons):
    """barrier (torch_npu allreduces an at::ones tensor), all_gather into a list (it copies the
    flat result with an operator) and all_reduce(AVG) (it divides with one) go through the
    operator half of the native front end (aclnn) as well as the collectives."""
    _ok(_launch(two_daemons, "0,1", 2, "0,1", NEED_OPERATORS + ",avg"), 2)


def test_bench_collective_native_row(two_daemons):
    """`flexnpu bench collective --native`: the real torch_npu's ranks against gloo, results correct
    (its own daemons: the benchmark never uses a shared runtime directory)."""
    import json

    r = subprocess.run(
        [sys.executable, "-m", "flexnpu", "bench", "collective", "--native", "--json"]
        + ["--max-bytes", "16384", "--iters", "3"],
        env=run_env(None),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads(r.stdout)
    assert doc["front"] == "native (real torch_npu)" and [x["bytes"] for x in doc["rows"]] == [4096, 16384]
    assert doc["summary"]["all_correct"], doc
