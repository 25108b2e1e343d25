"""Horovod's semantics under mpirun, without Horovod's suite (tests/mpi_scripts/horovod_semantics.py).

Each check there stands for tests of Horovod's test_torch.py that tests/compat/ runs when a Horovod
checkout is given: collective gradients against finite differences, integer scaling, grouped
operations, alltoall errors, join, names in flight, shape mismatches, the timeline, sparse gradients,
SyncBatchNorm.
"""

import pytest
from mpi_launch import assert_ok, run_mpi

pytestmark = pytest.mark.mpi

CHECKS = ["gradient of allreduce Sum", "gradient of allgather", "gradient of broadcast",
          "gradient of reducescatter Average", "gradient of alltoall", "gradient of grouped_reducescatter",
          "integer and half scaling", "grouped operations", "alltoall errors", "a name in flight",
          "operations in flight across a barrier",
          "shape mismatch", "join", "timeline", "sparse gradients", "optimizer outside its process set", "SyncBatchNorm"]


@pytest.mark.parametrize("np", [2, 3])
def test_horovod_semantics(np):
    result = run_mpi("horovod_semantics.py", np, timeout=240)
    assert_ok(result)
    for r in range(np):
        for check in CHECKS:
            assert f"rank {r} of {np}: {check} OK" in result.output, (check, result.output[-3000:])
        assert f"rank {r} of {np}: all Horovod semantics OK" in result.output
