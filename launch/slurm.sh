#!/bin/bash
# Train on a Slurm cluster: srun starts one torchrun per node, with c10d rendezvous on the first node.
#
#   sbatch launch/slurm.sh [CONFIG] [key=value ...]            # from the repository root
#   sbatch --nodes=4 --gpus-per-node=8 --time=48:00:00 launch/slurm.sh configs/based_1b_50b.yaml
#   CONFIG=configs/based_tiny.yaml ARGS="optim.lr=1e-3 schedule.max_steps=100" sbatch launch/slurm.sh
#
# Environment (arguments win): CONFIG (default configs/based_tiny.yaml), ARGS (config overrides),
# NODES (nodes to use; default all of the job's), GPUS_PER_NODE (processes per node; default the job's
# --gpus-per-node; 0 = CPU), CPU_PROCS_PER_NODE (processes per node on CPU, default 1),
# PYTHON (default .venv/bin/python), RDZV_PORT (default derived from the job id), REPO_DIR (default: where
# sbatch was called).
# Nodes, time, partition, account: sbatch options (command-line options override the header below).
#
# Preemption and time limit: Slurm sends SIGUSR1 to this script 300 s before the end (--signal), the script
# passes it to the trainers, which checkpoint at the next step and exit 0, and the script requeues the job;
# the requeued job resumes from that checkpoint (checkpoint.resume=auto). By hand:
#   scancel --signal=USR1 --batch JOBID     # checkpoint, then requeue
#   scancel --signal=USR2 --batch JOBID     # checkpoint, then stop
# Logs: logs/<job name>-<job id>.log, appended across requeues.
#SBATCH --job-name=based
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.log
set -uo pipefail

# sbatch runs a copy of this script from its spool folder; the repository is where sbatch was called
# (or REPO_DIR).
cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "launch/slurm.sh runs under Slurm: sbatch launch/slurm.sh [CONFIG] [key=value ...]" >&2
    exit 2
fi

CONFIG=${1:-${CONFIG:-configs/based_tiny.yaml}}
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
    OVERRIDES=("$@")
else
    read -r -a OVERRIDES <<<"${ARGS:-}"
fi
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHON

# Processes per node: GPUS_PER_NODE, else the job's GPUs ("8" or "h100:8"), else CPU processes.
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}}
gpus=${gpus##*:}
if [ "${gpus:-0}" -gt 0 ] 2>/dev/null; then
    NPROC_PER_NODE=$gpus
else
    NPROC_PER_NODE=${CPU_PROCS_PER_NODE:-1}
fi
ALLOCATED_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NNODES=${NODES:-$ALLOCATED_NODES}
if ! [ "$NNODES" -ge 1 ] 2>/dev/null || [ "$NNODES" -gt "$ALLOCATED_NODES" ]; then
    echo "NODES=$NNODES: expected a number from 1 to the $ALLOCATED_NODES node(s) of job $SLURM_JOB_ID" >&2
    exit 2
fi
# Threads per trainer: this node's CPUs shared among its processes (torchrun alone would set 1).
threads=$(( ${SLURM_CPUS_ON_NODE:-1} / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# One port per job id, so that several jobs sharing a node do not collide (and a requeued job reuses it).
RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

echo "=== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, $(date -Is)"
echo "config $CONFIG, overrides: ${OVERRIDES[*]:-none}"
echo "$NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $HEAD_NODE:$RDZV_PORT"
if ! DESCRIPTION=$("$PYTHON" -m launch.common describe "$CONFIG" "${OVERRIDES[@]}"); then
    echo "the config does not load; not starting" >&2
    exit 2
fi
RUN_DIR=$(sed -n 's/^run_dir=//p' <<<"$DESCRIPTION")
echo "run folder $RUN_DIR; TensorBoard: tensorboard --logdir $RUN_DIR/tb"

SIGNAL_ACTION=""
SRUN_PID=""
FORWARDED=""
# The trainers get the signal once: srun passes it to every process of the step; torchrun ignores it
# (see launch/common.py) and the trainers checkpoint at their next step.
send_to_trainers() {
    if [ -n "$SIGNAL_ACTION" ] && [ -n "$SRUN_PID" ] && [ -z "$FORWARDED" ]; then
        FORWARDED=1
        kill -USR1 "$SRUN_PID" 2>/dev/null
    fi
}
forward_checkpoint_signal() {
    [ -n "$SIGNAL_ACTION" ] && return
    SIGNAL_ACTION=$1
    echo "=== $(date -Is) $2: asking the trainers to checkpoint, then $1"
    send_to_trainers
}
trap 'forward_checkpoint_signal requeue SIGUSR1' USR1
trap 'forward_checkpoint_signal stop SIGUSR2' USR2
# SIGTERM (scancel, time limit, preemption) reaches every process of the job from Slurm itself.
trap 'echo "=== $(date -Is) SIGTERM: Slurm is ending the job"' TERM

# A signal before training starts leaves nothing new to save: go straight to the requeue (or stop).
STATUS=0
if [ -z "$SIGNAL_ACTION" ]; then
    srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
        bash -c 'trap "" USR1 USR2 TERM; exec "$@"' torchrun \
        "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
        --max-restarts=0 --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \
        -m pretrain.train "$CONFIG" "${OVERRIDES[@]}" &
    SRUN_PID=$!
    send_to_trainers
    # `wait` returns early when a trapped signal arrives: wait until srun is gone, then take its status
    # (bash remembers it).
    while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
    wait "$SRUN_PID"
    STATUS=$?
    echo "=== $(date -Is) training step ended with status $STATUS"
fi

if [ "$SIGNAL_ACTION" = requeue ] && [ "$STATUS" -eq 0 ]; then
    if "$PYTHON" -m launch.common describe "$CONFIG" "${OVERRIDES[@]}" | grep -q '^finished=1'; then
        echo "=== the run is complete; not requeueing"
        exit 0
    fi
    echo "=== requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint in $RUN_DIR"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "scontrol requeue $SLURM_JOB_ID failed; resubmit the job to resume from the checkpoint" >&2
    exit 1
fi
exit "$STATUS"
