"""examples/train_cifar_like.py trains (the loss falls) and resumes from its checkpoint, at -np 2 (the second
run through the launcher, as the example's docstring shows)."""

import os
import re
import sys
from pathlib import Path

import pytest
from mpi_launch import assert_ok, run_bounded, run_mpi

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "train_cifar_like.py")
EPOCH = re.compile(r"epoch (\d+)/\d+: train loss ([\d.]+), eval loss ([\d.]+), accuracy ([\d.]+)%")

pytestmark = pytest.mark.mpi


def epochs(output: str) -> dict[int, tuple[float, float, float]]:
    """epoch -> (train loss, eval loss, accuracy %) as printed by rank 0."""
    return {int(m[1]): (float(m[2]), float(m[3]), float(m[4])) for m in EPOCH.finditer(output)}


def test_trains_then_resumes_from_the_checkpoint(tmp_path):
    checkpoint = str(tmp_path / "cnn")
    first = run_mpi(EXAMPLE, 2, "--epochs", "3", "--checkpoint-dir", checkpoint, timeout=180)
    assert_ok(first)
    seen = epochs(first.output)
    assert sorted(seen) == [1, 2, 3]
    assert seen[3][0] < 0.5 * seen[1][0] and seen[3][1] < 0.5 * seen[1][1]  # train and eval loss fall
    assert seen[3][2] > 50  # well above the 10% of guessing

    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    second = run_bounded([sys.executable, "-m", "pipedap.tools.launch", "-np", "2", "--max-restarts", "1",
                          "--checkpoint-dir", checkpoint, "--", sys.executable, EXAMPLE, "--epochs", "4"], env, 180)
    assert second.returncode == 0, second.stdout
    assert f"resumed from {checkpoint}/step-00000003 at epoch 3" in second.stdout
    resumed = epochs(second.stdout)
    assert sorted(resumed) == [4]  # only the remaining epoch ran
    assert resumed[4][1] < 0.5 * seen[1][1]  # it continued from the trained weights
