#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for the launcher tests: Debian's slurmctld + slurmd + munge,
# CPU-only and cgroup-free (proctrack/linuxproc, task/none, no GRES), daemons run directly as root.
#
#   tests/launch/slurm_cluster.sh start   # installs the packages if missing, starts munged/slurmctld/slurmd
#   tests/launch/slurm_cluster.sh stop    # stops what `start` started
#   export SLURM_CONF=$SLURM_TEST_DIR/slurm.conf   # then sbatch/srun/scontrol talk to it
#
# Exit status of `start`: 0 ready, 3 the packages cannot be installed (the tests skip), other: failure.
# State, config and daemon logs live in $SLURM_TEST_DIR (default /tmp/based-slurm-test).
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/based-slurm-test}
CONF=$DIR/slurm.conf
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}

log() { echo "slurm_cluster: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        log "slurmctld/slurmd/munge are not installed and there is no apt-get to install them"
        return 3
    fi
    log "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge; } >"$DIR/apt.log" 2>&1; then
        log "apt-get could not install the Slurm packages (see $DIR/apt.log):"
        tail -n 5 "$DIR/apt.log" >&2
        return 3
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "munged already running; using it"
        return 0
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    munged --force
    touch "$DIR/munged.started-by-us"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged did not come up"
    return 1
}

write_config() {
    local cpus
    cpus=$(nproc)
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
ClusterName=basedtest
SlurmctldHost=$(hostname -s 2>/dev/null || cat /proc/sys/kernel/hostname)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=15
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

wait_for_node() {
    for _ in $(seq 100); do
        if SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            return 0
        fi
        sleep 0.3
    done
    log "the node did not become idle; daemon logs: $DIR/slurmctld.log $DIR/slurmd.log"
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    return 1
}

stop_pidfile() {
    local file=$1 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}

stop() {
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    if [ -e "$DIR/munged.started-by-us" ]; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$DIR/munged.started-by-us"
    fi
}

start() {
    if [ "$(id -u)" != 0 ]; then
        log "the test cluster runs its daemons as root (SlurmUser=root); run the tests as root"
        return 3
    fi
    mkdir -p "$DIR"
    install_packages || return $?
    stop
    rm -rf "$DIR/state" "$DIR/spool"
    start_munge
    write_config
    slurmctld -f "$CONF" -c -i
    slurmd -f "$CONF" -N localhost
    wait_for_node
    log "ready: export SLURM_CONF=$CONF"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
