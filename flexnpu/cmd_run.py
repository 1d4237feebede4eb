"""Run a program with its device calls routed through FlexNPU, unmodified.

    flexnpu run -- python app.py --its-args
    flexnpu run --device 0,1 --phase decode -- python serve.py

Two front ends (--interpose):
  python  FlexNPU's bootstrap on the program's Python path (for it and every Python child it
          starts): `import torch` gives a torch with an `npu` device whose memory and operators
          live in the daemon, `import torch_npu` and `import acl` work as on an Ascend host.
  native  FlexNPU's AscendCL libraries (libascendcl.so, ...) first on LD_LIBRARY_PATH and in
          LD_PRELOAD: plain AscendCL C/C++ programs, and the real torch_npu (installed with
          `flexnpu install-torch-npu` into an isolated folder this puts on PYTHONPATH), run
          unmodified; see docs/native.md.
  auto    (default) native for executables linked against libascendcl.so; python for everything
          else, Python programs included, until the native front end runs operators (then
          Python programs get native when the real torch_npu is installed for FlexNPU).

One daemon per device, however started: a system daemon (/run/flexnpu, systemd) always wins;
else the daemon in the user's runtime folder (the one `flexnpu status` reads) is used, and if
none runs there an embedded one is started there (backend auto: npu where torch_npu finds a
device, else cuda, else cpu), shared by every `flexnpu run` of the user that starts while it
lives (a lock file settles start races: the loser attaches) and exiting --idle-grace seconds
after its last client left. ^C and ^\\ reach the program from the terminal
(once: they are not forwarded again); SIGTERM, SIGHUP, SIGUSR1/2 sent to `flexnpu run` are
forwarded. The exit code is the program's.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .daemon.backends import BACKEND_SYNTAX, check_backend
from .daemon.policies import DEFAULT_POLICY, policy_arg
from .daemon_process import DaemonProcess, DaemonStartError, answers
from .paths import SYSTEM_RUNTIME_DIR, UnsafeRuntimeDir, check_dir, check_peer, runtime_dir, socket_path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# Sent by the terminal to its whole foreground process group (the program is in ours).
GROUP_SIGNALS = (signal.SIGINT, signal.SIGQUIT)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults from the environment: a Kubernetes container gets them from the device plugin.
    p.add_argument(
        "--device",
        default=os.environ.get("FLEXNPU_DEVICES", "0"),
        help="physical device(s) the program sees as npu:0, npu:1, ... (e.g. 0 or 0,1; "
        "default $FLEXNPU_DEVICES, else 0)",
    )
    p.add_argument(
        "--phase",
        default=os.environ.get("FLEXNPU_PHASE", "auto"),
        choices=("auto", "prefill", "decode"),
        help="phase hint for the scheduler (default $FLEXNPU_PHASE, else auto: inferred from the operators)",
    )
    p.add_argument(
        "--daemon",
        default="auto",
        metavar="auto|PATH",
        help="auto: use the running daemon of each device, else start an embedded one; "
        "PATH: the runtime directory of the daemons to use (no embedded fallback)",
    )
    p.add_argument(
        "--backend",
        default=os.environ.get("FLEXNPU_BACKEND", "auto"),
        type=check_backend,
        help=f"backend of an embedded daemon this run starts: {BACKEND_SYNTAX} (default auto; a "
        f"running daemon keeps its own)",
    )
    p.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        type=policy_arg,
        help="scheduling policy of an embedded daemon this run starts (see flexnpu daemon --help)",
    )
    p.add_argument("--memory-limit", default=None, help="device memory limit for this program, e.g. 4GiB")
    p.add_argument(
        "--idle-grace",
        type=float,
        default=float(os.environ.get("FLEXNPU_IDLE_GRACE", 30)),
        metavar="SECONDS",
        help="an embedded daemon this run starts exits this long after its last client left (default 30)",
    )
    p.add_argument(
        "--interpose",
        default=os.environ.get("FLEXNPU_INTERPOSE", "auto"),
        choices=("auto", "native", "python"),
        help="front end: native AscendCL libraries, the Python hook, or auto (see above)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the embedded daemon's log and, with the native front end, each unsupported "
        "AscendCL call (once, by name) and every error it returns",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the program and its arguments (after --)")


def _devices(text: str) -> list[int]:
    try:
        devs = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise SystemExit(f"flexnpu run: --device takes numbers like 0 or 0,1, not {text!r}") from None
    if not devs or any(d < 0 for d in devs) or len(set(devs)) != len(devs):
        raise SystemExit(f"flexnpu run: bad --device {text!r}")
    return devs


def _links_ascendcl(path: str) -> bool:
    """True for an ELF executable whose dynamic section names libascendcl.so (an AscendCL program)."""
    from .elf import needed_libraries

    return any(n == "libascendcl.so" or n.startswith("libascendcl.so.") for n in needed_libraries(path))


def choose_front(mode: str, cmd: list[str]) -> str:
    """The front end `--interpose auto` means for this program (documented in docs/native.md)."""
    if mode != "auto":
        return mode
    from .hook import native

    exe = shutil.which(cmd[0]) or cmd[0]
    if _links_ascendcl(exe):
        return "native"
    if native.RUNS_OPERATORS and native.torch_npu_installed() and os.path.basename(exe).startswith("python"):
        return "native"
    return "python"


def native_env(env: dict[str, str], verbose: bool) -> None:
    """Put the native AscendCL libraries (built now if missing) and the real torch_npu in env."""
    from .hook import native
    from .hook.native.build import build

    libdir = str(build(quiet=True))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [libdir] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    )
    # LD_PRELOAD too: torch_npu looks functions up with dlsym(RTLD_DEFAULT, ...) when it is set
    env["LD_PRELOAD"] = " ".join(
        [os.path.join(libdir, native.CORE_LIB)] + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else [])
    )
    if native.torch_npu_installed():
        tdir = str(native.torch_npu_dir())
        env["PYTHONPATH"] = os.pathsep.join([tdir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # torch_npu's task queue moves each operator launch to a worker thread because the real
    # CANN launch path is slow on the host; ours only encodes a record and pushes it onto the
    # ring, which is itself the queue. The extra thread hop per operator then costs more than it
    # hides (measured on the HF generate rows: docs/native_ops.md). A value the user set wins.
    env.setdefault("TASK_QUEUE_ENABLE", "0")
    if verbose:
        env["FLEXNPU_NATIVE_VERBOSE"] = "1"


def bootstrap_dir() -> Path:
    from . import hook

    return Path(hook.__file__).resolve().parent / "bootstrap"


class Lease:
    """A `hold` connection to a device's daemon: while it is open, an idle-exit daemon stays,
    so it cannot leave between our start and our program's attach. Closed with the process."""

    def __init__(self, sock: socket.socket, reply: dict) -> None:
        self.sock, self.reply = sock, reply

    def close(self) -> None:
        self.sock.close()


def hold(path: Path) -> Lease | None:
    """A lease on the daemon at `path`, or None when no daemon answers there (or it is leaving)."""
    from .control import ProtocolError, recv_msg, send_msg

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        return None
    try:
        check_peer(s, path)
        send_msg(s, {"op": "hold"})
        reply, fds = recv_msg(s)
        for fd in fds:
            os.close(fd)
    except UnsafeRuntimeDir as e:
        s.close()
        raise SystemExit(f"flexnpu run: {e}") from None
    except (OSError, ConnectionError, ProtocolError):
        s.close()  # it closed on us: a daemon that was leaving
        return None
    if not reply.get("ok"):
        s.close()
        raise SystemExit(
            f"flexnpu run: the daemon at {path} refused us: {reply.get('error', 'no reason given')}"
        )
    return Lease(s, reply)


def shared_daemons(devices: list[int], args: argparse.Namespace) -> tuple[Path, list[Lease]]:
    """The runtime folder whose daemons serve `devices`, starting embedded ones where none runs,
    and a lease on each."""
    own = runtime_dir()
    if own != SYSTEM_RUNTIME_DIR and not os.environ.get("FLEXNPU_RUNTIME_DIR"):
        system = [d for d in devices if answers(socket_path(d, SYSTEM_RUNTIME_DIR))]
        if system and len(system) == len(devices):
            return SYSTEM_RUNTIME_DIR, []  # the system daemons always win
        if system:
            raise SystemExit(
                f"flexnpu run: devices {system} have system daemons in {SYSTEM_RUNTIME_DIR}, "
                f"{sorted(set(devices) - set(system))} do not; start them all "
                f"(systemctl start flexnpu@N) or use --device with the served ones"
            )
    try:
        check_dir(own, create=True)
    except UnsafeRuntimeDir as e:
        raise SystemExit(f"flexnpu run: {e}") from None
    leases: list[Lease] = []
    try:
        for d in devices:
            leases.append(_lease_or_start(d, own, args))
    except BaseException:
        for lease in leases:
            lease.close()
        raise
    return own, leases


def _lease_or_start(device: int, rdir: Path, args: argparse.Namespace) -> Lease:
    sock = socket_path(device, rdir)
    lease = hold(sock)
    if lease is not None:
        return lease
    # Whoever holds the lock starts the daemon; the others wait for it and attach.
    with open(rdir / f"npu{device}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lease = hold(sock)
        if lease is not None:
            return lease
        try:
            dp = DaemonProcess(
                device,
                rdir,
                [
                    "--backend",
                    args.backend,
                    "--policy",
                    args.policy,
                    "--exit-when-idle",
                    str(args.idle_grace),
                    "--embedded",
                ],
            )
        except DaemonStartError as e:
            raise SystemExit(f"flexnpu run: the embedded daemon could not start: {e}") from None
        dp.release()
        if args.verbose:
            print(
                f"flexnpu run: started the embedded daemon for device {device} (pid {dp.pid}); "
                f"its log: {dp.log}",
                file=sys.stderr,
            )
        lease = hold(sock)
        if lease is None:
            raise SystemExit(
                f"flexnpu run: the embedded daemon for device {device} stopped at once:\n{dp.log_text()}"
            )
        return lease


def run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print(
            "flexnpu run: no program given; usage: flexnpu run [options] -- PROGRAM [ARGS...]",
            file=sys.stderr,
        )
        return 2
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        print(f"flexnpu run: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    devices = _devices(args.device)
    env = dict(os.environ)
    leases: list[Lease] = []
    try:
        if args.daemon == "auto":
            rdir, leases = shared_daemons(devices, args)
        else:
            rdir = Path(args.daemon)
            for d in devices:
                if not answers(socket_path(d, rdir)):
                    print(
                        f"flexnpu run: no daemon for device {d} answers at {socket_path(d, rdir)}",
                        file=sys.stderr,
                    )
                    return 2
        front = choose_front(args.interpose, cmd)
        root = str(Path(__file__).resolve().parent.parent)
        if front == "native":
            env["PYTHONPATH"] = os.pathsep.join(
                [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            )
            try:
                native_env(env, args.verbose)
            except SystemExit as e:
                print(f"flexnpu run: cannot build the native front end: {e}", file=sys.stderr)
                return 2
        else:
            boot = bootstrap_dir()
            env["PYTHONPATH"] = os.pathsep.join(
                [str(boot), root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            )
        env["FLEXNPU_INTERPOSE"] = front
        env["FLEXNPU_RUNTIME_DIR"] = str(rdir)
        env["FLEXNPU_DEVICES"] = ",".join(map(str, devices))
        env["FLEXNPU_PHASE"] = args.phase
        env["FLEXNPU_ACTIVE"] = "1"
        if args.memory_limit:
            env["FLEXNPU_CLIENT_MEMORY_LIMIT"] = args.memory_limit
        return run_child(cmd, env)
    finally:
        for lease in leases:
            lease.close()


def run_child(cmd: list[str], env: dict[str, str]) -> int:
    """Run the program to its end; its exit status (128+N when killed by signal N).

    The program stays in our process group, so what the terminal sends the foreground group
    (^C, ^\\) and what someone sends the whole group reach it directly: forwarding those too
    would deliver them twice and interrupt its cleanup (a KeyboardInterrupt inside its
    `finally`). Those we only absorb. Signals that are usually sent to one process (SIGTERM,
    SIGHUP from a supervisor, SIGUSR1/2) are forwarded."""
    child: subprocess.Popen | None = None

    def forward(sig: int, _frame: object) -> None:
        if sig not in GROUP_SIGNALS and child is not None and child.poll() is None:
            child.send_signal(sig)

    # Installed before the program starts, so a ^C during its start cannot kill us instead.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        try:
            child = subprocess.Popen(cmd, env=env)
        except OSError as e:
            print(f"flexnpu run: cannot start {cmd[0]}: {e}", file=sys.stderr)
            return 126
        rc = child.wait()
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    return rc if rc >= 0 else 128 - rc
