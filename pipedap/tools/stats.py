"""Statistics of timed iterations, shared by the benchmark and the comparison.

:func:`confidence` is the mean with its 95% interval (Student t); :func:`run_statistics`
turns one benchmark result into the time per batch and throughput the comparison reports,
from the steady-state iterations (see [Note: timing decoupled schedules] in
:mod:`pipedap.tools.compare`); :func:`rounds_statistics` does the same for the results of
one system's interleaved rounds, its interval from the rounds' means; :func:`paired_ratio`
compares two systems round by round.
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


def steady(seconds: Sequence[float]) -> list[float]:
    """The steady-state iterations: those between the window's first and last (its edges are
    not steady: see the note named above), or all of them when there are fewer than 3."""
    return list(seconds[1:-1]) if len(seconds) >= 3 else list(seconds)


def steady_statistics(seconds: Sequence[float]) -> tuple[float, float | None, float]:
    """(steady-state mean, half-width of its 95% interval, window mean) of timed iterations."""
    mean, ci95, _ = confidence(steady(seconds))
    return mean, ci95, statistics.fmean(seconds)


def batch_seconds(result: dict) -> list[float]:
    """A benchmark result's seconds per batch, one value per timed iteration."""
    return [it["seconds"] / result["batches_per_iter"] for it in result["per_iteration"]]


def run_statistics(result: dict) -> dict:
    """A benchmark result's time per batch and throughput (each with its interval), predicted vs measured."""
    mean, ci95, window = steady_statistics(batch_seconds(result))
    return _summary(result, mean, ci95, window, iterations=len(result["per_iteration"]),
                    predicted=result["batch_time"]["predicted_s"])


def rounds_statistics(results: Sequence[dict]) -> dict:
    """:func:`run_statistics` over one system's rounds (one benchmark result each, same settings).

    The time per batch is the mean of every round's steady-state iterations; its interval
    comes from the rounds' steady-state means (a round is a job of its own: its launch,
    warm-up, plan and neighbours vary with it, which the iterations inside one job do not
    show). With one round, :func:`run_statistics`.
    """
    if len(results) == 1:
        single = run_statistics(results[0])
        single["batch_s"]["rounds"] = 1
        return single
    seconds = [batch_seconds(r) for r in results]
    inner = [t for s in seconds for t in steady(s)]
    round_means = [statistics.fmean(steady(s)) for s in seconds]
    predictions = [r["batch_time"]["predicted_s"] for r in results]
    summary = _summary(results[0], statistics.fmean(inner), confidence(round_means)[1],
                       statistics.fmean(statistics.fmean(s) for s in seconds),
                       iterations=sum(map(len, seconds)),
                       predicted=statistics.fmean(predictions) if all(predictions) else None)
    summary["batch_s"].update(rounds=len(results), steady_iterations=len(inner), round_means=round_means)
    return summary


def round_throughputs(record: dict) -> dict[int, float]:
    """Samples per second of each successful round of one system's merged record, by round index."""
    return {r["round"]: _samples_per_batch(r["result"]) / statistics.fmean(steady(batch_seconds(r["result"])))
            for r in record.get("rounds", ()) if r["status"] == "ok"}


def paired_ratio(numerator: dict[int, float], denominator: dict[int, float]) -> dict | None:
    """The mean of ``numerator[k] / denominator[k]`` over the rounds k both have, with its 95% interval.

    Two systems in one round ran minutes apart on the same machine, so a round that
    is slow for everything (the machine's speed drifted by up to 24% between rounds)
    cancels out of their ratio: the ratio's interval is the one to judge a speedup by.
    None when no round has both.
    """
    common = sorted(set(numerator) & set(denominator))
    if not common:
        return None
    mean, ci95, _ = confidence([numerator[k] / denominator[k] for k in common])
    return {"mean": mean, "ci95": ci95, "rounds": len(common)}


def _samples_per_batch(result: dict) -> int:
    return result.get("samples_per_batch", result["world_size"] * result["batch_size"])


def _summary(result: dict, mean: float, ci95: float | None, window: float, iterations: int,
             predicted: float | None) -> dict:
    samples_per_batch = _samples_per_batch(result)
    return {"batch_s": {"mean": mean, "ci95": ci95, "iterations": iterations, "window_mean": window},
            "throughput": {"mean": samples_per_batch / mean,
                           "ci95": samples_per_batch / mean * ci95 / mean if ci95 is not None else None},
            "predicted_s": predicted, "predicted_over_measured": predicted / mean if predicted else None}
