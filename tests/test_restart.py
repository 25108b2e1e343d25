"""Issue 18 item 2: checkpoints every rank completed, and python -m pipedap.tools.launch restarting a failed job.

A rank SIGKILLed in step 33 of 60 (checkpoints every 10 steps): the launcher restarts the
job, which resumes from step 30 and ends with parameters, buffers, optimizer state and
random generators bit for bit those of an uninterrupted run (float64, dropout, BatchNorm).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from mpi_launch import SCRIPTS, assert_ok, run_bounded, run_mpi

from pipedap.tools import launch

pytestmark = pytest.mark.mpi
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")


def run_launch(*args: str, timeout: float = 180):
    return run_bounded([sys.executable, "-m", "pipedap.tools.launch", *args], ENV, timeout)


def test_checkpoints_are_complete_agreed_and_load_at_another_world_size(tmp_path):
    result = run_mpi("check_checkpoint.py", 2, str(tmp_path / "checkpoints"))
    assert_ok(result)
    assert "rank 0: ok" in result.output and "rank 1: ok" in result.output
    assert "checkpoint step 30 was saved at 2 rank(s), loading at 1" in result.output


@pytest.mark.parametrize("schedule, optimizer", [("dear", "sgd"), ("pipedap", "adamw-sharded")])
def test_a_killed_rank_restarts_from_the_last_checkpoint_bit_for_bit(tmp_path, schedule, optimizer):
    script = [sys.executable, str(SCRIPTS / "restart_training.py")]
    whole = run_launch("-np", "2", "--", *script, str(tmp_path / "whole"), "60", str(tmp_path / "ck-whole"),
                       schedule, optimizer)
    assert whole.returncode == 0, whole.stdout
    assert "finished after 1 attempt(s)" in whole.stdout

    ck = tmp_path / "ck-killed"
    killed = run_launch("-np", "2", "--max-restarts", "2", "--checkpoint-dir", str(ck), "--",
                        *script, str(tmp_path / "killed"), "60", str(ck), schedule, optimizer, "33")
    assert killed.returncode == 0, killed.stdout
    out = killed.stdout
    assert "rank 1: vanishing in step 33" in out
    assert "attempt 1 failed with exit status" in out and f"last complete checkpoint: step 30 at 2 rank(s) in {ck}" in out
    assert "restart 1 of 2 at 2 rank(s)" in out and "finished after 2 attempt(s)" in out
    assert "rank 0: resumed from step 30" in out and "rank 1: resumed from step 30" in out

    for rank in (0, 1):
        a = torch.load(tmp_path / f"whole.{rank}", weights_only=False)
        b = torch.load(tmp_path / f"killed.{rank}", weights_only=False)
        assert a["model"].keys() == b["model"].keys()
        for name in a["model"]:  # parameters and this rank's BatchNorm statistics
            assert torch.equal(a["model"][name], b["model"][name]), (rank, name)
        assert torch.equal(a["generator"], b["generator"]) and a["lr"] == b["lr"]
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys() and len(sa) == 8
        for i in sa:
            for key, value in sa[i].items():
                assert torch.equal(value, sb[i][key]) if torch.is_tensor(value) else value == sb[i][key], (rank, i, key)
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000050", "step-00000060"]


def test_gives_up_after_max_restarts_with_the_last_status():
    result = run_launch("-np", "1", "--max-restarts", "1", "--", sys.executable, "-c",
                        "import os, sys; print('attempt', os.environ['PIPEDAP_RESTART_COUNT']); sys.exit(3)")
    assert result.returncode == 3, result.stdout
    assert "attempt 0" in result.stdout and "attempt 1" in result.stdout
    assert "giving up: the job failed 2 time(s) (--max-restarts 1)" in result.stdout


def test_a_host_that_does_not_answer_is_left_out(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\nnohost.invalid slots=1  # gone\n")
    result = run_launch("-np", "3", "--min-np", "2", "--max-restarts", "1", "--probe-timeout", "20",
                        "--hostfile", str(hostfile), "--", sys.executable, "-c", "print('rank ran')")
    assert result.returncode == 0, result.stdout
    assert "answering: localhost (2 slots); not answering: nohost.invalid" in result.stdout
    assert "restart 1 of 1 at 2 rank(s)" in result.stdout and result.stdout.splitlines().count("rank ran") == 2


def test_not_below_min_np(tmp_path):
    result = run_launch("-np", "3", "--max-restarts", "1", "--probe-timeout", "20",
                        "-H", "localhost:2,nohost.invalid:1", "--", sys.executable, "-c", "print('rank ran')")
    assert result.returncode != 0
    assert "the answering hosts have 2 slot(s), fewer than --min-np 3: not restarting" in result.stdout


# the launcher's bad options: tests/test_bad_input.py


def test_hostfile_lines(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# cluster\nh1 slots=4\n\nh2   # one slot\nh3 slots=2 max_slots=8\n")
    assert launch.parse_hostfile(path) == [launch.Host("h1", 4), launch.Host("h2", 1), launch.Host("h3", 2)]
    path.write_text("h1 slot=4\n")
    with pytest.raises(ValueError, match="line 1: 'slot=4' is not 'slots=K'"):
        launch.parse_hostfile(path)

