"""Single-process references for the pipeline tests, written from the semantics, not from the runtime.

``replay_1f1b`` replays PipeDream's 1F1B event order with explicit weight
versions: stage s of S forwards S - s minibatches before its first backward
(``extra`` more per later stage), then alternates one forward and one
backward, and updates after each backward.
A forward runs on a copy of the stage's latest weights (the version it used),
its backward differentiates with respect to that copy, and the gradient is
applied to the latest weights. The events of different stages are interleaved
in any order their data dependencies allow; the result does not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call


def stage_orders(num_stages: int, num_minibatches: int, extra: int = 0) -> list[list[tuple[str, int]]]:
    """Each stage's events, ("F" | "B", minibatch), from the 1F1B rule with ``extra`` more admitted per later stage."""
    orders = []
    for s in range(num_stages):
        warm_up = min((num_stages - s) + extra * (num_stages - 1 - s), num_minibatches)
        order = [("F", j) for j in range(warm_up)]
        for j in range(num_minibatches):
            order.append(("B", j))
            if warm_up + j < num_minibatches:
                order.append(("F", warm_up + j))
        orders.append(order)
    return orders


def replay_1f1b(stages: list[nn.Module], loss_fn: nn.Module, batches: list, make_optimizer: Callable,
                extra: int = 0) -> dict[tuple[int, int], int]:
    """Train ``stages`` in place as 1F1B with weight stashing would; returns the version each forward used."""
    num_stages, n = len(stages), len(batches)
    optimizers = [make_optimizer(list(stage.parameters())) for stage in stages]
    updates = [0] * num_stages
    activations: dict[tuple[int, int], torch.Tensor] = {}  # (stage, j): the output stage s sent on
    gradients: dict[tuple[int, int], torch.Tensor] = {}  # (stage, j): the gradient of stage s's input
    graphs: dict[tuple[int, int], tuple] = {}
    version_used: dict[tuple[int, int], int] = {}
    orders, done = stage_orders(num_stages, n, extra), [0] * num_stages

    def ready(s: int, kind: str, j: int) -> bool:
        if kind == "F":
            return s == 0 or (s - 1, j) in activations
        return s == num_stages - 1 or (s + 1, j) in gradients

    while any(done[s] < len(orders[s]) for s in range(num_stages)):
        runnable = [s for s in range(num_stages) if done[s] < len(orders[s]) and ready(s, *orders[s][done[s]])]
        if not runnable:
            raise RuntimeError("the 1F1B orders deadlock")
        s = runnable[0]
        kind, j = orders[s][done[s]]
        done[s] += 1
        if kind == "F":
            version = {name: p.detach().clone().requires_grad_() for name, p in stages[s].named_parameters()}
            x = batches[j][0] if s == 0 else activations[s - 1, j].detach().requires_grad_()
            out = functional_call(stages[s], version, (x,))
            if s == num_stages - 1:
                out = loss_fn(out, batches[j][1])
            else:
                activations[s, j] = out.detach()
            graphs[s, j] = (x, out, version)
            version_used[s, j] = updates[s]
        else:
            x, out, version = graphs.pop((s, j))
            out.backward(None if s == num_stages - 1 else gradients[s + 1, j])
            if s > 0:
                gradients[s, j] = x.grad
            for p, stashed in zip(stages[s].parameters(), version.values()):
                p.grad = stashed.grad
            optimizers[s].step()
            updates[s] += 1
    return version_used


def worst_relative_difference(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """max over tensors of max|ours - reference| / max|reference|."""
    return max(((p - q).abs().max() / q.abs().max().clamp_min(1e-300)).item() for p, q in zip(ours, reference))
