"""The planner on a real job: measured cost model (cached), agreed profiles, identical plans, online planning."""

import pytest
from mpi_launch import assert_ok, run_mpi

pytestmark = pytest.mark.mpi


def test_all_ranks_obtain_identical_plans_and_switch_together():
    result = run_mpi("check_planning.py", 3, timeout=300)
    assert_ok(result)
    assert result.output.count("identical plans") == 3
    assert result.output.count("online plan optimal predicts") == 3


def test_one_rank_through_the_engine_measures_and_plans_online():
    """PIPEDAP_ONE_RANK_THROUGH_ENGINE=1 (how scripts/gpu_check.sh drives NCCL on one GPU): the cost
    model is measured on the engine's own operations and the online planner switches; it used to
    raise for want of a second rank (σ and the microbenchmark)."""
    env = {"PIPEDAP_ONE_RANK_THROUGH_ENGINE": "1", "PIPEDAP_INTERFERENCE": "measure"}
    result = run_mpi("check_planning.py", 1, env=env, timeout=300)
    assert_ok(result)
    assert "rank 0: identical plans" in result.output
    assert "rank 0: online plan optimal predicts" in result.output
