#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests/test_slurm.py: slurmctld + slurmd + munge from
# Debian, no systemd, no accounting database (like many clusters' sacct-less setups), one fake GPU
# declared as GRES, partitions "cpu" (default) and "gpu" as in profiles/slurm. Needs root.
# Idempotent: a second run finds the daemons up and only prints sinfo.
set -euo pipefail
T0=$(date +%s)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

[ -s /etc/munge/munge.key ] || /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
munge -n >/dev/null 2>&1 || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

if ! sinfo -h >/dev/null 2>&1; then
  CPUS=$(nproc)
  # below slurmd's own figure, or the node drains
  MEM=$(($(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 1024))
  install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
  cat >/etc/slurm/slurm.conf <<CONF
ClusterName=braidci
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=600
DefMemPerCPU=1000
MailProg=/bin/true
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
CONF
  cat >/etc/slurm/gres.conf <<CONF
AutoDetect=off
NodeName=localhost Name=gpu File=/dev/null
CONF
  slurmctld
  slurmd -N localhost
fi
for _ in $(seq 1 120); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
  sleep 0.5
done
sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' || {
  echo "slurm_up: the node did not come up; see /var/log/slurm/slurmd.log and slurmctld.log" >&2
  sinfo >&2 || true
  exit 1
}
sinfo
echo "slurm_up: SLURM up in $(($(date +%s) - T0)) s"
