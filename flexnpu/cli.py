"""flexnpu: run unmodified accelerator programs through per-device FlexNPU daemons.

Subcommands are small modules; each exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Benchmarks live in the checkout's top-level ``bench/`` folder, installed as ``flexnpu.bench``:
``flexnpu bench NAME`` runs ``bench/NAME.py``'s ``main(argv)``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

# name -> (module, one-line help). Modules are imported lazily so `flexnpu --help` stays fast
# and a missing optional dependency (torch) only affects the subcommand that needs it.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("flexnpu.cmd_run", "run a program with its device calls routed through FlexNPU"),
    "daemon": ("flexnpu.daemon.main", "serve one device (normally started by systemd or `run`)"),
    "status": ("flexnpu.cmd_status", "list running daemons and their clients"),
    "service": ("flexnpu.cmd_service", "install systemd units for the daemons"),
    "k8s-device-plugin": ("flexnpu.k8s.plugin", "advertise shared devices to the kubelet (Kubernetes)"),
    "install-torch-npu": (
        "flexnpu.cmd_install_torch_npu",
        "install the real torch_npu into an isolated folder for the native front end",
    ),
    "calibrate": ("flexnpu.cmd_calibrate", "fit the scheduler's cost model to this machine and save it"),
}

# Former benchmarks that became commands: `flexnpu bench NAME` says where they went.
MOVED_FROM_BENCH = {"calibrate": "flexnpu calibrate"}


def _bench_names() -> list[str]:
    from flexnpu import bench  # type: ignore[attr-defined]  # the checkout's bench/, mapped in by flexnpu/__init__.py

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def _run_bench(argv: list[str]) -> int:
    names = _bench_names()
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: flexnpu bench NAME [options]\n\nmicrobenchmarks and studies; each takes --help, --quick, --json\n"
        )
        for n in names:
            mod = importlib.import_module(f"flexnpu.bench.{n}")
            doc = (mod.__doc__ or "").strip().splitlines()
            print(f"  {n:<12} {doc[0] if doc else ''}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in MOVED_FROM_BENCH:
        print(
            f"flexnpu bench {name}: it writes runtime configuration, so it is a command now: "
            f"run `{MOVED_FROM_BENCH[name]}{' ' if rest else ''}{' '.join(rest)}`",
            file=sys.stderr,
        )
        return 2
    if name not in names:
        print(f"flexnpu bench: unknown benchmark {name!r}; choose from: {', '.join(names)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"flexnpu.bench.{name}")
    return int(mod.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _run_bench(argv[1:])
    parser = argparse.ArgumentParser(
        prog="flexnpu",
        description="FlexNPU: transparent user-space virtualization for AI accelerators.",
        epilog="examples:\n  flexnpu run -- python app.py\n  flexnpu status --json\n  flexnpu bench ring --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="_subcommand", metavar="COMMAND")
    sub.add_parser("bench", help="run a benchmark (flexnpu bench --help lists them)")
    modules = {}
    for name, (modname, helptext) in SUBCOMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(
            name,
            help=helptext,
            description=(mod.__doc__ or helptext).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    if args._subcommand is None:
        parser.print_help()
        return 2
    return int(modules[args._subcommand].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
