"""stderr logging that reads well both in a terminal and in the systemd journal.

Under systemd, stderr is connected to journald, which records its own timestamp, unit, pid
and reads a ``<N>`` syslog-priority prefix on each line. So in journald mode we print
``<6>flexnpu.daemon: message`` (no timestamp, the priority on every line of a multi-line
record such as a traceback, so the whole traceback is filed as an error). In a terminal we
print ``2026-01-01 12:00:00.123 INFO flexnpu.daemon[123]: message``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

__all__ = ["setup_logging", "journald_stderr", "JournaldFormatter", "TerminalFormatter", "SYSLOG_PRIORITY"]

# syslog(3) priorities used by sd-daemon(3) prefixes.
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for lvl in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= lvl:
            return SYSLOG_PRIORITY[lvl]
    return 7


def journald_stderr(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream systemd gave us.

    systemd sets JOURNAL_STREAM=<device>:<inode> of that stream; comparing it with the
    stream's fstat (as sd_journal_stream_fd docs advise) avoids a false positive when a child
    inherited the variable but has its stderr redirected to a file or terminal.
    """
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class JournaldFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class TerminalFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s[%(process)d]: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        )


_HANDLER_TAG = "_flexnpu_handler"


def setup_logging(
    level: int | str | None = None, *, journald: bool | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger to write to stderr (or ``stream``); idempotent.

    ``level``: a logging level or its name ("debug", "INFO"); None reads FLEXNPU_LOG_LEVEL,
    default INFO. ``journald``: force the journal format on/off; None detects it from
    JOURNAL_STREAM. Returns the installed handler.
    """
    if level is None:
        level = os.environ.get("FLEXNPU_LOG_LEVEL") or "INFO"
    if isinstance(level, str):
        name = level.strip().upper()
        resolved = logging.getLevelName(name)
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}; use debug, info, warning, error or critical")
        level = resolved
    stream = sys.stderr if stream is None else stream
    if journald is None:
        journald = journald_stderr(stream)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_TAG, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournaldFormatter() if journald else TerminalFormatter())
    setattr(handler, _HANDLER_TAG, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
