"""pipedap.interference: the clean clock by hand, and the measurement under mpirun."""

from __future__ import annotations

import json

import pytest
from mpi_launch import assert_ok, run_mpi

from pipedap.interference import clean_clock


def test_the_clean_clock_runs_slower_beside_transfers():
    # interference 1: compute at half speed from 1 to 2 and from 4 to 6
    clean = clean_clock([(4.0, 6.0), (1.0, 2.0)], 1.0)
    assert [clean(t) for t in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)] == pytest.approx(
        [0.5, 1.0, 1.25, 1.5, 2.5, 3.5, 4.0, 4.5, 5.5])
    assert clean_clock([(1.0, 2.0)], 0.0)(5.0) == 5.0
    assert clean_clock([(1.0, 1.0)], 1.0)(5.0) == 5.0  # an empty interval slows nothing


@pytest.mark.mpi
def test_measured_on_one_shared_core_and_cached_with_the_cost_model(tmp_path):
    """Two ranks pinned to one core: compute must slow while their engines move bytes, every rank gets the
    same interference, the cost model carries it to the cache, PIPEDAP_INTERFERENCE=off measures nothing, and
    the online planner measures it, maps its profile with it, plans with it and reports it (opt.planning)."""
    out = tmp_path / "sigma.json"
    assert_ok(run_mpi("check_interference.py", 2, str(out), timeout=240, env={"PIPEDAP_CACHE_DIR": str(tmp_path)}))
    result = json.loads(out.read_text())
    assert len(set(result["sigma"])) == 1 and result["sigma"][0] > 0, result
    assert len(set(result["measured"])) == 1 and result["measured"][0] > 0, result
    assert result["cached"] == result["measured"][0]
    assert result["off"] == 0.0
    # the online planner: measured once, the same on every rank, the profile mapped with it, the plans made with it
    clocks = [rank["clock"] for rank in result["online"]]
    assert all(len(set(c)) == 1 for c in clocks) and len({c[0] for c in clocks}) == 1 and clocks[0][0] > 0, clocks
    plans = result["online"][0]["plans"]
    assert plans and all(profile == clocks[0][0] and cost > 0 for profile, cost in plans), plans
    assert result["planning"] == [clocks[0][0]] * 2, result["planning"]  # what the optimizer reports (bench records)
