#!/usr/bin/env bash
# A real one-node SLURM cluster (slurmctld + slurmd + slurmdbd/MariaDB accounting) for tests and demos.
#
#   slurm/cluster.sh start  [STATE_DIR]   install packages if missing, write configs, start daemons, wait
#   slurm/cluster.sh stop   [STATE_DIR]   cancel this cluster's jobs, stop the daemons this script started
#   slurm/cluster.sh status [STATE_DIR]   daemons, sinfo; exit 0 when the cluster answers
#   slurm/cluster.sh env    [STATE_DIR]   print the `export SLURM_CONF=...` line for client commands
#
# Made for a Debian 12 machine without systemd, run as root (SlurmUser=root). Everything lives under
# STATE_DIR (default /tmp/mtrl-hpc-slurm): configs, munge key and socket, state, spool, logs, pid files and
# the MariaDB data directory (socket only, no TCP). Client commands need SLURM_CONF=STATE_DIR/etc/slurm.conf.
# Environment knobs: MTRL_SLURM_CPUS (4), MTRL_SLURM_MEM_MB (8000), MTRL_SLURM_TIMEOUT (60 s readiness),
# MTRL_SLURM_PORT_BASE (6817: slurmctld, +1 slurmd, +2 slurmdbd).
set -euo pipefail

CMD=${1:-status}
STATE_DIR=${2:-${MTRL_SLURM_STATE_DIR:-/tmp/mtrl-hpc-slurm}}
STATE_DIR=$(mkdir -p "$STATE_DIR" && cd "$STATE_DIR" && pwd)
CPUS=${MTRL_SLURM_CPUS:-4}
MEM_MB=${MTRL_SLURM_MEM_MB:-8000}
TIMEOUT=${MTRL_SLURM_TIMEOUT:-60}
PORT_BASE=${MTRL_SLURM_PORT_BASE:-6817}
CLUSTER=mtrl
PARTITION=debug

ETC=$STATE_DIR/etc
RUN=$STATE_DIR/run
LOG=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge
DB_DIR=$STATE_DIR/mysql
DB_SOCK=$RUN/mysqld.sock
MUNGE_SOCK=$MUNGE_DIR/munge.socket
export SLURM_CONF=$ETC/slurm.conf
# libmariadb (used by slurmdbd and the mariadb client) reads the server socket from here.
export MYSQL_UNIX_PORT=$DB_SOCK
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
# daemon name -> binary that must be installed
declare -A BINARY=([munged]=munged [mariadbd]=mariadbd [slurmdbd]=slurmdbd [slurmctld]=slurmctld [slurmd]=slurmd)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { printf '[cluster.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
pidfile() { echo "$RUN/$1.pid"; }

# The pid recorded for DAEMON if that process is alive and is that daemon (guards against pid reuse).
live_pid() {
    local f pid
    f=$(pidfile "$1")
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -d /proc/$pid ]] || return 1
    grep -q "$1" "/proc/$pid/comm" 2>/dev/null || grep -qa "$1" "/proc/$pid/cmdline" 2>/dev/null || return 1
    echo "$pid"
}

# Poll a command until it succeeds, at most TIMEOUT seconds.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what (logs: $LOG)"
        sleep 0.2
    done
}

check_platform() {
    [[ $(uname -s) == Linux ]] || die "needs Linux"
    [[ $(id -u) == 0 ]] || die "needs root (daemons run as SlurmUser=root)"
}

install_packages() {
    local missing=0 d
    for d in "${DAEMONS[@]}"; do command -v "${BINARY[$d]}" >/dev/null 2>&1 || missing=1; done
    for d in sinfo sbatch sacct sacctmgr scontrol mariadb-install-db; do command -v "$d" >/dev/null 2>&1 || missing=1; done
    ((missing)) || return 0
    command -v apt-get >/dev/null 2>&1 || die "SLURM packages missing and no apt-get to install them"
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_configs() {
    mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE_DIR" "$DB_DIR" "$STATE_DIR/ctld" "$STATE_DIR/spool"
    cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/cluster.sh; one node, one partition, accounting through slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=30
KillWait=5
InactiveLimit=0
Waittime=0
MessageTimeout=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$ETC/plugstack.conf
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT_BASE + 2))
# munge socket for connections to slurmdbd (Slurm reads it from here, not from AuthInfo)
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$ETC/plugstack.conf"
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/cluster.sh; MariaDB over its unix socket only (MYSQL_UNIX_PORT=$DB_SOCK).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
    fi
    chown -R munge:munge "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR"
    chmod 400 "$MUNGE_DIR/munge.key"
}

start_munged() {
    live_pid munged >/dev/null && return 0
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    # munged refuses group/world-writable parents such as /tmp unless forced; the key stays 0400 munge.
    runuser -u munge -- munged --force --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_for "munged pid file" test -s "$MUNGE_DIR/munged.pid"
    cp "$MUNGE_DIR/munged.pid" "$(pidfile munged)"
    wait_for munge munge --socket="$MUNGE_SOCK" -n
}

start_mariadbd() {
    live_pid mariadbd >/dev/null && return 0
    if [[ ! -d $DB_DIR/mysql ]]; then
        log "initialising MariaDB in $DB_DIR"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" --auth-root-authentication-method=socket \
            --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fi
    rm -f "$DB_SOCK"
    # setsid + nohup: the server outlives this script and ignores the caller's terminal.
    setsid nohup mariadbd --no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCK" \
        --pid-file="$(pidfile mariadbd)" --skip-networking --log-error="$LOG/mariadbd.log" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M >/dev/null 2>&1 </dev/null &
    wait_for "MariaDB socket" mariadb-admin --no-defaults --socket="$DB_SOCK" ping
}

start_slurmdbd() {
    live_pid slurmdbd >/dev/null && return 0
    slurmdbd
    wait_for slurmdbd sacctmgr -n list cluster
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    live_pid slurmctld >/dev/null && return 0
    slurmctld
    wait_for slurmctld scontrol ping
}

start_slurmd() {
    live_pid slurmd >/dev/null && return 0
    slurmd
    wait_for "node $NODE idle" node_ready
}

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null) || return 1
    case $state in
        idle*|mix*|alloc*) return 0 ;;
        down*|drain*|drng*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1; return 1 ;;
        *) return 1 ;;
    esac
}

cmd_start() {
    local t0=$SECONDS t0ns
    t0ns=$(date +%s%N)
    check_platform
    install_packages
    if cmd_status >/dev/null 2>&1; then
        log "already running (state dir $STATE_DIR)"
        echo "export SLURM_CONF=$SLURM_CONF"
        return 0
    fi
    write_configs
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurmctld
    start_slurmd
    # the controller registers with slurmdbd asynchronously; sacct must answer before jobs are tracked
    wait_for "accounting" sacct -n -X -S now
    log "cluster $CLUSTER up in $(( ($(date +%s%N) - t0ns) / 1000000 )) ms (state dir $STATE_DIR)"
    : "$t0"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# TERM the given daemons together, wait for them (20 s), KILL what is left. Only pids from our pid files.
stop_daemons() {
    local name pid deadline pids=()
    for name in "$@"; do
        if pid=$(live_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$name:$pid")
        fi
        rm -f "$(pidfile "$name")"
    done
    deadline=$((SECONDS + 20))
    for name in "${pids[@]}"; do
        pid=${name#*:}
        while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.1; done
        if [[ -d /proc/$pid ]]; then
            log "${name%%:*} ($pid) did not stop on TERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

cmd_stop() {
    if live_pid slurmctld >/dev/null; then
        # Cancel every job of this cluster so no slurmstepd outlives its slurmd.
        scancel --full --quiet --user=root 2>/dev/null || true
        local deadline=$((SECONDS + 15))
        while [[ -n $(squeue -h -t R,CG,S -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.2; done
    fi
    # reverse start order; the controller flushes to slurmdbd, which needs MariaDB and munge
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    rm -f "$MUNGE_DIR/munged.pid"
    log "stopped (state dir $STATE_DIR kept)"
}

cmd_status() {
    local d pid ok=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(live_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: stopped"; ok=1; fi
    done
    if ((ok == 0)); then
        scontrol ping 2>/dev/null | sed 's/^/slurmctld: /' || ok=1
        sinfo 2>/dev/null || ok=1
        node_ready || ok=1
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
    return $ok
}

case $CMD in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) echo "usage: $0 start|stop|status|env [STATE_DIR]" >&2; exit 2 ;;
esac
