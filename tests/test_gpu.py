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


@needs_gpu
def test_the_profiler_times_cuda_layers_on_the_gpu_clock():
    """On CUDA the profiler marks its hooks with events instead of synchronising at each one
    (pipedap.profiler._Clock); the layer times must still be those of the layers, in order."""
    from pipedap.profiler import profile_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)).cuda()
    profile = profile_model(model, torch.randn(256, 512, device="cuda"), warmup=2, iterations=5)
    assert profile.meta["device"] == "cuda" and [layer.name for layer in profile.layers] == ["0", "2"]
    for layer in profile.layers:
        assert 0 < layer.tf < 1 and 0 <= layer.tb < 1 and layer.u >= 0, layer
    assert profile.layers[-1].tb > 0 and profile.bucket_cost > 0


@needs_gpu
def test_a_tied_embedding_split_on_cuda_trains_as_single_process_training():
    """pipedap/tied_split.py on CUDA tensors (its node hook on autograd's device thread, its collectives
    over NCCL), one rank through the engine (tests/mpi_scripts/check_tied.py --cuda)."""
    result = run_mpi("check_tied.py", 1, "training", "--cuda", env={"PIPEDAP_ONE_RANK_THROUGH_ENGINE": "1"},
                     timeout=300)
    assert_ok(result)
    for part in ("dear OK", "ag in backward OK", "pipedap OK", "paths OK"):
        assert result.output.count(part) == 1, result.output
