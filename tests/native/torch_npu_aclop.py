"""Run by tests/test_native_aclop.py under `flexnpu run --interpose native`: functions the REAL
torch_npu 2.13 has no aclnn kernel for go through aclopCompileAndExecute (CANN operator types)
to the daemon's aclop table.

    python torch_npu_aclop.py check      # Erfinv, Atanh, FastGelu through aclop equal the CPU; prints OK
    python torch_npu_aclop.py missing    # torch_npu.npu_iou: an operator type outside the table
"""

import sys

import torch
import torch_npu


def check() -> None:
    torch.npu.set_device(0)
    g = torch.Generator().manual_seed(0)
    for dt, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = (torch.rand(5, 7, generator=g) * 1.8 - 0.9).to(dt)
        for name, fn, ref in (
            ("erfinv", torch.erfinv, torch.erfinv),
            ("atanh", torch.atanh, torch.atanh),
            ("fast_gelu", torch_npu.npu_fast_gelu, lambda t: t * torch.sigmoid(1.702 * t)),
        ):
            if dt == torch.float16 and name != "fast_gelu":
                continue
            got = fn(x.to("npu")).cpu()
            want = ref(x.float()).to(dt)
            assert got.dtype == dt and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (
                name,
                dt,
            )
            # strided input: torch_npu makes it contiguous before the aclop call
            xs = x.t()
            got = fn(xs.to("npu")).cpu()
            assert torch.allclose(got.float(), ref(xs.float()).to(dt).float(), atol=tol, rtol=tol), (
                name,
                dt,
                "strided",
            )
    print("OK")


def missing() -> None:
    torch.npu.set_device(0)
    b = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 15]], dtype=torch.float16).to("npu")
    try:
        torch_npu.npu_iou(b, b).cpu()
    except RuntimeError as e:
        print("REFUSED", " | ".join(str(e).splitlines()))
        return
    print("NOT REFUSED")


if __name__ == "__main__":
    {"check": check, "missing": missing}[sys.argv[1]]()
