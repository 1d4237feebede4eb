"""The native AscendCL front end with plain C programs: compiled against the CANN headers the
real torch_npu wheel ships, linked to FlexNPU's libascendcl.so, run unmodified under
`flexnpu run` against a real daemon (tests/native/acl_runtime.c does the checking)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from _native import spawn_flexnpu, run_flexnpu, ROOT, compile_program, flexnpu_run_cmd, run_env


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    return str(compile_program("acl_runtime.c", tmp_path_factory.mktemp("acl") / "acl_runtime"))


def _run(runtime_dir, *args, timeout=120, **kw):
    return run_flexnpu(runtime_dir, *args, timeout=timeout, **kw)


def test_c_program_runs_unmodified_with_correct_data_and_errors(daemon, runtime_dir, prog):
    r = _run(runtime_dir, "--", prog)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr
    st = daemon.status()
    assert st["clients"] == [] or all(c["memory_bytes"] == 0 for c in st["clients"])


def test_auto_picks_native_for_an_ascendcl_executable(daemon, runtime_dir, prog):
    from flexnpu.cmd_run import choose_front

    assert choose_front("auto", [prog]) == "native"
    assert choose_front("auto", [sys.executable, "app.py"]) == "python"
    assert choose_front("auto", ["sh", "-c", "true"]) == "python"


def test_allocation_beyond_the_quota_is_acl_memory_allocation(daemon, runtime_dir, prog):
    r = _run(runtime_dir, "--memory-limit", "64MiB", "--", prog, "oom", str(128 << 20))
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


def test_unsupported_call_is_an_error_logged_once_by_name_with_v(daemon, runtime_dir, prog):
    r = _run(runtime_dir, "-v", "--", prog, "unsupported")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("unsupported AscendCL call aclrtBinaryLoadFromData") == 1
    quiet = _run(runtime_dir, "--", prog, "unsupported")
    assert quiet.returncode == 0 and "unsupported AscendCL call" not in quiet.stderr


def test_daemon_loss_is_an_error_return_not_a_hang(start_daemon, runtime_dir, prog):
    d = start_daemon()
    p = spawn_flexnpu(runtime_dir, "--", prog, "loss")
    try:
        assert p.stdout.readline().strip() == "READY"
        d.proc.kill()
        d.proc.wait(10)
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert "sync 507010" in out, out + err  # ACL_ERROR_RT_LOST_HEARTBEAT
    assert "memcpy 507010" in out, out + err


def test_sigkill_mid_copy_reclaims_memory_and_spares_other_clients(daemon, runtime_dir, prog):
    from flexnpu.client import Client

    other = Client(0)
    try:
        h = other.malloc(1 << 20, sync=True)
        other.memcpy_h2d(h, 0, bytes(range(256)) * 4096)
        p = subprocess.Popen(
            flexnpu_run_cmd(runtime_dir, "--", prog, "spin"),
            env=run_env(runtime_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            assert p.stdout.readline().strip() == "READY"
            deadline = time.monotonic() + 30
            while True:  # wait until its copies are flowing and its 64 MiB are charged
                mine = [c for c in daemon.status()["clients"] if c["pid"] != os.getpid()]
                if mine and mine[0]["memory_bytes"] >= 64 << 20 and mine[0]["ops_total"] > 5:
                    break
                assert time.monotonic() < deadline, daemon.status()
                time.sleep(0.05)
            prog_pid = mine[0]["pid"]
            os.kill(prog_pid, signal.SIGKILL)
            p.wait(30)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(c["pid"] == prog_pid for c in daemon.status()["clients"]):
            assert time.monotonic() < deadline, "the killed client was never detached"
            time.sleep(0.05)
        st = daemon.status()
        assert [c["pid"] for c in st["clients"]] == [os.getpid()]
        assert st["clients"][0]["memory_bytes"] == 1 << 20
        assert bytes(other.memcpy_d2h(h, 0, 1 << 20)) == bytes(range(256)) * 4096
    finally:
        other.close()


def test_ipc_export_import_between_two_processes_with_pid_allow_list(daemon, runtime_dir, prog):
    # The importer must be named by pid before it imports: it waits for the key on stdin.
    import psutil

    importer = spawn_flexnpu(runtime_dir, "--", prog, "import", "-")
    deadline = time.monotonic() + 30
    while not psutil.Process(importer.pid).children():
        assert time.monotonic() < deadline and importer.poll() is None
        time.sleep(0.02)
    imp_pid = psutil.Process(importer.pid).children()[0].pid
    exporter = spawn_flexnpu(runtime_dir, "--", prog, "export", str(imp_pid))
    try:
        line = exporter.stdout.readline().split()
        assert line and line[0] == "KEY", exporter.stderr.read() if exporter.poll() is not None else line
        key = line[1]
        # a process not on the allow-list is refused
        r = _run(runtime_dir, "--", prog, "import", key)
        assert r.returncode == 2 and "IMPORT 207006" in r.stdout, (
            r.stdout + r.stderr
        )  # ACL_ERROR_RT_NO_PERMISSION
        out, err = importer.communicate(key + "\n", timeout=60)
        assert importer.returncode == 0 and out.strip().endswith("OK"), out + err
        eout, eerr = exporter.communicate("done\n", timeout=60)
        assert exporter.returncode == 0 and eout.strip().endswith("OK"), eout + eerr
    finally:
        for p in (importer, exporter):
            if p.poll() is None:
                p.kill()


def test_many_threads_one_device_under_thread_sanitizer(daemon, runtime_dir, tmp_path):
    """Per-thread current device, shared tables, one submission ring: built and run with
    -fsanitize=thread, any data race in the library is reported (and fails the test)."""
    from flexnpu.hook.native.build import build

    libs = tmp_path / "tsan-libs"
    try:
        build(libs, extra_cflags=["-fsanitize=thread", "-g", "-O1"], quiet=True)
    except SystemExit as e:
        pytest.skip(f"cannot build the library with -fsanitize=thread: {str(e)[-300:]}")
    exe = tmp_path / "acl_threads"
    p = subprocess.run(
        [
            "cc",
            "-O1",
            "-g",
            "-fsanitize=thread",
            "-pthread",
            "-o",
            str(exe),
            str(ROOT / "tests" / "native" / "acl_threads.c"),
            f"-L{libs}",
            "-lascendcl",
            f"-Wl,-rpath,{libs}",
        ],
        capture_output=True,
        text=True,
    )
    if p.returncode:
        pytest.skip(f"cannot link with -fsanitize=thread (libtsan missing?): {p.stderr[-300:]}")
    env = run_env(runtime_dir)
    env.update(FLEXNPU_DEVICES="0", TSAN_OPTIONS="halt_on_error=0 exitcode=66")
    r = subprocess.run([str(exe), "4", "60"], env=env, capture_output=True, text=True, timeout=600)
    assert "WARNING: ThreadSanitizer" not in r.stderr, r.stderr[:6000]
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr[-3000:]
