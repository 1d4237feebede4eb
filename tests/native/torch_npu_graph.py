"""Run by tests/test_native_graph.py under `flexnpu run --interpose native`: the REAL torch_npu's
torch.npu.NPUGraph (aclmdlRICaptureBegin/GetInfo/End, aclmdlRIExecuteAsync, aclmdlRIDestroy)
on FlexNPU's AscendCL libraries.

    python torch_npu_graph.py copies    # a graph of device copies, replayed 50 times; prints OK
    python torch_npu_graph.py decode    # a captured decode step replayed 50 times equals eager
    python torch_npu_graph.py lookup    # an index the graph computes is read anew on every replay
"""

import sys

import torch
import torch_npu  # noqa: F401  (the real one: flexnpu run puts its isolated folder on the path)


def copies() -> None:
    assert "site-packages" not in torch_npu.__file__, torch_npu.__file__
    torch.npu.set_device(0)
    n = 1 << 14
    static_in = torch.empty(n, dtype=torch.float32).to("npu")
    mid = torch.empty_like(static_in)
    static_out = torch.empty_like(static_in)
    pinned = torch.empty(n, dtype=torch.float32, pin_memory=True)
    torch.npu.synchronize()
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        mid.copy_(static_in)
        static_out.copy_(mid)
    for i in range(50):
        x = torch.arange(n, dtype=torch.float32) * (i + 1) - i
        pinned.copy_(x)
        static_in.copy_(pinned, non_blocking=True)
        g.replay()
        got = static_out.cpu()
        assert torch.equal(got, x), (i, got[:4], x[:4])
    g.reset()
    torch.npu.synchronize()

    # FlexNPU's phase hints from Python through ctypes (docs/native.md)
    import ctypes

    acl = ctypes.CDLL("libascendcl.so")
    assert acl.flexnpuSetPhase(b"decode", None) == 0
    assert acl.flexnpuSetPhase(b"bogus", None) == 100000  # ACL_ERROR_INVALID_PARAM
    stream = ctypes.c_void_p(torch.npu.current_stream().npu_stream)
    for _ in range(3):
        static_in.copy_(pinned, non_blocking=True)
        assert acl.flexnpuMarkStep(stream) == 0
    torch.npu.synchronize()
    print("OK")


def decode() -> None:
    """A decode step of a tiny transformer layer: needs the operator half (aclnn)."""
    torch.npu.set_device(0)
    torch.manual_seed(0)
    d, heads, vocab, ctx = 64, 4, 128, 16
    emb = torch.randn(vocab, d)
    wq, wk, wv, wo = (torch.randn(d, d) / d**0.5 for _ in range(4))
    w1, w2 = torch.randn(d, 4 * d) / d**0.5, torch.randn(4 * d, d) / (4 * d) ** 0.5
    lm = torch.randn(d, vocab) / d**0.5
    kcache, vcache = torch.randn(ctx, d), torch.randn(ctx, d)

    def step(tok, emb, wq, wk, wv, wo, w1, w2, lm, kcache, vcache):
        x = emb[tok]  # (1, d)
        h = torch.nn.functional.rms_norm(x, (d,))
        q, k, v = h @ wq, h @ wk, h @ wv
        keys = torch.cat([kcache, k], 0).view(-1, heads, d // heads).transpose(0, 1)
        vals = torch.cat([vcache, v], 0).view(-1, heads, d // heads).transpose(0, 1)
        qh = q.view(1, heads, d // heads).transpose(0, 1)
        att = torch.softmax(qh @ keys.transpose(1, 2) / (d // heads) ** 0.5, -1) @ vals
        x = x + att.transpose(0, 1).reshape(1, d) @ wo
        x = x + torch.nn.functional.silu(torch.nn.functional.rms_norm(x, (d,)) @ w1) @ w2
        return torch.argmax(x @ lm, -1), x

    weights = [t.to("npu") for t in (emb, wq, wk, wv, wo, w1, w2, lm, kcache, vcache)]
    static_tok = torch.zeros(1, dtype=torch.int64, device="npu")
    s = torch.npu.Stream()
    s.wait_stream(torch.npu.current_stream())
    with torch.npu.stream(s):
        for _ in range(2):  # warm up on a side stream, as torch's graph recipe does
            step(static_tok, *weights)
    torch.npu.current_stream().wait_stream(s)
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        out_tok, out_x = step(static_tok, *weights)
    tok = torch.tensor([3])
    for i in range(50):
        static_tok.copy_(tok.to("npu"))
        g.replay()
        eager_tok, eager_x = step(tok.to("npu"), *weights)
        cpu_tok, cpu_x = step(tok, emb, wq, wk, wv, wo, w1, w2, lm, kcache, vcache)
        assert torch.equal(out_tok.cpu(), eager_tok.cpu()), i
        assert torch.equal(out_x.cpu(), eager_x.cpu()), i
        assert torch.allclose(out_x.cpu(), cpu_x, atol=1e-4, rtol=1e-4), i
        tok = (cpu_tok + i) % vocab
    # the daemon compiled the graph (graphs.CompiledAscendGraph), not the op-by-op fallback,
    import os

    from flexnpu.control import query
    from flexnpu.paths import socket_path

    st = query(str(socket_path(0)), {"op": "status"})["daemon"]
    me = [c for c in st["clients"] if c["pid"] == os.getpid()]
    assert me and me[0]["graphs_compiled"] == 1, me
    # ... and after two replays it ran as one traced TorchScript function (graphs._TracedAscend)
    assert me[0]["graphs_traced"] == 1, me
    print("OK")


def lookup() -> None:
    """A captured step whose lookup index the graph itself computes (argmax, then an index):
    checking that index before the replay would check a stale value, so the daemon does not
    trace this graph (graphs._TracedAscend); it is compiled and replays step by step, reading
    each replay's new input."""
    torch.npu.set_device(0)
    vocab = 64
    logits = torch.zeros(1, vocab).to("npu")
    table = (torch.arange(vocab, dtype=torch.float32) * 2).to("npu")

    def step():
        tok = torch.argmax(logits, -1)
        return tok, table[tok]

    s = torch.npu.Stream()
    s.wait_stream(torch.npu.current_stream())
    with torch.npu.stream(s):
        step()
    torch.npu.current_stream().wait_stream(s)
    g = torch.npu.NPUGraph()
    with torch.npu.graph(g):
        tok, picked = step()
    for i in range(30):
        want = (7 * i + 3) % vocab
        logits.copy_(torch.nn.functional.one_hot(torch.tensor([want]), vocab).float().to("npu"))
        g.replay()
        assert int(tok.cpu()) == want and float(picked.cpu()) == 2.0 * want, (i, tok.cpu(), picked.cpu())
    import os

    from flexnpu.control import query
    from flexnpu.paths import socket_path

    st = query(str(socket_path(0)), {"op": "status"})["daemon"]
    me = [c for c in st["clients"] if c["pid"] == os.getpid()]
    assert me and me[0]["graphs_compiled"] == 1 and me[0]["graphs_traced"] == 0, me
    print("OK")


if __name__ == "__main__":
    {"copies": copies, "decode": decode, "lookup": lookup}[sys.argv[1]]()
