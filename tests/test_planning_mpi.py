"""The planner on a real job: measured cost model (cached), agreed profiles, identical plans, online planning."""

import pytest
from mpi_launch import assert_ok, run_mpi

pytestmark = pytest.mark.mpi


def test_all_ranks_obtain_identical_plans_and_switch_together():
    result = run_mpi("check_planning.py", 3, timeout=300)
    assert_ok(result)
    assert result.output.count("identical plans") == 3
    assert result.output.count("online plan optimal predicts") == 3
