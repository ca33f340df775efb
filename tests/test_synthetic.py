"""The full-size random FLUX.1-dev that every GPU benchmark trains (`--model random:flux1-dev`):
built on the meta device here, it must have FLUX.1-dev's exact sizes, or the benchmark's figures
would not be FLUX.1-dev's.   pytest -q tests/test_synthetic.py"""

import pytest
import torch

from flux_lora.errors import ModelError
from flux_lora.models import fingerprint, loading, synthetic

META = torch.device("meta")


def test_components_have_flux1_dev_sizes():
    # published parameter counts of black-forest-labs/FLUX.1-dev's components
    transformer = synthetic.transformer(torch.bfloat16, META)
    assert sum(p.numel() for p in transformer.parameters()) == 11_901_408_320
    assert transformer.dtype == torch.bfloat16 and len(loading.transformer_blocks(transformer)) == 19 + 38
    assert sum(p.numel() for p in synthetic.vae(torch.bfloat16, META).parameters()) == 83_819_683
    text = synthetic.text_pipeline(torch.bfloat16, META)
    assert sum(p.numel() for p in text.text_encoder.parameters()) == 123_060_480  # CLIP-L
    assert sum(p.numel() for p in text.text_encoder_2.parameters()) == 4_762_310_656  # T5-XXL encoder
    assert text.tokenizer.model_max_length == 77 and text.tokenizer_2("a photo of sks").input_ids[-1] == 1  # eos


def test_same_weights_on_every_rank():
    """Every rank builds the synthetic model itself: the seeded build must give identical weights."""
    small = dict(synthetic.TRANSFORMER, num_layers=1, num_single_layers=1, num_attention_heads=2,
                 joint_attention_dim=64, axes_dims_rope=(16, 56, 56))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "TRANSFORMER", small)
        a = synthetic.transformer(torch.float32, torch.device("cpu"))
        b = synthetic.transformer(torch.float32, torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_host_build_is_drawn_layer_by_layer():
    """What a sharded or host-staged run gets on a GPU machine (drawn on the GPU, here the CPU):
    every tensor real and on the CPU, the direct build's names and shapes, norms at one, the
    same on every rank."""
    config = dict(synthetic.TRANSFORMER, num_layers=1, num_single_layers=1, num_attention_heads=2,
                  joint_attention_dim=64)
    cls = type(synthetic.transformer(torch.float32, META))
    a, b = (synthetic.drawn_layer_by_layer(cls, config, torch.float32, torch.device("cpu")) for _ in range(2))
    direct = synthetic.build(cls, config, torch.float32, META).state_dict()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in direct.items()}
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in a.state_dict().values())
    assert torch.equal(a.transformer_blocks[0].attn.norm_q.weight, torch.ones(128))
    assert a.transformer_blocks[0].attn.to_q.weight.std() > 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_model_ids_are_checked_and_fingerprinted():
    loading.check_model_path("random:flux1-dev")
    with pytest.raises(ModelError, match="unknown synthetic model.*random:flux1-dev"):
        loading.check_model_path("random:flux2")
    assert fingerprint.fingerprint("random:flux1-dev", 512) != fingerprint.fingerprint("random:flux1-dev", 256)
