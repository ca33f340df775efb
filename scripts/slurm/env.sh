# Shared settings for scripts/preprocess.sbatch and scripts/train.sbatch: the environment is set up
# here, in one place. Every setting can be overridden from the environment at submit time:
#   CONFIG=configs/flux-dev-1024.yaml GPUS_PER_NODE=4 sbatch --nodes=2 scripts/train.sbatch
#
#   FLUX_LORA_HOME  repo checkout (default: the directory sbatch was called from)
#   CONFIG          YAML config (default configs/flux-dev-512.yaml); extra sbatch arguments are
#                   passed to flux_lora as flags, e.g. --set train.steps=4000
#   VENV            virtualenv to activate (default $FLUX_LORA_HOME/.venv, skipped if absent)
#   SHARDING        train's --sharding: auto (default: DDP while the model fits a GPU, else FSDP2),
#                   ddp or fsdp (the base sharded over every GPU of the job; resumes on another count)
#   GPUS_PER_NODE   ranks per node (default: SLURM's GPU count for the node, else nvidia-smi, else 1)
#   RDZV_PORT       rendezvous port on the first node (default 29500 + job id % 1000)
#   HF_HOME         model cache; node-local is fine (see README: what must be shared)
#   COMPILE_CACHE   torch.compile's cache folder on the shared filesystem (train.compile_cache_dir):
#                   the job's other nodes and later jobs start with compiled blocks (unset: per node)

FLUX_LORA_HOME=${FLUX_LORA_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$FLUX_LORA_HOME"
CONFIG=${CONFIG:-configs/flux-dev-512.yaml}
VENV=${VENV:-$FLUX_LORA_HOME/.venv}
if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi

if [ -z "${GPUS_PER_NODE:-}" ]; then
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE=$(nvidia-smi -L | wc -l)
    else
        GPUS_PER_NODE=1
    fi
fi
NNODES=${SLURM_NNODES:-1}
JOB_ID=${SLURM_JOB_ID:-$$}
MASTER_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
RDZV_PORT=${RDZV_PORT:-$((29500 + JOB_ID % 1000))}
# marker left by slurm/forward-signals.sh on this node when SLURM warned of preemption / time limit
PREEMPT_MARKER=${TMPDIR:-/tmp}/flux-lora-${JOB_ID}.preempted
export FLUX_LORA_HOME CONFIG GPUS_PER_NODE NNODES JOB_ID MASTER_NODE RDZV_PORT PREEMPT_MARKER
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [ -n "${COMPILE_CACHE:-}" ]; then
    export TORCHINDUCTOR_CACHE_DIR=$COMPILE_CACHE  # what train.compile_cache_dir sets
fi
# a dead rank must end the job in minutes, and NCCL must report errors instead of hanging
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
echo "flux_lora on SLURM: job $JOB_ID, $NNODES node(s) x $GPUS_PER_NODE rank(s), rendezvous $MASTER_NODE:$RDZV_PORT, config $CONFIG" >&2

# After srun: requeue the job if SLURM asked it to stop (USR1 before preemption or the time
# limit); the requeued job reruns this script and train resumes from its latest checkpoint.
finish_step() {
    local code=$1 stage=$2
    if [ -e "$PREEMPT_MARKER" ]; then
        rm -f "$PREEMPT_MARKER"
        if [ "$stage" = train ]; then
            echo "stopped for preemption; requeueing job $JOB_ID to resume" >&2
            scontrol requeue "$JOB_ID"
            exit 0
        fi
    fi
    exit "$code"
}
