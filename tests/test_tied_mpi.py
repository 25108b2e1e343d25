"""Tied embeddings split in two parts under mpirun (tests/mpi_scripts/check_tied.py): equal to single-process
training on every path that reads a reduced gradient, and a rank-dependent output layer raises, never hangs."""

import pytest
from mpi_launch import assert_ok, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("np", [2, 3])  # shard boundaries inside rows, uneven at 3
def test_the_split_runs_and_training_equals_single_process(np):
    result = run_mpi("check_tied.py", np, "training", timeout=300)
    assert_ok(result)
    for plan in ("dear", "ag in backward", "node hook"):
        assert result.output.count(f"{plan} OK: the tied weight's rows all-gather moved") == np, result.output
    assert result.output.count("pipedap OK: planned split ") == np, result.output
    assert result.output.count("paths OK") == np, result.output


def test_a_rank_that_skips_the_output_layer_raises_on_every_rank():
    result = run_mpi("check_tied.py", 2, "desync", timeout=120)
    assert_ok(result)
    assert result.output.count("desync raised CommError: ") == 2, result.output
    assert "NOT DETECTED" not in result.output
