#!/usr/bin/env bash
# Slurm test clusters on this machine for the launcher tests: Debian's slurmctld + slurmd + munge, CPU only,
# no GRES, daemons run directly as root. Three configurations (KIND, default linuxproc):
#   linuxproc  one node "localhost" on 127.0.0.1, proctrack/linuxproc, task/none
#   cgroup     one node "cgnode" on 127.0.0.1 (other ports), proctrack/cgroup, task/cgroup,task/affinity,
#              cgroup/v1 (what this machine has: /sys/fs/cgroup holds the v1 controllers, freezer included)
#   twonode    slurmctld and two slurmd (NodeName n1, n2) each in its own network namespace, the slurmd
#              also in their own hostname namespace (hostnames box1, box2: not the NodeNames), joined by veth
#              pairs to a bridge inside the controller's namespace, on 10.213.0.0/24 addresses that exist only
#              in those namespaces (no route to any other network). The slurmd share this machine's
#              filesystem (as nodes share a cluster filesystem). Clients reach the controller through the
#              wrappers in $SLURM_TEST_DIR/twonode/bin (sbatch, srun, scontrol, ... run inside its namespace).
#
#   tests/launch/slurm_cluster.sh start [KIND]   # installs the packages if missing, starts the daemons
#   tests/launch/slurm_cluster.sh stop [KIND]    # stops what `start` started
#   export SLURM_CONF=$SLURM_TEST_DIR/KIND/slurm.conf   # then sbatch/srun/scontrol talk to it
#
# Exit status of `start`: 0 ready, 3 the packages cannot be installed (the tests skip), other: failure.
# State, config and daemon logs live in $SLURM_TEST_DIR/KIND (default /tmp/based-slurm-test/KIND).
set -euo pipefail

ROOT_DIR=${SLURM_TEST_DIR:-/tmp/based-slurm-test}
KIND=${2:-linuxproc}
DIR=$ROOT_DIR/$KIND
CONF=$DIR/slurm.conf
case $KIND in
    linuxproc) CTLD_PORT=6817 SLURMD_PORT=6818 ;;
    cgroup) CTLD_PORT=6827 SLURMD_PORT=6828 ;;
    twonode) CTLD_PORT=6817 SLURMD_PORT=6818 ;;
    *) echo "unknown cluster kind $KIND: expected linuxproc, cgroup or twonode" >&2; exit 2 ;;
esac
NET=10.213.0
NS_CTL=basedtest-ctl

log() { echo "slurm_cluster: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && command -v ip >/dev/null && command -v nsenter >/dev/null; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        log "slurmctld/slurmd/munge are not installed and there is no apt-get to install them"
        return 3
    fi
    log "installing slurmctld slurmd slurm-client munge iproute2 util-linux with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge iproute2 util-linux; } >"$ROOT_DIR/apt.log" 2>&1; then
        log "apt-get could not install the Slurm packages (see $ROOT_DIR/apt.log):"
        tail -n 5 "$ROOT_DIR/apt.log" >&2
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
    touch "$ROOT_DIR/munged.started-by-us"
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged did not come up"
    return 1
}

write_config() {
    local cpus ctl_host proctrack=proctrack/linuxproc task=task/none nodes host
    cpus=$(nproc)
    host=$(hostname -s 2>/dev/null || cat /proc/sys/kernel/hostname)
    mkdir -p "$DIR/state" "$DIR"/spool/{localhost,cgnode,n1,n2}
    ctl_host="$host(127.0.0.1)"
    nodes="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    case $KIND in
        cgroup)
            proctrack=proctrack/cgroup task=task/cgroup,task/affinity
            nodes="NodeName=cgnode NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=cgnode Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
            printf '%s\n' CgroupPlugin=cgroup/v1 CgroupMountpoint=/sys/fs/cgroup ConstrainCores=no \
                ConstrainRAMSpace=no ConstrainDevices=no >"$DIR/cgroup.conf"
            ;;
        twonode)
            ctl_host="basedctl($NET.1)"
            nodes="NodeName=n1 NodeAddr=$NET.11 CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeAddr=$NET.12 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
            ;;
    esac
    cat >"$CONF" <<CONF
ClusterName=basedtest$KIND
SlurmctldHost=$ctl_host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.%n.log
ProctrackType=$proctrack
TaskPlugin=$task
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
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
$nodes
CONF
}

# Slurm commands for this cluster: inside the controller's network namespace for twonode.
client() {
    if [ "$KIND" = twonode ]; then nsenter --net="/run/netns/$NS_CTL" "$@"; else "$@"; fi
}

wait_for_nodes() {
    local want=$1
    for _ in $(seq 150); do
        if [ "$(SLURM_CONF=$CONF client sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -ge "$want" ]; then
            return 0
        fi
        sleep 0.3
    done
    log "the node(s) did not become idle; daemon logs in $DIR"
    tail -n 20 "$DIR"/slurm*.log >&2 || true
    return 1
}

# twonode: namespaces basedtest-ctl (bridge br0, $NET.1), basedtest-n1/-n2 (eth0, $NET.11/.12).
make_network() {
    remove_network
    ip netns add "$NS_CTL"
    ip -n "$NS_CTL" link set lo up
    ip -n "$NS_CTL" link add br0 type bridge
    ip -n "$NS_CTL" addr add "$NET.1/24" dev br0
    ip -n "$NS_CTL" link set br0 up
    local i
    for i in 1 2; do
        ip netns add "basedtest-n$i"
        ip -n "basedtest-n$i" link set lo up
        ip -n "$NS_CTL" link add "veth$i" type veth peer name eth0 netns "basedtest-n$i"
        ip -n "$NS_CTL" link set "veth$i" master br0 up
        ip -n "basedtest-n$i" addr add "$NET.1$i/24" dev eth0
        ip -n "basedtest-n$i" link set eth0 up
    done
}

remove_network() {
    local ns
    for ns in basedtest-n1 basedtest-n2 "$NS_CTL"; do
        ip netns del "$ns" 2>/dev/null || true
    done
}

write_wrappers() {
    mkdir -p "$DIR/bin"
    local tool
    for tool in sbatch srun salloc scontrol scancel squeue sinfo sacct; do
        printf '#!/bin/sh\nexec nsenter --net=/run/netns/%s %s "$@"\n' "$NS_CTL" "$(command -v "$tool")" \
            >"$DIR/bin/$tool"
        chmod 0755 "$DIR/bin/$tool"
    done
}

start_daemons() {
    case $KIND in
        twonode)
            make_network
            write_wrappers
            nsenter --net="/run/netns/$NS_CTL" unshare --uts \
                sh -c "hostname basedctl && exec slurmctld -f '$CONF' -c -i" </dev/null >/dev/null 2>&1
            local i
            for i in 1 2; do
                nsenter --net="/run/netns/basedtest-n$i" unshare --uts \
                    sh -c "hostname box$i && exec slurmd -f '$CONF' -N n$i" </dev/null >/dev/null 2>&1
            done
            wait_for_nodes 2
            ;;
        cgroup)
            slurmctld -f "$CONF" -c -i
            slurmd -f "$CONF" -N cgnode
            wait_for_nodes 1
            ;;
        *)
            slurmctld -f "$CONF" -c -i
            slurmd -f "$CONF" -N localhost
            wait_for_nodes 1
            ;;
    esac
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

# Whether another configuration's controller is up (munged is shared by all).
others_running() {
    local kind pidfile
    for kind in linuxproc cgroup twonode; do
        [ "$kind" = "$KIND" ] && continue
        pidfile=$ROOT_DIR/$kind/slurmctld.pid
        [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && return 0
    done
    return 1
}

stop() {
    local file
    for file in "$DIR"/slurmd.*.pid; do
        [ -e "$file" ] && stop_pidfile "$file"
    done
    stop_pidfile "$DIR/slurmctld.pid"
    [ "$KIND" = twonode ] && remove_network
    if [ -e "$ROOT_DIR/munged.started-by-us" ] && ! others_running; then
        stop_pidfile /run/munge/munged.pid
        rm -f "$ROOT_DIR/munged.started-by-us"
    fi
    return 0
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
    start_daemons
    log "ready ($KIND): export SLURM_CONF=$CONF"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop [linuxproc|cgroup|twonode]" >&2; exit 2 ;;
esac
