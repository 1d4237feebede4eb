"""Where daemons put their control sockets, and how clients find them."""
from __future__ import annotations

import os
from pathlib import Path


def runtime_dir() -> Path:
    """The directory holding every daemon's control socket.

    FLEXNPU_RUNTIME_DIR wins; root uses /run/flexnpu (systemd's RuntimeDirectory=flexnpu);
    anyone else $XDG_RUNTIME_DIR/flexnpu, falling back to /tmp/flexnpu-<uid>.
    """
    env = os.environ.get("FLEXNPU_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/flexnpu")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "flexnpu"
    return Path(f"/tmp/flexnpu-{os.geteuid()}")


def socket_path(device: int, base: Path | None = None) -> Path:
    """The control socket of `device`. Without FLEXNPU_RUNTIME_DIR, a non-root user whose own
    runtime directory has no daemon for the device uses the system daemons' /run/flexnpu."""
    if base is None:
        own = runtime_dir() / f"npu{device}.sock"
        system = Path("/run/flexnpu") / f"npu{device}.sock"
        if not os.environ.get("FLEXNPU_RUNTIME_DIR") and not own.exists() and system.exists():
            return system
        return own
    return base / f"npu{device}.sock"


def list_sockets(base: Path | None = None) -> list[tuple[int, Path]]:
    """(device, path) for every control socket present, sorted by device number."""
    d = base or runtime_dir()
    out = []
    if d.is_dir():
        for p in d.glob("npu*.sock"):
            num = p.name[3:-5]
            if num.isdigit():
                out.append((int(num), p))
    return sorted(out)
