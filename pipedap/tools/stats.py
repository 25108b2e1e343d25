"""Statistics of timed iterations, shared by the benchmark and the comparison.

:func:`confidence` is the mean with its 95% interval (Student t); :func:`run_statistics`
turns one benchmark result into the time per batch and throughput the comparison reports,
from the steady-state iterations (see [Note: timing decoupled schedules] in
:mod:`pipedap.tools.compare`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Two-sided 95% Student-t quantiles for 1..30 degrees of freedom; the normal 1.96 beyond.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)


def confidence(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, half-width of the 95% confidence interval of the mean, standard deviation).

    With one value there is no spread: None (null in the JSON, which has no NaN).
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    std = statistics.stdev(values)
    dof = len(values) - 1
    t = T95[dof - 1] if dof <= len(T95) else 1.96
    return mean, t * std / math.sqrt(len(values)), std


def steady_statistics(seconds: Sequence[float]) -> tuple[float, float | None, float]:
    """(steady-state mean, half-width of its 95% interval, window mean) of timed iterations.

    Steady state: the iterations between the window's first and last (its edges are not
    steady: see the note named above), or all of them when there are fewer than 3.
    """
    inner = list(seconds[1:-1]) if len(seconds) >= 3 else list(seconds)
    mean, ci95, _ = confidence(inner)
    return mean, ci95, statistics.fmean(seconds)


def run_statistics(result: dict) -> dict:
    """A benchmark result's time per batch and throughput (each with its interval), predicted vs measured."""
    mean, ci95, window = steady_statistics([it["seconds"] / result["batches_per_iter"]
                                            for it in result["per_iteration"]])
    samples_per_batch = result.get("samples_per_batch", result["world_size"] * result["batch_size"])
    predicted = result["batch_time"]["predicted_s"]
    return {"batch_s": {"mean": mean, "ci95": ci95, "iterations": len(result["per_iteration"]),
                        "window_mean": window},
            "throughput": {"mean": samples_per_batch / mean,
                           "ci95": samples_per_batch / mean * ci95 / mean if ci95 is not None else None},
            "predicted_s": predicted, "predicted_over_measured": predicted / mean if predicted else None}
