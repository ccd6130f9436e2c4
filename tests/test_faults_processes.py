"""Process faults in real multi-process training runs (torchrun, gloo, CPU, tiny configs).

A training process SIGKILLed under `torchrun --max-restarts=1`, a rank that stops answering
(SIGSTOP) and a non-finite loss: the run either recovers bit-identically or fails with a clear
error within a bounded time, never hangs, and never loses the last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from data_fixtures import tiny_shards  # noqa: F401  (fixture)
from dist_scripts.procs import TORCHRUN, clean_env, run_here
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_stack_dumps import threads_taking_usr2
from test_train import TRAIN, assert_same_weights, train_args

from ognet.checkpoint import checkpoint_steps, load_checkpoint
from ognet.stack_dumps import HEADER
from ognet.train import main as train_main

pytestmark = pytest.mark.slow

# A store per restart: see ognet.dist._warn_about_shared_store_restarts.
TORCHRUN_ENV = clean_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def torchrun_cmd(shards: Path, run_dir: Path, *extra: str, restarts: int = 0) -> list[str]:
    return [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        TRAIN,
        *train_args(shards, run_dir, "train.checkpoint_every_steps=1", "eval.rank_list_queries=0", *extra),
    ]


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the training processes a torchrun process started."""
    pids = {}
    for child in psutil.Process(launcher).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "RANK" in (env := child.environ()):
                pids[int(env["RANK"])] = child.pid
    return pids


class Run:
    """A torchrun started in the background; a thread collects its output line by line, so that
    waiting for a line is bounded even when the run falls silent."""

    def __init__(self, cmd: list[str], env: dict[str, str] = TORCHRUN_ENV):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._incoming: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._incoming.put(line)
        self._incoming.put(None)  # end of output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> float:
        """Collect output until a line holds `text`; returns the time it appeared."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Empty):
            while (line := self._incoming.get(timeout=max(deadline - time.monotonic(), 0))) is not None:
                self.lines.append(line)
                if text in line:
                    return time.monotonic()
        raise AssertionError(f"never printed {text!r} within {timeout} s\n{self.output[-6000:]}")

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s\n{self.output[-6000:]}") from None
        with contextlib.suppress(queue.Empty):
            while (line := self._incoming.get(timeout=30)) is not None:
                self.lines.append(line)
        return self.proc.returncode

    def kill(self) -> None:
        for pid in rank_pids(self.proc.pid).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run = Run(torchrun_cmd(tiny_shards, run_dir))
    assert run.finish(timeout=300) == 0, run.output[-6000:]
    return run_dir


def test_a_killed_rank_restarts_and_resumes_bit_identically(tiny_shards, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    run = Run(torchrun_cmd(tiny_shards, run_dir, restarts=1))
    try:
        run.wait_for("epoch 0 step 2/3", timeout=180)
        os.kill(rank_pids(run.proc.pid)[1], signal.SIGKILL)
        assert run.finish(timeout=300) == 0, run.output[-6000:]
    finally:
        if run.proc.poll() is None:
            run.kill()
    out = run.output
    # torchrun names the failure it saw first: the kill (-9, local rank 1), or rank 0 stopping on its
    # lost peer when both ended within one poll (rank 0's error file's time then wins the tie).
    first = re.search(r"failed \(exitcode: (\S+)\) local_rank: (\d)", out)
    assert first and first.groups() in (("-9", "1"), ("1", "0")), out[-6000:]
    if first.groups() == ("1", "0"):
        assert "rank 0 of 2:" in out and "another rank crashed" in out, out[-6000:]
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, out[-6000:]
    assert "epoch 1 step 3/3" in out.split(resumed[0])[1]
    assert_same_weights(uninterrupted / "model_last.pt", run_dir / "model_last.pt")


DUMPS = 50


def test_fifty_stack_dumps_leave_a_training_run_bit_identical(tiny_shards, tmp_path, uninterrupted):
    """`kill -USR2` again and again to rank 0, which writes TensorBoard events every step (a
    faulthandler dump once crashed such a rank in gfile): every dump is printed, the run goes on and
    ends with the undisturbed run's weights."""
    run_dir = tmp_path / "run"
    run = Run(torchrun_cmd(tiny_shards, run_dir))
    try:
        run.wait_for("epoch 0 step 1/3", timeout=180)
        rank0 = rank_pids(run.proc.pid)[0]
        assert threads_taking_usr2(rank0) == ["python"]  # only the dumper: launch/train.py masked it first
        for n in range(1, DUMPS + 1):
            os.kill(rank0, signal.SIGUSR2)  # the next one only once this one is out: pending signals merge
            run.wait_for(f"end of {HEADER} {n}\n", timeout=30)
            time.sleep(0.05)  # spread over the training steps
        steps_during_dumps = len(re.findall(r"epoch \d step \d/3 loss", run.output.split(f"{HEADER} 1: pid")[1]))
        assert run.finish(timeout=300) == 0, run.output[-6000:]
    finally:
        if run.proc.poll() is None:
            run.kill()
    out = run.output
    assert [out.count(f"{HEADER} {n}: pid {rank0},") for n in range(1, DUMPS + 1)] == [1] * DUMPS
    assert "event_file_writer.py" in out  # TensorBoard's writer thread, dumped while it ran
    assert steps_during_dumps > 0, out[-6000:]
    assert_same_weights(uninterrupted / "model_last.pt", run_dir / "model_last.pt")


@pytest.mark.serial  # a wall-clock bound: run alone (tests/run.sh)
def test_a_stopped_rank_makes_the_others_fail_naming_the_collective(tiny_shards, tmp_path):
    timeout = 5
    run = Run(torchrun_cmd(tiny_shards, tmp_path / "run", f"train.collective_timeout_s={timeout}", "train.epochs=3"))
    stopped = None
    try:
        run.wait_for("epoch 0 step 2/3", timeout=180)
        os.kill(rank_pids(run.proc.pid)[0], signal.SIGUSR2)  # where is it? (ognet.stack_dumps)
        run.wait_for(f"end of {HEADER} 1\n", timeout=30)
        stopped = rank_pids(run.proc.pid)[1]
        os.kill(stopped, signal.SIGSTOP)  # alive, holds its sockets, answers nothing
        start = time.monotonic()
        failed = run.wait_for("ognet-train: error: rank 0 of 2:", timeout=120)
        assert failed - start < timeout + 10, f"rank 0 failed {failed - start:.0f} s after rank 1 stopped"
        os.kill(stopped, signal.SIGCONT)  # let torchrun's SIGTERM reach it
        assert run.finish(timeout=120) != 0
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        if run.proc.poll() is None:
            run.kill()
    error = next(line for line in run.lines if "ognet-train: error:" in line)
    assert f"failed (timeout {timeout} s, train.collective_timeout_s)" in error, error
    assert any(name in error for name in ("all_reduce_sum", "barrier", "backward", "BatchNorm statistics")), error


# A learning rate of 1e30: step 1's update leaves finite but huge weights, step 2's forward overflows.
DIVERGING = ("optim.lr=1e30", "train.epochs=1", "eval.rank_list_queries=0")


def test_a_non_finite_loss_stops_with_a_clear_error_and_the_last_good_state(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_here(train_main, train_args(tiny_shards, run_dir, *DIVERGING), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    good = run_dir / "checkpoints" / "step-00000001.pt"
    assert proc.stderr.strip().splitlines()[-1] == (
        "ognet-train: error: non-finite loss at epoch 0 step 2/3 (global step 2), stopped (train.nonfinite=stop); "
        f"the last good state is {good}"
    )
    assert [step for step, _ in checkpoint_steps(run_dir / "checkpoints")] == [1]
    state = load_checkpoint(good)
    assert state["progress"]["global_step"] == 1 and all(v.isfinite().all() for v in state["model"].values())


def test_non_finite_steps_are_skipped_counted_and_logged(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_here(train_main, train_args(tiny_shards, run_dir, *DIVERGING, "train.nonfinite=skip"), check=False)
    for n, step in ((1, 2), (2, 3)):
        assert (
            f"non-finite loss at epoch 0 step {step}/3 (global step {step}): step skipped ({n} so far, "
            f"train.nonfinite=skip)"
        ) in proc.stdout, proc.stdout[-3000:]
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped_steps")] == [(1, 0), (2, 1), (3, 2)]
    # Skipping cannot mend weights that are already ruined: the evaluation says so instead of ranking NaNs.
    assert proc.returncode == 1 and "features contain NaN or inf" in proc.stderr.strip().splitlines()[-1]
