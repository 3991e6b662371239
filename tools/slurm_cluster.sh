#!/usr/bin/env bash
# A throw-away single-node Slurm cluster (munged, slurmctld, slurmd) for tests and for trying the
# sbatch scripts on a workstation. Needs root and the Debian/Ubuntu packages `slurm-wlm munge`.
#
#   dir=$(tools/slurm_cluster.sh start)      # prints the cluster directory once the node is idle
#   export SLURM_CONF=$dir/slurm.conf        # sbatch, srun, squeue, scontrol now talk to it
#   tools/slurm_cluster.sh stop "$dir"       # stops exactly the daemons `start` started (by pid)
#
# Everything (config, munge key and socket, state, spool, logs) lives in one temporary directory;
# the ports are free ones, so the cluster does not disturb a system Slurm or munge. The node is
# `$(hostname -s)` with all the machine's CPUs (`nproc --all`: plain `nproc` honours
# OMP_NUM_THREADS, and a 1-CPU node leaves every 2-task job pending) and one fake GPU (gres backed
# by /dev/null) so that GPU requests can be made and refused; partition `debug` is the default.
set -euo pipefail

die() { echo "slurm_cluster.sh: error: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their users)"
    for tool in munged slurmctld slurmd scontrol; do
        command -v "$tool" >/dev/null || die "$tool not found; install with: apt-get install -y slurm-wlm munge"
    done
    local dir node ctld_port node_port
    dir=$(mktemp -d /tmp/bigtrain-slurm.XXXXXX)
    chmod 755 "$dir"  # munged runs as the munge user and must reach its own sub-directory
    mkdir -p "$dir"/{munge,state,spool,log}
    chown munge: "$dir/munge"
    chmod 755 "$dir/munge"  # the socket must be reachable by every user; the key stays 0400
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chown munge: "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    runuser -u munge -- munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" || die "munged failed to start; see $dir/munge/munged.log"

    node=$(hostname -s)
    ctld_port=$(free_port)
    node_port=$(free_port)
    cat >"$dir/slurm.conf" <<EOF
ClusterName=bigtrain-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=10
# generous timeouts: on a busy machine the defaults (10 s) fail launches and RPCs
MessageTimeout=60
BatchStartTimeout=120
MinJobAge=600
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc --all) Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$node Name=gpu File=/dev/null" >"$dir/gres.conf"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld || die "slurmctld failed to start; see $dir/log/slurmctld.log"
    slurmd || die "slurmd failed to start; see $dir/log/slurmd.log"
    for _ in $(seq 60); do
        if scontrol show node "$node" 2>/dev/null | grep -q 'State=IDLE'; then
            echo "$dir"
            return
        fi
        sleep 0.5
    done
    stop "$dir"
    die "node $node did not become idle within 30 s; see $dir/log/"
}

stop() {
    local dir=${1:?usage: slurm_cluster.sh stop DIR}
    local pidfile pid jobs
    # end the cluster's jobs first: slurmstepd and job processes outlive slurmd
    export SLURM_CONF=$dir/slurm.conf
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 30); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 1; done
    fi
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [[ -s $pidfile ]] || continue
        pid=$(<"$pidfile")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

case ${1:-} in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
