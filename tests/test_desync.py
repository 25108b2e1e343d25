"""Desynchronised ranks get errors, never corrupted memory or a hang (issue: safety first).

The matrix: {extra op on one rank, different size, dtype, root, a name reused
while in flight (a ValueError at once, on that rank only, as Horovod's)} x {small (MPI's collectives), large (the ring)} x {wfbp, dear,
pipedap}, with the normal build and with comm_core built with AddressSanitizer
and UBSan (comm_core/sanitized_build.py). Each rank must raise a CommError that
names its own operation and what the other rank submitted; where the ranks stay
aligned, training goes on and the ranks still agree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from mpi_launch import run_mpi

sys.path.insert(0, str(Path(__file__).parent.parent / "comm_core"))
import sanitized_build  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.desync]

SIZES = {"small": 100, "large": 100_000}
SCHEDULES = ("wfbp", "dear", "pipedap")
ALIGNED = ("size", "dtype", "root", "name")
CRASH_SIGNS = ("AddressSanitizer", "runtime error:", "corrupt", "double free", "Segmentation", "signal 11",
               "signal 6", "free():", "malloc()")


@pytest.fixture(scope="module")
def sanitized_env() -> dict:
    """Runs Python with comm_core built with AddressSanitizer and UBSan (built once, cached under build/)."""
    return sanitized_build.environment(sanitized_build.build())


@pytest.fixture(params=["normal", "sanitized"])
def build_env(request) -> dict:
    """Environment for the jobs: the installed core, or the sanitized one."""
    env = {"PIPEDAP_PROFILE_STEPS": "2"}  # the pipedap schedule switches to its plan before the desync
    if request.param == "sanitized":
        env.update(request.getfixturevalue("sanitized_env"))
    return env


def expected(case: str, rank: int, size: str) -> tuple[str, str]:
    """(what rank 0 submitted, what rank 1 submitted) at the mismatch, as the error words it."""
    n = SIZES[size]
    if case == "size":
        return f"allreduce 'probe' ({n} float32)", f"allreduce 'probe' ({n + 1} float32)"
    if case == "dtype":
        return f"allreduce 'probe' ({n} float32)", f"allreduce 'probe' ({n} float64)"
    if case == "root":
        return f"broadcast 'probe' ({n} float32 from rank 0)", f"broadcast 'probe' ({n} float32 from rank 1)"
    if case == "name":
        return "", f"allreduce 'probe' ({n} float32) on rank 1: an operation named 'probe' is still in flight"
    raise ValueError(case)


def assert_no_crash(output: str) -> None:
    for sign in CRASH_SIGNS:
        assert sign not in output, f"'{sign}' in the output:\n{output}"


def test_the_sanitized_build_is_loaded_and_catches_a_double_free(sanitized_env):
    result = run_mpi("failure_modes.py", 2, "sanitizer", env=sanitized_env, timeout=120)
    cores = re.findall(r"rank \d: core (\S+) asan (\w+)", result.output)
    assert len(cores) == 2, result.output
    for path, asan in cores:
        assert "build/sanitized" in path and asan == "True", result.output
    assert "attempting double-free" in result.output, result.output
    assert "NOT CAUGHT" not in result.output
    assert result.returncode != 0


@pytest.mark.parametrize("case", ALIGNED)
def test_a_mismatch_fails_on_every_rank_and_training_goes_on(case, build_env):
    result = run_mpi("desync.py", 2, case, ",".join(SIZES), ",".join(SCHEDULES), env=build_env, timeout=420)
    assert_no_crash(result.output)
    assert result.returncode == 0, result.output
    for size in SIZES:
        mine = expected(case, 0, size)
        for schedule in SCHEDULES:
            for rank in (0, 1):
                assert f"rank {rank}: {size} {schedule} FINISHED" in result.output
                if case == "name" and rank == 0:  # Horovod's rule: only the rank that reused the name fails
                    assert f"rank 0: {size} {schedule} NO ERROR" in result.output, result.output
                    continue
                error = re.search(rf"rank {rank}: {size} {schedule} ERROR (.*)", result.output)
                assert error, f"no error on rank {rank} ({size}, {schedule}):\n{result.output}"
                message = error.group(1)
                if case == "name":  # refused at submission, before anything reached the engine's queue
                    assert message.startswith(mine[1]) and "synchronize the first one" in message, message
                    continue
                assert message.startswith(f"pipedap: {mine[rank]} (operation #"), message
                assert "It ran on no rank" in message
                assert f"rank 0 submitted {mine[0]}; rank 1 submitted {mine[1]}" in message
    assert result.output.count("ALIVE") == 2


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("size", SIZES)
def test_an_extra_collective_on_one_rank_fails_on_both(size, schedule, build_env):
    """The issue's example: rank 1 alone all-reduces mid-training (default settings otherwise)."""
    result = run_mpi("desync.py", 2, "extra", size, schedule, env=build_env, timeout=180)
    assert_no_crash(result.output)
    extra = f"allreduce 'extra' ({SIZES[size]} float32)"
    errors = dict(re.findall(rf"rank (\d): {size} {schedule} ERROR (.*)", result.output))
    assert sorted(errors) == ["0", "1"], result.output
    assert errors["1"].startswith(f"pipedap: {extra} (operation #"), errors["1"]
    for message in errors.values():
        # rank 0 names its own operation, an optimizer collective, and both are listed
        assert re.search(rf"rank 0 submitted (reducescatter|allgather|allreduce) '(rs|ag|ar)\.\d+' \(\d+ float32\); "
                         rf"rank 1 submitted {re.escape(extra)}", message), message
    assert not errors["0"].startswith(f"pipedap: {extra}")
    assert result.output.count("ALIVE") == 2
