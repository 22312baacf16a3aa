#!/usr/bin/env bash
# A one-machine SLURM cluster (2 nodes, accounting via slurmdbd + MariaDB) for tests and demos.
#
#   slurm/cluster.sh start    install what is missing, configure, start, wait until both nodes are idle
#   slurm/cluster.sh stop     cancel leftover jobs, stop the daemons this script started (by pid file)
#   slurm/cluster.sh status   show what runs; exit 0 when everything is up, 3 when stopped, 1 otherwise
#
# Needs root. State, logs and pid files live in $LAUNCHER_SLURM_DIR (default /var/lib/launcher-slurm);
# the configs are /etc/slurm/slurm.conf and /etc/slurm/slurmdbd.conf, where the slurm commands look.
# See slurm/README.md.
set -euo pipefail

STATE=${LAUNCHER_SLURM_DIR:-/var/lib/launcher-slurm}
CONF_DIR=/etc/slurm
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
DBD_CONF_FILE=$CONF_DIR/slurmdbd.conf
TIMEOUT=${LAUNCHER_SLURM_TIMEOUT:-90}          # seconds to wait for each daemon / for the nodes
NODE_CPUS=${LAUNCHER_SLURM_CPUS:-4}            # declared per node (may exceed the real cores)
NODE_MEM=${LAUNCHER_SLURM_MEM_MB:-4096}        # declared RealMemory per node, MB
CLUSTER=launcher
NODES=(n1 n2)
CTLD_PORT=17000                                # slurmd: 17001-17002, slurmdbd: 17003, mariadb: 17004
DBD_PORT=17003
DB_PORT=17004
MARKER="# Managed by launcher slurm/cluster.sh"

RUN=$STATE/run
LOG=$STATE/log
MUNGE_DIR=$STATE/munge
MUNGE_SOCK=$MUNGE_DIR/munge.socket
DB_DIR=$STATE/mysql
DB_SOCK=$RUN/mysqld.sock
export SLURM_CONF=$SLURM_CONF_FILE

T0=$(date +%s.%N)
say() { printf 'cluster.sh: %s\n' "$*"; }
err() { printf 'cluster.sh: ERROR: %s\n' "$*" >&2; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# die MESSAGE [LOGFILE...]: print the error and the tail of each log, exit 1
die() {
    local msg=$1; shift
    err "$msg"
    local f
    for f in "$@"; do
        if [[ -s $f ]]; then
            printf -- '----- last lines of %s -----\n' "$f" >&2
            tail -n 40 "$f" >&2
            printf -- '-----\n' >&2
        fi
    done
    exit 1
}

# ---------------------------------------------------------------- daemons and their pid files
# name -> pid file, expected /proc/PID/comm, log file
pidfile_of() {
    case $1 in
        munged) echo "$MUNGE_DIR/munged.pid" ;;
        mariadbd) echo "$RUN/mariadbd.pid" ;;
        slurmdbd) echo "$RUN/slurmdbd.pid" ;;
        slurmctld) echo "$RUN/slurmctld.pid" ;;
        slurmd.*) echo "$RUN/$1.pid" ;;
    esac
}
comm_of() { echo "${1%%.*}"; }
logfile_of() {
    case $1 in
        munged) echo "$MUNGE_DIR/munged.log" ;;
        *) echo "$LOG/$1.log" ;;
    esac
}
DAEMONS=(munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd.}")

# alive PID: the process exists and is not a zombie (init here may reap orphans late)
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

# pid_of NAME: print the pid if the daemon from our pid file is alive (and is what we think it is)
pid_of() {
    local f pid comm
    f=$(pidfile_of "$1")
    [[ -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f" 2>/dev/null || true)
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$(comm_of "$1")" ]] && alive "$pid" || return 1
    echo "$pid"
}
running() { pid_of "$1" >/dev/null; }

# wait_for NAME DESCRIPTION COMMAND...: poll COMMAND until it succeeds; fail if the daemon died
wait_for() {
    local name=$1 what=$2; shift 2
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ! running "$name"; then
            sleep 0.3   # the pid file may be written a moment after the fork
            running "$name" || die "$name exited during start-up ($what)" "$(logfile_of "$name")"
        fi
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for $what" "$(logfile_of "$name")"
        sleep 0.2
    done
}

stop_daemon() {
    local name=$1 pid i
    pid=$(pid_of "$name") || { rm -f "$(pidfile_of "$name")"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do           # up to 15 s, then SIGKILL
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        err "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$(pidfile_of "$name")"
    say "stopped $name (pid $pid)"
}

# ---------------------------------------------------------------- installation
BINARIES=(munged munge unmunge slurmctld slurmd slurmdbd sinfo squeue sbatch srun scontrol sacct sacctmgr
    mariadbd mariadb-install-db mariadb)
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server-core mariadb-client-core)

missing_binaries() {
    local b out=()
    for b in "${BINARIES[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || out+=("$b")
    done
    [[ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/accounting_storage_mysql.so ]] ||
        compgen -G '/usr/lib/*/slurm-wlm/accounting_storage_mysql.so' >/dev/null || out+=(slurm-mysql-plugin)
    echo "${out[*]}"
}

install_packages() {
    local missing
    missing=$(missing_binaries)
    [[ -z $missing ]] && return 0
    say "installing ${PACKAGES[*]} (missing: $missing)"
    command -v apt-get >/dev/null || die "apt-get not found; install slurm-wlm, slurmdbd, munge and mariadb yourself"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' maintainer scripts from starting system services (we start our own daemons).
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local apt_log=$STATE/log/apt.log rc=0
    mkdir -p "$STATE/log"
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        apt-get update -q >"$apt_log" 2>&1 </dev/null || rc=$?
    fi
    if ((rc == 0)); then
        apt-get install "${apt_opts[@]}" "${PACKAGES[@]}" >>"$apt_log" 2>&1 </dev/null || rc=$?
        if ((rc != 0)); then   # stale package lists: refresh once and retry
            rc=0
            { apt-get update -q && apt-get install "${apt_opts[@]}" "${PACKAGES[@]}"; } >>"$apt_log" 2>&1 </dev/null || rc=$?
        fi
    fi
    ((added_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get failed (exit $rc)" "$apt_log"
    missing=$(missing_binaries)
    [[ -z $missing ]] || die "still missing after apt-get install: $missing" "$apt_log"
    say "installed packages ($(elapsed) s)"
}

# ---------------------------------------------------------------- configuration
HOST=$(hostname -s)

ensure_hosts() {
    local name
    for name in "$HOST" "${NODES[@]}"; do
        if ! getent hosts "$name" >/dev/null 2>&1; then
            printf '127.0.0.1 %s\n' "$name" >>/etc/hosts
            say "added '127.0.0.1 $name' to /etc/hosts"
        fi
    done
}

ensure_dirs() {
    mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/slurmctld" "$MUNGE_DIR"
    chmod 755 "$STATE" "$RUN" "$LOG"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/slurmd.$n"; done
    id munge >/dev/null 2>&1 || die "user 'munge' does not exist (the munge package creates it)"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"          # clients (any user) must reach the socket
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        if [[ -s /etc/munge/munge.key ]]; then
            cp /etc/munge/munge.key "$MUNGE_DIR/munge.key"
        else
            dd if=/dev/urandom bs=1024 count=1 status=none >"$MUNGE_DIR/munge.key"
        fi
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 400 "$MUNGE_DIR/munge.key"
    if [[ ! -s $STATE/db.pass ]]; then
        (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$STATE/db.pass")
    fi
}

slurm_conf() {
    local first=${NODES[0]#n} last=${NODES[-1]#n}
    cat <<EOF
$MARKER -- regenerated on every 'start'; edit the script, not this file.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may only start again once its old credential expired (default 120 s)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd.%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: plain /proc process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# trust the CPUs/RealMemory declared below rather than the hardware slurmd detects
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
# Refuse at submit time what can never run (too many nodes or CPUs), as most production sites do.
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# the munge socket slurmdbd clients (slurmctld, sacct, sacctmgr) use; AuthInfo alone does not reach them
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=n[$first-$last] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((CTLD_PORT + first))-$((CTLD_PORT + last)) CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN
PartitionName=debug Nodes=n[$first-$last] Default=YES MaxTime=INFINITE State=UP
EOF
}

dbd_conf() {
    cat <<EOF
$MARKER -- regenerated on every 'start'; edit the script, not this file.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$STATE/db.pass")
StorageLoc=slurm_acct_db
EOF
}

# write_conf FILE MODE CONTENT: install CONTENT as FILE; sets CHANGED=1 if the content changed
write_conf() {
    local file=$1 mode=$2 content=$3 tmp
    CHANGED=0
    if [[ -e $file ]] && ! grep -qF "$MARKER" "$file"; then
        if [[ ${LAUNCHER_SLURM_FORCE:-0} == 1 ]]; then
            cp -p "$file" "$file.orig.$(date +%s)"
            say "saved the existing $file as $file.orig.*"
        else
            die "$file exists and was not written by this script; set LAUNCHER_SLURM_FORCE=1 to replace it (a backup is kept)"
        fi
    fi
    mkdir -p "$(dirname "$file")"
    tmp=$(mktemp "$file.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    chown root:root "$tmp"
    if [[ -e $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$file"
        CHANGED=1
    fi
}

# ---------------------------------------------------------------- starting each piece
start_munged() {
    running munged && return 0
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    runuser -u munge -- /usr/sbin/munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1 9>&- ||
        die "munged failed to start" "$LOG/munged.out" "$MUNGE_DIR/munged.log"
    wait_for munged "munge credentials" bash -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'"
    say "munged up (pid $(pid_of munged))"
}

db() { mariadb --no-defaults -S "$DB_SOCK" -u root --batch --skip-column-names "$@"; }

start_mariadb() {
    if ! running mariadbd; then
        local opts=(--no-defaults --user=root --datadir="$DB_DIR" --socket="$DB_SOCK" --port=$DB_PORT
            --bind-address=127.0.0.1 --skip-name-resolve --innodb-buffer-pool-size=512M
            --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 --innodb-flush-log-at-trx-commit=2)
        if [[ ! -d $DB_DIR/mysql ]]; then
            rm -rf "$DB_DIR"
            mkdir -p "$DB_DIR"
            mariadb-install-db "${opts[@]}" --auth-root-authentication-method=socket --skip-test-db \
                </dev/null >"$LOG/mariadb-install.log" 2>&1 9>&- ||
                { rm -rf "$DB_DIR"; die "mariadb-install-db failed" "$LOG/mariadb-install.log"; }
        fi
        rm -f "$DB_SOCK"
        setsid mariadbd "${opts[@]}" --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
            </dev/null >>"$LOG/mariadbd.log" 2>&1 9>&- &
        local pid=$! deadline=$((SECONDS + TIMEOUT))
        until db -e 'SELECT 1' >/dev/null 2>&1; do
            alive "$pid" || die "mariadbd exited during start-up" "$LOG/mariadbd.log"
            ((SECONDS < deadline)) || die "timed out waiting for mariadbd" "$LOG/mariadbd.log"
            sleep 0.2
        done
        say "mariadbd up (pid $(pid_of mariadbd || echo "$pid"))"
    fi
    local pw
    pw=$(cat "$STATE/db.pass")
    db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
        ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" 2>>"$LOG/mariadbd.log" ||
        die "could not create the slurm_acct_db database/user" "$LOG/mariadbd.log"
}

start_slurmdbd() {
    if ! running slurmdbd; then
        slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 9>&- || die "slurmdbd failed to start" "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"
    fi
    wait_for slurmdbd "slurmdbd to answer" sacctmgr -n -P list cluster format=cluster
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster 2>/dev/null) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >>"$LOG/slurmdbd.out" 2>&1 ||
            die "sacctmgr add cluster $CLUSTER failed" "$LOG/slurmdbd.out" "$LOG/slurmdbd.log"
        say "registered cluster '$CLUSTER' with slurmdbd"
    fi
    say "slurmdbd up (pid $(pid_of slurmdbd))"
}

start_slurmctld() {
    if ! running slurmctld; then
        slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 9>&- || die "slurmctld failed to start" "$LOG/slurmctld.out" "$LOG/slurmctld.log"
    fi
    wait_for slurmctld "slurmctld to answer" scontrol ping
    say "slurmctld up (pid $(pid_of slurmctld))"
}

start_slurmd() {
    local n=$1 name=slurmd.$1
    running "$name" && return 0
    slurmd -N "$n" </dev/null >>"$LOG/$name.out" 2>&1 9>&- || die "slurmd -N $n failed to start" "$LOG/$name.out" "$LOG/$name.log"
    wait_for "$name" "slurmd $n" running "$name"
    say "slurmd $n up (pid $(pid_of "$name"))"
}

# nodes_ready: every node responds and is usable (idle, or busy with jobs left from before)
nodes_ready() {
    local out n state
    out=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do
        state=$(awk -v n="$n" '$1 == n { print $2; exit }' <<<"$out")
        [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    done
}

wait_nodes() {
    local deadline=$((SECONDS + TIMEOUT)) resumed=0 n
    until nodes_ready; do
        for n in "${NODES[@]}"; do
            running "slurmd.$n" || die "slurmd $n died" "$LOG/slurmd.$n.log" "$LOG/slurmctld.log"
        done
        running slurmctld || die "slurmctld died" "$LOG/slurmctld.log"
        # a node left DOWN/DRAINED by an earlier unclean stop: put it back in service once
        if ((!resumed)) && sinfo -h -N -p debug -o '%T' 2>/dev/null | grep -qE '^(down|drain)'; then
            scontrol update NodeName="$(IFS=,; echo "${NODES[*]}")" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        ((SECONDS < deadline)) || die "timed out after ${TIMEOUT}s waiting for nodes to become idle:
$(sinfo -N -p debug -o '%N %T %E' 2>&1)" "$LOG/slurmctld.log" "$LOG/slurmd.${NODES[0]}.log"
        sleep 0.2
    done
}

# ---------------------------------------------------------------- commands
lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 600 9 || die "another cluster.sh is still running (lock $STATE/.lock)"
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and writes /etc/slurm)"
    lock
    install_packages
    ensure_hosts
    ensure_dirs
    local slurm_changed dbd_changed
    write_conf "$SLURM_CONF_FILE" 644 "$(slurm_conf)"
    slurm_changed=$CHANGED
    write_conf "$DBD_CONF_FILE" 600 "$(dbd_conf)"
    dbd_changed=$CHANGED
    # a changed config on a running cluster: restart what reads it
    if ((dbd_changed)) && running slurmdbd; then
        say "slurmdbd.conf changed; restarting slurmdbd"
        stop_daemon slurmdbd
    fi
    if ((slurm_changed)) && { running slurmctld || running "slurmd.${NODES[0]}" || running "slurmd.${NODES[1]}"; }; then
        say "slurm.conf changed; restarting slurmctld and slurmd"
        local n
        for n in "${NODES[@]}"; do stop_daemon "slurmd.$n"; done
        stop_daemon slurmctld
    fi

    local all_up=1 d
    for d in "${DAEMONS[@]}"; do running "$d" || all_up=0; done
    if ((all_up)) && nodes_ready; then
        say "already running; nodes ready ($(elapsed) s)"
        return 0
    fi

    start_munged
    start_mariadb
    start_slurmdbd
    start_slurmctld
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    wait_nodes
    sinfo -p debug
    say "cluster up in $(elapsed) s"
}

cmd_stop() {
    [[ $(id -u) == 0 ]] || die "must run as root"
    lock
    if [[ ${LAUNCHER_SLURM_KEEP_JOBS:-0} != 1 ]] && running slurmctld && running "slurmd.${NODES[0]}"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            say "cancelling leftover jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs >/dev/null 2>&1 || true
            local deadline=$((SECONDS + 20))
            while [[ -n $(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do
                sleep 0.3
            done
        fi
    fi
    local i
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[i]}"; done
    rm -f "$MUNGE_SOCK" "$DB_SOCK"
    say "stopped ($(elapsed) s)"
}

cmd_status() {
    local d pid up=0 total=0
    for d in "${DAEMONS[@]}"; do
        total=$((total + 1))
        if pid=$(pid_of "$d"); then
            up=$((up + 1))
            printf '  %-12s running  pid %s\n' "$d" "$pid"
        else
            printf '  %-12s stopped\n' "$d"
        fi
    done
    if running slurmctld; then sinfo -p debug 2>&1 || true; fi
    if ((up == total)) && nodes_ready; then
        say "up"
        return 0
    elif ((up == 0)); then
        say "stopped"
        return 3
    fi
    say "partly running ($up of $total daemons)"
    return 1
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    restart) "$0" stop && exec "$0" start ;;
    *)
        echo "usage: $0 start|stop|status|restart" >&2
        exit 2
        ;;
esac
