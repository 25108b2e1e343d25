"""Multi-process tests of the comm core under mpirun (expected values come from rank and size)."""

import re
import time

import pytest
from mpi_launch import assert_ok, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("np", [1, 2, 3, 4])
def test_every_collective_and_dtype(np):
    result = run_mpi("check_collectives.py", np, timeout=300)
    assert_ok(result)
    path = "local copies" if np == 1 else "the engine"
    for r in range(np):
        assert f"rank {r} of {np}: all collectives OK (through {path})" in result.output


def test_one_rank_through_the_engine():
    """PIPEDAP_ONE_RANK_THROUGH_ENGINE=1: one rank's collectives and buckets go through the core
    (how scripts/gpu_check.sh reaches the NCCL backend on one GPU); here on the CPU path."""
    env = {"PIPEDAP_ONE_RANK_THROUGH_ENGINE": "1", "PIPEDAP_LOG_RANKS": "all"}
    result = run_mpi("check_collectives.py", 1, env=env, timeout=300)
    assert_ok(result)
    assert "rank 0 of 1: all collectives OK (through the engine)" in result.output
    result = run_mpi("check_optimizer.py", 1, "matrix", env=env, timeout=300)
    assert_ok(result)
    assert "matrix OK: 4 schedules x 4 optimizers x 6 models" in result.output


@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_every_collective_with_a_forced_algorithm(algorithm):
    """Both algorithms are correct on their own (auto mixes them by size)."""
    result = run_mpi("check_collectives.py", 3, env={"PIPEDAP_ALGORITHM": algorithm}, timeout=300)
    assert_ok(result)


@pytest.mark.parametrize("np", [2, 3])
def test_a_ring_all_gather_reports_what_has_arrived_while_it_runs(np):
    """[Note: all-gather progress]: 8 KB messages make a 16 MB all-gather slow enough to be seen part-way; the
    script fails if a wait returns before the bytes it waited for hold their values."""
    result = run_mpi("check_progress.py", np, env={"PIPEDAP_MESSAGE_BYTES": "8192", "PIPEDAP_ALGORITHM": "ring"})
    assert_ok(result)
    early = [int(n) for n in re.findall(r"progress OK; (\d+) of 48 waits returned before", result.output)]
    assert len(early) == np and sum(early) > 0, result.output


def test_an_all_gather_by_mpi_reports_no_progress_and_is_waited_for_to_its_end():
    result = run_mpi("check_progress.py", 2, env={"PIPEDAP_ALGORITHM": "mpi"})
    assert_ok(result)
    assert result.output.count("progress OK; 0 of 48 waits returned before") == 2, result.output


def test_waiting_for_a_late_rank_costs_a_fraction_of_the_polling_and_little_latency():
    """[Note: patient waits]: rank 0 waits 1 s for rank 1 (an all-reduce's agreement, a barrier).
    Measured: 18-24 ms of CPU per wait with the default patience, 104-148 ms without."""
    cpu, waited = {}, {}
    for patience in ("0.1", "0"):
        result = run_mpi("wait_cpu.py", 2, "1.0", env={"PIPEDAP_POLL_PATIENCE": patience}, timeout=60)
        assert_ok(result)
        rows = re.findall(r"rank 0 waited ([\d.]+) s, cpu ([\d.]+) ms", result.output)
        assert len(rows) == 6, result.output
        waited[patience] = max(float(w) for w, _ in rows)
        cpu[patience] = sorted(float(c) for _, c in rows)[len(rows) // 2]
    assert cpu["0.1"] < 0.5 * cpu["0"], cpu
    assert waited["0.1"] < 1.0 * 1.1, waited  # noticed the peer within 10% of the wait


def test_order_mismatch_is_detected_on_every_rank_naming_both_sides():
    result = run_mpi("failure_modes.py", 3, "order_mismatch")
    assert_ok(result)
    assert "NOT DETECTED" not in result.output
    detected = re.findall(r"rank (\d): DETECTED (.*)", result.output)
    assert sorted(int(r) for r, _ in detected) == [0, 1, 2], result.output
    for r, message in detected:
        own = "allreduce 'grad.b' (5 float32)" if r == "1" else "allreduce 'grad.a' (4 float32)"
        assert message.startswith(f"pipedap: {own} (operation #1) on rank {r} was not run"), message
        assert ("operations differ between ranks at operation #1: ranks 0, 2 submitted allreduce 'grad.a' "
                "(4 float32); rank 1 submitted allreduce 'grad.b' (5 float32)") in message
        assert "It ran on no rank" in message


def test_unhandled_exception_on_one_rank_ends_the_job_quickly():
    start = time.monotonic()
    result = run_mpi("failure_modes.py", 3, "exception", timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "ValueError: boom from rank 1" in result.output  # the traceback is shown
    assert "aborting the job: unhandled ValueError on rank 1: boom from rank 1" in result.output
    assert "NOT ABORTED" not in result.output
    assert elapsed < 30, f"the job took {elapsed:.0f} s to end"


@pytest.mark.parametrize("mode, words", [
    ("early_end", ["rank 1 has shut down (pipedap.shutdown() or the end of the script) without submitting it",
                   "let ranks that run out call join()"]),
    ("barrier_early_end", ["barrier #1 on rank", "rank 1 has shut down", "without calling it"]),
])
def test_a_rank_that_ends_early_fails_the_others_operation_or_barrier_at_once_naming_it(mode, words):
    """Departure notices: without them ranks 0 and 2 would wait PIPEDAP_TIMEOUT_SECONDS (here 120 s)."""
    result = run_mpi("failure_modes.py", 3, mode, env={"PIPEDAP_TIMEOUT_SECONDS": "120"}, timeout=90)
    assert_ok(result)
    failed = dict(re.findall(r"rank (\d): FAILED after [\d.]+ s: (.*)", result.output))
    assert sorted(failed) == ["0", "2"], result.output
    for message in failed.values():
        for w in words:
            assert w in message, (w, message)


def test_watchdog_reports_a_barrier_a_rank_has_not_called_then_it_completes():
    result = run_mpi("failure_modes.py", 2, "barrier_stall", env={"PIPEDAP_STALL_SECONDS": "1"})
    assert_ok(result)
    report = re.search(r"pipedap: rank 0: barrier \(barrier #0\) has not finished after \d+ s: rank 1 has not called "
                       r"it\.\n  rank 1: has not called it; its engine is idle", result.output)
    assert report, result.output
    assert result.output.count("passed the barrier") == 2


def test_watchdog_reports_a_stalled_operation_naming_the_missing_rank_then_it_completes():
    result = run_mpi("failure_modes.py", 2, "stall", env={"PIPEDAP_STALL_SECONDS": "1"})
    assert_ok(result)
    report = re.search(r"pipedap: rank 0: allreduce 'late.op' \(2 float32\) \(operation #0\) has not finished "
                       r"after \d+ s.*\n  rank 1: has NOT submitted operation #0; it submitted 0 operation\(s\)",
                       result.output)
    assert report, result.output
    assert "The job aborts after PIPEDAP_TIMEOUT_SECONDS=600 (0: never)" in result.output
    assert result.output.count("result [2.0, 2.0]") == 2


def test_timeout_aborts_the_job_naming_each_rank_s_state():
    start = time.monotonic()
    result = run_mpi("failure_modes.py", 3, "timeout", env={"PIPEDAP_TIMEOUT_SECONDS": "2"}, timeout=60)
    assert result.returncode != 0
    assert "NOT ABORTED" not in result.output
    assert re.search(r"aborting the job: pipedap: rank [02]: allreduce 'abandoned.op' \(2 float32\) \(operation #0\)",
                     result.output), result.output
    assert "rank 1: has NOT submitted operation #0" in result.output
    assert re.search(r"rank [02]: is in operation #0 too \(waiting for every rank to submit it", result.output)
    assert "Past PIPEDAP_TIMEOUT_SECONDS=2: aborting the job." in result.output
    assert time.monotonic() - start < 40


def test_mpi4py_and_comm_core_share_one_libmpi():
    result = run_mpi("failure_modes.py", 2, "mpi4py")
    assert_ok(result)
    assert result.output.count("one libmpi") == 2
