#!/bin/bash
# Train on a Slurm cluster: srun starts one launch/relay.py per node, which runs torchrun (standalone on one
# node, c10d rendezvous hosted by the first node otherwise) and relays the job's signals to the trainers.
#
#   sbatch launch/slurm.sh [CONFIG] [key=value ...]                      # CPU processes (no GPUs asked)
#   sbatch --nodes=4 --gpus-per-node=8 --time=48:00:00 launch/slurm.sh configs/based_1b_50b.yaml
#   CONFIG=configs/based_tiny.yaml ARGS="optim.lr=1e-3 schedule.max_steps=100" sbatch launch/slurm.sh
# `make pretrain` / `python -m launch.pretrain` build this sbatch command from the config's launch: section
# and refuse jobs that cannot run (missing data, more nodes than the partition, GPUs on a CPU partition).
#
# Environment (arguments win): CONFIG (default configs/based_tiny.yaml), ARGS (config overrides),
# NODES (nodes to use; default all of the job's), GPUS_PER_NODE (processes per node; default the job's
# GPUs; 0 = CPU processes), CPU_PROCS_PER_NODE (processes per node on CPU, default 1),
# PYTHON (default <repository>/.venv/bin/python), REPO_DIR (default: found from the submitted script's path,
# so sbatch works from any folder), GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (default: the interface that
# reaches the first node), NCCL_* (launch/relay.py sets NCCL_NVLS_ENABLE=0 unless given).
# Nodes, time, partition, account, GPUs: sbatch options (command-line options override the header below).
#
# Signals (docs/DISTRIBUTED.md, "Signals"): Slurm sends SIGUSR1 to this script 300 s before the time limit
# (--signal=B:USR1@300); the script passes it to srun, srun to the relay on every node, the relay to the
# trainers, which checkpoint at the next step and exit 0; the script then requeues the job, which resumes
# from that checkpoint (checkpoint.resume=auto). Every later signal is passed on as well. By hand:
#   scancel --signal=USR1 --batch JOBID     # checkpoint, then requeue
#   scancel --signal=USR2 --batch JOBID     # checkpoint, then stop (Slurm then shows COMPLETED)
# Logs: logs/<job name>-<job id>.log in the folder sbatch was called from (it must exist there: Slurm opens
# it before this script runs; the repository has logs/), appended across requeues.
#SBATCH --job-name=based
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.log
set -uo pipefail

# The traps come first: a signal before them would end the script (bash's default for USR1/USR2).
SIGNAL_ACTION=""
SRUN_PID=""
# srun passes each signal to the relay on every node, which passes it to the trainers (launch/relay.py).
send_to_trainers() {
    [ -n "$SRUN_PID" ] && kill "-$1" "$SRUN_PID" 2>/dev/null
}
on_signal() {
    local name=$1 action=$2
    if [ -z "$SIGNAL_ACTION" ]; then
        SIGNAL_ACTION=$action
        echo "=== $(date -Is) $name: asking the trainers to checkpoint, then $action"
    else
        echo "=== $(date -Is) $name: passed on (the trainers exit at once on a second request)"
    fi
    send_to_trainers USR1
}
trap 'on_signal SIGUSR1 requeue' USR1
trap 'on_signal SIGUSR2 stop' USR2
# SIGTERM (scancel, time limit, preemption): Slurm signals every job step as well; passed on for the
# cgroup case, where a step's signal reaches only its task (the relay, which forwards it).
trap 'echo "=== $(date -Is) SIGTERM: Slurm is ending the job"; [ -z "$SIGNAL_ACTION" ] && SIGNAL_ACTION=ended; send_to_trainers TERM' TERM

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "launch/slurm.sh runs under Slurm: sbatch launch/slurm.sh [CONFIG] [key=value ...]" >&2
    exit 2
fi
fail() { echo "=== error: $*; not starting" >&2; exit 2; }

# sbatch runs a copy of this script from its spool folder: the repository is found from the path that was
# submitted (scontrol's Command=), else it is the folder sbatch was called from.
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
if [ -z "${REPO_DIR:-}" ]; then
    submitted=$(scontrol show job --oneliner "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    case $submitted in /*) ;; ?*) submitted=$SUBMIT_DIR/$submitted ;; esac
    REPO_DIR=$SUBMIT_DIR
    [ -n "$submitted" ] && [ -f "$(dirname "$submitted")/relay.py" ] && REPO_DIR=$(cd "$(dirname "$submitted")/.." && pwd)
fi
cd "$REPO_DIR" || fail "REPO_DIR=$REPO_DIR is not a folder"
[ -f launch/relay.py ] || fail "$REPO_DIR is not the repository (no launch/relay.py); set REPO_DIR"

CONFIG=${1:-${CONFIG:-configs/based_tiny.yaml}}
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
    OVERRIDES=("$@")
else
    read -r -a OVERRIDES <<<"${ARGS:-}"
fi
# A config path given relative to the folder sbatch was called from.
case $CONFIG in /*) ;; *) [ ! -f "$CONFIG" ] && [ -f "$SUBMIT_DIR/$CONFIG" ] && CONFIG=$SUBMIT_DIR/$CONFIG ;; esac
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
[ -x "$PYTHON" ] || fail "no Python at $PYTHON: run \`make setup\` in $REPO_DIR, or set PYTHON=/path/to/python"
export PYTHON

echo "=== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, $(date -Is)"
echo "repository $REPO_DIR, python $PYTHON"
echo "config $CONFIG, overrides: ${OVERRIDES[*]:-none}"
DESCRIPTION=$("$PYTHON" -m launch.common describe "$CONFIG" "${OVERRIDES[@]}") || fail "the config does not load"
described() { sed -n "s/^$1=//p" <<<"$DESCRIPTION"; }
RUN_DIR=$(described run_dir)

# Processes per node: GPUS_PER_NODE, else the job's GPUs ("8" or "h100:8"), else CPU processes.
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}}
gpus=${gpus##*:}
[[ $gpus =~ ^[0-9]+$ ]] || fail "GPUS_PER_NODE=$gpus: expected a number"
if [ "$gpus" -gt 0 ]; then
    NPROC_PER_NODE=$gpus
elif [ -z "${GPUS_PER_NODE:-}" ] && [ "$(described device)" != cpu ]; then
    fail "this job has no GPUs but the config has device: $(described device); submit with --gpus-per-node=N, or GPUS_PER_NODE=0 for CPU processes"
else
    NPROC_PER_NODE=${CPU_PROCS_PER_NODE:-1}
fi
ALLOCATED_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NNODES=${NODES:-$ALLOCATED_NODES}
if ! [ "$NNODES" -ge 1 ] 2>/dev/null || [ "$NNODES" -gt "$ALLOCATED_NODES" ]; then
    fail "NODES=$NNODES: expected a number from 1 to the $ALLOCATED_NODES node(s) of job $SLURM_JOB_ID"
fi
[ "$(described nodes)" != "$NNODES" ] && echo "note: the config's launch.nodes is $(described nodes); this job uses $NNODES node(s)"
# CPUs per node task: the smallest node of the allocation ("16(x2),8"), so that srun fits on every node.
cpus=$(tr ',' '\n' <<<"${SLURM_JOB_CPUS_PER_NODE:-1}" | sed 's/(.*//' | sort -n | head -n 1)
threads=$(( cpus / NPROC_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
RELAY=(--nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE")
if [ "$NNODES" -gt 1 ]; then
    # The endpoint is the first node's address as Slurm reaches it (NodeAddr), hosted by node 0 whatever
    # its hostname; the port is free on this node (the batch script runs on the first node), per job id.
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    HEAD_ADDR=$(scontrol show node --oneliner "$HEAD_NODE" | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
    RDZV_PORT=${RDZV_PORT:-$("$PYTHON" -m launch.relay --pick-port "$SLURM_JOB_ID")} || fail "no free port"
    RELAY+=(--rdzv-endpoint="${HEAD_ADDR:-$HEAD_NODE}:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID")
    echo "$NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous ${HEAD_ADDR:-$HEAD_NODE}:$RDZV_PORT ($HEAD_NODE)"
else
    echo "1 node x $NPROC_PER_NODE process(es) (torchrun --standalone)"
fi
echo "run folder $RUN_DIR; TensorBoard: $(described tensorboard) --logdir $RUN_DIR/tb"

# A signal before training starts leaves nothing new to save: go straight to the requeue (or stop).
STATUS=0
if [ -z "$SIGNAL_ACTION" ]; then
    # The task ignores USR1/TERM until the relay's handlers are in (its first ~0.1 s): such an early
    # signal is dropped rather than fatal.
    srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" \
        bash -c 'trap "" USR1 USR2 TERM; exec "$@"' relay \
        "$PYTHON" -m launch.relay "${RELAY[@]}" -- "$CONFIG" "${OVERRIDES[@]}" &
    SRUN_PID=$!
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
if [ "$SIGNAL_ACTION" = stop ] && [ "$STATUS" -eq 0 ]; then
    echo "=== stopped on SIGUSR2 after the checkpoint (Slurm shows this job COMPLETED; the run is not finished)."
    echo "=== resume: sbatch the same command again (it resumes from the newest checkpoint in $RUN_DIR)"
fi
exit "$STATUS"
