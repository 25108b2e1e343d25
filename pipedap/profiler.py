"""Measure a torch model's per-layer forward, backward and update times: the planner's Profile.

A layer is a module that owns trainable parameters (the unit the runtime buckets). Layers
are ordered by when the forward first calls them. Times are medians over `iterations`
measured iterations after `warmup` ones:

* forward: timestamps at each layer's first forward pre-hook (on CUDA, events: the GPU's
  clock, with nothing synchronised inside the iteration); a layer's time runs
  until the next layer starts (parameter-free modules after it, e.g. activations and
  pooling, count with it), the last layer's until the loss is computed;
* backward: the time at which each layer's gradients are all accumulated (post-accumulate
  hooks), differenced in backward order ([Note: backward attribution] in
  :func:`pipedap.planner.profile.layer_times`, shared with the online planner);
* update: the wrapped optimizer's step on copies of one layer's parameters and gradients,
  less the step's per-call part (the step on one one-element parameter), which is the
  profile's ``bucket_cost`` instead: the runtime pays it once per bucket, not per layer
  ([Note: a bucket's fixed cost] in pipedap.planner.profile). The reducer's own host work
  per bucket needs the comm core and is added by :func:`pipedap.measure.with_bucket_cost`;
* ties: the word embeddings tied to an output layer, with the most rows a batch looked up
  ([Note: ties in a profile] in pipedap.planner.profile). On the CPU, a plain ``nn.Linear``
  output layer (the only user) computes its weight gradient in pieces as the runtime does
  (pipedap.output_layer), and the tie gets when the first piece was ready before the output
  layer's gradients were (``early``) and from the first to the last (``span``); a tie is
  ``deferrable`` where the runtime could serve its lookup from the shards with this optimizer.

No MPI here: ranks agree on the numbers through the optional ``agree(profile) -> profile``
callable (e.g. the element-wise max of :func:`pipedap.planner.profile.elementwise_max`,
gathered by the comm layer).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from pipedap import settings, shard_update
from pipedap.buckets import group_by_module
from pipedap.output_layer import DENSE_PIECES, PieceTimer, plain_linear
from pipedap.planner.profile import Layer, Profile, layer_times
from pipedap.tied_embeddings import RowCounter, lookup_refusal

OptimizerFactory = Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer]

MAX_ITERATIONS = 200  # per phase, however short the batch


def _default_optimizer(params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _default_loss(output: Any, _target: Any) -> torch.Tensor:
    """Sum of the output (or of its first tensor): enough to time a backward."""
    while not isinstance(output, torch.Tensor):
        output = output[0]
    return output.float().sum()


def layers_of(model: nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters grouped by the module that registers them (tied ones once)."""
    owners = group_by_module((name, param) for name, param in model.named_parameters() if param.requires_grad)
    if not owners:
        raise ValueError("the model has no trainable parameters: nothing to profile")
    return owners


def profile_model(
    model: nn.Module,
    inputs: Any,
    targets: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    warmup: int = 2,
    iterations: int = 5,
    min_seconds: float = 0.0,
    optimizer_factory: OptimizerFactory = _default_optimizer,
    agree: Callable[[Profile], Profile] | None = None,
    meta: dict | None = None,
) -> Profile:
    """Profile one training iteration of `model` on (`inputs`, `targets`).

    `inputs` is passed as ``model(inputs)`` (a tuple is unpacked); the loss is
    ``loss_fn(output, targets)`` (default: the sum of the output). Gradients are left
    cleared; parameters are not changed (updates are timed on copies). The profile's meta
    says how many iterations were warm-up and how many measured.
    """
    if iterations < 1 or warmup < 0 or not min_seconds >= 0:
        raise ValueError(f"need iterations >= 1, warmup >= 0 and min_seconds >= 0, "
                         f"got {iterations}, {warmup}, {min_seconds}")
    loss_fn = loss_fn or _default_loss
    owners = layers_of(model)
    modules = dict(model.named_modules())
    cuda = any(p.is_cuda for params in owners.values() for _, p in params)
    clock = _Clock(cuda)

    def now() -> float:  # the update's timer: on CUDA, the step's kernels included
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    order: list[str] = []  # owners in first-call order, fixed by the first iteration
    called: dict[str, Any] = {}  # clock marks
    ready: dict[str, Any] = {}
    handles = []
    for owner in owners:
        def pre_hook(_module: nn.Module, _args: Any, owner: str = owner) -> None:
            if owner not in called:
                called[owner] = clock.mark()

        handles.append(modules[owner].register_forward_pre_hook(pre_hook))
        for _, param in owners[owner]:
            def grad_hook(_param: torch.Tensor, owner: str = owner) -> None:
                ready[owner] = clock.mark()  # the last parameter of the layer to finish wins

            handles.append(param.register_post_accumulate_grad_hook(grad_hook))

    samples: dict[str, list[list[float]]] = {"tf": [], "tb": []}
    rows = RowCounter(model)  # the ties' rows ([Note: ties in a profile])
    timers = {} if cuda else {p: PieceTimer(users[0], time.perf_counter) for p, (_, users) in rows.tied.items()
                              if len(users) == 1 and plain_linear(users[0], p)}
    owner_of = {name: owner for owner, params in owners.items() for name, _ in params}
    user_of = {p: owner_of.get(rows.tie(p).user) for p in timers}  # the layer holding the output layer's other params
    pieces: dict[torch.nn.Parameter, list[tuple[float, float]]] = {p: [] for p in timers}  # (early, span) per run
    model.train()
    try:
        for step, measured in enumerate(_phases(warmup, iterations, min_seconds)):
            called.clear()
            ready.clear()
            model.zero_grad(set_to_none=True)
            start = clock.mark()
            output = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            loss = loss_fn(output, targets)
            forward_end = clock.mark()
            loss.backward()
            if step == 0:
                order = _forward_order(owners, called)
            clock.settle()
            if measured:
                tf, tb = _layer_times(order, clock.since(start, called), clock.since(start, ready),
                                      clock.seconds(forward_end, start))
                samples["tf"].append(tf)
                samples["tb"].append(tb)
                for p, timer in timers.items():
                    user = user_of[p]
                    if timer.runs and user in ready:
                        first, last = timer.runs[-1]
                        pieces[p].append((ready[user] - first, last - first))
    finally:
        rows.remove()
        for timer in timers.values():
            timer.remove()
        for handle in handles:
            handle.remove()

    update = [_update_time(owners[o], optimizer_factory, warmup, iterations, now) for o in order]
    first = owners[order[0]][0][1]
    call = _update_time([("call", torch.zeros(1, dtype=first.dtype, device=first.device))],
                        optimizer_factory, warmup, iterations, now)
    model.zero_grad(set_to_none=True)
    layers = tuple(
        Layer(
            name=owner,
            params=tuple(name for name, _ in owners[owner]),
            nbytes=sum(p.numel() * p.element_size() for _, p in owners[owner]),
            tf=statistics.median(run[i] for run in samples["tf"]),
            tb=statistics.median(run[i] for run in samples["tb"]),
            u=max(0.0, update[i] - call),
        )
        for i, owner in enumerate(order)
    )
    measured_runs = len(samples["tf"])
    info = {"warmup": step + 1 - measured_runs, "iterations": measured_runs,
            "device": "cuda" if cuda else "cpu", "update_call_s": call, **(meta or {})}
    ties = tuple(dataclasses.replace(rows.tie(p).timed(pieces.get(p, []), DENSE_PIECES),
                                     deferrable=_deferrable(embedding, p, optimizer_factory))
                 for p, (embedding, _) in rows.tied.items() if p in rows.name_of)
    profile = Profile(layers, info, bucket_cost=call, ties=ties)
    return agree(profile) if agree else profile


def _deferrable(embedding: nn.Module, param: torch.nn.Parameter, optimizer_factory: OptimizerFactory) -> bool:
    """Whether the runtime could serve the lookup of ``embedding`` from the shards with this optimizer
    ([Note: the lookup served from the shards] in pipedap/tied_lookup.py)."""
    if not settings.get("PIPEDAP_TIED_DEFER"):
        return False
    probe = optimizer_factory([param.detach().clone().requires_grad_(True)])
    return not lookup_refusal(embedding, param, shard_update.elementwise_rule(probe))


def _phases(warmup: int, iterations: int, min_seconds: float) -> Iterator[bool]:
    """For each iteration to run, whether it is measured: first the warm-up (False), then the
    measured ones (True). A phase of n > 0 iterations runs at least n, and more while it has
    taken less than `min_seconds` of the host's clock, up to MAX_ITERATIONS."""
    for count, measured in ((warmup, False), (iterations, True)):
        began, done = time.perf_counter(), 0
        while done < count or (count and done < MAX_ITERATIONS and time.perf_counter() - began < min_seconds):
            yield measured
            done += 1


class _Clock:
    """The timestamps of one profiled iteration, read as seconds once it is over.

    On the CPU, the host's clock. On CUDA, events recorded on the current stream: the GPU's
    clock, when it reached the hook's point. Synchronising at every hook instead would hold
    the host's launches until the kernels before them finished, an overlap that training has.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def settle(self) -> None:
        """Wait until every mark of the iteration can be read."""
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, mark: Any, origin: Any) -> float:
        """From `origin` to `mark` (both from :meth:`mark`, after :meth:`settle`)."""
        return origin.elapsed_time(mark) / 1e3 if self.cuda else mark - origin

    def since(self, origin: Any, marks: dict[str, Any]) -> dict[str, float]:
        """:meth:`seconds` of every mark in `marks`, keys kept."""
        return {key: self.seconds(mark, origin) for key, mark in marks.items()}


def _forward_order(owners: dict[str, list], called: dict[str, Any]) -> list[str]:
    """Owners in the order the forward first called them (`called`'s insertion order); all must
    have been called."""
    unused = [owner for owner in owners if owner not in called]
    if unused:
        raise ValueError(
            f"module(s) {unused[:3]} own trainable parameters but never ran in forward; "
            f"freeze them (requires_grad=False) or pass a batch that uses them"
        )
    return list(called)


def _layer_times(
    order: list[str], called: dict[str, float], ready: dict[str, float], forward_end: float
) -> tuple[list[float], list[float]]:
    """Per-layer forward and backward times of one iteration (layers in forward order), from hook
    times in seconds since the iteration started.

    :func:`pipedap.planner.profile.layer_times` with the first layer's forward from the start, 0
    (what runs before its pre-hook counts with it); every layer must have a gradient.
    """
    missing = [owner for owner in order if owner not in ready]
    if missing:
        raise ValueError(
            f"parameters of {missing[:3]} got no gradient; the loss does not depend on them: "
            f"freeze them (requires_grad=False) or use a loss that does"
        )
    spans = {i: (called[owner], called[owner]) for i, owner in enumerate(order)}
    spans[0] = (0.0, 0.0)
    return layer_times(len(order), spans, forward_end, {i: ready[owner] for i, owner in enumerate(order)})


def _update_time(
    params: list[tuple[str, torch.Tensor]],
    optimizer_factory: OptimizerFactory,
    warmup: int,
    iterations: int,
    now: Callable[[], float],
) -> float:
    """Median time of the optimizer's step on copies of one layer's parameters and grads."""
    copies = []
    for _, param in params:
        copy = param.detach().clone().requires_grad_(True)
        copy.grad = param.grad.detach().clone() if param.grad is not None else torch.zeros_like(copy)
        copies.append(copy)
    optimizer = optimizer_factory(copies)
    times = []
    for step in range(warmup + iterations):
        start = now()
        optimizer.step()
        if step >= warmup:
            times.append(now() - start)
    return statistics.median(times)
