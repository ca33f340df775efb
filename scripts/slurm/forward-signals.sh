#!/usr/bin/env bash
# Run by srun once per node: starts torchrun ("$@") and forwards SLURM's warning signals to its
# workers. torchrun itself dies on SIGUSR1, so the workers would never hear it: here USR1/TERM
# reach every worker as USR1, they checkpoint together and exit 3, and a marker tells the batch
# script to requeue.
set -u
marker=${PREEMPT_MARKER:-${TMPDIR:-/tmp}/flux-lora-${SLURM_JOB_ID:-$$}.preempted}
stopping=0
"$@" &
child=$!
forward() {
    stopping=1
    : > "$marker"
    pkill -USR1 -P "$child" 2>/dev/null || true
}
trap forward USR1 TERM INT
while true; do
    wait "$child"
    code=$?
    # wait returns early (>128) when a trapped signal arrives; keep waiting for torchrun
    if kill -0 "$child" 2>/dev/null; then
        continue
    fi
    break
done
if [ "$stopping" = 1 ]; then
    exit 3
fi
exit "$code"
