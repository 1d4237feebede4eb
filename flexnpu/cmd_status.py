"""List the running FlexNPU daemons and their clients.

Asks every control socket <runtime dir>/npu<N>.sock for its status (a short timeout each, all
in parallel) and prints one table of daemons, then one table of clients per daemon: pid, uid,
command line, phase, device memory used/limit, ops/s and queue depth.

--json prints exactly {"daemons": [...], "stale": [...]}: "daemons" holds the status objects
the daemons returned (docs/operations.md lists the fields; a daemon that accepted the
connection but did not answer appears as {"device", "socket", "error", "clients": []}),
"stale" the socket paths nobody listens on any more (a daemon that died without cleaning up).

Exit status: 0, also when no daemon runs; with --device N, 1 if that daemon did not answer.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flexnpu import paths
from flexnpu.control import recv_msg, send_msg
from flexnpu.units import format_bytes


class StaleSocket(Exception):
    """Nobody listens on the socket (connection refused or the file vanished)."""


def query(path: Path, timeout: float = 1.0) -> dict:
    """The daemon object from one socket. Raises StaleSocket, TimeoutError or another error."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as e:
            raise StaleSocket(str(e)) from None
        send_msg(s, {"op": "status"})
        s.settimeout(max(0.01, deadline - time.monotonic()))
        reply, fds = recv_msg(s)
        for fd in fds:  # a status reply carries none; never leak what a confused peer sends
            os.close(fd)
    except TimeoutError:
        raise TimeoutError(f"no reply within {timeout:g} s") from None
    finally:
        s.close()
    if not reply.get("ok"):
        raise RuntimeError(
            f"daemon refused status: {reply.get('error', 'no reason given')}"
            + (f" ({reply['code']})" if reply.get("code") else "")
        )
    daemon = reply.get("daemon")
    if not isinstance(daemon, dict):
        raise ValueError("reply has no daemon object")
    daemon.setdefault("clients", [])
    return daemon


SYSTEM_RUNTIME_DIR = Path("/run/flexnpu")  # RuntimeDirectory= of flexnpu@.service


def default_dirs() -> list[Path]:
    """Where to look without --runtime-dir: our own runtime dir, plus the systemd daemons'
    /run/flexnpu for non-root users (whose own default is $XDG_RUNTIME_DIR/flexnpu)."""
    dirs = [paths.runtime_dir()]
    if not os.environ.get("FLEXNPU_RUNTIME_DIR") and SYSTEM_RUNTIME_DIR not in dirs:
        dirs.append(SYSTEM_RUNTIME_DIR)
    return dirs


def collect(runtime_dir: Path | list[Path], device: int | None = None, timeout: float = 1.0) -> dict:
    """{"daemons": [...], "stale": [...]} for the sockets in ``runtime_dir`` (one or several)."""
    dirs = runtime_dir if isinstance(runtime_dir, list) else [runtime_dir]
    sockets = [item for d in dirs for item in paths.list_sockets(d)]
    if device is not None:
        sockets = [(d, p) for d, p in sockets if d == device]
    daemons: list[dict] = []
    stale: list[str] = []

    def one(item: tuple[int, Path]) -> tuple[str, dict | str]:
        dev, path = item
        try:
            return "ok", query(path, timeout)
        except StaleSocket:
            return "stale", str(path)
        except PermissionError as e:
            return "error", {
                "device": dev,
                "socket": str(path),
                "clients": [],
                "error": f"permission denied ({e.strerror}); check the socket mode and allowed uids",
            }
        except (OSError, ValueError, RuntimeError, ConnectionError) as e:
            if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
                return "stale", str(path)
            return "error", {"device": dev, "socket": str(path), "clients": [], "error": str(e)}

    if sockets:
        with ThreadPoolExecutor(max_workers=min(16, len(sockets))) as pool:
            for _kind, value in pool.map(one, sockets):
                if isinstance(value, str):  # kind == "stale": the socket's path
                    stale.append(value)
                else:
                    daemons.append(value)
    daemons.sort(
        key=lambda d: (d.get("device") if isinstance(d.get("device"), int) else 1 << 30, str(d.get("socket")))
    )
    return {"daemons": daemons, "stale": stale}


# ---------------------------------------------------------------------------- formatting


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _table(headers: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(headers)] + [fmt(r) for r in rows]


def _g(obj: dict, key: str, default: str = "-") -> str:
    v = obj.get(key)
    return default if v is None else str(v)


def _plans_line(d: dict) -> str:
    """The daemon's launch plans in one line (status `plans`; absent on backends without them)."""
    p = d.get("plans")
    if "error" in d or not isinstance(p, dict):
        return ""
    line = (
        f"device {_g(d, 'device')} plans: {_g(p, 'plans', '0')} ({_g(p, 'compiled', '0')} compiled, "
        f"{_g(p, 'compiled_launches', '0')} launches run compiled; {_g(p, 'sized_plans', '0')} without sizes"
    )
    if p.get("compiled_sized") is not None:
        line += f", {p['compiled_sized']} compiled, {_g(p, 'compiled_sized_launches', '0')} launches"
    line += ")"
    if p.get("hot_path"):
        line += f"; hot path {p['hot_path']}"
    loop = d.get("loop")
    if isinstance(loop, dict) and isinstance(loop.get("busy_s"), (int, float)):
        total = (loop.get("busy_s") or 0) + (loop.get("wait_s") or 0)
        if total > 0:  # how much of its life the main loop worked: ~100 % means it sets the pace
            line += f"; main loop busy {100 * loop['busy_s'] / total:.0f} % of {human_duration(total)}"
    if p.get("compiled_executor") is False:
        line += "; compiled executor not built: planned launches run in Python (python3 -m flexnpu.daemon.optable.build)"
    return line


def format_text(report: dict, runtime_dir: Path | list[Path], width: int = 120) -> str:
    daemons, stale = report["daemons"], report["stale"]
    where = " or ".join(map(str, runtime_dir)) if isinstance(runtime_dir, list) else str(runtime_dir)
    lines: list[str] = []
    if not daemons and not stale:
        return f"no FlexNPU daemons running in {where}"
    if daemons:
        rows = []
        for d in daemons:
            if "error" in d:
                rows.append([_g(d, "device"), "?", "-", "-", "-", "-", "-", "-", "-", f"error: {d['error']}"])
                continue
            backend = _g(d, "backend")
            if d.get("device_type") and d.get("device_type") != d.get("backend"):
                backend += f" ({d['device_type']})"
            if d.get("embedded"):
                backend += ", embedded"  # started by `flexnpu run`; exits when idle
            rows.append(
                [
                    _g(d, "device"),
                    backend,
                    _g(d, "pid"),
                    human_duration(d.get("uptime_s")),
                    format_bytes(d["rss_bytes"]) if d.get("rss_bytes") else "-",  # the daemon's host memory
                    _g(d, "policy"),
                    format_bytes(d.get("memory_limit_default")) if d.get("memory_limit_default") else "none",
                    str(len(d.get("clients") or [])),
                    _g(d, "ops_total"),
                    _g(d, "version"),
                ]
            )
        dirs = sorted({str(Path(str(d.get("socket"))).parent) for d in daemons if d.get("socket")})
        lines.append(f"FlexNPU daemons in {', '.join(dirs) or where}")
        lines += _table(
            [
                "DEVICE",
                "BACKEND",
                "PID",
                "UPTIME",
                "RSS",
                "POLICY",
                "CLIENT LIMIT",
                "CLIENTS",
                "OPS",
                "VERSION",
            ],
            rows,
        )
    for d in daemons:
        line = _plans_line(d)
        if line:
            lines.append(line)
    for d in daemons:
        clients = d.get("clients") or []
        if "error" in d or not clients:
            continue
        lines += ["", f"device {_g(d, 'device')}: {len(clients)} client{'s' if len(clients) != 1 else ''}"]
        rows = []
        for c in clients:
            limit = c.get("memory_limit")
            mem = format_bytes(c.get("memory_bytes")) + " / " + (format_bytes(limit) if limit else "no limit")
            ops = c.get("ops_per_s")
            rows.append(
                [
                    _g(c, "pid"),
                    _g(c, "uid"),
                    _g(c, "phase"),
                    mem,
                    f"{ops:.1f}" if isinstance(ops, (int, float)) else "-",
                    _g(c, "queue_depth"),
                    _g(c, "streams"),
                    # argv may hold newlines or tabs (python -c '...'): one table row each.
                    " ".join(_g(c, "cmdline", "").split()),
                ]
            )
        table = _table(
            ["PID", "UID", "PHASE", "MEMORY USED / LIMIT", "OPS/S", "QUEUE", "STREAMS", "COMMAND"],
            rows,
            indent="  ",
        )
        lines += [l if len(l) <= width else l[: width - 3] + "..." for l in table]
    if stale:
        lines += ["", "stale sockets (no daemon listening; remove them or restart the daemon):"]
        lines += [f"  {p}" for p in stale]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help='print {"daemons": [...], "stale": [...]} as JSON'
    )
    parser.add_argument(
        "--runtime-dir",
        metavar="DIR",
        type=Path,
        help="where the daemons' sockets are (default: FLEXNPU_RUNTIME_DIR if set, "
        "else /run/flexnpu, and for non-root users also $XDG_RUNTIME_DIR/flexnpu)",
    )
    parser.add_argument("--device", type=int, metavar="N", help="only the daemon of device N")
    parser.add_argument(
        "--timeout", type=float, default=1.0, metavar="S", help="seconds to wait for each daemon (default 1)"
    )


def run(args: argparse.Namespace) -> int:
    runtime_dir = [args.runtime_dir] if args.runtime_dir else default_dirs()
    report = collect(runtime_dir, args.device, args.timeout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        import shutil

        print(format_text(report, runtime_dir, width=max(80, shutil.get_terminal_size((120, 24)).columns)))
    if args.device is not None:
        answered = any("error" not in d for d in report["daemons"])
        if not answered:
            if not args.json:
                where = " or ".join(map(str, runtime_dir))
                print(f"no answering daemon for device {args.device} in {where}", file=sys.stderr)
            return 1
    return 0
