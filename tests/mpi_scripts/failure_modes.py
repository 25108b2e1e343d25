"""Failure behaviour of the engine, one mode per run (argv[1]); the test reads the output."""

import re
import sys
import time

import torch

import pipedap as hvd
from pipedap import _comm_core as core

mode = sys.argv[1]
hvd.init()
R, P = hvd.rank(), hvd.size()

if mode == "order_mismatch":
    hvd.allreduce(torch.ones(2), name="agreed")
    name, n = ("grad.b", 5) if R == 1 else ("grad.a", 4)
    try:
        hvd.allreduce(torch.ones(n), name=name)
        print(f"rank {R}: NOT DETECTED")
    except hvd.CommError as e:
        print(f"rank {R}: DETECTED {e}")

elif mode == "exception":  # rank 1 dies; the others are blocked in a collective
    if R == 1:
        raise ValueError("boom from rank 1")
    hvd.allreduce(torch.ones(2), name="never.completes")
    print(f"rank {R}: NOT ABORTED")

elif mode == "early_end":  # rank 1 runs out of data one step early (no join): the others fail at once
    for step in range(3):
        hvd.allreduce(torch.ones(2), name=f"step.{step}")
    if R != 1:  # one step more
        start = time.monotonic()
        try:
            hvd.allreduce(torch.ones(2), name="after.rank.1.left")
            print(f"rank {R}: NOT DETECTED")
        except hvd.CommError as e:
            print(f"rank {R}: FAILED after {time.monotonic() - start:.1f} s: {e}")

elif mode == "barrier_early_end":  # rank 1 leaves without the last barrier: the others' fails at once
    hvd.barrier()
    if R != 1:
        start = time.monotonic()
        try:
            hvd.barrier()
            print(f"rank {R}: NOT DETECTED")
        except hvd.CommError as e:
            print(f"rank {R}: FAILED after {time.monotonic() - start:.1f} s: {e}")

elif mode == "barrier_stall":  # run with PIPEDAP_STALL_SECONDS=1: rank 1 is late to a barrier, then all finish
    if R == 1:
        time.sleep(3)
    hvd.barrier()
    print(f"rank {R}: passed the barrier")

elif mode == "stall":  # run with PIPEDAP_STALL_SECONDS=1: rank 1 is late, then all finish
    if R == 1:
        time.sleep(3)
    print(f"rank {R}: result {hvd.allreduce(torch.ones(2), op=hvd.Sum, name='late.op').tolist()}")

elif mode == "timeout":  # run with PIPEDAP_TIMEOUT_SECONDS=2: rank 1 never joins
    if R == 1:
        time.sleep(120)
    hvd.allreduce(torch.ones(2), name="abandoned.op")
    print(f"rank {R}: NOT ABORTED")

elif mode == "sanitizer":  # under comm_core/sanitized_build.py's environment
    with open("/proc/self/maps") as maps:
        mapped = maps.read()
    print(f"rank {R}: core {core.__file__} asan {'libasan' in mapped}", flush=True)
    if R == 0:  # the preloaded runtime checks every free in the process: this must abort
        import ctypes

        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        block = libc.malloc(16)
        libc.free(ctypes.c_void_p(block))
        libc.free(ctypes.c_void_p(block))
        print(f"rank {R}: NOT CAUGHT", flush=True)

elif mode == "mpi4py":  # mpi4py and comm_core share one libmpi in one process
    from mpi4py import MPI

    assert MPI.Get_library_version() == core.mpi_library_version()
    with open("/proc/self/maps") as maps:
        libs = {m.group(0) for m in re.finditer(r"\S*libmpi\.so[.\d]*", maps.read())}
    assert len(libs) == 1, f"more than one libmpi loaded: {libs}"
    assert MPI.COMM_WORLD.allreduce(R) == P * (P - 1) // 2
    assert hvd.allreduce(torch.tensor([float(R)]), op=hvd.Sum).item() == P * (P - 1) / 2
    print(f"rank {R}: one libmpi {libs.pop()} thread level {MPI.Query_thread()} OK")

else:
    sys.exit(f"unknown mode {mode}")
sys.stdout.flush()
