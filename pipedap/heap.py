"""Keep the memory a training process frees for reuse, instead of handing it back to the kernel.

[Note: retained heap]
PyTorch's CPU tensors come from glibc's malloc. A block above the mmap threshold (128 KiB,
rising with use up to 32 MiB) is mapped when it is allocated and unmapped when it is freed,
so every training step maps its large temporaries (the optimizer step's, the gradients,
activations) again, and the kernel zeroes each page on first touch. VGG-16's second
pipeline stage (its classifier) spent 26% of its cycles in the kernel, 13% zeroing pages,
and its SGD step took 1.2 s where it takes 0.22 s with the memory kept: a 2-stage 1F1B
run on this machine went from 4.44 to 3.30 s per minibatch, and on 2 emulated hosts from
4.39 to 3.98 s at 125 Mbit/s and from 4.14 to 3.74 s at 500 Mbit/s (two interleaved
rounds; benchmarks/results/pipeline_vs_dp). An SGD step over 3 x 80 MB faults 58,600
pages in every step with glibc's defaults and none once the heap is kept.

So importing pipedap sets, through ``mallopt``, what
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` would: no mmap
for the main heap (it grows instead) and no trimming below 2 GiB of free memory at its top
(``mallopt`` takes an int). The cost: a process keeps up to its high-water mark of memory,
which a training loop reaches again every step anyway. It applies from the import on, to
glibc's main heap (big blocks of threads' own arenas are still mapped). Not done when
``PIPEDAP_RETAIN_HEAP=0``, when the user's GLIBC_TUNABLES sets glibc.malloc tunables (theirs
win), where the C library is not glibc, or where another malloc is preloaded in glibc's
place (AddressSanitizer's, jemalloc: it refuses mallopt, and its own policy stands).
``describe()`` says which, and the benchmarks and main_with_runtime.py print it. A bad
value is not raised at import (the settings checker itself imports pipedap): the heap stays
glibc's, ``describe()`` names the problem, and ``init()`` and the settings check refuse it.
The variable is read here, not through :mod:`pipedap.settings` (which declares it, default
1): importing that module from the package's ``__init__`` would make ``python -m
pipedap.settings`` warn that the module was imported before it ran.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource

# [Note: warm memory]
# Even kept, the heap grows for several steps after the first, until it reaches its high-water
# mark: each block glibc has not handed out before is fresh pages to fault in. On the emulated
# cluster's VMs a minor fault costs about 18 us; BERT-base faulted 280 000, 60-90 000,
# 30-50 000 and 20-50 000 times in its steps 2 to 5, then about 12 times a step, and the
# faults landed in whatever allocated then (its masked-LM loss and its gradient, 125 MB each:
# 0.5-1.5 s instead of 0.05 s). A measurement of those steps measures the warm-up, so what
# times steps (the online planner's profile, the benchmark's timed batches) waits for a step
# in which no rank faulted in more than WARM_BYTES.
WARM_BYTES = 16 << 20

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest int mallopt takes

_state = "not applied: pipedap.heap.retain() was not called"


def retain() -> str:
    """Keep freed memory in this process's heap ([Note: retained heap]); say what was done."""
    global _state
    text = os.environ.get("PIPEDAP_RETAIN_HEAP", "").strip()
    if text not in ("", "0", "1"):  # reported, not raised (see the note)
        _state = (f"glibc's defaults, not retained: PIPEDAP_RETAIN_HEAP={text!r} is not 0 or 1 "
                  "(python -m pipedap.settings --check)")
    elif text == "0":
        _state = "glibc's defaults (PIPEDAP_RETAIN_HEAP=0): large freed blocks are unmapped"
    elif "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        _state = f"as GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']} sets it"
    elif platform.libc_ver()[0] != "glibc":
        _state = "the C library's defaults (not glibc: nothing to set)"
    elif not _mallopt(M_MMAP_MAX, 0) or not _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES):
        # a malloc preloaded in glibc's place (AddressSanitizer's, jemalloc, tcmalloc) answers mallopt with 0
        _state = "the preloaded allocator's own (it refused glibc's mallopt)"
    else:
        _state = "retained (freed memory is kept for reuse; PIPEDAP_RETAIN_HEAP=0 hands it back)"
    return _state


def _mallopt(option: int, value: int) -> bool:
    """glibc's mallopt in this process; True when the allocator took it."""
    return ctypes.CDLL(None).mallopt(option, value) == 1


def faulted_in_bytes() -> int:
    """Memory this process has faulted in without I/O so far (its minor page faults, every thread's), in bytes:
    the difference over a step is how much new memory it touched ([Note: warm memory])."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize()


def describe() -> str:
    """How this process's heap treats freed memory, for a job's opening lines."""
    return _state
