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
from .policies import DEFAULT_POLICY, POLICY_NAMES, describe as describe_policies


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=int, default=int(os.environ.get("FLEXNPU_DEVICE", 0)),
                   help="physical device number to serve (default 0)")
    p.add_argument("--backend", default=os.environ.get("FLEXNPU_BACKEND", "auto"),
                   help="auto|cpu|cuda|npu|emu:<spec>[+cpu] (auto: npu if torch_npu finds one, else cuda, else cpu)")
    p.add_argument("--policy", default=os.environ.get("FLEXNPU_POLICY", DEFAULT_POLICY),
                   choices=POLICY_NAMES,
                   help=f"scheduling policy (default {DEFAULT_POLICY}): {describe_policies()}")
    p.add_argument("--tpot-budget-ms", type=float, default=float(os.environ.get("FLEXNPU_TPOT_BUDGET_MS", 50)),
                   help="flex policy: decode iteration budget in ms (default 50)")
    p.add_argument("--memory-limit", default=os.environ.get("FLEXNPU_MEMORY_LIMIT"),
                   help="default device memory limit per client, e.g. 8GiB (default: none)")
    p.add_argument("--memory-limit-max", default=os.environ.get("FLEXNPU_MEMORY_LIMIT_MAX"),
                   help="highest limit a client may ask for (default: the default limit)")
    p.add_argument("--device-memory", default=os.environ.get("FLEXNPU_DEVICE_MEMORY"),
                   help="memory all clients together may hold, e.g. 60GiB (default: the device's "
                        "memory; for the cpu backend half of the host's RAM)")
    env_uids = os.environ.get("FLEXNPU_ALLOW_UIDS")
    p.add_argument("--allow-uid", action="append",
                   default=[u.strip() for u in env_uids.split(",") if u.strip()] if env_uids else None,
                   metavar="UID",
                   help="uid allowed to attach (repeatable; 'any' for everyone who can open the socket; "
                        "default: the daemon's uid and root)")
    p.add_argument("--socket-mode", default=os.environ.get("FLEXNPU_SOCKET_MODE", "0660"),
                   help="file mode of the control socket (octal, default 0660)")
    p.add_argument("--runtime-dir", default=None, help="directory for the control socket")
    p.add_argument("--log-level", default=os.environ.get("FLEXNPU_LOG_LEVEL", "info"))


def _allowed(values: list[str] | None) -> set[int] | None:
    if not values:
        return {os.geteuid(), 0}
    if "any" in values:
        return None
    try:
        return {int(v) for v in values}
    except ValueError:
        raise SystemExit(f"flexnpu daemon: --allow-uid takes numbers or 'any', got {values}") from None


def run(args: argparse.Namespace) -> int:
    try:
        from ..logging_setup import setup_logging
    except ImportError:  # pragma: no cover - minimal fallback
        def setup_logging(level: str, **_: object) -> None:
            logging.basicConfig(level=level.upper(), stream=sys.stderr,
                                format="%(asctime)s %(name)s %(levelname)s %(message)s")
    setup_logging(args.log_level)
    log = logging.getLogger("flexnpu.daemon")
    try:
        from .backends import make_backend

        backend = make_backend(args.backend, args.device)
    except Exception as e:  # noqa: BLE001
        print(f"flexnpu daemon: cannot open backend {args.backend!r} for device {args.device}: {e}",
              file=sys.stderr)
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
            args.device, backend,
            runtime_dir=Path(args.runtime_dir) if args.runtime_dir else None,
            policy=args.policy, memory_limit=parse_bytes(args.memory_limit),
            memory_limit_max=parse_bytes(args.memory_limit_max),
            device_memory=parse_bytes(args.device_memory), allow_uids=_allowed(args.allow_uid),
            socket_mode=int(str(args.socket_mode), 8), notify=notify,
            tpot_budget_s=args.tpot_budget_ms / 1e3)
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
