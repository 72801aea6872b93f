#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (slurmctld + slurmd + munge, state under $1), for
# testing the job-array scripts beside it: `source <(deploy/slurm/local-cluster.sh DIR)` starts
# it and prints the SLURM_CONF to export. Needs Debian's `slurm-wlm` and `munge` packages and
# root (the daemons run as root). Stop it with `deploy/slurm/local-cluster.sh DIR stop`.
set -euo pipefail
dir="${1:?usage: local-cluster.sh STATE_DIR [stop]}"
mkdir -p "$dir"/state "$dir"/spool "$dir"/log
dir="$(cd "$dir" && pwd)"
if [ "${2:-}" = stop ]; then
  pkill -f "slurmd -f $dir/slurm.conf" 2>/dev/null || true
  pkill -f "slurmctld -f $dir/slurm.conf" 2>/dev/null || true
  exit 0
fi
host="$(hostname -s)"
cpus="$(nproc)"
cat > "$dir/slurm.conf" <<CONF
ClusterName=blendserve-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
fi
export SLURM_CONF="$dir/slurm.conf"
/usr/sbin/slurmctld -f "$SLURM_CONF"
/usr/sbin/slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "slurm did not come up; logs in $dir/log" >&2
exit 1
