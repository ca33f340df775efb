#!/usr/bin/env bash
# The real commands under FSDP2 on the full-size random FLUX.1-dev: preprocess on all GPUs, train
# sharded over all GPUs with previews and torch.distributed.checkpoint checkpoints, SIGKILL after
# step 4, resume on one GPU (the whole model), and report both runs' events.
#   bash scripts/gpu_fsdp_resume.sh OUT_DIR [WHEEL_DIR]
set -uo pipefail
out=${1:-bench/tmp}; wheels=${2:-.whl}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
gpus=$(nvidia-smi -L | wc -l); work=$(mktemp -d)
python3 -m flux_lora demo-data "$work/images" --count 16
torchrun --nproc_per_node="$gpus" -m flux_lora preprocess --model random:flux1-dev --data "$work/images" \
    --cache-dir "$work/cache" --resolution 512 --square --captioner none --default-caption "a photo" \
    --sample-prompt "a photo" --sample-prompt "a cat" --sample-prompt "a dog" > "$out/fsdp-preprocess.log" 2>&1 || tail -n 5 "$out/fsdp-preprocess.log"
common=(--model random:flux1-dev --cache-dir "$work/cache" --output "$work/run" --steps 8 --checkpoint-every 3
        --sample-every 3 --validation-split 0.25 --set train.sample_steps=4 --json)
echo "== train, FSDP2 on $gpus GPUs, killed after step 4"
FLUX_LORA_FAULT=kill@4 timeout 300 torchrun --nproc_per_node="$gpus" -m flux_lora train "${common[@]}" --sharding fsdp \
    --batch-size 2 > "$out/fsdp-train-killed.jsonl" 2> "$out/fsdp-train-killed.log"; echo "rc=$?"
ls -la "$work/run/checkpoints/"*/ "$work/run/checkpoints/"*/dcp 2>&1 | tee "$out/fsdp-checkpoint-files.txt"
echo "== resume on 1 GPU, global batch kept"
timeout 300 torchrun --nproc_per_node=1 -m flux_lora train "${common[@]}" --sharding fsdp --batch-size $((2 * gpus)) \
    > "$out/fsdp-train-resumed-1gpu.jsonl" 2> "$out/fsdp-train-resumed-1gpu.log"; echo "rc=$?"
tail -n 3 "$out/fsdp-train-resumed-1gpu.log"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def ev(name):
    return [json.loads(l) for l in (out / name).read_text().splitlines() if l.startswith("{")]
killed, resumed = ev("fsdp-train-killed.jsonl"), ev("fsdp-train-resumed-1gpu.jsonl")
report = {"killed_start": next((e for e in killed if e["event"] == "start"), {}).get("sharding"),
          "killed_losses": [e["loss"] for e in killed if e["event"] == "progress"],
          "killed_validation": [(e["step"], e["loss"]) for e in killed if e["event"] == "validation"],
          "resumed_start_step": next((e for e in resumed if e["event"] == "start"), {}).get("start_step"),
          "resumed_losses": [e["loss"] for e in resumed if e["event"] == "progress"],
          "resumed_validation": [(e["step"], e["loss"]) for e in resumed if e["event"] == "validation"],
          "resumed_done": next((e for e in resumed if e["event"] == "done"), None)}
print(json.dumps(report, indent=1))
(out / "fsdp-resume.json").write_text(json.dumps(report, indent=1) + "\n")
PY
