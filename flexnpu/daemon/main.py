"""Serve one physical device to every process on this host.

Normally started by systemd (`flexnpu@N.service`) or embedded by `flexnpu run` when no daemon
serves the device. Clients attach over the control socket in the runtime directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..units import parse_bytes
from .backends import BACKEND_SYNTAX, check_backend
from .policies import DEFAULT_POLICY, describe as describe_policies, policy_arg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        type=int,
        default=int(os.environ.get("FLEXNPU_DEVICE", 0)),
        help="physical device number to serve (default 0)",
    )
    p.add_argument(
        "--backend",
        default=os.environ.get("FLEXNPU_BACKEND", "auto"),
        type=check_backend,
        help=f"{BACKEND_SYNTAX} (auto: npu if torch_npu finds one, else cuda, else cpu)",
    )
    p.add_argument(
        "--policy",
        default=os.environ.get("FLEXNPU_POLICY", DEFAULT_POLICY),
        type=policy_arg,
        help=f"scheduling policy (default {DEFAULT_POLICY}): {describe_policies()}",
    )
    p.add_argument(
        "--tpot-budget-ms",
        type=float,
        default=float(os.environ.get("FLEXNPU_TPOT_BUDGET_MS", 50)),
        help="flex policy: decode iteration budget in ms (default 50)",
    )
    p.add_argument(
        "--memory-limit",
        default=os.environ.get("FLEXNPU_MEMORY_LIMIT"),
        help="default device memory limit per client, e.g. 8GiB (default: none)",
    )
    p.add_argument(
        "--memory-limit-max",
        default=os.environ.get("FLEXNPU_MEMORY_LIMIT_MAX"),
        help="highest limit a client may ask for (default: the default limit)",
    )
    p.add_argument(
        "--device-memory",
        default=os.environ.get("FLEXNPU_DEVICE_MEMORY"),
        help="memory all clients together may hold, e.g. 60GiB (default: the device's "
        "memory; for the cpu backend half of the host's RAM)",
    )
    env_uids = os.environ.get("FLEXNPU_ALLOW_UIDS")
    p.add_argument(
        "--allow-uid",
        action="append",
        default=[u.strip() for u in env_uids.split(",") if u.strip()] if env_uids else None,
        metavar="UID",
        help="uid allowed to attach (repeatable; 'any' for everyone who can open the socket; "
        "default: the daemon's uid and root)",
    )
    p.add_argument(
        "--max-sessions-per-uid",
        type=int,
        default=int(os.environ.get("FLEXNPU_MAX_SESSIONS_PER_UID", 256)),
        help="attached clients one uid may have at a time (default 256)",
    )
    p.add_argument(
        "--client-host-memory",
        default=os.environ.get("FLEXNPU_CLIENT_HOST_MEMORY", "256MiB"),
        help="daemon memory one client's objects may hold: handles, queued and captured "
        "commands, copied host data (default 256MiB)",
    )
    p.add_argument(
        "--socket-mode",
        default=os.environ.get("FLEXNPU_SOCKET_MODE", "0660"),
        help="file mode of the control socket (octal, default 0660)",
    )
    p.add_argument(
        "--spin-us",
        type=float,
        default=_env_float("FLEXNPU_DAEMON_SPIN_US"),
        help="how long the wait for client requests spins before it sleeps, in microseconds "
        "(default 500: on virtual machines a sleeping daemon's wake-up costs ~100 us per "
        "request; 0 = sleep at once)",
    )
    p.add_argument(
        "--max-launch-gflop",
        type=float,
        default=_env_float("FLEXNPU_MAX_LAUNCH_GFLOP"),
        help="refuse an operator launch predicted to take more GFLOP than this (default 1e6; 0 = no ceiling)",
    )
    p.add_argument(
        "--max-launch-bytes",
        default=os.environ.get("FLEXNPU_MAX_LAUNCH_BYTES"),
        help="refuse an operator launch that reads and writes more bytes than this, broadcast "
        "views counted at full size, e.g. 64GiB (default: 4x the device memory "
        "clients may hold; 0 = no ceiling)",
    )
    p.add_argument("--runtime-dir", default=None, help="directory for the control socket")
    idle = os.environ.get("FLEXNPU_EXIT_WHEN_IDLE")
    p.add_argument(
        "--exit-when-idle",
        type=float,
        default=float(idle) if idle else None,
        metavar="SECONDS",
        help="exit this long after the last client (or waiting `flexnpu run`) left; "
        "`flexnpu run` starts its embedded daemons with it (default: never)",
    )
    port = os.environ.get("FLEXNPU_METRICS_PORT")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(port) if port else None,
        metavar="PORT",
        help="serve Prometheus metrics on http://ADDR:PORT+DEVICE/metrics, so one setting "
        "serves every device of a host (0: any free port, shown by `flexnpu status`; "
        "default: off)",
    )
    p.add_argument(
        "--metrics-addr",
        default=os.environ.get("FLEXNPU_METRICS_ADDR", "127.0.0.1"),
        metavar="ADDR",
        help="address the metrics endpoint listens on (default 127.0.0.1)",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="mark this daemon as started by `flexnpu run` (shown by `flexnpu status`)",
    )
    p.add_argument("--log-level", default=os.environ.get("FLEXNPU_LOG_LEVEL", "info"))


def _env_float(name: str) -> float | None:
    v = os.environ.get(name)
    return float(v) if v else None


def _allowed(values: list[str] | None) -> set[int] | None:
    if not values:
        return {os.geteuid(), 0}
    if "any" in values:
        return None
    try:
        return {int(v) for v in values}
    except ValueError:
        raise SystemExit(f"flexnpu daemon: --allow-uid takes numbers or 'any', got {values}") from None


def _metrics_port(args: argparse.Namespace) -> int | None:
    """PORT + device (one setting for every device of a host); 0 stays 0 (any free port)."""
    if args.metrics_port is None:
        return None
    return args.metrics_port + args.device if args.metrics_port else 0


def run(args: argparse.Namespace) -> int:
    from ..logging_setup import setup_logging  # stdlib only: cannot fail to import

    setup_logging(args.log_level)
    log = logging.getLogger("flexnpu.daemon")
    try:
        from .backends import make_backend

        backend = make_backend(args.backend, args.device)
    except Exception as e:  # noqa: BLE001
        print(
            f"flexnpu daemon: cannot open backend {args.backend!r} for device {args.device}: {e}",
            file=sys.stderr,
        )
        return 2
    from . import server

    notify = None
    try:
        from .systemd import Notifier

        notify = Notifier()
    except ImportError:
        pass
    try:
        d = server.Daemon(
            args.device,
            backend,
            runtime_dir=Path(args.runtime_dir) if args.runtime_dir else None,
            policy=args.policy,
            memory_limit=parse_bytes(args.memory_limit),
            memory_limit_max=parse_bytes(args.memory_limit_max),
            device_memory=parse_bytes(args.device_memory),
            allow_uids=_allowed(args.allow_uid),
            socket_mode=int(str(args.socket_mode), 8),
            notify=notify,
            tpot_budget_s=args.tpot_budget_ms / 1e3,
            max_sessions_per_uid=max(1, args.max_sessions_per_uid),
            exit_when_idle=args.exit_when_idle,
            embedded=args.embedded,
            metrics_port=_metrics_port(args),
            metrics_addr=args.metrics_addr,
            max_launch_gflop=args.max_launch_gflop,
            max_launch_bytes=parse_bytes(args.max_launch_bytes),
            client_host_memory=parse_bytes(args.client_host_memory),
            spin_s=server.DAEMON_SPIN_S if args.spin_us is None else args.spin_us * 1e-6,
        )
        d.bind()
    except (RuntimeError, ValueError, OSError) as e:
        print(f"flexnpu daemon: {e}", file=sys.stderr)
        return 1
    server.install_signal_handlers(d)
    try:
        d.serve_forever()
    except Exception:  # noqa: BLE001
        log.exception("daemon failed")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flexnpu daemon", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
