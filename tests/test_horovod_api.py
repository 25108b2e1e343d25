"""Horovod's API where it is not a collective: build queries, optimizer wrap-time checks and warnings.

Each test here stands for tests of Horovod's test_torch.py (run by tests/compat/) that depend on it,
so a regression shows without the external suite.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

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


def test_duplicate_parameter_names_are_refused_before_anything_communicates():
    """Horovod's test_duplicate_names: no hvd.init() first, a ValueError naming the duplicates."""
    net1, net2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(list(net1.parameters()) + list(net2.parameters()), lr=0.1)
    named = (p for net in (net1, net2) for p in net.named_parameters())  # a generator, as itertools.chain
    with pytest.raises(ValueError, match="must be unique. Found duplicates: bias, weight"):
        hvd.DistributedOptimizer(opt, named_parameters=named)


def test_named_parameters_must_be_tuples():
    net = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sequence of tuples"):
        hvd.DistributedOptimizer(opt, named_parameters=list(net.parameters()))


# One rank through the engine (PIPEDAP_ONE_RANK_THROUGH_ENGINE=1), so the optimizer has a plan and
# synchronize()/step() behave as on many ranks.
STEP_AFTER_SYNCHRONIZE = textwrap.dedent("""
    import warnings
    import torch
    import pipedap as hvd

    hvd.init()
    model = torch.nn.Linear(2, 1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())

    def backward():
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()

    def warned(run):
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            run()
        return [str(w.message) for w in ws]

    backward()
    opt.synchronize()
    ws = warned(opt.step)
    assert len(ws) == 1 and "optimizer.step() called without optimizer.skip_synchronize()" in ws[0], ws

    backward()
    opt.synchronize()
    def skipped():
        with opt.skip_synchronize():
            opt.step()
    assert warned(skipped) == []

    backward()
    assert warned(opt.step) == []          # no synchronize(): no warning
    opt.synchronize()                      # after step(): applies what is pending, not mid-step
    backward()
    assert warned(opt.step) == []
    print("OK")
""")


def test_step_after_synchronize_without_skip_synchronize_warns_like_horovod(tmp_path):
    script = tmp_path / "step_after_synchronize.py"
    script.write_text(STEP_AFTER_SYNCHRONIZE)
    done = subprocess.run([sys.executable, str(script)], env={**os.environ, "PIPEDAP_ONE_RANK_THROUGH_ENGINE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def test_warning_text_starts_as_horovods():
    from pipedap.optimizer import SYNCHRONIZE_THEN_STEP

    assert SYNCHRONIZE_THEN_STEP.startswith(
        "optimizer.step() called without optimizer.skip_synchronize() context after optimizer.synchronize().")


def test_adasum_is_named_and_refused_as_not_implemented():
    """Horovod's test_horovod_reducescatter_adasum expects a RuntimeError; the message says what works."""
    hvd.init()
    assert "Adasum" in hvd.__all__
    model = torch.nn.Linear(1, 1)
    for call in (lambda: hvd.allreduce(torch.ones(4), op=hvd.Adasum),
                 lambda: hvd.allreduce_async_(torch.ones(4), op=hvd.Adasum),
                 lambda: hvd.reducescatter(torch.ones(4), op=hvd.Adasum),
                 lambda: hvd.grouped_allreduce([torch.ones(4)], op=hvd.Adasum),
                 lambda: hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)):
        with pytest.raises(NotImplementedError, match="op=Adasum is not supported by pipedap; use Average, Sum"):
            call()
    assert issubclass(NotImplementedError, RuntimeError)


@pytest.mark.parametrize("name", ["Min", "Max", "Product"])
def test_the_optimizer_reduces_gradients_by_average_or_sum_only(name):
    hvd.init()
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="reduces gradients with Average or Sum"):
        hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=getattr(hvd, name))


def test_horovod_api_names_are_exported():
    for name in ("alltoall", "alltoall_async", "join", "sparse_allreduce_async", "grouped_allreduce",
                 "grouped_allreduce_async", "grouped_allreduce_", "grouped_allreduce_async_", "grouped_allgather",
                 "grouped_allgather_async", "grouped_reducescatter", "grouped_reducescatter_async",
                 "start_timeline", "stop_timeline", "Min", "Max", "Product"):
        assert name in hvd.__all__ and getattr(hvd, name) is not None, name


def test_an_unknown_op_is_a_value_error():
    hvd.init()
    with pytest.raises(ValueError, match="unknown op 'max'"):
        hvd.allreduce(torch.ones(4), op="max")
