#!/usr/bin/env bash
# Exact resume of the real `train` on the GPUs, tiny model: a run of STEPS steps with a checkpoint
# halfway, and the same run resumed from that checkpoint; prints the losses around the resume and
# how far apart the two final LoRAs are (0 when resume is exact). One pair per variant:
#   VARIANTS="graphs: nographs:--set,train.cuda_graphs=off" SHARDING=fsdp bash scripts/gpu_resume_pair.sh OUT [WHEEL_DIR]
set -uo pipefail
out=${1:-bench/tmp}; wheels=${2:-.whl}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}; steps=${STEPS:-1000}; half=$((steps / 2)); work=$(mktemp -d)
variants=${VARIANTS:-"graphs: nographs:--set,train.cuda_graphs=off"}
python3 -m flux_lora make-tiny "$work/tiny" > /dev/null
python3 -m flux_lora demo-data "$work/images" --count 12 > /dev/null
torchrun --nproc_per_node="$gpus" -m flux_lora preprocess --config configs/tiny.yaml --model "$work/tiny" \
    --data "$work/images" --cache-dir "$work/cache" --square --captioner none --default-caption "a photo" > "$out/resume-preprocess.log" 2>&1 || tail -n 5 "$out/resume-preprocess.log"
for variant in $variants; do
    name=${variant%%:*}; extra=(${variant#*:}); extra=(${extra[@]//,/ })
    common=(--config configs/tiny.yaml --model "$work/tiny" --cache-dir "$work/cache" --sharding "${SHARDING:-fsdp}"
            --steps "$steps" --set train.checkpoint_every=$half --set train.sample_every=$half --json "${extra[@]}")
    timeout 600 torchrun --nproc_per_node="$gpus" -m flux_lora train "${common[@]}" --output "$work/$name-a" \
        > "$out/resume-$name-a.jsonl" 2> "$out/resume-$name-a.log" || tail -n 5 "$out/resume-$name-a.log"
    # REPEAT=1: run b fresh, as a (is the GPU run to run bit-identical at all?), not resumed
    resume=(--resume-from "$work/$name-a/checkpoints/step-$(printf %06d $half)"); [ "${REPEAT:-0}" = 1 ] && resume=()
    timeout 600 torchrun --nproc_per_node="$gpus" -m flux_lora train "${common[@]}" --output "$work/$name-b" \
        "${resume[@]}" \
        > "$out/resume-$name-b.jsonl" 2> "$out/resume-$name-b.log" || tail -n 5 "$out/resume-$name-b.log"
    python3 - "$out" "$name" "$work" "$half" "$steps" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
out, name, work, half, steps = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def losses(run):
    events = [json.loads(l) for l in (out / f"resume-{name}-{run}.jsonl").read_text().splitlines() if l.startswith("{")]
    return {e["step"]: e["loss"] for e in events if e["event"] == "progress"}
la, lb = losses("a"), losses("b")
a, b = (load_file(work / f"{name}-{run}" / "lora.safetensors") for run in "ab")
diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=float("nan"))
report = {"variant": name, "steps": steps, "resumed_from": half, "lora_max_abs_diff": diff,
          "lora_bit_identical": all(a[k].equal(b[k]) for k in a),
          "losses": {s: [la.get(s), lb.get(s)] for s in (half + 1, half + 2, half + 10, steps) if s in la or s in lb},
          "first_step_apart": next((s for s in sorted(lb) if s in la and la[s] != lb[s]), None)}
print(json.dumps(report))
(out / f"resume-pair-{name}.json").write_text(json.dumps(report, indent=1) + "\n")
PY
done
