"""Graph capture and replay: a capturing stream records prepared commands instead of running them
(session.prepare does the recording); a replay runs them again as one command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import BadState, InvalidArgument, InvalidHandle, NotFound, code_of, error_for
from ...protocol import Op
from .. import requests as R
from ..objects import Cmd, Graph, StreamState

if TYPE_CHECKING:
    from ..session import Session

MAX_GRAPHS = 4096  # per client


def _run_graph_mark(s: Session, st: StreamState, c: Cmd) -> None:
    if c.sync:
        s.reply_sync(c.user_data, st, c.a[1] if len(c.a) > 1 else 0)


def _p_graph_begin(s: Session, st: StreamState | None, r: R.GraphBegin) -> Cmd:
    assert st is not None  # stream-ordered: prepare resolved it
    gid = r.graph_id
    if st.capturing:
        raise BadState(f"stream {st.sid} is already capturing graph {st.capturing}")
    if not 0 < gid < 1 << 32 or gid in s.graphs:
        raise InvalidHandle(f"graph id {gid} invalid or in use")
    if len(s.graphs) >= MAX_GRAPHS:
        raise InvalidArgument("too many graphs")
    s.graphs[gid] = Graph(gid, st.sid)
    st.capturing = gid

    def undo() -> None:
        if st.capturing == gid:
            st.capturing = 0
        g = s.graphs.pop(gid, None)
        if g is not None:
            s.host.uncharge(g.held)

    return Cmd(Op.GRAPH_BEGIN, r.user_data, r.sync, _run_graph_mark, (gid,), undo=undo)


def _p_graph_end(s: Session, st: StreamState | None, r: R.GraphEnd) -> Cmd:
    assert st is not None  # stream-ordered: prepare resolved it
    gid = r.graph_id
    if st.capturing != gid:
        raise BadState(f"stream {st.sid} is not capturing graph {gid}")
    g = s.graphs[gid]
    g.complete = True
    st.capturing = 0
    return Cmd(Op.GRAPH_END, r.user_data, r.sync, _run_graph_mark, (gid, len(g.ops)))


def _run_graph_replay(s: Session, st: StreamState, c: Cmd) -> None:
    g: Graph = c.a[0]
    if g.compiled is None and s.daemon.compile_graphs:
        from ..graphs import compile_graph

        g.compiled = compile_graph(g.ops, s.daemon.backend.device) or False
    if g.compiled:
        try:
            g.compiled.run(s, st)
        except Exception as e:
            raise error_for(code_of(e), f"graph {g.gid} replay failed: {e}") from e
    else:
        for cmd in g.ops:
            cmd.run(s, st, cmd)
    st.ops_done += len(g.ops)
    if c.sync:
        s.reply_sync(c.user_data, st)


def _p_graph_replay(s: Session, st: StreamState | None, r: R.GraphReplay) -> Cmd:
    g = s.graphs.get(r.graph_id)
    if g is None:
        raise NotFound(f"unknown graph {r.graph_id}")
    if not g.complete:
        raise BadState(f"graph {r.graph_id} is still being captured")
    return Cmd(Op.GRAPH_REPLAY, r.user_data, r.sync, _run_graph_replay, (g,))


def _p_graph_destroy(s: Session, st: StreamState | None, r: R.GraphDestroy) -> None:
    g = s.graphs.get(r.graph_id)
    if g is None:
        raise NotFound(f"unknown graph {r.graph_id}")
    if not g.complete:
        raise BadState(f"graph {r.graph_id} is still being captured")
    del s.graphs[r.graph_id]
    g.release()
    s.host.uncharge(g.held)
    if r.sync:
        s.reply(r.user_data)


PREPARE: dict[Op, Any] = {
    Op.GRAPH_BEGIN: _p_graph_begin,
    Op.GRAPH_END: _p_graph_end,
    Op.GRAPH_REPLAY: _p_graph_replay,
    Op.GRAPH_DESTROY: _p_graph_destroy,
}
