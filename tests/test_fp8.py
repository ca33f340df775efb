"""The fp8 frozen base (flux_lora.fp8): quantization maths, the matmuls against a dequantized
reference, and the conversion of a model with peft LoRA layers.
torch._scaled_mm runs on the CPU too; on a GPU the same tests run on CUDA."""

import pytest
import torch

from flux_lora.fast import fp8

DEVICES = [d for d in ("cpu", "cuda") if (d == "cpu" or torch.cuda.is_available()) and fp8.matmul_works(d)]
needs_cpu_fp8 = pytest.mark.skipif(not fp8.matmul_works("cpu"), reason="this torch has no CPU fp8 matmul")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_rows_scales_each_row_to_the_fp8_range():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 10.0, -1000.0]])
    q, s = fp8.quantize_rows(x)
    assert q.dtype == fp8.E4M3 and s.shape == (3, 1)
    assert torch.allclose(q.float().abs().amax(dim=1)[[0, 2]], torch.tensor([448.0, 448.0]))
    assert torch.equal(q[1].float(), torch.zeros(3))  # an all-zero row stays zero, no NaN
    assert torch.allclose(q.float() * s, x, rtol=0.07)  # 3 mantissa bits


def test_quantize_keeps_non_finite_values_visible():
    # a diverging step must still look non-finite after quantization (the loop skips it)
    q, s = fp8.quantize_rows(torch.tensor([[1.0, float("nan")]]))
    assert not torch.isfinite(q.float() * s).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_linear_matches_its_dequantized_weight(device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).to(device, torch.bfloat16).requires_grad_(False)
    f = fp8.Fp8Linear.from_linear(lin)
    assert f.weight.dtype == fp8.E4M3 and f.weight.numel() == lin.weight.numel()
    x = torch.randn(3, 33, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = f(x)
    assert y.shape == (3, 33, 48) and y.dtype == torch.bfloat16
    ref_w = f.dequantized_weight()
    assert rel(ref_w, lin.weight) < 0.05
    x_ref = x.detach().float().requires_grad_(True)
    y_ref = x_ref @ ref_w.t() + lin.bias.float()
    assert rel(y, y_ref) < 0.06  # only the per-row activation rounding remains
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.float())
    assert x.grad.dtype == x.dtype and rel(x.grad, x_ref.grad) < 0.06
    assert rel(x.grad, x_ref.grad) > 0  # it really ran in fp8


@needs_cpu_fp8
def test_fp8_linear_keeps_its_dtype_when_the_model_is_cast():
    f = fp8.Fp8Linear.from_linear(torch.nn.Linear(32, 16).to(torch.bfloat16))
    f.to(torch.float32)
    assert f.weight.dtype == fp8.E4M3 and f.scale_out.dtype == torch.float32 and f.bias.dtype == torch.bfloat16
    assert f(torch.randn(2, 32)).shape == (2, 16)


@needs_cpu_fp8
def test_conversion_replaces_peft_base_layers_and_keeps_lora_trainable():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 32), torch.nn.Linear(32, 8))
    model = model.to(torch.bfloat16).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False), model)
    assert fp8.convert_frozen_linears([model], torch.device("cpu")) == 2  # not the 8-wide layer, not lora_A/B
    assert isinstance(model[0].base_layer, fp8.Fp8Linear) and isinstance(model[2], fp8.Fp8Linear)
    assert type(model[3]) is torch.nn.Linear and type(model[0].lora_A["default"]) is torch.nn.Linear
    model(torch.randn(2, 64, dtype=torch.bfloat16)).float().sum().backward()
    assert model[0].lora_B["default"].weight.grad is not None


@needs_cpu_fp8
def test_train_with_fp8_base_on_the_tiny_model(tiny_model, cache_dir, tmp_path):
    """memory_mode=fp8 end to end on the CPU: the base is fp8, the LoRA trains and is saved."""
    from flux_lora.training import train
    from flux_lora.config import build_config

    cfg = build_config(None, {"model.path": str(tiny_model), "data.cache_dir": str(cache_dir),
                              "output.dir": str(tmp_path / "out"), "train.steps": 3, "train.batch_size": 2,
                              "train.memory_mode": "fp8", "train.lr": 1e-2})
    summary = train.run(cfg)
    assert summary["steps"] == 3 and summary["final_loss"] is not None
    from safetensors.torch import load_file

    sd = load_file(summary["lora"])
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sd.items())  # B moved off its zero init
