"""Where daemons put their control sockets, how clients find them, and whom they trust.

A runtime folder another user controls is a squatting attack: that user can run a fake daemon
the victim's client sends its memory segment to, or swap the real daemon's socket. So, as
ssh-agent and tmux do, a runtime folder is used only when it is not a symlink, is owned by the
user or root (or a uid the user named in FLEXNPU_DAEMON_UID), and nobody else can write it;
and a client sends nothing to a control socket before SO_PEERCRED shows the process behind it
is one of those uids (check_peer).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

SYSTEM_RUNTIME_DIR = Path("/run/flexnpu")  # RuntimeDirectory= of flexnpu@.service (mode 0755)


class UnsafeRuntimeDir(RuntimeError):
    """A runtime folder (or daemon) that someone other than the user or root controls."""


def runtime_dir() -> Path:
    """The directory holding every daemon's control socket.

    FLEXNPU_RUNTIME_DIR wins; root uses /run/flexnpu (systemd's RuntimeDirectory=flexnpu);
    anyone else $XDG_RUNTIME_DIR/flexnpu, falling back to flexnpu-<uid> in $TMPDIR or /tmp.
    """
    env = os.environ.get("FLEXNPU_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "flexnpu"
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"flexnpu-{os.geteuid()}"


def trusted_uids() -> set[int]:
    """Who may own a runtime folder and run the daemon we talk to: root, ourselves, and the
    uids in FLEXNPU_DAEMON_UID (comma-separated; for a shared daemon run as a service user)."""
    uids = {0, os.geteuid()}
    for part in os.environ.get("FLEXNPU_DAEMON_UID", "").split(","):
        part = part.strip()
        if part:
            try:
                uids.add(int(part))
            except ValueError:
                raise UnsafeRuntimeDir(f"FLEXNPU_DAEMON_UID must hold numeric uids, not {part!r}") from None
    return uids


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_dir(path: Path, create: bool = False) -> Path:
    """Return `path` if it is a safe runtime folder, creating it (mode 0700) when `create`.

    Safe: a real directory (not a symlink), owned by a trusted uid, writable by nobody else
    (no group/other write bit), inside ancestors nobody else can swap it out of (each ancestor
    owned by a trusted uid, and not writable by others unless sticky, like /tmp). The folder in
    the shared temp directory must be exactly the user's own with mode 0700.
    Raises UnsafeRuntimeDir with what is wrong and how to fix it; FileNotFoundError when it is
    missing and not `create`.
    """
    path = Path(os.path.abspath(path))
    trusted = trusted_uids()
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(path)
    fix = (
        "remove it (if it is not yours, someone may be impersonating FlexNPU) or set "
        "FLEXNPU_RUNTIME_DIR or XDG_RUNTIME_DIR to a folder of your own"
    )
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRuntimeDir(f"runtime folder {path} is a symbolic link; refusing to use it: {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRuntimeDir(f"runtime folder {path} is not a directory: {fix}")
    if st.st_uid not in trusted:
        raise UnsafeRuntimeDir(
            f"runtime folder {path} belongs to {_owner(st.st_uid)}, not to you "
            f"(uid {os.geteuid()}) or root; refusing to use it: {fix}"
        )
    if st.st_mode & 0o022:
        raise UnsafeRuntimeDir(
            f"runtime folder {path} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it: chmod 700 {path}, or {fix}"
        )
    tmp_default = path.name == f"flexnpu-{os.geteuid()}" and os.geteuid() != 0
    if tmp_default and (st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700):
        raise UnsafeRuntimeDir(
            f"runtime folder {path} must be yours with mode 0700 (it is "
            f"{_owner(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}): {fix}"
        )
    for anc in path.parents:
        ast = os.stat(anc)
        if ast.st_uid not in trusted:
            raise UnsafeRuntimeDir(
                f"runtime folder {path} lies in {anc}, which belongs to {_owner(ast.st_uid)}: {fix}"
            )
        if ast.st_mode & 0o022 and not ast.st_mode & stat.S_ISVTX:
            raise UnsafeRuntimeDir(
                f"runtime folder {path} lies in {anc}, which others can write "
                f"(mode {stat.S_IMODE(ast.st_mode):04o}, not sticky): {fix}"
            )
    return path


def check_peer(sock: socket.socket, path: str | Path) -> int:
    """Raise UnsafeRuntimeDir unless the process listening at `path` runs as a trusted uid;
    call it after connect() and before sending anything. Returns the daemon's pid."""
    from .control import peer_credentials

    pid, uid, _gid = peer_credentials(sock)
    if uid not in trusted_uids():
        raise UnsafeRuntimeDir(
            f"the process serving {path} (pid {pid}) runs as {_owner(uid)}, not as root or you "
            f"(uid {os.geteuid()}); refusing to send it anything. If you trust that daemon, set "
            f"FLEXNPU_DAEMON_UID={uid}"
        )
    return pid


def socket_path(device: int, base: Path | None = None) -> Path:
    """The control socket of `device`. Without FLEXNPU_RUNTIME_DIR, a non-root user whose own
    runtime directory has no daemon for the device uses the system daemons' /run/flexnpu."""
    if base is None:
        own = runtime_dir() / f"npu{device}.sock"
        system = SYSTEM_RUNTIME_DIR / f"npu{device}.sock"
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
