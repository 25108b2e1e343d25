"""The comparison's subprocesses: start a run in its own process group, bound it by a deadline,
and read its log afterwards (the telling error line, the cores the ranks were pinned to).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipedap.tools.processes import stop_process_group


@dataclass
class Job:
    """A finished (or stopped) subprocess: exit status, duration, where its output went."""

    command: list[str]
    returncode: int
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, chars: int = 3000) -> str:
        """The end of its output, for the record of a failure."""
        return self.log.read_text(errors="replace")[-chars:]


def start_job(command: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, float]:
    """Start ``command`` in its own process group with stdout and stderr into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, time.perf_counter()


def finish_job(proc: subprocess.Popen, started: float, deadline: float, log: Path) -> Job:
    """Wait until ``deadline`` (perf_counter); then stop the whole process group (exit 124)."""
    try:
        returncode = proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        returncode = 124
    finally:
        stop_process_group(proc)  # timeout or Ctrl-C: stop mpirun and its ranks
    seconds = time.perf_counter() - started
    if returncode == 124:
        with log.open("a") as out:
            out.write(f"\n[pipedap.tools.compare] stopped after {seconds:.0f} s: over its timeout\n")
    return Job(list(map(str, proc.args)), returncode, seconds, log)


def run_job(command: list[str], env: dict[str, str], log: Path, timeout: float) -> Job:
    """Run ``command`` to the end or for ``timeout`` seconds at most."""
    proc, started = start_job(command, env, log)
    return finish_job(proc, started, started + timeout, log)


def telling_line(text: str) -> str:
    """The line of a failure's output that says most: its last error line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("-")]
    errors = [line for line in lines if re.search(r"Error\b|Exception\b|error:|timeout", line)]
    return ((errors or lines)[-1] if lines else "no output")[:200]


def pinned_cores(log: Path) -> dict[str, int]:
    """rank -> core, as the testbed's pinning wrapper reported it in the run's output."""
    found = re.findall(r"\[pipedap\.tools\.testbed\.pin\] rank (\d+) on \S+ pinned to core (\d+)",
                       log.read_text(errors="replace"))
    return {rank: int(core) for rank, core in found}


def horovod_available() -> str | None:
    """Why Horovod cannot run here, or None when ``horovod.torch`` imports (checked in a subprocess)."""
    done = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, text=True,
                          timeout=120)
    return None if done.returncode == 0 else f"`import horovod.torch` failed: {telling_line(done.stderr)}"
