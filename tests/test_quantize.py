"""Which frozen base each mode and device gets, and where it is staged.   pytest -q tests/test_quantize.py"""

import dataclasses

import pytest
import torch

from flux_lora.config import TrainConfig
from flux_lora.errors import ConfigError
from flux_lora.fast import fp8, quantize

GIB = 2**30


def test_fp8_base_choice_by_mode_and_device():
    cpu = torch.device("cpu")
    assert not quantize.uses_fp8_base(TrainConfig(), cpu, torch.float32)  # auto: only on fp8 tensor cores
    assert quantize.uses_fp8_base(TrainConfig(memory_mode="fp8"), cpu, torch.float32) == fp8.matmul_works("cpu")
    assert not quantize.uses_fp8_base(TrainConfig(memory_mode="nf4"), cpu)
    assert not quantize.uses_fp8_base(TrainConfig(fp8_compute="off"), cpu)

def test_fp8_compute_accepts_booleans_and_rejects_nf4():
    assert TrainConfig(fp8_compute="true").fp8_compute == "on"
    assert TrainConfig(fp8_compute="False").fp8_compute == "off"
    with pytest.raises(ConfigError, match="nf4"):
        TrainConfig(fp8_compute="on", memory_mode="nf4")
    with pytest.raises(ConfigError, match="fp8_compute"):
        dataclasses.replace(TrainConfig(), fp8_compute="maybe")

def test_quantized_base_is_staged_on_the_cpu_for_small_gpus(monkeypatch):
    cuda = torch.device("cuda", 0)
    nf4 = TrainConfig(memory_mode="nf4")
    monkeypatch.setattr(quantize, "gpu_bytes", lambda device, budget=0.0: int(budget * GIB) or 16 * GIB)
    assert quantize.load_device(nf4, cuda, torch.bfloat16).type == "cpu"
    assert quantize.load_device(TrainConfig(fp8_compute="off"), cuda, torch.bfloat16) == cuda
    assert quantize.load_device(nf4, cuda, torch.bfloat16, budget_gib=80) == cuda
    monkeypatch.setattr(quantize, "gpu_bytes", lambda device, budget=0.0: int(budget * GIB) or 80 * GIB)
    assert quantize.load_device(nf4, cuda, torch.bfloat16) == cuda
    assert quantize.load_device(nf4, cuda, torch.bfloat16, budget_gib=12).type == "cpu"  # a run capped below the card
