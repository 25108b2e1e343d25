"""Sharded update (ZeRO stage 1): each rank updates only its reduce-scatter shard of every bucket.

After a bucket's reduce-scatter this rank's shard holds the averaged gradient of a
contiguous block of the bucket. With ``DistributedOptimizer(..., shard_update=True)``
the parameters live in a flat buffer laid out like the gradients ([Note: parameter
buffers] in buckets.py), and the wrapped optimizer steps *pieces*: for each parameter
that overlaps this rank's shard, a flat Parameter viewing its part of the parameter
buffer, with the same part of the gradient buffer as ``.grad``. So the update rule is
the user's, unchanged, on 1/N of the elements; ``optimizer.state`` holds state for the
pieces only (1/N of it); and the all-gather carries the updated parameters instead of
the gradients (the same bytes).

[Note: element-wise optimizers]
Stepping the pieces of a tensor separately equals stepping the tensor only if the
update of each element depends on that element alone (SGD, Adam, AdamW, RMSprop, ...).
LAMB/LARS trust ratios use the norm of the whole tensor, Adafactor factors its moments
over rows and columns, Muon orthogonalises matrices. Which rule an optimizer has is
tested, not listed: :func:`check_elementwise` steps a small matrix whole and in two flat
pieces, three times, with each param group's hyperparameters, and refuses the optimizer
at wrap time if the results differ (or a piece is refused).

[Note: rank-independent optimizer state]
A rank's state is a list of *ranges*: (parameter index, first element, end element, the
state of those elements), element-wise tensors flat. ``state_dict()`` gathers every
rank's ranges and assembles each parameter whole, in torch's format, so it loads at any
world size and into a plain torch optimizer; ``load_state_dict()`` cuts a whole state into
this rank's pieces. The sharded form (``sharded_state_dict()``) is this rank's ranges as
they are; loading all ranks' files at any world size assembles each new piece from the
ranges that cover it. A state entry is element-wise when it is a tensor shaped like its
range (flat, one value per element); anything else (Adam's ``step``) is the same on
every piece of a parameter and is taken from the first.
"""

from __future__ import annotations

import collections
import copy
from dataclasses import dataclass

import torch

from pipedap.buckets import Bucket

PROBE_SHAPE = (6, 5)  # a matrix, so that row/column-factored rules show themselves
PROBE_SPLIT = 11  # the flat pieces [0, 11) and [11, 30): neither a row boundary nor half
PROBE_STEPS = 3
SHARDED_FORMAT = "pipedap.sharded_optimizer_state"

# (parameter index, first element, end element, {state key: value}); element-wise values flat
StateRange = tuple[int, int, int, dict]


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that lies in this rank's shard of its bucket."""

    param: torch.nn.Parameter  # the model's parameter
    index: int  # its position in the optimizer's param_groups (torch's state_dict key)
    group: int  # its param group
    start: int  # its first element (of the flattened parameter) in this piece
    stop: int
    tensor: torch.nn.Parameter  # what the optimizer steps: a flat view of the parameter buffer


def pieces_of(bucket: Bucket, index_of: dict[int, int], group_of: dict[int, int]) -> list[Piece]:
    """This rank's pieces of ``bucket`` (its parameters already flattened into ``params_buffer``)."""
    low, high = bucket.shard_start, bucket.shard_start + bucket.shard.numel()
    offsets = bucket.offsets()
    pieces = []
    for i, p in enumerate(bucket.params):
        a, b = max(low, offsets[i]), min(high, offsets[i + 1])
        if a < b:
            tensor = torch.nn.Parameter(bucket.params_buffer[a:b])  # shares the buffer's storage
            tensor.grad = bucket.buffer[a:b]
            pieces.append(Piece(p, index_of[id(p)], group_of[id(p)], a - offsets[i], b - offsets[i], tensor))
    return pieces


# --- which optimizers can be sharded ------------------------------------------------------


def check_elementwise(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless every param group's update is element-wise ([Note: element-wise optimizers])."""
    name = type(optimizer).__name__
    for i, group in enumerate(optimizer.param_groups):
        generator = torch.Generator().manual_seed(i)
        start = torch.randn(PROBE_SHAPE, dtype=torch.float64, generator=generator)
        grads = [torch.randn(PROBE_SHAPE, dtype=torch.float64, generator=generator) for _ in range(PROBE_STEPS)]
        try:
            whole = _probe_steps(optimizer, group, [start.clone()], [[g] for g in grads])[0].flatten()
            flat = [start.flatten()[:PROBE_SPLIT].clone(), start.flatten()[PROBE_SPLIT:].clone()]
            split = [[g.flatten()[:PROBE_SPLIT], g.flatten()[PROBE_SPLIT:]] for g in grads]
            pieces = torch.cat(_probe_steps(optimizer, group, flat, split))
        except Exception as err:  # whatever the rule raises on a flat piece
            raise ValueError(
                f"shard_update=True: {name} (param group {i}) cannot step a flat piece of a parameter "
                f"({type(err).__name__}: {err}); use shard_update=False") from None
        if not torch.allclose(whole, pieces, rtol=1e-9, atol=1e-12):
            worst = (whole - pieces).abs().max().item()
            raise ValueError(
                f"shard_update=True: {name} (param group {i}) does not update element by element: stepping a "
                f"{PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} tensor whole and in two flat pieces differs by {worst:.3g} "
                "(its rule uses the whole tensor: a norm, a trust ratio, factored moments). Each rank would "
                "update its shard differently from single-process training; use shard_update=False")


def elementwise_rule(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group's rule is element-wise (:func:`check_elementwise` does not raise)."""
    try:
        check_elementwise(optimizer)
    except ValueError:
        return False
    return True


def _probe_steps(optimizer: torch.optim.Optimizer, group: dict, tensors: list[torch.Tensor],
                 grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Step ``tensors`` with ``optimizer``'s rule and ``group``'s options, on a copy with fresh state."""
    probe = copy.copy(optimizer)
    probe.state = collections.defaultdict(dict)
    probe.param_groups = [{**group, "params": tensors}]
    probe._optimizer_step_pre_hooks = collections.OrderedDict()
    probe._optimizer_step_post_hooks = collections.OrderedDict()
    for step_grads in grads:
        for t, g in zip(tensors, step_grads):
            t.grad = g.clone()
        type(optimizer).step(probe)
    return [t.detach() for t in tensors]


# --- the state, rank-independent ([Note: rank-independent optimizer state]) -----------------


def _elementwise(value, numel: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == numel


def ranges_of_pieces(pieces: list[Piece], state) -> list[StateRange]:
    """This rank's state as ranges (the pieces that have state)."""
    return [(pc.index, pc.start, pc.stop, dict(state[pc.tensor])) for pc in pieces if pc.tensor in state]


def ranges_of_params(state, index_of: dict[int, int]) -> list[StateRange]:
    """A torch optimizer's state (keyed by whole parameters) as ranges: element-wise entries flattened."""
    out = []
    for p, entries in state.items():
        flat = {k: v.flatten() if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                for k, v in entries.items()}
        out.append((index_of[id(p)], 0, p.numel(), flat))
    return out


def assemble(ranges: list[StateRange], index: int, start: int, stop: int) -> dict | None:
    """The state of elements [start, stop) of parameter ``index``, from the ranges that cover them.

    None if no range has state for that parameter (it was never stepped); an error if the
    ranges cover only part of it (a rank's part of a sharded checkpoint is missing).
    """
    over = sorted((r for r in ranges if r[0] == index and r[1] < stop and r[2] > start), key=lambda r: r[1])
    if not over:
        return None
    cursor = start
    for _, a, b, _ in [*over, (index, stop, stop, {})]:
        if a > cursor:  # a gap from cursor to a
            raise ValueError(f"optimizer state: elements {cursor}..{a} of parameter #{index} are in none of the "
                             "given parts; load the parts of every rank that saved them")
        cursor = max(cursor, b)
    state = {}
    for key, value in over[0][3].items():
        if _elementwise(value, over[0][2] - over[0][1]):
            parts, cursor = [], start
            for _, a, b, entries in over:
                if b > cursor:
                    parts.append(entries[key][cursor - a : min(b, stop) - a])
                    cursor = min(b, stop)
            state[key] = torch.cat(parts).clone()
        else:
            state[key] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
    return state


def whole_param_state(ranges: list[StateRange], index: int, param: torch.nn.Parameter) -> dict | None:
    """The state of a whole parameter, element-wise entries shaped like it (torch's format)."""
    state = assemble(ranges, index, 0, param.numel())
    if state is None:
        return None
    return {k: v.view(param.shape) if _elementwise(v, param.numel()) else v for k, v in state.items()}


def check_sharded_parts(parts: list[dict]) -> None:
    """Raise ValueError unless ``parts`` are the sharded states of every rank of one save."""
    if not parts:
        raise ValueError("load_sharded_state_dict: no parts given; pass the sharded_state_dict() of every rank")
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("format") != SHARDED_FORMAT:
            raise ValueError(f"load_sharded_state_dict: part {i} is not a sharded_state_dict() "
                             f"(key 'format' is not {SHARDED_FORMAT!r})")
    world = parts[0]["world_size"]
    ranks = sorted(part["rank"] for part in parts)
    if ranks != list(range(world)):
        raise ValueError(f"load_sharded_state_dict: the parts are of ranks {ranks}, but they were saved by "
                         f"{world} ranks; pass the part of every rank 0..{world - 1}")
