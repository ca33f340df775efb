#!/usr/bin/env bash
# Multi-GPU scaling of the real commands on the full-size random model (random:flux1-dev):
# preprocess on all GPUs, then `train` on 1 GPU and on all GPUs of this machine, in one go.
#   bash scripts/gpu_scaling.sh OUT_DIR [WHEEL_DIR]
# Writes OUT_DIR/scaling.json (samples/s per GPU count, efficiency, LoRA identical on all ranks).
# VARIANTS="name:--set k=v ..." (space-separated, ',' between a variant's flags) repeats train per
# variant, e.g. VARIANTS="graphs: nographs:--set,train.cuda_graphs=off"; rows are keyed "name/N".
# "name@2+4:flags" runs that variant on those GPU counts only.
# Runs shorter than 1,000 steps record no CUDA graphs unless a variant sets train.cuda_graphs=on
# (auto leaves them to long runs, which win back the recording); the steady rates before
# 2026-11-30 session 14 were measured with them.
# PAIR=1 also runs two 1-GPU trains at once, on GPU 0 and GPU 1 (rows "name.pairI/1"): the pace
# a card keeps next to a busy neighbour without any communication.
# EACH_GPU=1 also runs the 1-GPU train on every other GPU alone (rows "name.gpuI/1"): a multi-GPU
# step goes at the pace of the slowest card, so speedups are also given against their mean.
set -uo pipefail
out=${1:-bench/tmp}; wheels=${2:-.whl}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
gpus=${GPUS:-$(nvidia-smi -L | wc -l)}
steps=${STEPS:-30}; res=${RESOLUTION:-512}; batch=${BATCH:-4}
work=${WORK:-$(mktemp -d)}
python3 -m flux_lora demo-data "$work/images" --count 64
echo "== preprocess on $gpus GPU(s)"
torchrun --nproc_per_node="$gpus" -m flux_lora preprocess --model random:flux1-dev --data "$work/images" \
    --cache-dir "$work/cache" --resolution "$res" --square --captioner none --default-caption "a photo" --json \
    > "$out/preprocess-${gpus}gpu.jsonl" 2> "$out/preprocess.log" || tail -n 5 "$out/preprocess.log"
for variant in ${VARIANTS:-default:}; do
  name=${variant%%:*}; flags=${variant#*:}; flags=${flags//,/ }
  counts=${COUNTS:-1 $gpus}
  if [[ $name == *@* ]]; then counts=${name#*@}; counts=${counts//+/ }; name=${name%%@*}; fi
  for n in $counts; do
    echo "== train $name on $n GPU(s) $flags"
    timeout "${LIMIT:-200}" torchrun --nproc_per_node="$n" -m flux_lora train --model random:flux1-dev \
        --cache-dir "$work/cache" --output "$work/out-$name-$n" --steps "$steps" --batch-size "$batch" \
        --checkpoint-every 100000 --json $flags > "$out/train-$name-${n}gpu.jsonl" 2> "$out/train-$name-${n}gpu.log" \
        || tail -n 5 "$out/train-$name-${n}gpu.log"
  done
  if [ "${PAIR:-0}" = 1 ]; then
    echo "== train $name on GPU 0 and GPU 1 at once, each alone (no DDP)"
    for i in 0 1; do
      CUDA_VISIBLE_DEVICES=$i timeout "${LIMIT:-200}" torchrun --nproc_per_node=1 --master_port=$((29600 + i)) -m flux_lora train \
          --model random:flux1-dev --cache-dir "$work/cache" --output "$work/out-$name-pair$i" --steps "$steps" \
          --batch-size "$batch" --checkpoint-every 100000 --json $flags > "$out/train-$name.pair$i-1gpu.jsonl" \
          2> "$out/train-$name.pair$i-1gpu.log" &
    done
    wait
  fi
  if [ "${EACH_GPU:-0}" = 1 ]; then
    for ((i = 1; i < gpus; i++)); do
      echo "== train $name on GPU $i alone"
      CUDA_VISIBLE_DEVICES=$i timeout "${LIMIT:-200}" torchrun --nproc_per_node=1 -m flux_lora train --model random:flux1-dev \
          --cache-dir "$work/cache" --output "$work/out-$name-gpu$i" --steps "$steps" --batch-size "$batch" \
          --checkpoint-every 100000 --json $flags > "$out/train-$name.gpu$i-1gpu.jsonl" 2> "$out/train-$name.gpu$i-1gpu.log" \
          || tail -n 5 "$out/train-$name.gpu$i-1gpu.log"
    done
  fi
done
python3 - "$out" "$gpus" <<'PY'
import json, sys
from pathlib import Path
out, gpus = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for f in sorted(out.glob("train-*gpu.jsonl")):
    name = f.name[len("train-"):].rsplit("-", 1)[0]
    ev = [json.loads(l) for l in f.read_text().splitlines() if l.startswith("{")]
    prog = [e for e in ev if e["event"] == "progress"]
    done = [e for e in ev if e["event"] == "done"]
    start = [e for e in ev if e["event"] == "start"]
    if prog and done:
        # steady state: from a quarter of the run on (compile, DDP's bucket rebuild and the first
        # allocations are over by then), from the events' own clocks
        first = prog[max(4, len(prog) // 4)]
        steps, secs = prog[-1]["step"] - first["step"], prog[-1]["elapsed_s"] - first["elapsed_s"]
        dts = sorted(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(prog, prog[1:]))
        gb = start[0]["global_batch"]
        rows[f"{name}/{start[0]['world_size']}"] = {"samples_per_s": steps * gb / secs, "samples_per_s_from_step_1": prog[-1]["samples_per_s"],
                                        "median_step_s": dts[len(dts) // 2], "steps": prog[-1]["step"],
                                        "global_batch": gb, "ranks_agree": done[0].get("ranks_agree"),
                                        "time_to_first_step_s": done[0].get("time_to_first_step_s"),
                                        "setup_s": done[0].get("setup_s"), "cpu_threads": start[0].get("cpu_threads"),
                                        "slowest_steps_s": dts[-3:], "gc_full_collections": done[0].get("gc_full_collections"),
                                        "first_step_since_process_start_s": done[0].get("first_step_since_process_start_s"),
                                        "final_loss": done[0].get("final_loss"), "compile": done[0].get("compile"),
                                        "before_setup_s": done[0].get("before_setup_s"), "setup_phases_s": done[0].get("setup_phases_s")}
for key, r in rows.items():
    name, n = key.rsplit("/", 1)
    base = rows.get(f"{name}/1", {}).get("samples_per_s")
    if base:
        r["speedup"] = r["samples_per_s"] / base
        r["efficiency"] = r["speedup"] / int(n)
    singles = [v["samples_per_s"] for k, v in rows.items() if k.rsplit("/", 1)[0].split(".gpu")[0] == name and k.endswith("/1")]
    if int(n) > 1 and len(singles) > 1:
        r["speedup_vs_mean_single_gpu"] = r["samples_per_s"] * len(singles) / sum(singles)
    pair = [v["samples_per_s"] for k, v in rows.items() if k.startswith(f"{name}.pair")]
    if int(n) > 1 and pair:
        # against 1-GPU runs made at the same time on two cards: what the host and the cards' shared
        # power and cooling allow without any communication
        r["speedup_vs_concurrent_single_gpus"] = r["samples_per_s"] * len(pair) / sum(pair)
pre = [json.loads(l) for l in (out / f"preprocess-{gpus}gpu.jsonl").read_text().splitlines() if l.startswith("{")]
done = [e for e in pre if e["event"] == "done"]  # all ranks' items over the encoding time
report = {"train": rows, "preprocess_512_images_per_s": done[-1].get("items_per_s") if done else None, "gpus": gpus}
print(json.dumps(report, indent=1))
(out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
PY
