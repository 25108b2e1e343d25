"""pipedap.heap: importing pipedap keeps freed memory for reuse ([Note: retained heap]); a setting turns it off."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# An SGD step with weight decay over two 40 MB parameters (above glibc's largest dynamic mmap
# threshold, 32 MiB): its temporaries are freed every step. Prints each step's minor page faults.
STEPS = """
import json, resource, torch
import pipedap
torch.set_num_threads(1)
params = [torch.nn.Parameter(torch.randn(10_000_000)) for _ in range(2)]
for p in params:
    p.grad = torch.randn_like(p)
opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "heap": pipedap.heap.describe()}))
"""


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PIPEDAP_RETAIN_HEAP", "GLIBC_TUNABLES")}
    return subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), capture_output=True, text=True,
                          timeout=120)


def steps(**env: str) -> dict:
    done = run(STEPS, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap settings are glibc's")
def test_a_step_reuses_its_freed_memory_and_glibcs_defaults_fault_it_in_again():
    kept, handed_back = steps(), steps(PIPEDAP_RETAIN_HEAP="0")
    assert kept["heap"].startswith("retained") and handed_back["heap"].startswith("glibc's defaults")
    pages = 40_000_000 // 4096  # one parameter's temporary
    assert min(handed_back["faults"][2:]) > pages, handed_back  # every step maps its temporaries again
    # once warm (the heap grows over the first 1-4 steps, depending on where glibc's top chunk lies), it serves
    # them: the median of the last 5 steps, as this VM's proactive reclaim (kdamond) may take pages back once
    assert sorted(kept["faults"][-5:])[2] < pages // 10, kept


def test_the_users_glibc_tunables_win():
    done = run("import pipedap; print(pipedap.heap.describe())", GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "as GLIBC_TUNABLES=glibc.malloc.mmap_max=0 sets it"


def test_a_bad_setting_keeps_glibcs_heap_says_why_and_the_settings_check_refuses_it():
    done = run("import pipedap; print(pipedap.heap.describe())", PIPEDAP_RETAIN_HEAP="yes")
    assert done.returncode == 0, done.stderr  # the checker below imports pipedap too
    assert done.stdout.strip() == ("glibc's defaults, not retained: PIPEDAP_RETAIN_HEAP='yes' is not 0 or 1 "
                                   "(python -m pipedap.settings --check)")
    check = subprocess.run([sys.executable, "-m", "pipedap.settings", "--check"], capture_output=True, text=True,
                           env=dict(os.environ, PIPEDAP_RETAIN_HEAP="yes"), timeout=60)
    assert check.returncode == 2 and "PIPEDAP_RETAIN_HEAP='yes': expected 0 or 1 (default 1)" in check.stderr
    assert "RuntimeWarning" not in check.stderr  # the package does not import pipedap.settings before it runs
    from pipedap import settings
    assert settings.SETTINGS["PIPEDAP_RETAIN_HEAP"].default == "1"  # heap.py reads it itself: unset means retain


def test_an_allocator_that_refuses_mallopt_keeps_its_own_policy_and_says_so(monkeypatch):
    """AddressSanitizer's malloc (the sanitized build's jobs) or a preloaded jemalloc answer mallopt with 0."""
    from pipedap import heap

    before = heap.describe()
    monkeypatch.setattr(heap, "_mallopt", lambda option, value: False)
    monkeypatch.setattr(heap, "_state", before)  # restored after the test
    monkeypatch.delenv("PIPEDAP_RETAIN_HEAP", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    if heap.platform.libc_ver()[0] != "glibc":
        pytest.skip("the heap settings are glibc's")
    assert heap.retain() == heap.describe() == "the preloaded allocator's own (it refused glibc's mallopt)"
