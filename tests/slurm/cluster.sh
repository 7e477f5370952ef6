#!/usr/bin/env bash
# A disposable one-node SLURM cluster on this machine, for the tests and for trying
# workflow/profiles/slurm-local: munge, MariaDB and slurmdbd (accounting: sacct lists every job with
# the CPUs, memory, time and GPUs it asked for), slurmctld and slurmd, as root, without systemd or
# cgroups. One node: CPUs=2, two fake GPUs (gres gpu:2).
#   tests/slurm/cluster.sh up|down|status
# State, logs and the database live in $SLURM_LOCAL_DIR (default /tmp/diffprune-slurm); the
# config files go to /etc/slurm, where sbatch and sacct look for them. It lives under tests/: it
# is a test fixture (daemons as root, no cgroups, a fake GPU node), not a way to run a real cluster.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/diffprune-slurm}
ETC=/etc/slurm
MARK="# written by diffprune tests/slurm/cluster.sh"
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
HOST=$(hostname -s)

die() { echo "slurm-local: $*" >&2; exit 1; }

# wait_for SECONDS WHAT COMMAND...: retry COMMAND every 0.2 s until it succeeds.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${seconds}s waiting for $what (logs: $DIR/log)"
    sleep 0.2
  done
}

# pidfile NAME: where the daemon NAME started by this script wrote its PID.
pidfile() { if [[ $1 == mariadb ]]; then echo "$DIR/mysql-run/mariadb.pid"; else echo "$DIR/$1.pid"; fi; }
running() { [[ -f $(pidfile "$1") ]] && kill -0 "$(cat "$(pidfile "$1")")" 2>/dev/null; }

check_host() {
  [[ $(id -u) == 0 ]] || die "needs root (it installs Debian packages and runs the daemons as root)"
  command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu) to install ${PACKAGES[*]}"
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return
  echo "slurm-local: installing ${missing[*]}"
  # policy-rc.d 101: the packages must not start their own daemons (we start ours below)
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' RETURN
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >"$DIR/log/apt.log" 2>&1 ||
    die "apt-get install ${missing[*]} failed (see $DIR/log/apt.log)"
}

start_munge() {
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  [[ -f /etc/munge/munge.key ]] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 400 /etc/munge/munge.key
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return  # a munged already answers
  /usr/sbin/munged --force --pid-file="$DIR/munged.pid" 2>>"$DIR/log/munged.log"
  wait_for 10 munged bash -c 'munge -n | unmunge'
}

# MariaDB runs as the mysql user: its data, socket, pid file and log live in folders it owns.
start_mariadb() {
  local data=$DIR/mysql run=$DIR/mysql-run
  mkdir -p "$run" && chown mysql:mysql "$run"
  if [[ ! -d $data/mysql ]]; then
    mkdir -p "$data" && chown mysql:mysql "$data"
    mariadb-install-db --user=mysql --datadir="$data" --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
  fi
  running mariadb && return
  setsid /usr/sbin/mariadbd --user=mysql --datadir="$data" --socket="$run/mysqld.sock" \
    --pid-file="$run/mariadb.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --innodb-buffer-pool-size=64M --log-error="$run/mariadb.log" </dev/null >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --socket="$run/mysqld.sock" -e 'select 1'
  mariadb --socket="$run/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

write_config() {
  if [[ -f $ETC/slurm.conf ]] && ! grep -qF "$MARK" "$ETC/slurm.conf"; then
    die "$ETC/slurm.conf exists and was not written by this script: not overwriting it"
  fi
  local mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
  mkdir -p "$ETC"
  cat >"$ETC/slurm.conf" <<EOF
$MARK
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
MpiDefault=none
GresTypes=gpu
NodeName=$HOST CPUs=2 RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # Two fake GPUs, enough for the scheduler to place GPU requests. Slurm 22.05 drops a GPU without
  # File= ("Removing file-less GPU") and refuses a regular file, so each is a character device
  # with /dev/null's numbers (1, 3): nothing can use it as a GPU.
  mkdir -p "$DIR/fake-gpu"
  for i in 0 1; do [[ -c $DIR/fake-gpu/nvidia$i ]] || mknod "$DIR/fake-gpu/nvidia$i" c 1 3; done
  printf '%s\nNodeName=%s Name=gpu File=%s\n' "$MARK" "$HOST" "$DIR/fake-gpu/nvidia[0-1]" \
    >"$ETC/gres.conf"
  cat >"$ETC/slurmdbd.conf" <<EOF
$MARK
DbdHost=localhost
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

start_slurm() {
  running slurmdbd || /usr/sbin/slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
  running slurmctld || /usr/sbin/slurmctld
  running slurmd || /usr/sbin/slurmd
  # a node drained by an earlier configuration (state kept in $DIR/state) comes back
  wait_for 60 "the node to register" bash -c "sinfo -h -n $HOST -o %t | grep -Eqx 'idle|drain|inval'"
  sinfo -h -n "$HOST" -o %t | grep -Eq 'drain|inval' && scontrol update nodename="$HOST" state=resume
  wait_for 60 "the node to be idle" bash -c "sinfo -h -n $HOST -o %t | grep -qx idle"
}

up() {
  check_host
  mkdir -p "$DIR"/{state,spool,log}
  install_packages
  start_munge
  start_mariadb
  write_config
  start_slurm
  echo "slurm-local: up (node $HOST, CPUs=2, gres gpu:2; state in $DIR)"
}

# Stops what this script started (by the PIDs in $DIR), newest first; waits until each is gone.
down() {
  local name pid
  for name in slurmd slurmctld slurmdbd mariadb munged; do
    [[ -f $(pidfile "$name") ]] || continue
    pid=$(cat "$(pidfile "$name")")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      wait_for 60 "$name (pid $pid) to stop" bash -c "! kill -0 $pid"
    fi
    rm -f "$(pidfile "$name")"
  done
  # Our slurm.conf goes too: while it names a controller that is down, every `scontrol` waits
  # 9 s for it, and snakemake-executor-plugin-slurm 2.8.0 runs `scontrol show config` each time
  # Snakemake starts (measured: `snakemake -n` 10.8 s instead of 1.8). `up` writes it again.
  if [[ -f $ETC/slurm.conf ]] && grep -qF "$MARK" "$ETC/slurm.conf"; then
    rm -f "$ETC/slurm.conf"
  fi
  echo "slurm-local: down"
}

status() {
  running slurmctld && running slurmd && running slurmdbd && sacct -n -X -S now >/dev/null 2>&1 &&
    sinfo -h -n "$HOST" -o %t | grep -Eqx 'idle|mix|alloc'
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status && echo "slurm-local: up" || { echo "slurm-local: down"; exit 1; } ;;
  *) die "usage: $0 up|down|status" ;;
esac
