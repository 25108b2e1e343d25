"""Reading the pipeline training script's output (tests/mpi_scripts/pipeline_training.py), for both transports."""

import re


def worst(output: str, case: str, np: int) -> list[float]:
    """The case's worst relative difference on every rank (each rank must report it)."""
    found = dict(re.findall(rf"^CASE {re.escape(case)} rank (\d+) worst (\S+)$", output, re.M))
    assert sorted(map(int, found)) == list(range(np)), f"{case}: not every rank reported:\n{output}"
    return [float(v) for v in found.values()]
