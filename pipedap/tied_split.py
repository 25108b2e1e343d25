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
   buffer is reduce-scattered at once, overlapping the rest of backward;
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
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

from pipedap import comm, engine
from pipedap.buckets import Bucket
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
                 tapping: Callable[[], bool], lock: threading.Lock):
        self.bucket, self.op, self.process_set = bucket, op, process_set
        self.tapping = tapping  # whether a contribution seen now is taken (the reducer syncs this step)
        self.lock = lock  # the reducer's: its submissions and this one's keep one order on every rank
        self.param = bucket.params[0]
        self.staging: torch.Tensor | None = None  # the tapped part, laid out as the bucket (made when first used)
        self.dense_shard: torch.Tensor | None = None  # its reduce-scattered block
        for module in users:
            module.register_forward_hook(self._tap)
        self.new_step()

    def new_step(self) -> None:
        self.taps_expected = 0  # hooks placed by this step's forward passes ...
        self.taps_seen = 0  # ... and those that fired, the taken ones copied into staging
        self.taken = 0
        self.dense_work: engine.Work | None = None
        self.rows_work: engine.Work | None = None
        self.combined = False

    # --- backward: the dense part ------------------------------------------------------

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
        if self.staging is None:
            self.staging = torch.zeros_like(self.bucket.buffer)
            self.dense_shard = torch.zeros_like(self.bucket.shard)
        flat = self.staging[: self.param.numel()]
        if self.taken == 0:
            flat.copy_(grad.reshape(-1))
        else:
            flat.add_(grad.reshape(-1))
        self.taken += 1
        if self.taps_seen == self.taps_expected:
            with self.lock:
                self._submit_dense()
        return tuple(None if i == slot else g for i, g in enumerate(grad_inputs))

    def _submit_dense(self) -> None:
        name = f"rs.{self.bucket.index}.dense"
        self.dense_work = engine.submit([engine.reducescatter_collective(self.staging, self.dense_shard, name, self.op,
                                                                         self.process_set)])

    # --- end of backward: the rows ----------------------------------------------------

    def submit_rows(self, used: bool) -> None:
        """The parameter's gradient is complete: all-gather its non-zero rows (and whether this rank used it).
        Called holding the reducer's lock."""
        if self.taken and self.dense_work is None:  # a forward whose graph never ran backward left a hook unfired
            self._submit_dense()
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
        if self.dense_work is not None:
            self.dense_work.wait()
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
        self.combined = True
