#!/usr/bin/env bash
# shellcheck disable=SC2317  # the functions run from traps
# The body of train.sbatch and evaluate.sbatch, which exec it, so it runs as the batch shell itself:
#   torchrun_step.sh SCRIPT [ARGS...]      (SCRIPT relative to the repository, e.g. launch/train.py)
#
# One srun task per node (or per --ntasks: each task is one "node" of the rendezvous) runs torchrun
# with one process per GPU of its node, joined by a c10d rendezvous at the job's first host.
#
# Preemption and time limits (verified on a real cluster; see the README's SLURM section):
#   `#SBATCH --signal=B:USR1@SECONDS` sends USR1 to this shell only. Its trap has SLURM send USR1 to
#   every process of the job's steps on every node (`scancel --signal=USR1 JOBID`): torchrun ignores
#   it (each task sets USR1 to SIG_IGN before exec'ing torchrun, and torchrun does not handle USR1),
#   the training workers set their preemption flag, and their data loader processes, forked after
#   the flag's handler was installed, inherit that handler and live on. At the next step boundary
#   all ranks agree, write a checkpoint and exit 75; torchrun and srun end; this shell runs
#   `scontrol requeue`, and the requeued job (same id, arguments and run directory) resumes by
#   itself. USR1 is repeated every 30 s (a worker still starting up ignores it) and the step is
#   killed OGNET_PREEMPT_TIMEOUT seconds after the first USR1 (the job is requeued all the same and
#   resumes from the latest checkpoint), so the requeue always happens before the time limit.
#   Why not SIGTERM: srun answers SIGTERM by SIGKILLing its tasks, and a SIGTERM to all processes
#   (scancel --signal=TERM) kills the DataLoader worker processes (PyTorch's worker handler re-raises
#   it), which crashes training before it can checkpoint. SIGTERM to this shell (time limit, scancel,
#   preemption by SLURM itself) is logged and waited out, never requeued.
#
# Environment (all optional):
#   OGNET_ROOT               the repository (default: the submit directory)
#   OGNET_TORCHRUN           torchrun to use (default: $OGNET_ROOT/.venv/bin/torchrun, else PATH)
#   OGNET_NPROC_PER_NODE     processes per task (default: the task's GPUs, SLURM_GPUS_ON_NODE, or 1)
#   OGNET_RDZV_PORT          rendezvous port (default: 20000 + job id % 20000)
#   OGNET_PREEMPT_TIMEOUT    seconds from USR1 until the step is killed (default 180; keep it below
#                            the --signal lead time minus 60 s, SLURM's signal timing slack)
set -uo pipefail

say() { echo "[ognet-slurm $(date +%H:%M:%S)] $*"; }

[ $# -ge 1 ] || { say "usage: $0 SCRIPT [ARGS...]"; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || { say "not inside a SLURM job: submit with sbatch"; exit 2; }
root=${OGNET_ROOT:-$SLURM_SUBMIT_DIR}
script=$root/$1; shift
[ -f "$script" ] || { say "$script not found: submit from the repository root or export OGNET_ROOT"; exit 2; }
if [ -n "${OGNET_TORCHRUN:-}" ]; then torchrun=$OGNET_TORCHRUN
elif [ -x "$root/.venv/bin/torchrun" ]; then torchrun=$root/.venv/bin/torchrun
else torchrun=$(command -v torchrun) || { say "no torchrun: set OGNET_TORCHRUN or create $root/.venv"; exit 2; }
fi

head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OGNET_RDZV_ENDPOINT="$head:${OGNET_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OGNET_RDZV_ID="ognet-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}"
export PYTHONUNBUFFERED=1  # log lines reach the job's log as they happen

say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NTASKS torchrun task(s)," \
    "rendezvous $OGNET_RDZV_ENDPOINT id $OGNET_RDZV_ID"
say "$torchrun $script $*"
# A job without GPUs trains on CPU (gloo): say so where it will be seen, rather than run silently slow.
if [ -z "${SLURM_GPUS_ON_NODE:-}${SLURM_JOB_GPUS:-}${CUDA_VISIBLE_DEVICES:-}" ] && [ -z "${OGNET_NPROC_PER_NODE:-}" ]; then
  say "warning: this job has no GPUs (no --gpus-per-node / --gres=gpu): it runs on CPU, one process per task;" \
      "add --gpus-per-node=N, or set OGNET_NPROC_PER_NODE to run on CPU on purpose"
fi

preempted=0 nudger='' step=''
on_usr1() {
  [ "$preempted" = 0 ] || return 0
  preempted=1
  say "USR1 (preemption or time limit near): asking the workers to checkpoint and exit, then requeueing"
  local timeout=${OGNET_PREEMPT_TIMEOUT:-180} shell=$$
  (
    deadline=$((SECONDS + timeout))
    while left=$((deadline - SECONDS)); [ "$left" -gt 0 ]; do
      scancel --signal=USR1 "$SLURM_JOB_ID"
      sleep $((left < 30 ? left : 30))
    done
    say "the step is still running ${timeout} s after USR1: stopping it"
    kill -USR2 "$shell"
  ) &
  nudger=$!
}
on_usr2() { [ -z "$step" ] || kill -TERM "$step"; }  # srun answers SIGTERM by SIGKILLing its tasks
on_term() { say "SIGTERM (time limit, scancel or preemption by SLURM): waiting for the step to end"; }
trap on_usr1 USR1
trap on_usr2 USR2
trap on_term TERM

# Per task: as many processes as this node's GPUs; the task's CPUs shared among them.
# shellcheck disable=SC2016  # expanded by each task's own bash
srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash -c '
  nproc=${OGNET_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
  threads=$(( ${SLURM_CPUS_PER_TASK:-1} / nproc )); [ "$threads" -ge 1 ] || threads=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
  trap "" USR1  # inherited by torchrun and its workers until the training loop handles USR1
  exec "$0" --nnodes="$SLURM_NTASKS" --nproc_per_node="$nproc" --rdzv_backend=c10d \
    --rdzv_endpoint="$OGNET_RDZV_ENDPOINT" --rdzv_id="$OGNET_RDZV_ID" "$@"' "$torchrun" "$script" "$@" &
step=$!
while :; do
  wait "$step"; rc=$?
  [ "$rc" -gt 128 ] || break
  # wait also returns early (status > 128) when a trapped signal arrives: srun may still be running
  kill -0 "$step" 2>/dev/null && continue
  wait "$step"; again=$?; [ "$again" = 127 ] || rc=$again  # srun's own status, if bash kept it
  break
done

[ -z "$nudger" ] || kill "$nudger" 2>/dev/null

if [ "$preempted" = 1 ] && [ "$rc" != 0 ]; then
  say "step ended (status $rc; a worker's 75 means: checkpoint written) after USR1: requeueing job $SLURM_JOB_ID"
  trap - TERM
  scontrol requeue "$SLURM_JOB_ID"  # SLURM ends this job now; it starts again from the top
  sleep 60
  exit 1  # only reached if the requeue did not happen
fi
say "step ended with status $rc"
exit "$rc"
