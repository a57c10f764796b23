#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and for trying the batch scripts.
#
#   launch/slurm/local_cluster.sh up   [DIR]   start munge (if not running), slurmctld and slurmd; wait for idle
#   launch/slurm/local_cluster.sh down [DIR]   stop the daemons this script started (by their pid files)
#
# DIR (default /tmp/hvd_distef_slurm) holds slurm.conf, state, spool and logs. Clients need
# SLURM_CONF=DIR/slurm.conf (printed by `up`). Needs root and Debian's slurmd slurmctld
# slurm-client munge packages (scripts/install.sh installs them).
set -euo pipefail
cmd=${1:-}
dir=${2:-/tmp/hvd_distef_slurm}
conf=$dir/slurm.conf

stop_pidfile() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

case "$cmd" in
  up)
    [ "$(id -u)" = 0 ] || { echo "local_cluster.sh: needs root (slurmd runs jobs as their users)" >&2; exit 2; }
    for bin in slurmctld slurmd munged sinfo; do
      command -v "$bin" >/dev/null || { echo "local_cluster.sh: $bin is missing (apt-get install slurmd slurmctld slurm-client munge)" >&2; exit 2; }
    done
    mkdir -p "$dir/state" "$dir/spool"
    host=$(hostname -s)
    cpus=$(nproc)
    cat > "$conf" <<CONF
ClusterName=hvdlocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
# 4 CPUs per real core, so that 4 tasks fit on this 2-core machine
NodeName=$host CPUs=$((cpus * 4)) State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    if ! pgrep -x munged >/dev/null; then
      # munged runs as user munge, which cannot enter DIR when it sits in a root-only
      # directory (pytest's tmp dirs do), so its pid file lives in /run/munge; DIR only
      # records that this script started it.
      mkdir -p /run/munge && chown munge:munge /run/munge
      runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/hvd_distef_munged.pid
      echo /run/munge/hvd_distef_munged.pid > "$dir/munged.started"
    fi
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    slurmd -f "$conf"
    for _ in $(seq 120); do
      state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
      case "$state" in idle*|mix*|alloc*) echo "local Slurm cluster up: export SLURM_CONF=$conf"; exit 0 ;; esac
      sleep 0.5
    done
    echo "local_cluster.sh: the node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    "$0" down "$dir"
    exit 1
    ;;
  down)
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    if [ -f "$dir/munged.started" ]; then
      stop_pidfile "$(cat "$dir/munged.started")"
      rm -f "$dir/munged.started"
    fi
    echo "local Slurm cluster down"
    ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
