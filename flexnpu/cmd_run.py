"""Run a program with its device calls routed through FlexNPU, unmodified.

    flexnpu run -- python app.py --its-args
    flexnpu run --device 0,1 --phase decode -- python serve.py

The program starts with FlexNPU's bootstrap on its Python path (for it and every Python child
it starts): `import torch` gives a torch with an `npu` device whose memory and operators live in
the daemon, `import torch_npu` and `import acl` work as on an Ascend host. If no daemon serves a
device, an embedded one is started for the duration of the program (backend auto: npu where
torch_npu finds a device, else cuda, else cpu). Signals are forwarded; the exit code is the
program's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .daemon.policies import DEFAULT_POLICY, POLICY_NAMES
from .paths import runtime_dir, socket_path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="0", help="physical device(s) the program sees as npu:0, npu:1, ... (e.g. 0 or 0,1)")
    p.add_argument("--phase", default="auto", choices=("auto", "prefill", "decode"),
                   help="phase hint for the scheduler (default auto: inferred from the operators)")
    p.add_argument("--daemon", default="auto", metavar="auto|PATH",
                   help="auto: use the running daemon of each device, else start an embedded one; "
                        "PATH: the runtime directory of the daemons to use (no embedded fallback)")
    p.add_argument("--backend", default=os.environ.get("FLEXNPU_BACKEND", "auto"),
                   help="backend of an embedded daemon: auto|cpu|cuda|npu|emu:<spec> (default auto)")
    p.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICY_NAMES,
                   help="scheduling policy of an embedded daemon")
    p.add_argument("--memory-limit", default=None, help="device memory limit for this program, e.g. 4GiB")
    p.add_argument("-v", "--verbose", action="store_true", help="show the embedded daemon's log")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the program and its arguments (after --)")


def _devices(text: str) -> list[int]:
    try:
        devs = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise SystemExit(f"flexnpu run: --device takes numbers like 0 or 0,1, not {text!r}") from None
    if not devs or any(d < 0 for d in devs) or len(set(devs)) != len(devs):
        raise SystemExit(f"flexnpu run: bad --device {text!r}")
    return devs


def _alive(path: Path) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def bootstrap_dir() -> Path:
    from . import hook

    return Path(hook.__file__).resolve().parent / "bootstrap"


class EmbeddedDaemon:
    def __init__(self, device: int, rdir: Path, backend: str, policy: str, verbose: bool) -> None:
        self.log_path = rdir / f"daemon{device}.log"
        self._log = None if verbose else open(self.log_path, "wb")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexnpu", "daemon", "--device", str(device), "--backend", backend,
             "--policy", policy, "--runtime-dir", str(rdir)],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log or sys.stderr, stderr=subprocess.STDOUT,
            start_new_session=True)   # our terminal's ^C goes to the program, not the daemon
        sock = socket_path(device, rdir)
        deadline = time.monotonic() + 60
        while not sock.exists():
            if self.proc.poll() is not None:
                raise SystemExit(f"flexnpu run: the embedded daemon for device {device} failed to start:\n"
                                 f"{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"flexnpu run: the embedded daemon for device {device} did not come up "
                                 f"within 60 s:\n{self.log_text()}")
            time.sleep(0.01)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log:
            self._log.close()


def run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("flexnpu run: no program given; usage: flexnpu run [options] -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        print(f"flexnpu run: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    devices = _devices(args.device)
    env = dict(os.environ)
    embedded: list[EmbeddedDaemon] = []
    tmp: str | None = None
    if args.daemon == "auto":
        rdir = runtime_dir()
        missing = [d for d in devices if not _alive(socket_path(d, rdir))]
        if missing:
            if len(missing) != len(devices):
                print(f"flexnpu run: devices {missing} have no daemon in {rdir} but others do; start "
                      f"them all (flexnpu daemon --device N) or none", file=sys.stderr)
                return 2
            tmp = tempfile.mkdtemp(prefix="flexnpu-run-")
            rdir = Path(tmp)
            try:
                for d in devices:
                    embedded.append(EmbeddedDaemon(d, rdir, args.backend, args.policy, args.verbose))
            except SystemExit:
                for e in embedded:
                    e.stop()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    else:
        rdir = Path(args.daemon)
        for d in devices:
            if not _alive(socket_path(d, rdir)):
                print(f"flexnpu run: no daemon for device {d} answers at {socket_path(d, rdir)}", file=sys.stderr)
                return 2
    boot = bootstrap_dir()
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([str(boot), root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["FLEXNPU_RUNTIME_DIR"] = str(rdir)
    env["FLEXNPU_DEVICES"] = ",".join(map(str, devices))
    env["FLEXNPU_PHASE"] = args.phase
    env["FLEXNPU_ACTIVE"] = "1"
    if args.memory_limit:
        env["FLEXNPU_CLIENT_MEMORY_LIMIT"] = args.memory_limit
    try:
        child = subprocess.Popen(cmd, env=env)
    except OSError as e:
        for e2 in embedded:
            e2.stop()
        print(f"flexnpu run: cannot start {cmd[0]}: {e}", file=sys.stderr)
        return 126
    previous = {}

    def forward(sig: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(sig)

    for sig in FORWARDED:
        previous[sig] = signal.signal(sig, forward)
    try:
        rc = child.wait()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        for e in embedded:
            e.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc if rc >= 0 else 128 - rc
