"""Whole pyACL programs in their own processes, models, and a daemon that goes away."""

from __future__ import annotations

import signal
import subprocess
import sys

from _acl_env import acl, acl_daemon  # noqa: F401 - fixtures
from conftest import ROOT, child_env
from flexnpu.hook.acl import constants as C

EXAMPLE = ROOT / "examples" / "acl_add.py"


def _example_cmd() -> list[str]:
    return [sys.executable, "-m", "flexnpu", "run", "--", sys.executable, str(EXAMPLE)]


def _example_env(runtime_dir) -> dict[str, str]:
    return child_env(runtime_dir)


def test_example_acl_add_runs_unmodified(daemon):
    p = subprocess.run(
        _example_cmd(), env=_example_env(daemon.runtime_dir), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS" in p.stdout


def test_two_acl_programs_share_one_device(daemon):
    procs = [
        subprocess.Popen(
            _example_cmd(),
            env=_example_env(daemon.runtime_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "PASS" in out, out


def test_models_are_refused_with_a_clear_error(acl, tmp_path):
    assert acl.rt.set_device(0) == 0
    model_id, ret = acl.mdl.load_from_file(str(tmp_path / "missing.om"))
    assert (model_id, ret) == (0, C.ACL_ERROR_INVALID_FILE)
    om = tmp_path / "resnet50.om"
    om.write_bytes(b"\0" * 64)
    model_id, ret = acl.mdl.load_from_file(str(om))
    assert ret == C.ACL_ERROR_FEATURE_UNSUPPORTED
    assert ".om models" in acl.get_recent_err_msg()
    assert acl.mdl.execute(model_id, 0, 0) == C.ACL_ERROR_INVALID_MODEL_ID
    import pytest

    with pytest.raises(AttributeError, match=r"\.om models"):
        acl.mdl.create_dataset  # noqa: B018


def test_daemon_gone_is_reported(start_daemon):
    from _acl_env import load_acl
    from flexnpu.client import Client
    from flexnpu.hook.acl import rt
    from flexnpu.hook.acl._runtime import RT

    d = start_daemon()
    clients = []
    RT.reset()
    RT.client_factory = lambda dev: clients.append(Client(dev, path=str(d.socket))) or clients[-1]
    try:
        acl = load_acl()
        assert acl.rt.set_device(0) == 0
        ptr, ret = acl.rt.malloc(1024, 0)
        assert ret == 0 and acl.rt.synchronize_device() == 0
        d.stop(signal.SIGKILL)
        assert acl.rt.synchronize_device() == C.ACL_ERROR_RT_LOST_HEARTBEAT
        assert "daemon" in acl.get_recent_err_msg()
        assert acl.rt.memset(ptr, 1024, 0, 1024) == C.ACL_ERROR_RT_LOST_HEARTBEAT
    finally:
        rt.release_host_blocks()
        RT.reset()
        for c in clients:
            c.close()
