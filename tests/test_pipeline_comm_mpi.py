"""send_tensor / receive_tensor at np 2 and 3 (tests/mpi_scripts/pipeline_comm.py): shapes, dtypes, tags,
receives matched by tag out of order, a receive in flight before its send, a 100 MB tensor.

The comm core's own point-to-point tests (segmentation, the watchdog) are the core's;
these test the pipeline's layer over it.
"""

from __future__ import annotations

import pytest
from mpi_launch import assert_ok, run_mpi


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 3])
def test_tensors_arrive_whole_under_their_tags(np):
    result = run_mpi("pipeline_comm.py", np, timeout=120)
    assert_ok(result)
    for r in range(np):
        assert f"COMM rank {r} OK" in result.output, result.output
