"""Tied embeddings reduced in two parts: the output layer's gradient early, the lookup's rows late.

[Note: tied embeddings]
A language model's word-embedding matrix is often also its output layer's weight (BERT's
masked-LM decoder, GPT-2's LM head). Its gradient has two parts that arrive at opposite ends
of backward: the output layer's, dense, first; the lookup's, non-zero only in the rows of the
batch's tokens, last. Autograd sums them into one ``.grad`` at the very end, so a plain
reducer reduce-scatters the whole matrix (94 MB for BERT-base) after backward, and the next
forward's lookup waits for that and for the all-gather behind it.

For a parameter registered by an ``nn.Embedding`` and by other modules, alone in its bucket,
where the plan splits it (``Plan.split``: the planner's timeline found the split faster), the
reducer instead:

1. *taps* each other module's contribution in backward: a forward hook finds the autograd
   node that feeds the module's output gradient into the parameter and hooks it; in
   backward the hook copies the contribution into a staging buffer and passes nothing on
   to the parameter. When every tapped contribution of the step has come, the staging
   buffer is reduce-scattered, overlapping the rest of backward (an ``nn.Linear`` output
   layer computes its contribution itself, and sends it in pieces as it goes: [Note: the
   dense part in pieces]);
2. when the parameter's gradient is complete (the lookup's rows, plus whatever ``.grad``
   held before this backward), all-gathers its non-zero rows with their indices (a few MB);
3. before the bucket's all-gather, writes the reduce-scattered dense part into this rank's
   shard and adds the gathered rows that fall into it: the shard then holds exactly what
   reducing the summed gradient gives, and the all-gather and the update run unchanged.

Every rank submits the same operations in the same order (the tap fires at the same point
of every rank's backward). A rank whose forward used the output layer while another's did
not submits an operation the others do not: the engine's agreement check raises CommError
on every rank, naming both. ``PIPEDAP_TIED_SPLIT=0`` turns the split off.
Which parameters qualify: :mod:`pipedap.tied_embeddings`.

[Note: the dense part in pieces]
BERT-base's decoder takes about a second of backward on a CPU core, half of it for the weight's
94 MB gradient, and the link has nothing else to send meanwhile: every other gradient comes
after the decoder's. So a plain ``nn.Linear`` output layer runs as
:class:`pipedap.output_layer.PiecewiseLinear`, whose backward computes the weight's gradient in
``DENSE_PIECES`` blocks, before the input's gradient, and reduce-scatters
each block as soon as it is staged. For the blocks to land in the bucket's shards, the staging
buffer is laid out piece-major: piece k holds, for each rank r in turn, elements
``r * S + bounds[k]`` to ``r * S + bounds[k + 1]`` of the bucket (S: the shard size), so that
reduce-scattering piece k gives this rank ``dense_shard[bounds[k]:bounds[k + 1]]``. A tap that
gets its contribution whole (a node hook) stages every piece at once, in the same layout.
Where the plan does not split, the layer still computes its gradient in blocks (handed to
autograd as one tensor), so that the online planner measures when the pieces would be ready
(the tie's ``early`` and ``span``: [Note: ties in a profile]). Under autocast the layer runs
``F.linear`` (which computes in the autocast type) and is tapped whole.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pipedap import comm, engine
from pipedap.buckets import Bucket
from pipedap.output_layer import (
    DENSE_PIECES,
    PiecewiseLinear,
    autocasting,
    plain_linear,
    weight_gradient_in_pieces,
)
from pipedap.process_sets import ProcessSet

MAX_TAP_DEPTH = 8  # autograd nodes between a module's output and the parameter (F.linear: 2 or 3)


def _feeding_edges(outputs: list[torch.Tensor], stop: set, target) -> list[tuple[object, int]]:
    """``(node, slot)`` for every autograd node within MAX_TAP_DEPTH of ``outputs`` whose input ``slot``
    is ``target`` (a parameter's gradient accumulator); the search does not enter ``stop`` (the
    graphs of the module's inputs, which lead to the parameter's other uses)."""
    found, seen = [], set()
    frontier = [(t.grad_fn, 0) for t in outputs]
    while frontier:
        node, depth = frontier.pop()
        if node is None or node in seen or node in stop or depth > MAX_TAP_DEPTH:
            continue
        seen.add(node)
        for slot, (following, _) in enumerate(node.next_functions):
            if following is target:
                found.append((node, slot))
            else:
                frontier.append((following, depth + 1))
    return found


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class TiedSplit:
    """One tied parameter's two-part reduction ([Note: tied embeddings])."""

    def __init__(self, bucket: Bucket, users: list[torch.nn.Module], *, op, process_set: ProcessSet,
                 tapping: Callable[[], bool], lock: threading.Lock,
                 on_pieces: Callable[[float, float], None] | None = None):
        self.bucket, self.op, self.process_set = bucket, op, process_set
        self.tapping = tapping  # whether a contribution seen now is taken (the reducer syncs this step)
        self.lock = lock  # the reducer's: its submissions and this one's keep one order on every rank
        self.on_pieces = on_pieces  # told when an output layer's first and last pieces were ready (monotonic s)
        self.param = bucket.params[0]
        # an output layer's product (F.linear's arguments); a deferred group's computes its own rows first
        # ([Note: the output layer's own rows first] in pipedap/tied_lookup.py)
        self.product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = F.linear
        self.outputs: list[torch.nn.Module] = []  # the plain nn.Linear output layers, which use it
        self.staging: torch.Tensor | None = None  # the tapped part, piece-major (made when first used)
        self.dense_shard: torch.Tensor | None = None  # its reduce-scattered block
        shard = bucket.shard.numel()
        count = min(DENSE_PIECES, shard)
        self.bounds = [round(k * shard / count) for k in range(count + 1)]  # pieces within a shard
        for module in users:
            if plain_linear(module, self.param):
                module.forward = functools.partial(self.linear, module)
                self.outputs.append(module)
            else:
                module.register_forward_hook(self._tap)
        self.new_step()

    def new_step(self) -> None:
        self.taps_expected = 0  # contributions this step's forward passes will send ...
        self.taps_seen = 0  # ... and those that came, the taken ones staged
        self.taken = 0
        self.dense_works: list[engine.Work] = []  # the pieces submitted, in order
        self.rows_work: engine.Work | None = None
        self.combined = False
        self.used = False

    # --- backward: the dense part ------------------------------------------------------

    def linear(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Forward of a plain ``nn.Linear`` output layer ([Note: the dense part in pieces])."""
        if not (torch.is_grad_enabled() and self.param.requires_grad):
            return self.product(x, module.weight, module.bias)
        if autocasting(x.device.type):  # autocast's linear casts and its backward casts back: tap it whole
            output = self.product(x, module.weight, module.bias)
            self._tap(module, (x,), output)
            return output
        take = self.tapping()
        self.taps_expected += take
        return PiecewiseLinear.apply(x, module.weight, module.bias, self, take)

    def output_layer_backward(self, grad2d: torch.Tensor, x2d: torch.Tensor, take: bool) -> torch.Tensor | None:
        """The output layer's weight gradient (``grad2d.T @ x2d``), block by block: staged and sent when
        ``take``, else returned to autograd."""
        times = []
        if not take:
            grad, times = weight_gradient_in_pieces(grad2d, x2d)
        else:
            self.taps_seen += 1
            self._take(lambda lo, hi: grad2d[:, lo:hi].t() @ x2d, times)
            grad = None
        if self.on_pieces is not None:
            self.on_pieces(times[0], times[-1])
        return grad

    def _tap(self, module: torch.nn.Module, args, output) -> None:
        """Forward hook of an output layer: hook the nodes through which its gradient reaches the parameter."""
        if not (torch.is_grad_enabled() and self.param.requires_grad and self.tapping()):
            return
        outputs = [t for t in _tensors(output) if t.grad_fn is not None]
        if not outputs:
            return
        accumulator = self.param.view_as(self.param).grad_fn.next_functions[0][0]
        stop = {t.grad_fn for t in _tensors(args) if t.grad_fn is not None}
        for node, slot in _feeding_edges(outputs, stop, accumulator):
            node.register_hook(functools.partial(self._dense_ready, slot))
            self.taps_expected += 1

    def _dense_ready(self, slot: int, grad_inputs: tuple, grad_outputs: tuple):
        """Node hook in backward: take the contribution for the parameter (unless this step does not sync)."""
        self.taps_seen += 1
        grad = grad_inputs[slot]
        if grad is None or not self.tapping():
            return None
        grad = grad.reshape(self.param.shape)
        self._take(lambda lo, hi: grad[lo:hi])
        return tuple(None if i == slot else g for i, g in enumerate(grad_inputs))

    def _take(self, rows: Callable[[int, int], torch.Tensor], times: list[float] | None = None) -> None:
        """Stage a contribution (counted in ``taps_seen``) piece by piece, ``rows(lo, hi)`` giving its rows; the
        step's last contribution submits each piece as soon as it is staged. ``times`` gets when each was."""
        last = self.taps_seen == self.taps_expected
        for k in range(len(self.bounds) - 1):
            self._stage(k, rows)
            if last:
                with self.lock:
                    self._submit(k)
            if times is not None:
                times.append(time.monotonic())
        self.taken += 1

    def _stage(self, k: int, rows: Callable[[int, int], torch.Tensor]) -> None:
        """Copy (the step's first contribution) or add piece ``k`` of a contribution into the staging buffer;
        ``rows(lo, hi)`` gives its rows lo..hi."""
        if self.staging is None:
            self.staging = torch.zeros_like(self.bucket.buffer)
            self.dense_shard = torch.zeros_like(self.bucket.shard)
        members, shard, columns, numel = self.process_set.size(), self.bucket.shard.numel(), self.param.shape[1], \
            self.param.numel()
        lo, hi = self.bounds[k], self.bounds[k + 1]
        for r in range(members):
            first, last = r * shard + lo, min(r * shard + hi, numel)  # the parameter's elements in rank r's block
            if first >= last:
                continue
            row = first // columns
            values = rows(row, -(-last // columns)).reshape(-1)[first - row * columns:last - row * columns]
            at = members * lo + r * (hi - lo)
            target = self.staging[at:at + last - first]
            if self.taken:
                target.add_(values)
            else:
                target.copy_(values)

    def _submit(self, k: int) -> None:
        members, lo, hi = self.process_set.size(), self.bounds[k], self.bounds[k + 1]
        name = f"rs.{self.bucket.index}.dense.{k}"
        self.dense_works.append(engine.submit([engine.reducescatter_collective(
            self.staging[members * lo:members * hi], self.dense_shard[lo:hi], name, self.op, self.process_set)]))

    # --- end of backward: the rows ----------------------------------------------------

    def submit_rows(self, used: bool) -> None:
        """The parameter's gradient is complete: all-gather its non-zero rows (and whether this rank used it).
        Called holding the reducer's lock."""
        if self.taken:  # a forward whose graph never ran backward left a contribution unsent
            for k in range(len(self.dense_works), len(self.bounds) - 1):
                self._submit(k)
        grad = self.bucket.grads[0]
        rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
        values = grad.index_select(0, rows)
        flag = torch.tensor([1 if used else 0], dtype=grad.dtype, device=grad.device)
        g = self.bucket.index
        self.rows_work = comm.allgather_work([rows, values, flag], [f"rows.{g}", f"rowvalues.{g}", f"used.{g}"],
                                             self.process_set)

    def combine(self) -> None:
        """Make this rank's shard the reduced gradient: the dense part's block plus the gathered rows in it."""
        if self.combined:
            return
        b = self.bucket
        rows, values, used = self.rows_work.wait()
        if self.dense_works:
            for work in self.dense_works:
                work.wait()
            b.shard.copy_(self.dense_shard)
        else:
            b.shard.zero_()
        scale = 1.0 / self.process_set.size() if self.op == engine.Average else 1.0
        columns, start, n = self.param.shape[1], b.shard_start, b.shard.numel()
        first = rows * columns - start  # where each gathered row starts, relative to the shard
        inside = (first < n) & (first + columns > 0)
        positions = first[inside, None] + torch.arange(columns, device=rows.device)
        keep = (positions >= 0) & (positions < n)
        b.shard.index_add_(0, positions[keep], values[inside][keep], alpha=scale)
        flag_at = b.grad_numel - start  # the used flag ([Note: used flags] in pipedap.buckets)
        if 0 <= flag_at < n:
            b.shard[flag_at] = used.sum() * scale
        self.used = bool(used.sum() > 0)  # some rank made a gradient (pipedap/tied_lookup.py needs it)
        self.combined = True
