"""Preview images during training (outputs/previews.py): a rank's prompts drawn as one batch give
the images each prompt gives alone with its own seed, for FLUX.1, FLUX.2 [klein] (true CFG with
the cached negative prompt) and Kontext (one batch per control size). The CUDA-graph replay of the transformer is GPU-only: it is
checked against eager images by `scripts/bench.py train --compare-previews`.
    pytest -q tests/test_previews.py"""

import numpy as np
import pytest
import torch

from flux_lora.config import build_config
from flux_lora.outputs.previews import Previewer
from flux_lora.parallel import session


def _samples(family: str, prompts: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if family == "flux1":
        return {"prompts": [f"p{i}" for i in range(prompts)], "t5": torch.randn(prompts, 32, 32, generator=g),
                "clip": torch.randn(prompts, 32, generator=g), "text_keys": ["t5", "clip"]}
    return {"prompts": [f"p{i}" for i in range(prompts)], "text": torch.randn(prompts, 16, 96, generator=g),
            "text_keys": ["text"], "negative": {"text": torch.randn(1, 16, 96, generator=g)}}


class _Controls:
    """A cache's items as previews read them: control latents, of two sizes."""

    def __init__(self, channels: int):
        g = torch.Generator().manual_seed(1)
        self.items = [torch.randn(channels, 8, 8, generator=g), torch.randn(channels, 8, 12, generator=g)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return {"control": self.items[k]}


@pytest.mark.parametrize("family", ["flux1", "flux2-klein", "flux1-kontext"])
def test_batched_previews_are_each_prompts_own_image(family, tiny_model, tmp_path):
    from flux_lora.models import families
    from flux_lora.models.tiny import make_tiny

    model_dir = tiny_model if family == "flux1" else make_tiny(tmp_path / family, family=family)
    fam = families.of_model(str(model_dir))
    cfg = build_config(flags={"model.path": str(model_dir), "output.dir": str(tmp_path / "out"),
                              "train.sample_steps": 3})
    transformer = fam.load_transformer(str(model_dir), torch.float32)
    di = session.env_dist_info()
    samples = _samples("flux2" if family == "flux2-klein" else "flux1", 3)
    if family == "flux2-klein":
        samples["text"] = samples["text"][..., : transformer.config.joint_attention_dim]
        samples["negative"]["text"] = samples["negative"]["text"][..., : transformer.config.joint_attention_dim]
    kwargs = dict(cfg=cfg, di=di, manifest={"resolution": 32}, model=transformer, samples=samples, reporter=None,
                  family=fam)
    if fam.paired:  # prompts 0 and 2 edit the 8×8 control (one batch), prompt 1 the 8×12 one
        kwargs["dataset"] = _Controls(transformer.config.in_channels // 4)
        assert Previewer(**kwargs)._groups([0, 1, 2]) == [[0, 2], [1]]
    batched = Previewer(**kwargs).images()
    alone = Previewer(**kwargs, batched=False).images()
    assert sorted(batched) == sorted(alone) == [0, 1, 2]
    for i in batched:
        a, b = np.asarray(batched[i], dtype=np.int16), np.asarray(alone[i], dtype=np.int16)
        assert np.abs(a - b).max() <= 2  # the same noise and model: a batch's float sums at most
    assert np.abs(np.asarray(batched[0], np.int16) - np.asarray(batched[2], np.int16)).max() > 10  # prompts differ
    if fam.paired:
        assert batched[0].size == (16, 16) and batched[1].size == (24, 16)  # each the size of its control
