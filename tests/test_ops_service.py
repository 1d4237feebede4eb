"""`flexnpu service install/uninstall` into a scratch root, and `systemd-analyze verify` of the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexnpu import cmd_service

ROOT = Path(__file__).resolve().parents[1]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed; run scripts/ci-system-deps.sh as root"
)


def flexnpu_cli(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(
        [sys.executable, "-m", "flexnpu", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def verify(*units: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=units[0].parent,
    )


def problems(p: subprocess.CompletedProcess) -> list[str]:
    # systemd-analyze exits 0 on unknown keys and bad values, so any complaint about our files
    # counts as a failure (lines about the host's own units are not ours to judge).
    return [l for l in (p.stdout + p.stderr).splitlines() if "flexnpu" in l]


def test_install_writes_units_and_config(tmp_path):
    p = flexnpu_cli(
        "service",
        "install",
        "--root",
        str(tmp_path),
        "--devices",
        "0,1",
        "--policy",
        "flex",
        "--memory-limit",
        "8GiB",
        "--allow-uids",
        "0,1000",
        "--exec",
        sys.executable + " -m flexnpu",
        "--json",
    )
    report = json.loads(p.stdout)
    unit_dir = tmp_path / "etc/systemd/system"
    assert report["devices"] == [0, 1]
    assert {f["path"]: f["action"] for f in report["files"]} == {
        str(unit_dir / "flexnpu@.service"): "wrote",
        str(unit_dir / "flexnpu.target"): "wrote",
        str(tmp_path / "etc/flexnpu/flexnpu.conf"): "wrote",
    }
    assert report["commands"][-1] == [
        "systemctl",
        "enable",
        "--now",
        "flexnpu.target",
        "flexnpu@0.service",
        "flexnpu@1.service",
    ]
    assert report["ran"] == []

    unit = (unit_dir / "flexnpu@.service").read_text()
    assert f"ExecStart={sys.executable} -m flexnpu daemon --device %i $FLEXNPU_DAEMON_ARGS" in unit
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RuntimeDirectory=flexnpu",
        "RuntimeDirectoryPreserve=yes",
        "EnvironmentFile=-/etc/flexnpu/flexnpu.conf",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "IPAddressDeny=any",
        "IPAddressAllow=localhost",
        "DeviceAllow=char-nvidia* rw",
        "PrivateTmp=yes",
    ):
        assert f"\n{line}\n" in unit, line
    assert "\nMemoryDenyWriteExecute=" not in unit and "\nPrivateDevices=yes" not in unit
    target = (unit_dir / "flexnpu.target").read_text()
    assert "Wants=flexnpu@0.service\nWants=flexnpu@1.service\n" in target

    conf = cmd_service.read_config(tmp_path / "etc/flexnpu/flexnpu.conf")
    assert conf == {
        "FLEXNPU_POLICY": "flex",
        "FLEXNPU_MEMORY_LIMIT": str(8 << 30),
        "FLEXNPU_ALLOW_UIDS": "0,1000",
    }


def test_reinstall_keeps_admin_settings_and_is_idempotent(tmp_path):
    args = ("service", "install", "--root", str(tmp_path), "--devices", "0", "--json")
    flexnpu_cli(*args, "--policy", "priority")
    conf = tmp_path / "etc/flexnpu/flexnpu.conf"
    conf.write_text(conf.read_text() + "LD_LIBRARY_PATH=/opt/vendor/lib\n")
    r = json.loads(flexnpu_cli(*args, "--log-level", "debug").stdout)
    values = cmd_service.read_config(conf)
    assert values == {
        "FLEXNPU_POLICY": "priority",
        "FLEXNPU_LOG_LEVEL": "debug",
        "LD_LIBRARY_PATH": "/opt/vendor/lib",
    }
    assert [f["action"] for f in r["files"]] == ["unchanged", "unchanged", "wrote"]
    r = json.loads(flexnpu_cli(*args).stdout)
    assert [f["action"] for f in r["files"]] == ["unchanged"] * 3
    flexnpu_cli(*args, "--force")
    assert cmd_service.read_config(conf) == {}


def test_dry_run_and_enable_never_touch_the_system(tmp_path):
    p = flexnpu_cli("service", "install", "--root", str(tmp_path), "--devices", "2", "--dry-run")
    assert "would write" in p.stdout and "systemctl enable --now flexnpu.target flexnpu@2.service" in p.stdout
    assert not (tmp_path / "etc").exists()
    # --enable with an alternate root refuses to run systemctl and says so.
    p = flexnpu_cli(
        "service", "install", "--root", str(tmp_path), "--devices", "2", "--enable", "--json", check_rc=1
    )
    r = json.loads(p.stdout)
    assert r["ran"] == [] and any("not running systemctl for --root" in n for n in r["notes"])


def test_bad_options_give_clear_errors(tmp_path):
    for opts, msg in (
        (["--memory-limit", "lots"], "not a size"),
        (["--devices", "0,x"], "bad device number"),
        (["--socket-mode", "999"], "octal"),
        (["--exec", "flexnpu"], "absolute path"),
        (["--allow-uids", "no-such-user-xyz"], "no such user"),
        (["--memory-limit", "0"], "must be positive"),
    ):
        p = flexnpu_cli("service", "install", "--root", str(tmp_path), *opts, check_rc=2)
        assert msg in p.stderr, (opts, p.stderr)
    assert not (tmp_path / "etc").exists()


def test_memory_limit_none_unsets_the_key(tmp_path):
    args = ("service", "install", "--root", str(tmp_path), "--devices", "0")
    flexnpu_cli(*args, "--memory-limit", "512MiB", "--memory-limit-max", "2GiB")
    conf = tmp_path / "etc/flexnpu/flexnpu.conf"
    assert cmd_service.read_config(conf) == {
        "FLEXNPU_MEMORY_LIMIT": str(512 << 20),
        "FLEXNPU_MEMORY_LIMIT_MAX": str(2 << 30),
    }
    flexnpu_cli(*args, "--memory-limit", "none")
    assert cmd_service.read_config(conf) == {"FLEXNPU_MEMORY_LIMIT_MAX": str(2 << 30)}
    assert "#FLEXNPU_MEMORY_LIMIT=" in conf.read_text()


def test_uninstall(tmp_path):
    flexnpu_cli("service", "install", "--root", str(tmp_path), "--devices", "0-2")
    p = flexnpu_cli("service", "uninstall", "--root", str(tmp_path), "--json")
    r = json.loads(p.stdout)
    assert r["devices"] == [0, 1, 2]
    assert r["commands"][0] == [
        "systemctl",
        "disable",
        "--now",
        "flexnpu.target",
        "flexnpu@0.service",
        "flexnpu@1.service",
        "flexnpu@2.service",
    ]
    assert not (tmp_path / "etc/systemd/system/flexnpu@.service").exists()
    assert (tmp_path / "etc/flexnpu/flexnpu.conf").exists()  # kept without --purge
    flexnpu_cli("service", "uninstall", "--root", str(tmp_path), "--purge")
    assert not (tmp_path / "etc/flexnpu/flexnpu.conf").exists()
    # A unit the admin wrote by hand is not ours to delete.
    hand = tmp_path / "etc/systemd/system/flexnpu@.service"
    hand.write_text("[Service]\nExecStart=/bin/true\n")
    p = flexnpu_cli("service", "uninstall", "--root", str(tmp_path), check_rc=1)
    assert "not written by flexnpu" in p.stdout and hand.exists()
    flexnpu_cli("service", "uninstall", "--root", str(tmp_path), "--force")
    assert not hand.exists()


def test_device_group_discovery(tmp_path):
    # Real character devices under other names: the discovery reads major numbers via stat.
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "hisi_hdc").symlink_to("/dev/null")  # major 1 on Linux
    (dev / "davinci0").symlink_to("/dev/zero")
    (dev / "davinci1").symlink_to("/dev/zero")
    (dev / "davinci_manager").symlink_to("/dev/zero")
    (dev / "davinci_regular_file").write_text("not a device")
    proc = tmp_path / "devices"
    proc.write_text(
        "Character devices:\n  1 ascend-hdc\n 10 misc\n195 nvidia-frontend\n\nBlock devices:\n  1 ramdisk\n"
    )
    assert cmd_service.discover_device_groups(dev, proc) == ["char-ascend-hdc"]
    proc.write_text("Character devices:\n  1 davinci-cdev\n")  # covered by the unit's static glob
    assert cmd_service.discover_device_groups(dev, proc) == []
    assert cmd_service.discover_devices(dev) == ([0, 1], "ascend")
    assert cmd_service.discover_devices(tmp_path) == ([], "")


@needs_analyze
def test_rendered_units_pass_systemd_analyze_verify(tmp_path):
    flexnpu_cli("service", "install", "--root", str(tmp_path), "--devices", "0,1")
    unit_dir = tmp_path / "etc/systemd/system"
    unit = (unit_dir / "flexnpu@.service").read_text()
    exec_path = unit.split("\nExecStart=", 1)[1].split()[0]
    assert os.path.isabs(exec_path) and os.access(exec_path, os.X_OK)
    p = verify(unit_dir / "flexnpu@0.service", unit_dir / "flexnpu@1.service", unit_dir / "flexnpu.target")
    assert p.returncode == 0 and problems(p) == [], p.stdout + p.stderr

    # The same with host-discovered device groups and ProtectHome=read-only rendered in.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "flexnpu@.service").write_text(
        cmd_service.render_unit(
            (ROOT / "systemd/flexnpu@.service").read_text(),
            [sys.executable, "-m", "flexnpu"],
            extra_device_groups=["char-ascend-hdc"],
            protect_home="read-only",
        )
    )
    p = verify(extra / "flexnpu@3.service")
    assert p.returncode == 0 and problems(p) == [], p.stdout + p.stderr


@needs_analyze
def test_verify_catches_broken_units(tmp_path):
    """The check above can fail: a bad value, an unknown key and a missing binary are caught."""
    good = cmd_service.render_unit((ROOT / "systemd/flexnpu@.service").read_text(), [sys.executable])
    broken = good.replace("Restart=on-failure", "Restart=sometimes\nRestartEvery=1")
    (tmp_path / "flexnpu@.service").write_text(broken)
    p = verify(tmp_path / "flexnpu@0.service")
    out = "\n".join(problems(p))
    assert "sometimes" in out and "RestartEvery" in out
    (tmp_path / "flexnpu@.service").write_text(
        cmd_service.render_unit((ROOT / "systemd/flexnpu@.service").read_text(), ["/nonexistent/flexnpu"])
    )
    p = verify(tmp_path / "flexnpu@0.service")
    assert p.returncode != 0 and "/nonexistent/flexnpu" in p.stdout + p.stderr


def test_service_accepts_every_backend_the_daemon_accepts(tmp_path):
    """One list (flexnpu.daemon.backends.check_backend) for `service install` and `daemon`."""
    args = ("service", "install", "--root", str(tmp_path), "--devices", "0")
    conf = tmp_path / "etc/flexnpu/flexnpu.conf"
    for backend in ("auto", "cpu", "cuda", "npu", "emu:910b", "emu:h100+cpu"):
        flexnpu_cli(*args, "--backend", backend)
        assert cmd_service.read_config(conf)["FLEXNPU_BACKEND"] == backend
    for bad in ("emu", "emu:xyz", "tpu", "cpu:1"):
        s = flexnpu_cli(*args, "--backend", bad, check_rc=2)
        d = flexnpu_cli("daemon", "--backend", bad, "--runtime-dir", str(tmp_path / "run"), check_rc=2)
        assert "--backend" in s.stderr and "--backend" in d.stderr, (bad, s.stderr, d.stderr)


def test_metrics_port_in_the_config(tmp_path):
    args = ("service", "install", "--root", str(tmp_path), "--devices", "0")
    flexnpu_cli(*args, "--metrics-port", "9400")
    conf = tmp_path / "etc/flexnpu/flexnpu.conf"
    assert cmd_service.read_config(conf)["FLEXNPU_METRICS_PORT"] == "9400"
    flexnpu_cli(*args, "--metrics-port", "0", check_rc=2)
