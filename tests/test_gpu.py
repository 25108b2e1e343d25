"""The NCCL path on real GPUs: every collective and dtype on CUDA tensors (skipped without a GPU)."""

import pytest
import torch
from mpi_launch import assert_ok, run_mpi

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.is_available() is False")


@needs_gpu
@pytest.mark.parametrize("np", [1, 2])
def test_every_collective_and_dtype_on_cuda(np):
    import pipedap._comm_core as core

    if not core.nccl_built():
        pytest.fail("a GPU is present but comm_core was built without NCCL: reinstall with CUDA and NCCL")
    if np > torch.cuda.device_count():
        pytest.skip(f"{np} ranks need {np} GPUs, {torch.cuda.device_count()} visible")
    # one rank too goes through the core (and NCCL), not through the one-rank copy shortcut
    result = run_mpi("check_collectives.py", np, "cuda", env={"PIPEDAP_ONE_RANK_THROUGH_ENGINE": "1"}, timeout=300)
    assert_ok(result)
    assert result.output.count("all collectives OK (through the engine)") == np
