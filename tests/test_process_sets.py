"""Process sets in the engine (tests/mpi_scripts/process_sets.py at np 3, sets {0, 1} and {1, 2}).

Collectives on overlapping sets are exact, also interleaved on the rank both
share; a wrong submission on a set fails on its members only, naming them by
world rank; a stall inside a set names the missing member and ends the job at
the timeout; a cycle of overlapping sets is named in the stall report.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from mpi_launch import assert_ok, run_mpi

from pipedap.process_sets import ProcessSet, global_process_set, remove_process_set

sys.path.insert(0, str(Path(__file__).parent.parent / "comm_core"))
import sanitized_build  # noqa: E402

SHORT_TIMEOUT = {"PIPEDAP_STALL_SECONDS": "1", "PIPEDAP_TIMEOUT_SECONDS": "4"}


def test_a_process_set_sorts_its_ranks_and_refuses_other_things():
    ps = ProcessSet([2, 0])
    assert ps.ranks == [0, 2] and ps.process_set_id is None and ps.size() is None and ps.rank() is None
    for bad in ("01", [0, 1.0], 3):
        with pytest.raises(TypeError, match="ProcessSet takes"):
            ProcessSet(bad)
    assert global_process_set.process_set_id == 0
    # as Horovod: nothing to remove (no collective) for the world or an unregistered set
    assert remove_process_set(ps) is False and remove_process_set(global_process_set) is False


@pytest.fixture(params=["normal", "sanitized"])
def build_env(request) -> dict:
    """The working tree's core, or comm_core built with AddressSanitizer and UBSan (cached under build/)."""
    return {} if request.param == "normal" else sanitized_build.environment(sanitized_build.build())


@pytest.mark.mpi
def test_overlapping_sets_run_every_collective_and_refuse_what_is_wrong(build_env):
    result = run_mpi("process_sets.py", 3, "collectives", env=build_env, timeout=240)
    assert_ok(result)
    assert "AddressSanitizer" not in result.output and "runtime error:" not in result.output
    out = result.output
    for r in range(3):
        assert f"rank {r}: collectives on both sets OK" in out and f"rank {r}: process sets OK" in out, out
        # different add_process_set lists: every rank hears each rank's list
        assert re.search(rf"rank {r}: mismatched lists ERROR .*operations differ between ranks at operation #\d+: "
                         r"rank 0 submitted add_process_set \[0\]; ranks 1, 2 submitted add_process_set \[2\]", out)
        assert f"rank {r}: duplicate ERROR" in out and f"rank {r}: remove the world ERROR" in out
    for r, other in ((0, "process set 2 (ranks 1, 2)"), (2, "process set 1 (ranks 0, 1)")):
        assert f"rank {r}: non-member ERROR rank {r} is not a member of {other}" in out, out
    # a desynchronised submission inside {1, 2} fails on both, naming both; rank 0 goes on
    for r in (1, 2):
        assert re.search(rf"rank {r}: desync ERROR pipedap: allreduce 'probe' \({3 + r} float32\) \(operation #\d+ "
                         rf"of process set 2 \(ranks 1, 2\)\) on rank {r} was not run: operations differ", out), out
    assert "rank 0: desync" not in out
    assert "rank 0: A goes on" in out and "rank 1: A goes on" in out


@pytest.mark.mpi
def test_a_stall_inside_a_set_names_the_missing_member_and_the_timeout_ends_the_job():
    start = time.monotonic()
    result = run_mpi("process_sets.py", 3, "stall", env=SHORT_TIMEOUT, timeout=90)
    assert result.returncode != 0 and "NOT ABORTED" not in result.output
    report = re.search(r"pipedap: rank 1: allreduce 'stalled.op' \(2 float32\) \(operation #0 of process set 2 "
                       r"\(ranks 1, 2\)\) has not finished after \d+ s.*\n((?:  .*\n)*)", result.output)
    assert report, result.output
    lines = report.group(1)
    assert "rank 2: has NOT submitted operation #0 of process set 2 (ranks 1, 2)" in lines, lines
    assert "rank 0:" not in lines  # not a member: not asked
    assert "Past PIPEDAP_TIMEOUT_SECONDS=4: aborting the job." in result.output
    assert time.monotonic() - start < 60


@pytest.mark.mpi
def test_a_cycle_of_overlapping_sets_is_named_in_the_stall_report():
    result = run_mpi("process_sets.py", 3, "cycle", env=SHORT_TIMEOUT, timeout=90)
    assert result.returncode != 0 and "NOT ABORTED" not in result.output
    # e.g. rank 0 waits in {0, 1}, where rank 1 runs its {1, 2} operation first
    links = re.findall(r"rank (\d): has submitted operation #0 of process set \d \(ranks (\d), (\d)\); it is running "
                       r"#0 of process set \d \(ranks (\d), (\d)\): .*form a cycle across ranks", result.output)
    assert links, result.output
    for rank, *ranks in links:
        waited, running = ranks[:2], ranks[2:]
        assert rank in waited and rank in running and waited != running, links
    assert "aborting the job" in result.output
