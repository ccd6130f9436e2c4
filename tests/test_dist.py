"""ognet.dist under real launchers: torchrun and SLURM-style tasks on gloo, and a plain process."""

import json
import os
import stat
import time

import pytest
import torch
from dist_scripts.procs import finish, slurm_tasks, start_slurm_tasks, torchrun

from ognet import dist
from ognet.errors import ConfigError


def check_collectives(out, world_size):
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    expected_uneven = [[float(r)] * 2 for r in range(world_size) for _ in range(r + 1)]
    expected_gathered = [[float(r)] * 3 for r in range(world_size) for _ in range(2)]
    for r, res in enumerate(results):
        assert (res["rank"], res["local_rank"], res["world_size"]) == (r, r, world_size)
        assert (res["backend"], res["device"], res["is_main"]) == ("gloo", "cpu", r == 0)
        assert res["uneven"] == expected_uneven
        assert res["uneven_empty"] == 0
        assert res["gathered"] == expected_gathered
        # d/dx_r of the sum over ranks of sum(weights * gathered) = world_size * weights[r's rows]
        assert res["grad"] == [[world_size * (6 * r + 3 * i + j) for j in range(3)] for i in range(2)]
        assert res["mean"] == pytest.approx(sum(range(world_size)) / world_size)
        assert "same shape on every rank" in res["mismatch_error"]


@pytest.mark.slow
def test_torchrun_three_ranks(tmp_path):
    torchrun("collectives.py", 3, str(tmp_path))
    check_collectives(tmp_path, 3)


@pytest.mark.slow
def test_slurm_tasks_without_torchrun(tmp_path):
    slurm_tasks("collectives.py", 2, str(tmp_path))
    check_collectives(tmp_path, 2)


@pytest.mark.slow
@pytest.mark.serial
def test_a_stuck_collective_fails_after_the_timeout(tmp_path):
    # Rank 1 never joins rank 0's barrier; init_distributed(timeout_s=3) must make rank 0 fail.
    procs = start_slurm_tasks("collectives.py", 2, str(tmp_path), "stuck")
    try:
        start = time.monotonic()
        rc, output = finish(procs[0], timeout=60)
        assert rc != 0 and "CollectiveError: rank 0 of 2: barrier failed (timeout 3 s" in output, output
        assert "Timed out" in output, output  # gloo's own words kept
        assert time.monotonic() - start < 19  # before rank 1 wakes up and exits
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def no_launcher(monkeypatch):
    for name in [*os.environ]:
        if name.startswith("SLURM_") or name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(name)
    # Set (not delete) so that monkeypatch also undoes values the code under test fills in.
    monkeypatch.setenv("MASTER_ADDR", "")
    monkeypatch.setenv("MASTER_PORT", "")
    return monkeypatch


def test_plain_process_has_world_size_one_and_no_op_helpers(no_launcher):
    info = dist.init_distributed()
    assert info == dist.DistInfo(0, 0, 1, info.device, None, True)
    assert not torch.distributed.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x and dist.all_gather_uneven(x) is x and dist.all_gather(x) is x
    assert torch.equal(dist.all_reduce_mean(x), x.detach())
    dist.barrier()
    dist.cleanup()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nccl_without_cuda_is_a_clear_error(no_launcher):
    with pytest.raises(ConfigError, match="needs CUDA"):
        dist.init_distributed(backend="nccl")


def test_slurm_master_from_the_node_list_and_job_id(no_launcher, tmp_path):
    # A stand-in for SLURM's `scontrol show hostnames`, which this machine does not have.
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[017-018]" ] && printf "gpu017\\ngpu018\\n"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    no_launcher.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    no_launcher.setenv("SLURM_PROCID", "5")
    no_launcher.setenv("SLURM_LOCALID", "1")
    no_launcher.setenv("SLURM_NTASKS", "8")
    no_launcher.setenv("SLURM_JOB_NODELIST", "gpu[017-018]")
    no_launcher.setenv("SLURM_JOB_ID", "123456")
    assert dist._launcher_ranks() == (5, 1, 8)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu017", str(15000 + 123456 % 20000))


def test_torchrun_variables_win_over_slurm(no_launcher):
    # `srun torchrun ...`: the task is SLURM task 0 of 1, the worker is torchrun rank 3 of 4.
    for name, value in dict(
        SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1", RANK="3", LOCAL_RANK="1", WORLD_SIZE="4"
    ).items():
        no_launcher.setenv(name, value)
    assert dist._launcher_ranks() == (3, 1, 4)


def test_slurm_without_a_master_is_a_clear_error(no_launcher):
    for name, value in dict(SLURM_PROCID="0", SLURM_NTASKS="2", PATH="/nonexistent").items():
        no_launcher.setenv(name, value)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        dist._launcher_ranks()
