"""`flexnpu run` end to end: real programs, real embedded or running daemons."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from conftest import ROOT, child_env

FLEXNPU = [sys.executable, "-m", "flexnpu"]


def flexnpu_run(args: list[str], runtime_dir=None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = child_env(runtime_dir)
    if runtime_dir is None:
        env["FLEXNPU_RUNTIME_DIR"] = str(kw.pop("empty_dir"))
    return subprocess.run(
        FLEXNPU + ["run", "--backend", "cpu", "--idle-grace", "1", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kw,
    )


def test_exit_code_and_environment_pass_through(tmp_path):
    r = flexnpu_run(
        [
            "--",
            sys.executable,
            "-c",
            textwrap.dedent("""
        import os, sys
        print(os.environ["FLEXNPU_DEVICES"], os.environ["FLEXNPU_PHASE"])
        sys.exit(7)"""),
        ],
        empty_dir=tmp_path,
    )
    assert r.returncode == 7, r.stderr
    assert r.stdout.split() == ["0", "auto"]


def test_missing_program_and_bad_daemon_path_are_explained(tmp_path):
    r = flexnpu_run(["--", "no-such-program-xyz"], empty_dir=tmp_path)
    assert r.returncode == 127 and "command not found" in r.stderr
    r = flexnpu_run(
        ["--daemon", str(tmp_path / "nowhere"), "--", sys.executable, "-c", "pass"], empty_dir=tmp_path
    )
    assert r.returncode == 2 and "no daemon for device 0" in r.stderr


def test_embedded_daemon_starts_in_the_runtime_folder_and_exits_when_idle(tmp_path):
    code = "import os, time; print(os.environ['FLEXNPU_RUNTIME_DIR'], flush=True); time.sleep(0.5)"
    env = child_env(tmp_path)
    p = subprocess.Popen(
        FLEXNPU + ["run", "--backend", "cpu", "--idle-grace", "0.5", "--", sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    rdir = p.stdout.readline().strip()
    assert rdir == str(tmp_path) and os.path.exists(os.path.join(rdir, "npu0.sock"))
    daemons = [c for c in psutil.Process(p.pid).children(recursive=True) if "daemon" in " ".join(c.cmdline())]
    assert len(daemons) == 1 and "--embedded" in daemons[0].cmdline()
    assert p.wait(60) == 0
    daemons[0].wait(60)  # no client, no run holding it: it leaves after the grace
    assert not os.path.exists(os.path.join(rdir, "npu0.sock"))


def test_signals_reach_the_program(tmp_path):
    code = textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
        print("ready", flush=True)
        time.sleep(60)""")
    p = subprocess.Popen(
        FLEXNPU + ["run", "--backend", "cpu", "--", sys.executable, "-c", code],
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 3


def test_uses_the_running_daemon(daemon, runtime_dir):
    code = textwrap.dedent("""
        from flexnpu.client import get_client
        import os
        c = get_client(0)
        h = c.malloc(100)
        c.memset(h, 0, 1, 100)
        print(os.environ["FLEXNPU_RUNTIME_DIR"], bytes(c.memcpy_d2h(h, 0, 3)).hex())""")
    r = flexnpu_run(["--", sys.executable, "-c", code], runtime_dir=runtime_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(runtime_dir), "010101"]
    assert "attached" in daemon.log_text()


def test_pyacl_example_runs_unmodified(tmp_path):
    r = flexnpu_run(["--", sys.executable, "examples/acl_add.py"], empty_dir=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout


def _plain_tokens() -> list[str]:
    r = subprocess.run(
        [sys.executable, "examples/generate.py"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "device: cpu" in r.stdout
    return [ln for ln in r.stdout.splitlines() if ln.startswith("tokens:")]


def test_generate_example_gives_the_cpu_tokens(tmp_path):
    r = flexnpu_run(["--", sys.executable, "examples/generate.py"], empty_dir=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "device: npu" in r.stdout
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("tokens:")] == _plain_tokens()


def test_two_programs_share_one_daemon(daemon, runtime_dir):
    env = child_env(runtime_dir)
    cmd = FLEXNPU + ["run", "--", sys.executable, "examples/generate.py", "--new-tokens", "12"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    toks = [[ln for ln in out.splitlines() if ln.startswith("tokens:")] for out, _ in outs]
    assert toks[0] == toks[1] and toks[0]
    assert daemon.log_text().count("attached: pid") >= 2


def test_daemon_gone_gives_a_clear_error(daemon, runtime_dir):
    code = textwrap.dedent("""
        import sys, time
        import torch
        import torch_npu
        x = torch.ones(4, device="npu")
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            for _ in range(100):
                (x + 1).cpu()
                time.sleep(0.01)
        except Exception as e:
            print("ERROR", type(e).__name__, e, flush=True)
            sys.exit(5)""")
    p = subprocess.Popen(
        FLEXNPU + ["run", "--", sys.executable, "-c", code],
        env=child_env(runtime_dir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout.readline().strip() == "ready"
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    t0 = time.monotonic()
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 5, out + err
    assert "DaemonLost" in out and "daemon for device 0" in out
    assert time.monotonic() - t0 < 10


def test_pd_handoff_example_shares_the_kv_cache(tmp_path):
    plain = subprocess.run(
        [sys.executable, "examples/pd_handoff.py"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert plain.returncode == 0, plain.stderr
    r = flexnpu_run(["--", sys.executable, "examples/pd_handoff.py"], empty_dir=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KV cache shared zero-copy" in r.stdout
    tokens = lambda out: [ln for ln in out.splitlines() if ln.startswith("tokens:")]  # noqa: E731
    assert tokens(r.stdout) == tokens(plain.stdout) and tokens(plain.stdout)
