"""Imported once by tests/forked_cli.py's fork server: what flux_lora's commands import, after the
environment defaults that `flux_lora.cli.main` sets before its own imports."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import diffusers  # noqa: E402
import peft  # noqa: E402, F401
import torch.distributed  # noqa: E402, F401
import transformers  # noqa: E402

import flux_lora.cli  # noqa: E402, F401
import flux_lora.data.preprocess  # noqa: E402, F401
import flux_lora.training.train  # noqa: E402, F401

# diffusers and transformers import a class's module when it is first named
for library, names in ((diffusers, ("FluxTransformer2DModel", "AutoencoderKL", "FluxPipeline", "FluxKontextPipeline",
                                    "FlowMatchEulerDiscreteScheduler", "Flux2Transformer2DModel", "AutoencoderKLFlux2")),
                       (transformers, ("CLIPTextModel", "T5EncoderModel", "CLIPTokenizer", "T5TokenizerFast",
                                       "AutoTokenizer", "BlipForConditionalGeneration", "BlipProcessor"))):
    for name in names:
        getattr(library, name, None)
