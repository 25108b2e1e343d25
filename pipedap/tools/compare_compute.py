"""The compute-only job of a comparison: ``python -m pipedap.tools.compare_compute BENCH-OPTIONS``.

It runs the benchmark's own timing loop (:func:`pipedap.tools.bench.run`, same model, batch,
optimizer and JSON) in one process that communicates nothing: a plain torch optimizer,
world size 1, no MPI. ``pipedap.tools.compare`` starts one copy per rank at the same time, each
pinned to that rank's core, so the cores are as busy as in the distributed run
(``docs/testbed.md``: the compute-only reference runs on both cores at once).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from pipedap.tools import bench
from pipedap.tools.bench_baselines import Distributed, Runtime


class LocalRuntime(Runtime):
    """One process, no communication: the optimizer steps on this process's gradients alone."""

    name = "compute only"

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1

    def local_rank(self) -> int:
        return 0

    def barrier(self) -> None:
        """Nothing to wait for."""

    def allgather_object(self, obj: Any) -> list:
        return [obj]

    def distribute(self, model, optimizer, batch, loss, say) -> Distributed:
        return Distributed(model, optimizer, "one process, plain torch optimizer, no communication")

    def finish(self, optimizer) -> None:
        """Nothing pending: the plain optimizer updates in step()."""

    def shutdown(self) -> None:
        """Nothing was started."""


def main(argv: Sequence[str] | None = None) -> int:
    return bench.main(argv, LocalRuntime())


if __name__ == "__main__":
    sys.exit(main())
