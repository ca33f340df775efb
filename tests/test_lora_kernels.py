"""The LoRA up-add's Triton kernel (flux_lora.fast.lora_kernels) against fp32 matmuls, its
determinism (exact resume needs the same bits each run), and the up-add op's two paths. The kernel
runs on CUDA only: on a CPU the op takes torch's addmm, which the last test checks."""

import pytest
import torch

from flux_lora.fast import lora_kernels, lora_up

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and lora_kernels.available(torch.zeros(1, device="cuda", dtype=torch.bfloat16))),
                          reason="needs CUDA and triton")
SHAPES = [(100, 96, 80, 16), (70, 64, 200, 48), (33, 300, 40, 5), (6144, 3072, 1024, 16)]


def rel(got, want):
    return ((got.float() - want).abs().max() / want.abs().max()).item()


@cuda
@pytest.mark.parametrize("m,k,n,r", SHAPES)
def test_kernel_matches_fp32_matmuls_and_repeats_bit_for_bit(m, k, n, r):
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    h, y, b = torch.randn(m, r, **bf), torch.randn(m, n, **bf), torch.randn(n, r, **bf)
    a = torch.randn(r, n, **bf)
    cases = {"y + 2·h·Bᵀ": (lambda: lora_kernels.widen(h, b, y, alpha=2.0), y.float() + 2 * h.float() @ b.float().t()),
             "h·A (a transposed view)": (lambda: lora_kernels.widen(h, a.t()), h.float() @ a.float()),
             "bias + 2·h·Bᵀ": (lambda: lora_kernels.widen(h, b, alpha=2.0, bias=y[0]), y[0].float() + 2 * h.float() @ b.float().t())}
    for name, (run, want) in cases.items():
        got = run()
        assert got.shape == want.shape and rel(got, want) < 1e-2, name  # bf16 output, fp32 sums
        assert torch.equal(run(), got), name  # deterministic


@cuda
def test_up_add_op_by_triton_matches_addmm_and_its_gradients():
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    y, h, b = torch.randn(2, 300, 512, **bf), torch.randn(2, 300, 16, **bf, requires_grad=True), torch.randn(512, 16, **bf, requires_grad=True)
    outs = {}
    for triton in (False, True):
        out = lora_up.lora_up_add(y, h, b, 0.5, triton)
        out.float().square().sum().backward()
        outs[triton] = (out.detach(), h.grad.clone(), b.grad.clone())
        h.grad = b.grad = None
    for want, got in zip(outs[False], outs[True]):
        assert rel(got, want.float()) < 1e-2


def test_up_add_on_the_cpu_takes_addmm_whatever_the_flag():
    torch.manual_seed(0)
    y, h, b = torch.randn(3, 7, 40), torch.randn(3, 7, 4), torch.randn(40, 4)
    want = y + 0.5 * h @ b.t()
    for triton in (False, True):
        assert torch.allclose(lora_up.lora_up_add(y, h, b, 0.5, triton), want, atol=1e-5)
