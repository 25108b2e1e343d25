"""The order in which one replica of a stage runs forwards, backwards and optimizer steps.

A *unit* is what flows through the pipeline as one piece: a minibatch (``1f1b``,
``no_pipelining``) or a micro-batch (``flush``). Units are numbered globally;
replica r of a stage of n ranks runs the units j with ``j % n == r``.

* ``1f1b`` (PipeDream, with weight stashing): a stage admits
  :func:`admitted` units before its first backward (S - s on stage s of S with one
  rank per stage, plus ``extra_in_flight`` per later stage), then alternates one
  forward and one backward, and steps after every backward.
* ``no_pipelining``: forward, backward, step, one unit at a time.
* ``flush``: each minibatch is m micro-batches, run in 1F1B order; gradients
  accumulate and the stage steps once, after the minibatch's last backward.

The event lists are pure functions of the config, so every rank can compute any
rank's order (the tests check them without MPI).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipedap.pipeline.config import PipelineConfig

SCHEDULES = ("1f1b", "no_pipelining", "flush")
FORWARD, BACKWARD, STEP = "forward", "backward", "step"


@dataclass(frozen=True)
class Event:
    kind: str  # FORWARD, BACKWARD or STEP
    unit: int = -1  # the global unit index (-1 for STEP)


def check(schedule: str, config: PipelineConfig, micro_batches: int, extra_in_flight: int = 0) -> None:
    """ValueError unless ``schedule`` can run on ``config`` with ``micro_batches`` and ``extra_in_flight``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    admitted(config, 0, extra_in_flight)  # its type and sign
    if extra_in_flight and schedule != "1f1b":
        raise ValueError(f"extra_in_flight={extra_in_flight} admits more units under 1F1B; schedule {schedule!r} "
                         "runs one unit at a time or flushes every minibatch: use schedule='1f1b' or "
                         "extra_in_flight=0")
    if schedule != "flush":
        if micro_batches != 1:
            raise ValueError(f"micro_batches={micro_batches} needs schedule='flush' (schedule {schedule!r} runs "
                             "whole minibatches)")
        return
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    for s in range(config.num_stages):
        n = len(config.ranks(s))
        if micro_batches % n:
            raise ValueError(f"flush: stage {s} has {n} replicas, which do not share micro_batches={micro_batches} "
                             f"evenly; choose micro_batches a multiple of {n}")


def check_length(schedule: str, config: PipelineConfig, num_minibatches: int) -> None:
    """ValueError unless every replica of every stage gets the same number of updates."""
    if num_minibatches < 0:
        raise ValueError(f"num_minibatches must be >= 0, got {num_minibatches}")
    if schedule == "flush":
        return
    for s in range(config.num_stages):
        n = len(config.ranks(s))
        if num_minibatches % n:
            raise ValueError(f"stage {s} has {n} replicas that update together, so num_minibatches must be a "
                             f"multiple of {n}, got {num_minibatches}")


def admitted(config: PipelineConfig, stage: int, extra_in_flight: int = 0) -> int:
    """Units a replica of ``stage`` forwards before its first backward under 1F1B.

    PipeDream's count: the ranks from this stage to the last, shared among this
    stage's replicas, rounded up (S - s with one rank per stage; 1 on the last stage),
    plus ``extra_in_flight`` for each stage after this one.

    [Note: extra units in flight]
    PipeDream's count keeps every stage busy when transfers take no time. When the
    activations and gradients between stages take as long as a stage's compute, stage s
    waits for the round trip of its first unit (both transfers and the later stages'
    compute) after every S - s units: 2 stages of 2.16 s with 0.82 s transfers ran a
    minibatch per 2.98 s instead of 2.16 s (benchmarks/results/pipeline_vs_dp). Extra
    units fill that wait with more forwards. They are counted per boundary: stage s
    forwards unit u + a_s right after the backward of u, so what lets stage s+1 find its
    next activation waiting is the difference a_s - a_{s+1}, which must cover a transfer
    each way and stage s's own compute; an extra unit on every stage alike would leave
    that difference at 1 (three stages whose middle one takes 1.5 s stayed 15% slow with
    any such count: ``tests/test_partition.py``). So each ``extra_in_flight`` adds one
    unit per later stage: S = 2 admits 2 + k, 1; S = 3 admits 3 + 2k, 2 + k, 1. Each
    unit costs one more stashed weight version and one more update of staleness on that
    stage; the last stage runs each backward right after its forward and admits 1.
    """
    if isinstance(extra_in_flight, bool) or not isinstance(extra_in_flight, int) or extra_in_flight < 0:
        raise ValueError(f"extra_in_flight must be an int >= 0 (units admitted beyond PipeDream's count), got "
                         f"{extra_in_flight!r}")
    downstream = sum(len(config.ranks(s)) for s in range(stage, config.num_stages))
    return -(-downstream // len(config.ranks(stage))) + extra_in_flight * (config.num_stages - 1 - stage)


def backward_passes_per_step(schedule: str, config: PipelineConfig, stage: int, micro_batches: int) -> int:
    """Backward passes a replica of ``stage`` accumulates into one update."""
    return micro_batches // len(config.ranks(stage)) if schedule == "flush" else 1


def one_f_one_b(units: list[int], admit: int) -> list[Event]:
    """``admit`` forwards, then one backward and one forward alternately, then the remaining backwards."""
    admit = min(admit, len(units))
    events = [Event(FORWARD, u) for u in units[:admit]]
    for k, unit in enumerate(units):
        events.append(Event(BACKWARD, unit))
        if admit + k < len(units):
            events.append(Event(FORWARD, units[admit + k]))
    return events


def events(schedule: str, config: PipelineConfig, stage: int, replica: int, num_minibatches: int,
           micro_batches: int = 1, extra_in_flight: int = 0) -> list[Event]:
    """Every event of ``replica`` of ``stage`` for ``num_minibatches`` minibatches, in order.

    ``extra_in_flight`` (1f1b only): units admitted beyond PipeDream's count ([Note: extra units in flight]).
    """
    n = len(config.ranks(stage))
    if schedule == "flush":
        out: list[Event] = []
        for t in range(num_minibatches):
            units = [t * micro_batches + u for u in range(replica, micro_batches, n)]
            out += one_f_one_b(units, admitted(config, stage)) + [Event(STEP)]
        return out
    units = list(range(replica, num_minibatches, n))
    if schedule == "no_pipelining":
        return [e for u in units for e in (Event(FORWARD, u), Event(BACKWARD, u), Event(STEP))]
    out = []
    for e in one_f_one_b(units, admitted(config, stage, extra_in_flight)):
        out += [e, Event(STEP)] if e.kind == BACKWARD else [e]
    return out


def stashes_weights(schedule: str, config: PipelineConfig, stage: int, extra_in_flight: int = 0) -> bool:
    """Whether a replica of ``stage`` updates its weights while units are in flight (1F1B, before the last stage)."""
    return schedule == "1f1b" and admitted(config, stage, extra_in_flight) > 1
