#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests and for trying the sbatch scripts.
# munged runs as the munge user, slurmctld and slurmd as root in the foreground (backgrounded here,
# their pids recorded); config, state, spool, sockets, logs and pids all live in one folder, and the
# cluster has its own munge socket and ports, so it touches nothing system-wide and several can run
# side by side. Needs root and the Debian/Ubuntu packages slurm-wlm and munge.
#
#   slurm/local/cluster.sh start DIR   create DIR, start the daemons, wait until the node is idle
#   slurm/local/cluster.sh stop DIR    cancel the cluster's jobs, stop every daemon started for DIR by pid
#
# In between: export SLURM_CONF=DIR/slurm.conf, then sbatch, srun, squeue, scontrol, scancel as usual.
# Daemon logs: DIR/log/{munged,slurmctld,slurmd}.log. Job processes run as root.
set -euo pipefail

PATH=$PATH:/usr/sbin:/sbin  # the daemons live in sbin, which a plain user's PATH may lack
usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")
conf=$dir/slurm.conf
pids=$dir/pids

say() { echo "[slurm-local] $*" >&2; }
die() { say "error: $*"; exit 1; }

# A pid is "running" while it exists and is not a zombie (PID 1 may never reap our daemons here).
running() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

free_ports() {  # two free TCP ports on this host
  python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
}

start_daemon() {  # NAME CMD...: start in the background, record its pid
  local name=$1; shift
  "$@" </dev/null >>"$dir/log/$name.log" 2>&1 &
  echo $! >"$pids/$name.pid"
  say "started $name (pid $!)"
}

wait_for() {  # SECONDS DESCRIPTION CMD...: poll until CMD succeeds
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { stop_all; die "$what did not happen within the time limit; logs in $dir/log"; }
    sleep 0.2
  done
}

stop_all() {
  if [ -r "$conf" ] && [ -r "$pids/slurmctld.pid" ] && running "$(cat "$pids/slurmctld.pid")"; then
    # Jobs left over would keep running under slurmstepd after slurmd stops: cancel them first.
    SLURM_CONF=$conf timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while [ -n "$(SLURM_CONF=$conf timeout 5 squeue -h -o %i 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  fi
  local name pid
  for name in slurmd slurmctld munged; do
    [ -r "$pids/$name.pid" ] || continue
    pid=$(cat "$pids/$name.pid")
    if running "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do running "$pid" || break; sleep 0.2; done
      if running "$pid"; then say "$name (pid $pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
      say "stopped $name (pid $pid)"
    fi
    rm -f "$pids/$name.pid"
  done
}

case $action in
start)
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their users; munged must run as munge)"
  for exe in munged munge slurmctld slurmd sbatch; do
    command -v "$exe" >/dev/null || die "$exe not found: apt-get install slurm-wlm munge"
  done
  id munge >/dev/null 2>&1 || die "no munge user: apt-get install munge"
  [ ! -e "$pids/slurmctld.pid" ] || die "$dir already has a cluster; stop it first"
  mkdir -p "$dir"/{state,spool,log,munge} "$pids"
  chmod 755 "$dir"  # munged (user munge) must reach its folder
  setpriv --reuid=munge --regid=munge --clear-groups test -x "$dir/munge" ||
    die "the munge user cannot reach $dir: put it below a folder others may enter (e.g. /tmp)"

  # munge: its own key, socket, log and seed, owned by munge (munged refuses anything else).
  chown munge:munge "$dir/munge"; chmod 755 "$dir/munge"
  if [ -r /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$dir/munge/munge.key"
  else dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none; fi
  chown munge:munge "$dir/munge/munge.key"; chmod 600 "$dir/munge/munge.key"
  socket=$dir/munge/munge.socket
  start_daemon munged setpriv --reuid=munge --regid=munge --init-groups \
    munged --foreground --socket="$socket" --key-file="$dir/munge/munge.key" \
    --log-file="$dir/munge/munged.log" --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed"
  wait_for 20 "munged answering on $socket" bash -c "munge -n -S '$socket' | unmunge -S '$socket'"

  read -r ctld_port slurmd_port < <(free_ports)
  cpus=$(nproc); [ "$cpus" -ge 2 ] || cpus=2  # the tests run 2 tasks; config_overrides lets slurmd accept it
  cat >"$conf" <<EOF
# Written by slurm/local/cluster.sh: a one-node cluster for tests.
ClusterName=ognet-local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job before it may start again (default 120 s)
AuthInfo=socket=$socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# proctrack/cgroup (the default) cannot start job steps on this machine's cgroup mount
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# scheduling passes every second, so a requeued job starts as soon as it may (not 30-60 s later)
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=30
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  start_daemon slurmctld slurmctld -D -f "$conf"
  wait_for 30 "slurmctld answering" env SLURM_CONF="$conf" scontrol ping
  start_daemon slurmd slurmd -D -f "$conf" -N localhost
  wait_for 30 "node localhost idle" bash -c "SLURM_CONF='$conf' sinfo -h -n localhost -o %T | grep -qx idle"
  say "cluster up: export SLURM_CONF=$conf"
  ;;
stop)
  [ -d "$pids" ] || die "no cluster in $dir"
  stop_all
  ;;
*) usage ;;
esac
