"""Bad pipeline inputs fail on every rank before training; a stage that dies ends the whole job, naming it.

tests/mpi_scripts/pipeline_failures.py at np 3 (stages 0, 1, 2 on ranks 0, 1, 2).
"""

from __future__ import annotations

import re
import time

import pytest
from mpi_launch import assert_ok, run_mpi

pytestmark = pytest.mark.mpi

EXPECTED = {
    "length": r"'module_to_stage_map' has 3 entries but the model has 4 modules \(the last one is the loss\)",
    "rank-without-stage": r"rank 2 has no stage \(ranks placed: 0, 1, 3\); put every rank 0\.\.2 in one stage",
    "stage-without-rank": r"stage 1 has no rank; add \"1\": \[rank\]",
    "world-size": r"places 2 ranks \(0, 1\) but the job has 3; start it with mpirun -np 2",
    "shapes": r"pipeline shapes: rank 1: stage 1 cannot run on stage 0's output \(\[4, 16\] float32\): RuntimeError: "
              r"mat1 and mat2 shapes cannot be multiplied .* check module_to_stage_map",
    "no-sample-on-rank-0": r"pipeline shapes: rank 0: stage 0 needs sample=",
    "config-differs-on-rank-2": r"the ranks disagree \(rank 0: 4 modules, config (\w+); rank 1: 4 modules, config \1; "
                                r"rank 2: 4 modules, config (?!\1)\w+\)",
}


def test_every_rank_names_each_bad_input_before_training():
    result = run_mpi("pipeline_failures.py", 3, "bad-inputs", timeout=120)
    assert_ok(result)
    for case, message in EXPECTED.items():
        for r in range(3):
            assert re.search(rf"^BAD {case} rank {r}: .*{message}", result.output, re.M), (case, r, result.output)
    assert len(re.findall(r"^BAD done rank \d", result.output, re.M)) == 3


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_stage_that_dies_ends_every_rank_within_30_s_naming_it(how):
    result = run_mpi("pipeline_failures.py", 3, how, "1", timeout=120)
    ended = time.time()
    assert result.returncode != 0, result.output
    died = float(re.search(r"^DIES (\S+)$", result.output, re.M).group(1))
    assert ended - died < 30, f"the job took {ended - died:.1f} s to end after rank 1 died"
    if how == "kill":
        assert re.search(r"process rank 1 with PID \d+ on node \S+ exited on\s+signal 9", result.output), result.output
    else:
        assert "unhandled RuntimeError on rank 1: this stage failed on purpose" in result.output, result.output
    assert "trained to the end" not in result.output
