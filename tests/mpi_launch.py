"""Launch a script under mpirun for the multi-process tests, bounded in time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipedap.pipeline.driver import free_port
from pipedap.tools.processes import mpirun_path

SCRIPTS = Path(__file__).parent / "mpi_scripts"


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


def run_ranks(script: str, np: int, *args: str, timeout: float = 120, torch_env: bool = True
              ) -> list[subprocess.CompletedProcess]:
    """Start tests/mpi_scripts/<script> (or a path) as ``np`` processes without mpirun, as PipeDream's users do.

    Each runs in its own session with ``{rank}`` and ``{port}`` (a free port) in
    ``args`` filled in, and, with ``torch_env``, torchrun's environment (RANK,
    WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT). After ``timeout`` s every
    group is killed and the call fails with every rank's output. Returns each
    rank's exit code and output.
    """
    import tempfile
    import time

    port = str(free_port())
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("OMPI_", "PMI", "PMIX_")) and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    procs, logs = [], []
    for r in range(np):
        log = tempfile.TemporaryFile(mode="w+")
        env = dict(base, PYTHONUNBUFFERED="1")
        if torch_env:
            env.update(RANK=str(r), WORLD_SIZE=str(np), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        filled = [a.format(rank=r, port=port) for a in args]
        procs.append(subprocess.Popen([sys.executable, str(SCRIPTS / script), *filled], env=env, text=True,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    timed_out = [r for r, proc in enumerate(procs) if proc.poll() is None]
    for r in timed_out:
        os.killpg(procs[r].pid, signal.SIGKILL)
        procs[r].wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if timed_out:
        listing = "\n".join(f"--- rank {r} ---\n{out}" for r, out in enumerate(outputs))
        raise AssertionError(f"{script} {' '.join(args)}: ranks {timed_out} did not finish in {timeout} s:\n{listing}")
    return [subprocess.CompletedProcess(script, p.returncode, out) for p, out in zip(procs, outputs)]
