"""Shared builders for the planner tests: hand-sized problems and seeded random ones."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from pipedap.planner.costmodel import AlphaBeta, CostModel, from_link
from pipedap.planner.profile import Layer, Profile, Tie
from pipedap.planner.simulator import Problem

HALF = AlphaBeta(1.0, 0.5)


def _make_problem(layers: Sequence[tuple[int, float, float, float]], half: AlphaBeta = HALF) -> Problem:
    """A problem from (nbytes, tf, tb, u) per group; RS = AG = `half`, AR = twice `half`."""
    profile = Profile(
        tuple(Layer(f"l{i}", (f"l{i}.weight",), m, tf, tb, u) for i, (m, tf, tb, u) in enumerate(layers))
    )
    cost = CostModel(4, rs=half, ag=half, ar=AlphaBeta(2 * half.a, 2 * half.b))
    return Problem(profile, cost)


def random_problem(rng: random.Random, size: int) -> Problem:
    """A random instance: link-bound, compute-bound or balanced, with skewed layer sizes."""
    workers = rng.choice([2, 4, 8, 16, 64])
    cost = from_link(workers, rng.choice([1.25e8, 1.25e9, 1.25e10]), rng.choice([0.0, 5e-6, 5e-5, 5e-4]))
    # Some instances have their big layers first (embeddings) or a forward much faster
    # than the backward, so that every term of the iteration time gets to be the binding one.
    big_first = rng.random() < 0.3
    fast_forward = rng.random() < 0.3
    layers = []
    for i in range(size):
        nbytes = int(10 ** rng.uniform(2, 7.5) * (30 if big_first and i < 2 else 1))
        tf = rng.uniform(1e-5, 5e-3)
        tb = tf * rng.uniform(1, 3) * (20 if fast_forward else 1)
        layers.append(Layer(f"l{i}", (f"l{i}.weight",), nbytes, tf, tb, rng.choice([0.0, tf / 10])))
    # Some have a tied embedding in group 0 whose dense part is ready with a later group ([Note: split
    # reductions in the timeline]), or with the first ready in backward (user ""), or part-way through its
    # backward, in pieces; half of them the runtime could defer ([Note: deferred all-gathers in the timeline]).
    ties = ()
    if size > 1 and rng.random() < 0.3:
        user = rng.choice(["", *(f"l{i}.weight" for i in range(1, size))])
        pieces = rng.choice([1, 1, 2, 8])  # sent whole, or in pieces during the output layer's backward
        ties = (Tie("l0.weight", user, int(layers[0].nbytes * rng.uniform(0.0, 0.2)),
                    early=0.0 if pieces == 1 else rng.uniform(0, 0.02), span=0.0 if pieces == 1 else rng.uniform(0, 0.01),
                    pieces=pieces, deferrable=rng.random() < 0.5),)
    return Problem(Profile(tuple(layers), ties=ties), cost, defer=any(tie.deferrable for tie in ties))


def random_options(rng: random.Random, problem: Problem) -> list[str]:
    """A random decoupled choice per group: F, B or M, but F where the AG must stay in the forward phase."""
    return ["F" if g in problem.fixed_forward else rng.choice("FBM") for g in range(problem.size)]


@pytest.fixture
def random_problems() -> Callable[[int, int, int], list[Problem]]:
    """``random_problems(count, min_groups, max_groups)``: seeded, so failures reproduce."""

    def build(count: int, low: int, high: int) -> list[Problem]:
        rng = random.Random(1234 + count * 7 + low * 31 + high)
        return [random_problem(rng, rng.randint(low, high)) for _ in range(count)]

    return build


@pytest.fixture
def make_problem() -> Callable[..., Problem]:
    """``make_problem([(nbytes, tf, tb, u), ...], half=AlphaBeta(1, 0.5))``: a hand-sized problem."""
    return _make_problem
