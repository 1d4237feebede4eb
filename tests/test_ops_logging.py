"""Log format on stderr: journald priority prefixes under systemd, timestamps otherwise."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexnpu.logging_setup import journald_stderr, setup_logging

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_journald_format_has_priorities_and_no_timestamp():
    buf = io.StringIO()
    setup_logging("debug", journald=True, stream=buf)
    log = logging.getLogger("flexnpu.daemon")
    log.debug("dbg")
    log.info("client %d attached", 7)
    log.warning("slow")
    log.error("bad")
    log.critical("dead")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("op failed")
    lines = buf.getvalue().splitlines()
    assert lines[:5] == [
        "<7>flexnpu.daemon: dbg",
        "<6>flexnpu.daemon: client 7 attached",
        "<4>flexnpu.daemon: slow",
        "<3>flexnpu.daemon: bad",
        "<2>flexnpu.daemon: dead",
    ]
    # Every traceback line keeps the error priority, so journald files the whole record as one.
    tb = lines[5:]
    assert tb[0] == "<3>flexnpu.daemon: op failed" and len(tb) > 3
    assert all(l.startswith("<3>") for l in tb) and tb[-1] == "<3>ValueError: boom"
    assert not re.search(r"\d{4}-\d\d-\d\d", buf.getvalue())


def test_terminal_format_and_level_filter():
    buf = io.StringIO()
    setup_logging("warning", journald=False, stream=buf)
    logging.getLogger("flexnpu.x").info("hidden")
    logging.getLogger("flexnpu.x").warning("shown")
    out = buf.getvalue()
    assert "hidden" not in out
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} WARNING flexnpu\.x\[{os.getpid()}\]: shown\n", out
    )


def test_idempotent_and_bad_level(monkeypatch):
    buf = io.StringIO()
    setup_logging("info", journald=True, stream=buf)
    setup_logging("info", journald=True, stream=buf)
    logging.getLogger("t").info("once")
    assert buf.getvalue().count("once") == 1
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("loud")
    monkeypatch.setenv("FLEXNPU_LOG_LEVEL", "error")
    setup_logging(journald=True, stream=buf)
    assert logging.getLogger().level == logging.ERROR


def test_journal_stream_detection(tmp_path, monkeypatch):
    f = open(tmp_path / "journal", "w")
    other = open(tmp_path / "other", "w")
    try:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert journald_stderr(f)
        assert not journald_stderr(other)  # inherited variable, stderr redirected elsewhere
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not journald_stderr(f)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not journald_stderr(f)
    finally:
        f.close()
        other.close()


def test_subprocess_autodetects_journal_stream(tmp_path):
    """A child whose stderr is the stream named by JOURNAL_STREAM writes the journal format."""
    code = textwrap.dedent("""
        import logging
        from flexnpu.logging_setup import setup_logging
        setup_logging("info")
        logging.getLogger("flexnpu.daemon").warning("device lost")
    """)
    for journal in (True, False):
        path = tmp_path / f"stderr-{journal}"
        with open(path, "w") as err:
            st = os.fstat(err.fileno())
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.pop("JOURNAL_STREAM", None)
            if journal:
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            subprocess.run(
                [sys.executable, "-c", code], env=env, stderr=err, timeout=30, check=True, cwd=ROOT
            )
        out = path.read_text()
        if journal:
            assert out == "<4>flexnpu.daemon: device lost\n"
        else:
            assert re.match(r"\d{4}-\d\d-\d\d .* WARNING flexnpu\.daemon\[\d+\]: device lost\n$", out)
