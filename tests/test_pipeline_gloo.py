"""The pipeline runtime without an MPI launcher: one process per rank over torch.distributed with gloo.

The same scripts as the MPI tests (tests/mpi_scripts/pipeline_training.py and
pipeline_failures.py, the same references), started as PipeDream's users start
ranks: one process each with RANK, WORLD_SIZE, MASTER_ADDR (loopback) and a free
MASTER_PORT (tests/mpi_launch.py run_ranks). One launch per size runs every case.
"""

from __future__ import annotations

import re
import time

import pytest
from mpi_launch import run_ranks
from pipeline_output import worst

TOLERANCE = 1e-12
CASES = {2: ["no-pipelining", "flush", "1f1b", "wrong-stash"], 3: ["no-pipelining", "flush", "1f1b", "dear-refused"]}


@pytest.fixture(scope="module")
def runs():
    """Every rank's output of each size's run, launched on first use."""
    outputs: dict[int, str] = {}

    def output(np: int) -> str:
        if np not in outputs:
            ranks = run_ranks("pipeline_training.py", np, *CASES[np], timeout=120)
            joined = "\n".join(r.stdout for r in ranks)
            assert all(r.returncode == 0 for r in ranks), joined
            outputs[np] = joined
        return outputs[np]

    return output




@pytest.mark.parametrize("np, case", [(np, c) for np, cases in CASES.items() for c in cases
                                      if c not in ("wrong-stash", "dear-refused")])
def test_over_gloo_the_pipeline_equals_its_reference(runs, np, case):
    """no_pipelining and flush (at np 3: stage 0 on 2 ranks) equal one process; 1F1B equals the replay."""
    assert max(worst(runs(np), case, np)) <= TOLERANCE, runs(np)


def test_over_gloo_a_stash_with_the_latest_weights_fails_the_1f1b_comparison(runs):
    assert max(worst(runs(2), "wrong-stash", 2)) > 1e-6, runs(2)


def test_over_gloo_dear_on_a_replicated_stage_is_refused_on_every_rank(runs):
    refused = re.findall(r"^CASE dear-refused rank (\d) refused: dp_schedule='dear' for the replicas of stage 0 "
                         r"needs PipeDAP's engine, .* launch with `mpirun -np 3", runs(3), re.M)
    assert sorted(refused) == ["0", "1", "2"], runs(3)


@pytest.mark.parametrize("np", CASES)
def test_over_gloo_the_transport_destroys_its_process_group_and_threads_at_exit(runs, np):
    """The scripts never close the transport. A group left to the interpreter's teardown, or one that outlives
    destroy_process_group (torch._dynamo imported after it keeps references), leaves gloo's threads running into
    the exit, which can abort it ("terminate called without an active exception", SIGABRT after the last case:
    8 of 30 loaded exits with the group never destroyed; one CI run with it outliving the destroy)."""
    left = re.findall(r"^EXIT rank (\d) process group left: (\w+), gloo threads: (\d+)$", runs(np), re.M)
    assert sorted(left) == [(str(r), "False", "0") for r in range(np)], runs(np)


def test_over_gloo_every_rank_names_each_bad_input_before_training():
    ranks = run_ranks("pipeline_failures.py", 3, "bad-inputs", timeout=60)
    output = "\n".join(r.stdout for r in ranks)
    assert all(r.returncode == 0 for r in ranks), output
    for case in ("length", "world-size", "shapes", "config-differs-on-rank-2"):
        assert len(re.findall(rf"^BAD {case} rank \d: pipeline ", output, re.M)) == 3, (case, output)


def test_over_gloo_a_stage_that_dies_ends_every_rank_within_30_s_naming_it():
    """Killed (an exception that ends the process closes its sockets the same way: tested by hand)."""
    ranks = run_ranks("pipeline_failures.py", 3, "kill", "1", timeout=90)
    ended = time.time()
    output = "\n".join(f"--- rank {r} ---\n{p.stdout}" for r, p in enumerate(ranks))
    died = float(re.search(r"^DIES (\S+)$", output, re.M).group(1))
    assert ended - died < 30, f"the job took {ended - died:.1f} s to end after rank 1 died:\n{output}"
    assert ranks[1].returncode == -9, output
    for r in (0, 2):
        assert ranks[r].returncode != 0, output
        # waiting for rank 1, or posting to it once gloo has seen its connection close
        assert re.search(rf"RuntimeError: rank {r}: (receiving from|sending to) rank 1 failed: rank 1 died",
                         ranks[r].stdout), output
    assert "trained to the end" not in output
