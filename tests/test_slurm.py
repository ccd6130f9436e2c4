"""The sbatch scripts on a real SLURM cluster on localhost (slurm/local/cluster.sh), CPU, tiny runs.

Each job has 2 tasks on the one node: two torchrun "nodes" of one process each, joined by a c10d
rendezvous, as on two machines. The cluster is started once per session and stopped at its end,
every daemon by its pid. slurm-wlm and munge are installed by the test command (tests/run.sh)
before pytest starts; without them the tests skip with the reason, except under CI (CI set), where
they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from data_fixtures import tiny_shards  # noqa: F401  (fixture)
from dist_scripts.procs import REPO, TORCHRUN, clean_env, free_port
from test_train import train_args

from ognet.checkpoint import checkpoint_steps, load_checkpoint

pytestmark = pytest.mark.slow

CLUSTER = REPO / "slurm" / "local" / "cluster.sh"
SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
NEEDED = ("sbatch", "scontrol", "scancel", "slurmctld", "slurmd", "munged", "munge")
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# 2 tasks (2 rendezvous nodes), 1 process and 1 CPU each; the time limit is a last resort.
TASKS = ("--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10")


def slurm_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tests' tiny training with a data loader process per rank (the real preemption path):
    2 epochs of 6 steps, a fraction of a second each."""
    return train_args(shards, run_dir, "data.num_workers=1", "train.max_steps_per_epoch=6", *extra)


def missing() -> list[str]:
    return [exe for exe in NEEDED if shutil.which(exe, path=SBIN_PATH) is None]


def why_not_usable() -> str | None:
    """None when the SLURM programs are here; else what is missing. The test command (tests/run.sh)
    installs them before pytest starts, so a test never runs apt."""
    if not missing():
        return None
    return f"{', '.join(missing())} not found: install slurm-wlm and munge (tests/run.sh does, as root)"


def cluster_logs(folder: Path) -> str:
    return "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((folder / "log").glob("*.log"))
    )


@pytest.fixture(scope="session")
def slurm(request):
    """Environment for sbatch & co. pointing at a fresh local cluster, stopped after the session."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(message, flush=True)

    reason = why_not_usable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM tests must run in CI: {reason}")
        say(f"[test_slurm] skipping: {reason}")
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="ognet-slurm-", dir="/tmp"))  # reachable by the munge user
    try:
        proc = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(e.cmd, -1, "", f"timed out: {e.stderr}")
    try:
        assert proc.returncode == 0, f"local cluster did not start:\n{proc.stderr}\n{cluster_logs(folder)}"
        yield clean_env(
            SLURM_CONF=str(folder / "slurm.conf"), OGNET_ROOT=str(REPO), OGNET_TORCHRUN=str(TORCHRUN), PATH=SBIN_PATH
        )
    finally:
        stop = subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, text=True, timeout=120)
        say(stop.stderr.strip())
        shutil.rmtree(folder, ignore_errors=True)


def command(cmd: list[str], env: dict, cwd: Path | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def sbatch(env: dict, log: Path, script: str, *args: str, options: tuple[str, ...] = TASKS) -> str:
    env = {**env, "OGNET_RDZV_PORT": str(free_port())}
    out = command(["sbatch", "--parsable", *options, f"--output={log}", str(REPO / "slurm" / script), *args], env)
    return out.strip().split(";")[0]


def job(env: dict, job_id: str) -> dict[str, str]:
    """JobState, ExitCode, Restarts of a job, from `scontrol show job`."""
    out = command(["scontrol", "show", "job", "-o", job_id], env)
    return {key: re.search(rf"\b{key}=(\S+)", out).group(1) for key in ("JobState", "ExitCode", "Restarts")}


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def wait_until_ended(env: dict, job_id: str, log: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (state := job(env, job_id))["JobState"] not in ENDED:
        if time.monotonic() > deadline:
            # Every thread's stack into the job's log (ognet.stack_dumps): where it hangs.
            for pid in rank_pids(env, job_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR2)
            time.sleep(3)
            subprocess.run(["scancel", job_id], env=env, timeout=30)
            raise AssertionError(f"job {job_id} not done after {timeout} s ({state})\n{read(log)[-30000:]}")
        time.sleep(0.5)
    return state


def rank_pids(env: dict, job_id: str) -> list[int]:
    """The training or evaluation processes of a job on this node: of the pids of its steps
    (`scontrol listpids`), those torchrun started (torchrun itself would die of USR2)."""
    proc = subprocess.run(["scontrol", "listpids", job_id], env=env, capture_output=True, text=True, timeout=30)
    pids = [int(row.split()[0]) for row in proc.stdout.splitlines() if row.split() and row.split()[0].isdigit()]
    ranks = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid).parent()
            launcher = [Path(arg).name for arg in parent.cmdline()[:2]] if parent is not None else []
            if len(launcher) == 2 and launcher[0].startswith("python") and launcher[1] == "torchrun":
                ranks.append(pid)  # not srun's own processes, whose command lines name torchrun too
    return ranks


def wait_for_line(env: dict, job_id: str, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in read(log):
        state = job(env, job_id)["JobState"]
        if state in ENDED or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} ({state}) never logged {text!r}\n{read(log)[-6000:]}")
        time.sleep(0.1)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def chained(slurm, tiny_shards, tmp_path_factory):
    """slurm/submit.sh: training, then the evaluation that depends on it; both run to their end."""
    cwd = tmp_path_factory.mktemp("submit")
    run_dir = cwd / "run"
    args = slurm_args(tiny_shards, run_dir)
    out = command(
        ["bash", str(REPO / "slurm" / "submit.sh"), *TASKS, "--", *args], {**slurm, "OGNET_PY": sys.executable}, cwd=cwd
    )
    train_id, eval_id = re.findall(r"job (\d+)", out)
    logs = cwd / "runs" / "slurm-logs"
    train_log, eval_log = logs / f"ognet-train-{train_id}.out", logs / f"ognet-eval-{eval_id}.out"
    train = wait_until_ended(slurm, train_id, train_log, timeout=300)
    evaluation = wait_until_ended(slurm, eval_id, eval_log, timeout=200)
    return {
        "run_dir": run_dir,
        "train": train,
        "train_log": read(train_log),
        "eval": evaluation,
        "eval_log": read(eval_log),
    }


def test_train_then_dependent_evaluation_on_two_nodes(chained):
    run_dir, log = chained["run_dir"], chained["train_log"]
    assert chained["train"] == {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "0"}, log
    assert "2 torchrun task(s)" in log and "on 2 x cpu (ddp, fp32)" in log
    assert "warning: this job has no GPUs" in log  # submitted without --gpus-per-node
    assert "epoch 1 step 6/6" in log and "step ended with status 0" in log
    assert [step for step, _ in checkpoint_steps(run_dir / "checkpoints")] == [6, 12]
    assert (run_dir / "model_last.pt").exists()
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"

    assert chained["eval"] == {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "0"}, chained["eval_log"]
    assert "--checkpoint" in chained["eval_log"] and "Rank@1:" in chained["eval_log"]
    metrics = json.loads((run_dir / "eval" / "metrics-eval.json").read_text())
    assert metrics["num_queries"] == 12 and 0 <= metrics["rank1"] <= 1
    assert list((run_dir / "eval" / "tb").glob("events.out.tfevents.*"))


def test_preempted_job_checkpoints_requeues_and_resumes_bit_identically(slurm, tiny_shards, tmp_path, chained):
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job_id = sbatch(slurm, log, "train.sbatch", *slurm_args(tiny_shards, run_dir))
    wait_for_line(slurm, job_id, log, "epoch 0 step 1/6", timeout=180)
    # What `#SBATCH --signal=B:USR1@300` does near the time limit: USR1 to the batch shell only.
    command(["scancel", "--signal=USR1", "--batch", job_id], slurm)
    state = wait_until_ended(slurm, job_id, log, timeout=300)
    text = read(log)
    assert state == {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "1"}, text

    written = re.search(r"preemption signal: checkpoint written at global step (\d+)", text)
    assert written, text
    step = int(written.group(1))
    assert 1 <= step < 12, f"the signal should land mid-run, got global step {step}"
    assert "exitcode  : 75" in text  # the workers' "checkpoint written, run me again"
    assert f"requeueing job {job_id}" in text and f"job {job_id} (restart 1)" in text
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}.pt'}" in text
    assert "epoch 1 step 6/6" in text
    assert_same_weights(chained["run_dir"] / "model_last.pt", run_dir / "model_last.pt")


def test_failing_training_ends_failed_with_the_error_in_its_log(slurm, tiny_shards, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job_id = sbatch(slurm, log, "train.sbatch", *slurm_args(tiny_shards, run_dir, "train.epoch=3"))
    state = wait_until_ended(slurm, job_id, log, timeout=120)
    # srun's status: 1 from torchrun, or 143 when --kill-on-bad-exit stopped the other task first
    assert state["JobState"] == "FAILED" and state["ExitCode"] in ("1:0", "143:0"), f"{state}\n{read(log)}"
    assert "unknown config key train.epoch" in read(log)
    assert not run_dir.exists()
