"""Pin an MPI rank to its own core, then run the real command: ``python -m pipedap.tools.testbed.pin -- CMD...``.

Each emulated host's launcher daemon would bind its rank to core 0 (so two
"hosts" share one core); mpirun runs with ``--bind-to none`` and this wrapper
sets the affinity to core ``rank mod cores`` *before* exec'ing the command, so
every thread that MPI, torch or the comm core start later inherits it.
The rank comes from ``OMPI_COMM_WORLD_RANK``; the cores are those this process
may run on (``os.sched_getaffinity``). The wrapper exports ``PIPEDAP_TESTBED_CORE``
and prints one line per rank to stderr so the affinity used is on record.
"""

from __future__ import annotations

import os
import socket
import sys


def core_for(rank: int, cores: list[int]) -> int:
    """The core for ``rank``: rank mod the number of usable cores."""
    return sorted(cores)[rank % len(cores)]


def main(argv: list[str]) -> None:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m pipedap.tools.testbed.pin -- COMMAND [ARGS...]")
    rank_text = os.environ.get("OMPI_COMM_WORLD_RANK")
    if rank_text is None:
        sys.exit("pipedap.tools.testbed.pin: OMPI_COMM_WORLD_RANK is not set: run it under Open MPI's mpirun")
    rank = int(rank_text)
    core = core_for(rank, list(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, {core})
    os.environ["PIPEDAP_TESTBED_CORE"] = str(core)
    print(f"[pipedap.tools.testbed.pin] rank {rank} on {socket.gethostname()} pinned to core {core}",
          file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
