"""GPU measurement: FLUX.2 [dev]'s text encoder (Mistral Small 3.1, 24 B, random weights at full
size) encoding prompts as preprocess does, whole on the GPU and streamed from host memory
(preprocess.text_encoder_offload=on): prompts/s and peak GPU memory of each (not a test).

    python scripts/encoder_offload.py --prompts 32 --batch-size 8 --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_lora.models import placement, synthetic, tiny  # noqa: E402
from flux_lora.models.families import flux2  # noqa: E402

# Mistral-Small-3.1-24B's language model (the text half of FLUX.2 [dev]'s text_encoder)
TEXT = dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=8)


def build(device: torch.device):
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    _, tokenizer = tiny.mistral3()
    config = Mistral3Config(text_config=TEXT, vision_config=dict(model_type="pixtral", hidden_size=64, num_hidden_layers=1,
                                                                  num_attention_heads=2, intermediate_size=64, head_dim=32,
                                                                  image_size=64, patch_size=16),
                            image_token_index=7, spatial_merge_size=1, multimodal_projector_bias=False)
    encoder = synthetic.build(Mistral3ForConditionalGeneration, {"config": config}, torch.bfloat16, device).eval()
    return Flux2Pipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None)


def measure(pipe, device, prompts: list[str], batch: int, length: int) -> dict:
    torch.cuda.reset_peak_memory_stats(device)
    flux2.DEV.encode_prompts(pipe, prompts[:batch], length, device)  # warm-up
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        flux2.DEV.encode_prompts(pipe, prompts[i:i + batch], length, device)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"prompts_per_s": len(prompts) / seconds, "seconds": seconds,
            "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = torch.device("cuda")
    prompts = [f"a photo of sks number {i}, detailed, studio light" for i in range(args.prompts)]
    t0 = time.perf_counter()
    pipe = build(device)
    report = {"text_encoder_params_b": sum(q.numel() for q in pipe.text_encoder.parameters()) / 1e9,
              "weights_gib": placement.weight_bytes(pipe) / 2**30, "build_s": time.perf_counter() - t0,
              "prompts": args.prompts, "batch_size": args.batch_size, "length": args.length}
    report["gpu"] = measure(pipe, device, prompts, args.batch_size, args.length)
    pipe.text_encoder.to("cpu")
    torch.cuda.empty_cache()
    placement.place(pipe, device, offload=True)
    report["offload"] = measure(pipe, device, prompts, args.batch_size, args.length)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
