"""Horovod's API where it is not a collective: build queries (and, later, optimizer checks).

Each test here stands for tests of Horovod's test_torch.py (run by tests/compat/) that depend on it,
so a regression shows without the external suite.
"""


import pipedap as hvd
from pipedap import _comm_core as core


def test_build_queries_answer_for_this_build_as_horovod_defines_them():
    # MPI is the controller and CPU data path; no Gloo, oneCCL, DDL or ROCm
    assert hvd.mpi_built() is True and hvd.mpi_enabled() is True
    for name in ("gloo_built", "gloo_enabled", "ccl_built", "ddl_built", "rocm_built"):
        assert getattr(hvd, name)() is False, name
    # nccl_built: Horovod's NCCL_VERSION_CODE (e.g. 22304), or 0
    nccl = hvd.nccl_built()
    assert isinstance(nccl, int)
    if core.nccl_built():
        assert nccl >= 1 and hvd.cuda_built() is True
    else:
        assert nccl == 0 and hvd.cuda_built() is False


def test_build_queries_are_exported():
    for name in ("mpi_built", "mpi_enabled", "gloo_built", "gloo_enabled", "ccl_built", "ddl_built",
                 "rocm_built", "cuda_built", "nccl_built"):
        assert name in hvd.__all__ and callable(getattr(hvd, name))
