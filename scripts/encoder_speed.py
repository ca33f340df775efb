"""Where preprocess's time goes at 1024 px, and what compiling the encoders would save: the
full-size random VAE encoder (FLUX.1's) and CLIP-L + T5-XXL at 512 tokens, each eager and with
torch.compile, the outputs compared; then both encoders at once on two CUDA streams.

    python scripts/encoder_speed.py --resolution 1024 --batch-size 8 --out bench/results/X.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flux_lora.models import families, synthetic  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (and compile)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.backends.cudnn.benchmark = True
    family = families.by_name("flux1")
    vae = synthetic.vae(dtype, device).eval().to(memory_format=torch.channels_last)
    text = synthetic.text_pipeline(dtype, device)
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    prompts = [f"a photo number {i} of a cat on a mat, detailed, in the style of {i * 7}" for i in range(args.batch_size)]
    report: dict = {"resolution": args.resolution, "batch_size": args.batch_size, "text_len": args.text_len,
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def vae_step():
        with torch.no_grad():
            return family.encode_latents(vae, pixels.contiguous(memory_format=torch.channels_last))

    def text_step():
        return family.encode_prompts(text, prompts, args.text_len, device)

    per_image = lambda s: s / args.batch_size * 1e3  # noqa: E731
    vae_s, vae_ref = timed(vae_step, args.repeats)
    text_s, text_ref = timed(text_step, args.repeats)
    report.update(vae_ms_per_image=per_image(vae_s), text_ms_per_image=per_image(text_s))
    print(json.dumps(report), flush=True)

    # both at once, each on its own stream and thread (as two pipelines stages would run)
    def on_stream(fn, box):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(args.repeats):
                box.append(fn())
        stream.synchronize()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=on_stream, args=(fn, [])) for fn in (vae_step, text_step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report["both_overlapped_ms_per_image"] = per_image((time.perf_counter() - t0) / args.repeats)
    report["both_sequential_ms_per_image"] = report["vae_ms_per_image"] + report["text_ms_per_image"]

    # accuracy: eager bf16 and compiled bf16 each against an fp32 copy (relative L2 error)
    error = lambda x, ref: float((x.float() - ref).norm() / ref.norm())  # noqa: E731
    t5 = text.text_encoder_2
    ids = text.tokenizer_2(prompts, padding="max_length", max_length=args.text_len, truncation=True,
                           return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        vae32 = copy.deepcopy(vae).float()
        vae_fp32 = family.encode_latents(vae32, pixels[:2].contiguous(memory_format=torch.channels_last))
        del vae32
        t5_32 = copy.deepcopy(t5).float()
        t5_fp32 = t5_32(ids[:2]).last_hidden_state
        del t5_32
        t5_eager = t5(ids[:2]).last_hidden_state
    report.update(vae_eager_error_vs_fp32=error(vae_ref[:2], vae_fp32), t5_eager_error_vs_fp32=error(t5_eager, t5_fp32))
    other_sizes = [torch.rand(1, 3, 768, 1280, device=device) * 2 - 1, torch.rand(3, 3, 1280, 768, device=device) * 2 - 1]
    with torch.no_grad():
        other_eager = [family.encode_latents(vae, x) for x in other_sizes]
    vae.encoder.forward = torch.compile(vae.encoder.forward)
    vae_c, vae_out = timed(vae_step, args.repeats)
    report.update(vae_compiled_ms_per_image=per_image(vae_c), vae_compiled_error_vs_fp32=error(vae_out[:2], vae_fp32))
    with torch.no_grad():  # other bucket sizes and batch sizes: a recompile with symbolic shapes, same latents
        report["vae_compiled_other_sizes_error_vs_eager"] = [
            error(family.encode_latents(vae, x), ref) for x, ref in zip(other_sizes, other_eager)]
    print(json.dumps(report), flush=True)
    t5.encoder.forward = torch.compile(t5.encoder.forward)
    text_c, text_out = timed(text_step, args.repeats)
    with torch.no_grad():
        report.update(text_compiled_ms_per_image=per_image(text_c),
                      t5_compiled_error_vs_fp32=error(t5(ids[:2]).last_hidden_state, t5_fp32))
    report["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(report), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
