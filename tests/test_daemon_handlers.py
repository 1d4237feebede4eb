"""The daemon's request dispatch: typed requests named from the wire table, one handler per
opcode, and the line between a client's mistake (its error) and a daemon bug (INTERNAL, logged)."""

from __future__ import annotations

import textwrap

import pytest

from flexnpu import protocol as P
from flexnpu.errors import Err, FlexNPUError, InvalidHandle
from flexnpu.daemon.handlers import TABLE
from flexnpu.daemon.requests import REQUEST_TYPES
from flexnpu.daemon_process import DaemonProcess, child_env


def test_every_opcode_has_a_typed_request_named_from_the_wire_table():
    for op, spec in P.OPS.items():
        cls = REQUEST_TYPES[op]
        assert tuple(n.removesuffix("_") for n in cls.field_names()) == spec.args, op.name
        words = tuple(range(100, 105))
        r = cls((int(op), P.FLAG_SYNC | P.FLAG_DEFERRED, 9, 7, 1, 2, *words))  # as unpacked from the SQ
        assert (r.user_data, r.sync, r.payload_offset, r.payload_len) == (7, True, 1, 2)
        assert r.flags == P.FLAG_SYNC | P.FLAG_DEFERRED
        assert not cls((int(op), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)).sync
        for i, name in enumerate(cls.field_names()):
            assert getattr(r, name) == words[i]


def test_dispatch_table_covers_the_wire_table_once():
    ops = {i for i, e in enumerate(TABLE) if e is not None}
    assert ops == {int(o) for o in P.OPS}
    for op in P.OPS:
        handler, rtype, ordered = TABLE[op]
        assert rtype is REQUEST_TYPES[op] and ordered == P.OPS[op].stream_ordered


# A daemon with a bug planted in one handler: the MEM_STATS handler raises a KeyError, as a
# real slip in handler code would. Loaded through sitecustomize in the daemon process only.
_PLANT_BUG = textwrap.dedent(
    """
    import flexnpu.daemon.handlers as h
    from flexnpu.protocol import Op

    def _buggy(s, st, r):
        return {}["no such key"]

    _fn, _rtype, _ordered = h.TABLE[Op.MEM_STATS]
    h.TABLE[Op.MEM_STATS] = (_buggy, _rtype, _ordered)
    """
)


@pytest.fixture
def buggy_daemon(runtime_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_PLANT_BUG)
    env = child_env(runtime_dir)
    env["PYTHONPATH"] = f"{site}:{env.get('PYTHONPATH', '')}"
    d = DaemonProcess(0, runtime_dir, ["--backend", "cpu"], detach=False, start_timeout=120, env=env)
    yield d
    d.stop()


def test_a_daemon_bug_is_reported_as_internal_logged_and_survived(buggy_daemon):
    from flexnpu.client import Client

    c = Client(0)
    try:
        with pytest.raises(FlexNPUError) as ei:
            c.memory_stats()
        assert ei.value.code == Err.INTERNAL
        assert "internal error in the daemon" in str(ei.value) and "KeyError" in str(ei.value)
        # the client's own mistakes keep their codes ...
        with pytest.raises(InvalidHandle):
            c.free(123456)
            c.synchronize()
        # ... and the client, like every other, is still served
        h = c.malloc(64, sync=True)
        c.free(h)
        c.nop()
        c2 = Client(0)
        c2.nop()
        c2.close()
    finally:
        c.close()
    log = buggy_daemon.log.read_text()
    assert "internal error (a daemon bug)" in log and "Traceback" in log and "KeyError" in log
