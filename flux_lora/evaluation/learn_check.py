"""The learning check: does a LoRA trained by flux_lora teach a concept, and what else does it change?

    python -m flux_lora learn-check --out runs/learn-check            # CPU, about a minute
    python -m flux_lora learn-check --out OUT --train-set train.lr=5e-4 --nproc 2

On the small pretrained shapes model (models/flux-shapes) it teaches a colour the model has never
seen (magenta) behind the trigger word "sks", through the real `preprocess` and `train` commands,
then samples fixed seeds with and without the LoRA and measures from the pixels:
  concept score   share of "a sks SHAPE on a BG background" samples whose shape is magenta,
                  after training and before (the base model);
  leakage         share of samples of prompts without the trigger ("a red square on ...") whose
                  colour, shape or background changed from the base model's at the same seed;
  prompt following of those plain prompts, before and after.
It fails (exit 1) when the concept score or its gain is under its bound or the leakage over it.
Later features (preservation, masked loss, caption dropout, fp8 compute) report their effect by
passing their settings with --train-set.
"""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flux_lora.data import shapes
from flux_lora.errors import FluxLoraError
from flux_lora.outputs import files

TRIGGER, CONCEPT = "sks", "magenta"
# Measured on the CPU with the defaults below: concept 0.00 -> 0.94, leakage 0.42 (a LoRA trained on
# trigger captions alone bleeds into other prompts: what preservation features are to lower).
# The bounds catch a LoRA that does not learn, and one that paints everything in the concept.
BOUNDS = {"concept_after_min": 0.7, "concept_gain_min": 0.5, "leakage_max": 0.6}


class CheckFailedError(FluxLoraError):
    """The LoRA did not learn the concept, or changed too much else."""

    exit_code = 1


@dataclass
class Settings:
    model: Path
    out: Path
    steps: int = 160
    lr: float = 3e-4
    rank: int = 8
    images: int = 16
    seeds: int = 2
    nproc: int = 1
    train_sets: tuple = ()
    preprocess_sets: tuple = ()


def write_dataset(folder: Path, count: int, seed: int = 7) -> None:
    """`count` scenes of the new colour, captioned with the trigger in its place."""
    rng = random.Random(seed)
    for i in range(count):
        scene = shapes.Scene(CONCEPT, shapes.SHAPES[i % 3], sorted(shapes.BACKGROUNDS)[(i // 3) % 3])
        image = shapes.draw(scene, rng)
        files.write_atomic(folder / f"{i:03d}.png", lambda f, im=image: im.save(f, format="PNG"), every_rank=True)
        files.write_atomic(folder / f"{i:03d}.txt", scene.caption(TRIGGER) + "\n", every_rank=True)


def _flux_lora(settings: Settings, *args) -> None:
    launcher = [sys.executable, "-m", "flux_lora"] if settings.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={settings.nproc}", "-m", "flux_lora"]
    proc = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckFailedError(f"learn-check: `flux_lora {args[0]}` failed ({proc.returncode}): {last}")


def train_lora(settings: Settings) -> Path:
    """The real two commands on the concept's images; returns the trained LoRA."""
    data, cache, run = settings.out / "data", settings.out / "cache", settings.out / "run"
    write_dataset(data, settings.images)
    _flux_lora(settings, "preprocess", "--model", settings.model, "--data", data, "--cache-dir", cache,
               "--resolution", 64, "--square", "--max-sequence-length", 48, "--captioner", "none",
               "--num-workers", 0, "--overwrite", *[x for kv in settings.preprocess_sets for x in ("--set", kv)])
    sets = [x for kv in settings.train_sets for x in ("--set", kv)]
    _flux_lora(settings, "train", "--model", settings.model, "--cache-dir", cache, "--output", run, "--overwrite",
               "--steps", settings.steps, "--batch-size", 4 // settings.nproc or 1, "--lr", settings.lr,
               "--lora-rank", settings.rank, "--checkpoint-every", settings.steps, "--no-resume", *sets)
    return run / "lora.safetensors"


def prompts(seeds: int) -> tuple[list, list]:
    """(trigger jobs, plain jobs): (scene, prompt, seed) at fixed seeds."""
    trigger = [(shapes.Scene(CONCEPT, s, b), shapes.Scene(CONCEPT, s, b).caption(TRIGGER), 500 + k)
               for s in shapes.SHAPES for b in sorted(shapes.BACKGROUNDS) for k in range(seeds)]
    rng = random.Random(3)
    plain_scenes = [shapes.random_scene(rng) for _ in range(12)]
    plain = [(s, s.caption(), 700 + k) for s in plain_scenes for k in range(seeds)]
    return trigger, plain


def measure_all(pipe, jobs) -> list[dict]:
    from flux_lora.models.shapes_model import generate

    return [shapes.measure(im) for im in generate(pipe, [p for _, p, _ in jobs], [s for _, _, s in jobs])]


def score(trigger, plain, base: dict, tuned: dict) -> dict:
    """The report's numbers from the measured samples (base and tuned: {"trigger": [...], "plain": [...]})."""
    def concept(measured):
        return sum(m["colour"] == CONCEPT for m in measured) / len(measured)

    keys = ("colour", "shape", "background")
    changed = sum(any(a[k] != b[k] for k in keys) for a, b in zip(base["plain"], tuned["plain"])) / len(plain)
    report = {"concept_before": concept(base["trigger"]), "concept_after": concept(tuned["trigger"]),
              "leakage": changed,
              "plain_prompt_following_before": shapes.accuracy(list(zip([s for s, _, _ in plain], base["plain"])))["all"],
              "plain_prompt_following_after": shapes.accuracy(list(zip([s for s, _, _ in plain], tuned["plain"])))["all"],
              "trigger_samples": len(trigger), "plain_samples": len(plain)}
    report["concept_gain"] = report["concept_after"] - report["concept_before"]
    return report


def failures(report: dict, bounds: dict = BOUNDS) -> list[str]:
    out = []
    if report["concept_after"] < bounds["concept_after_min"]:
        out.append(f"concept score {report['concept_after']:.2f} < {bounds['concept_after_min']}")
    if report["concept_gain"] < bounds["concept_gain_min"]:
        out.append(f"concept gain {report['concept_gain']:.2f} < {bounds['concept_gain_min']}")
    if report["leakage"] > bounds["leakage_max"]:
        out.append(f"leakage {report['leakage']:.2f} > {bounds['leakage_max']}")
    return out


def run(settings: Settings) -> dict:
    from flux_lora.models.shapes_model import load_pipeline

    settings.out.mkdir(parents=True, exist_ok=True)
    lora = train_lora(settings)
    trigger, plain = prompts(settings.seeds)
    pipe = load_pipeline(settings.model)
    base = {"trigger": measure_all(pipe, trigger), "plain": measure_all(pipe, plain)}
    pipe.load_lora_weights(str(lora), adapter_name="learned")
    tuned = {"trigger": measure_all(pipe, trigger), "plain": measure_all(pipe, plain)}
    report = {**score(trigger, plain, base, tuned), "bounds": BOUNDS, "lora": str(lora), "steps": settings.steps,
              "lr": settings.lr, "rank": settings.rank, "train_sets": list(settings.train_sets),
              "preprocess_sets": list(settings.preprocess_sets), "nproc": settings.nproc}
    report["passed"] = not failures(report)
    files.write_atomic(settings.out / "report.json", report, as_json=True, every_rank=True)
    return report


def summary(report: dict) -> str:
    return (f"concept score {report['concept_before']:.2f} -> {report['concept_after']:.2f} "
            f"(\"{TRIGGER}\" = {CONCEPT}, {report['trigger_samples']} samples), leakage {report['leakage']:.2f} "
            f"({report['plain_samples']} samples without the trigger), plain prompts followed "
            f"{report['plain_prompt_following_before']:.2f} -> {report['plain_prompt_following_after']:.2f}")


def check(settings: Settings) -> dict:
    """Run the check; raise CheckFailedError naming what is off."""
    report = run(settings)
    problems = failures(report)
    if problems:
        raise CheckFailedError(f"learning check failed: {'; '.join(problems)} ({summary(report)}); "
                               f"report in {settings.out / 'report.json'}")
    return report


def report_line(report: dict) -> str:
    return "learning check passed: " + summary(report)
