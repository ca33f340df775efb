#!/usr/bin/env bash
# The single-GPU benchmark set behind bench/results/ (run on the lent H100; see README "Performance").
#   bash scripts/gpu_bench.sh OUT_DIR [WHEEL_DIR]
# EXTRA is appended to every bench.py call (e.g. EXTRA=--profile). WHEEL_DIR holds wheels of packages the GPU image lacks (diffusers, bitsandbytes).
set -uo pipefail
out=${1:-bench/tmp}; wheels=${2:-.whl}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
run() { local name=$1; shift; echo "== $name: $*"; timeout "${LIMIT:-300}" python3 scripts/bench.py "$@" ${EXTRA:-} --out "$out/$name.json" > "$out/$name.log" 2>&1; echo "rc=$?"; tail -n 3 "$out/$name.log"; }
# the same on every GPU of the machine, one rank per GPU (DDP, as `train` runs)
run_ddp() { local name=$1; shift; echo "== $name (torchrun, all GPUs): $*"; timeout "${LIMIT:-300}" torchrun --nproc_per_node="$(nvidia-smi -L | wc -l)" scripts/bench.py "$@" ${EXTRA:-} --out "$out/$name.json" > "$out/$name.log" 2>&1; echo "rc=$?"; tail -n 3 "$out/$name.log"; }
for spec in ${BENCHES:-train512 train1024 fp8 nf4 pre1024}; do
    case $spec in
        # default settings + flash attention for the loss check + diffusers' setting
        train512) run train-512 train --resolution 512 --batch-size 4 --compare-attention ;;
        train1024) run train-1024 train --resolution 1024 --batch-size 1 --compare-attention ;;
        # q/k/v grouping against three layers, and the bf16 base, for speed and the loss check
        fused512) run fused-512 train --resolution 512 --batch-size 4 --compare-unfused --compare-bf16 --no-baseline --steps 20 ;;
        fused1024) run fused-1024 train --resolution 1024 --batch-size 1 --compare-unfused --no-baseline --steps 20 ;;
        # CUDA graphs per block against plain launches, for speed and the loss check
        graphs512) run graphs-512 train --resolution 512 --batch-size 4 --compare-graphs --no-baseline --steps 20 ;;
        graphs1024) run graphs-1024 train --resolution 1024 --batch-size 1 --compare-graphs --no-baseline --steps 20 ;;
        # the LoRA up-projection as one addmm against peft's forward, for speed and the loss check
        upadd512) run upadd-512 train --resolution 512 --batch-size 4 --compare-up-add --no-baseline --steps 30 ;;
        upadd1024) run upadd-1024 train --resolution 1024 --batch-size 1 --compare-up-add --no-baseline --steps 20 ;;
        # DDP: per-bucket averaging against DDP's own, and where a multi-GPU step's time goes
        ddpavg512) run_ddp ddp-average-512 train --resolution 512 --batch-size 4 --compare-average --no-baseline --steps 20 ;;
        ddpprofile512) run_ddp ddp-profile-512 train --resolution 512 --batch-size 4 --profile --no-baseline --steps 20 ;;
        # default settings (fp8 base on H100/H200) against the bf16 base, for the loss check
        fp8check512) run fp8check-512 train --resolution 512 --batch-size 4 --compare-bf16 --no-baseline ;;
        bf16-512) run bf16-512 train --resolution 512 --batch-size 4 --fp8-compute off --no-baseline ;;
        b6-512) run b6-512 train --resolution 512 --batch-size 6 --no-baseline ;;
        b2-1024) run b2-1024 train --resolution 1024 --batch-size 2 --no-baseline ;;
        b4-1024) run b4-1024 train --resolution 1024 --batch-size 4 --no-baseline --steps 5 ;;
        fp8) run fp8-1024 train --resolution 1024 --batch-size 1 --memory-mode fp8 --no-baseline ;;
        nf4) run nf4-1024 train --resolution 1024 --batch-size 1 --memory-mode nf4 --no-baseline ;;
        # the small-card claims from the process start: GPU memory capped to 16 / 12 GiB before the
        # first allocation, the random base built on the CPU and converted onto the GPU block by block
        fp8cap16) run fp8-1024-cap16 train --resolution 1024 --batch-size 1 --memory-mode fp8 --no-baseline --gpu-memory-cap 16 ;;
        nf4cap12) run nf4-1024-cap12 train --resolution 1024 --batch-size 1 --memory-mode nf4 --no-baseline --gpu-memory-cap 12 ;;
        previews512) run previews-512 train --resolution 512 --batch-size 4 --compare-previews --no-baseline --steps 10 ;;
        enc1024) echo "== encoder-speed"; timeout "${LIMIT:-300}" python3 scripts/encoder_speed.py --resolution 1024 --batch-size 8 --out "$out/encoder-speed-1024.json" > "$out/encoder-speed.log" 2>&1; echo "rc=$?" ;;
        # FSDP2 against DDP on the same GPUs (bf16 base: FSDP2 shards no fp8 copy), FSDP2 with
        # checkpointing (its memory floor), and one GPU with the same settings (the scaling base)
        fsdp1024) run_ddp fsdp-1024 train --resolution 1024 --batch-size 1 --no-baseline --fp8-compute off --fuse-qkv off \
            --sharding fsdp --compare-sharding --compare-sharding-checkpointed --steps 10 ;;
        # FSDP2 units of 1 (with DDP beside it) and 2 blocks, then 4 blocks
        fsdpunits1024) run_ddp fsdp-units-1024 train --resolution 1024 --batch-size 1 --no-baseline --fp8-compute off \
            --fuse-qkv off --sharding fsdp --compare-sharding --compare-fsdp-unit-blocks 2 --steps 10 ;;
        fsdpunit4) run_ddp fsdp-unit4-1024 train --resolution 1024 --batch-size 1 --no-baseline --fp8-compute off \
            --fuse-qkv off --sharding fsdp --fsdp-unit-blocks 4 --steps 10 ;;
        whole1024) run whole-1024 train --resolution 1024 --batch-size 1 --no-baseline --fp8-compute off --fuse-qkv off --steps 10 ;;
        # FLUX.2 [dev] (32 B) sharded over all GPUs, without and with checkpointing
        fsdpflux2) run_ddp fsdp-flux2-dev-1024 train --model random:flux2-dev --resolution 1024 --batch-size 1 --no-baseline \
            --fp8-compute off --sharding fsdp --compare-sharding-checkpointed --steps 6 --warmup 2 ;;
        # FLUX.2 [dev] planned for 60 GiB a GPU: auto checkpoints as few blocks as fit, against all of them
        fsdpflux2partial) run_ddp fsdp-flux2-dev-1024-partial train --model random:flux2-dev --resolution 1024 --batch-size 1 \
            --no-baseline --fp8-compute off --sharding fsdp --gpu-memory-gib 60 --compare-sharding-checkpointed --steps 6 --warmup 2 ;;
        pre1024) run preprocess-1024 preprocess --resolution 1024 --images 128 --batch-size 8 ;;
        pre1024compile) run preprocess-1024-compile-off preprocess --resolution 1024 --images 256 --batch-size 8 --compile off
            run preprocess-1024-compile-on preprocess --resolution 1024 --images 256 --batch-size 8 --compile on ;;
        pre1024b16) run preprocess-1024-b16 preprocess --resolution 1024 --images 128 --batch-size 16 ;;
        # preprocess on one GPU, then on every GPU (rank-strided): is it linear in GPUs from 512 images on
        pre1024scaling) run preprocess-1024-512img-1gpu preprocess --resolution 1024 --images 512 --batch-size 8
            run_ddp preprocess-1024-512img-allgpus preprocess --resolution 1024 --images 512 --batch-size 8 ;;
        # FSDP2 at batch 2 per GPU: blocks kept gathered (auto), DDP, none kept
        fsdpkeep1024b2) run_ddp fsdp-keep-gathered-1024-b2 train --resolution 1024 --batch-size 2 --no-baseline --fp8-compute off \
            --fuse-qkv off --sharding fsdp --compare-sharding --compare-fsdp-keep-gathered 0 --steps 10 ;;
        # FSDP2 with the LoRA replicated (one all-reduce a step) against it sharded, and DDP, batch 1 and 2
        fsdplora1024) run_ddp fsdp-lora-1024-b1 train --resolution 1024 --batch-size 1 --no-baseline --fp8-compute off \
            --fuse-qkv off --sharding fsdp --fsdp-lora replicated --compare-fsdp-lora sharded --compare-sharding --steps 10
            run_ddp fsdp-lora-1024-b2 train --resolution 1024 --batch-size 2 --no-baseline --fp8-compute off \
            --fuse-qkv off --sharding fsdp --fsdp-lora replicated --compare-fsdp-lora sharded --compare-sharding --steps 10 ;;
    esac
done
