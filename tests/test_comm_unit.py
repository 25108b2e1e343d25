"""The Python layer in one process (world size 1 fast paths, input checks, core validation)."""

import subprocess
import sys

import pytest
import torch

import pipedap as hvd
from pipedap import _comm_core as core


@pytest.fixture(scope="module", autouse=True)
def initialized():
    hvd.init()
    yield


def test_world_of_one_fast_paths_return_copies():
    x = torch.arange(6.0).view(3, 2)
    for result in (hvd.allreduce(x), hvd.allgather(x), hvd.reducescatter(x), hvd.broadcast(x, 0)):
        assert torch.equal(result, x) and result.data_ptr() != x.data_ptr()
    y = x.clone()
    assert hvd.allreduce_(y, op=hvd.Sum) is y and torch.equal(y, x)
    hvd.barrier()
    assert hvd.broadcast_object({"a": 1}) == {"a": 1}


def test_handles_poll_and_synchronize_once():
    h = hvd.allreduce_async(torch.ones(2))
    assert hvd.poll(h)
    assert torch.equal(hvd.synchronize(h), torch.ones(2))
    with pytest.raises(ValueError, match=f"handle {h} is unknown or was already synchronized"):
        hvd.synchronize(h)


@pytest.mark.parametrize(
    "tensor, error, message",
    [
        (torch.ones(4, 4).t(), ValueError, "not contiguous; pass tensor.contiguous()"),
        (torch.ones(2, dtype=torch.complex64), TypeError, "dtype torch.complex64 is not supported"),
        (torch.ones(2, device="meta"), ValueError, "device 'meta' are not supported"),
        ([1.0, 2.0], TypeError, "expected a torch.Tensor, got list"),
    ],
)
def test_bad_tensors_are_rejected_with_the_fix(tensor, error, message):
    with pytest.raises(error, match=message):
        hvd.allreduce_async(tensor, name="bad")


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="root_rank 3 is not in"):
        hvd.broadcast_async(torch.ones(2), root_rank=3)
    with pytest.raises(ValueError, match="either op= or the deprecated average="):
        hvd.allreduce(torch.ones(2), average=True, op=hvd.Sum)
    with pytest.raises(ValueError, match="at least one dimension"):
        hvd.reducescatter(torch.tensor(1.0))


def test_deprecated_average_flag_and_postscale():
    assert torch.equal(hvd.allreduce(torch.ones(2), average=False, postscale_factor=3.0), torch.full((2,), 3.0))


def test_fp16_compression_round_trip():
    x = torch.tensor([1.5, -2.25], dtype=torch.float32)
    out = hvd.allreduce(x, compression=hvd.Compression.fp16)
    assert out.dtype == torch.float32 and torch.equal(out, x)


def test_bf16_compression_round_trip_and_integers_pass_unchanged():
    x = torch.tensor([1.5, -2.25], dtype=torch.float32)
    compressed, ctx = hvd.Compression.bf16.compress(x)
    assert compressed.dtype == torch.bfloat16 and ctx == torch.float32
    assert torch.equal(hvd.allreduce(x, compression=hvd.Compression.bf16), x)
    ints = torch.tensor([3, 4])
    assert hvd.Compression.fp16.compress(ints) == (ints, None)


def test_distributed_optimizer_refuses_a_compressor_it_cannot_apply_to_buckets():
    class TopK(hvd.compression.Compressor):
        @staticmethod
        def compress(tensor):
            return tensor, None

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="compression TopK overrides compress"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, compression=TopK)
    with pytest.raises(TypeError, match="compression must be pipedap.Compression.none, .fp16, .bf16"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, compression="fp16")


def test_core_validates_what_python_submits():
    with pytest.raises(ValueError, match=r"allreduce 'x' .*needs 1 count\(s\), got 2"):
        core.submit([core.OpSpec(core.OpKind.ALLREDUCE, "x", 8, 8, [1, 1])])
    with pytest.raises(ValueError, match="root rank 5 is not in"):
        core.submit([core.OpSpec(core.OpKind.BROADCAST, "b", 8, 8, [1], root=5)])
    with pytest.raises(ValueError, match="null buffer address"):
        core.submit([core.OpSpec(core.OpKind.ALLREDUCE, "n", 0, 0, [4])])


def test_cuda_buffers_without_a_gpu_get_a_clear_error():
    """The device path refuses cleanly: no NCCL in the build, or no GPU visible."""
    op = core.OpSpec(core.OpKind.ALLREDUCE, "gpu.op", 8, 8, [1], device=0)
    expected = "no CUDA device is visible on rank 0" if core.nccl_built() else "has no CUDA/NCCL support"
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests cover the device path")
    with pytest.raises(hvd.CommError, match=expected):
        core.submit([op])


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **env))


def test_bad_environment_settings_name_the_variable():
    result = run_python("import pipedap; pipedap.init()", PIPEDAP_ALGORITHM="fastest")
    assert result.returncode != 0
    assert "PIPEDAP_ALGORITHM='fastest': expected auto, ring or mpi" in result.stderr
    assert "SettingsError" in result.stderr  # checked in Python, before MPI starts


def test_planner_imports_without_loading_the_comm_core():
    result = run_python("import sys, pipedap.planner; print('pipedap._comm_core' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_tcp_eager_limit_is_raised_unless_the_user_set_it():
    code = "import os, pipedap; pipedap.init(); print(os.environ['OMPI_MCA_btl_tcp_eager_limit'])"
    assert run_python(code).stdout.strip() == str(4 << 20)
    assert run_python(code, OMPI_MCA_btl_tcp_eager_limit="65536").stdout.strip() == "65536"
