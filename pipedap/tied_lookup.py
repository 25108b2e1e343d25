"""A split tied embedding's lookup served from the reduce-scattered shards, its all-gather deferred.

[Note: the lookup served from the shards]
After a split tied embedding's reduction (pipedap/tied_split.py) each rank's shard of the bucket
holds the reduced gradient of one block of the matrix. The all-gather that makes it whole moves
94 MB for BERT-base, and the next forward's first module, the lookup, waits for it and for the
update behind it, although it needs only its batch's rows. Where the plan defers the group
(``Plan.defer``), ``step()`` issues, before the forward list (where the planner put the group's
all-gather late, right behind the output layer's):

1. a *fetch* of the rows every rank's next lookup needs: an all-reduce (max) of a one-byte-per-row
   mask, then an all-gather of the elements of those rows in each rank's shard. Shards are
   consecutive blocks, so the all-gather's output, in rank order, is the reduced gradient of the
   masked rows, row by row. Both are deferred submissions (``engine.submit_deferred``): the
   engine thread builds the mask when the fetch comes up, from the token ids this rank's lookup
   offers in its forward, waiting at most ``IDS_WAIT_SECONDS`` for them. A rank whose main thread
   waits for something else first (another module's forward, ``optimizer.state_dict()``, any
   blocking wait: ``engine.add_blocking_wait_hook``) declines at once and sends an empty mask.
   So no rank ever waits on another rank's main thread: every rank submits the same operations at
   ``step()``, and only what the mask holds depends on timing.
2. In the lookup's forward, with its ids in the fetch: the rows' reduced gradient (times the step's
   gradient scale) and a copy of the rows and of their optimizer state go through the wrapped
   optimizer's rule (``step_rows``); the lookup runs with the stepped rows written into the weight,
   and the old rows are put back after it. Without its ids in the fetch (declined, timed out) the
   lookup waits for the all-gather and the update, as an undeferred group does.
3. The output layer waits for the all-gather and applies the group's whole update (a plain
   ``nn.Linear`` after computing the rows of this rank's shard: [Note: the output layer's own rows
   first]; another in its forward pre-hook; the model's forward hook at the latest): every row then
   gets what single-process training gives, the rows stepped in 2. included (the same element-wise
   rule on the same numbers). Until then the weight is the old one: code that reads it outside the
   lookup and the output layer in between (rare) sees it stale; where autograd saved it for that
   use (a product with hidden states that need a gradient) the update in place makes backward raise
   ("modified by an inplace operation"), otherwise nothing says so: ``PIPEDAP_TIED_DEFER=0`` for
   such a model.
   A second lookup in the same forward finishes the group first.

Only an element-wise optimizer ([Note: element-wise optimizers] in pipedap/shard_update.py), a
plain ``nn.Embedding`` (its own forward, no ``max_norm``, dense gradients) on host tensors (the
engine thread builds the fetch) qualify; :func:`pipedap.tied_embeddings.lookup_refusal` says why
not, the tie is then not deferrable and the planner does not defer it (``PIPEDAP_TIED_DEFER=0``:
never).

[Note: the output layer's own rows first]
The deferred all-gather is the last of the forward phase, and where the link is the bottleneck
(BERT-base at 250 Mbit/s) the output layer waits for it and then computes its whole product
(0.8 s on a CPU core) while the link idles. But the rows of this rank's shard need nothing from
the link: their reduced gradient is in the shard since ``step()``. So a plain ``nn.Linear`` output
layer (its product is :meth:`ServedLookup.output`: [Note: the dense part in pieces] in
pipedap/tied_split.py) whose forward finds the group's all-gather still running computes the
columns of those rows first, from the rows stepped alone (as the lookup's are). Then, as the
all-gather delivers the other ranks' blocks (the engine reports what has arrived of a ring
all-gather: [Note: all-gather progress] in comm_core/src/op.h), it computes their rows the same
way, in ``OUTPUT_PIECES`` pieces per block, each once its rows are there, until the all-gather has
ended. Then it applies the group's whole update (the same numbers for the rows computed so far) and
computes the other rows (the last piece, and the few rows that straddle two blocks) from the
updated weight. So with N ranks only ``1 / (N * OUTPUT_PIECES)`` of the product waits for the link,
for the price of stepping the rows computed early twice. An output layer that finds the
all-gather ended, or packed (compressed: it arrives in ``wire``), computes as usual; one run by
MPI's algorithm delivers nothing before its end, so there only this rank's rows go first.
The plan puts the deferred all-gather in a submission of its own right after the output layer's
group's, so that the layers before it in that group (BERT's transform, the decoder's bias) need
not wait for it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
import torch.nn.functional as F

from pipedap import engine
from pipedap.engine import core
from pipedap.output_layer import autocasting
from pipedap.planner.profile import OUTPUT_PIECES
from pipedap.tied_split import TiedSplit

log = logging.getLogger("pipedap")

IDS_WAIT_SECONDS = 5.0  # how long the engine thread waits for this rank's lookup ids when the fetch comes up

# step_rows(parameter, rows, their reduced gradient) -> the rows as the pending update steps them
StepRows = Callable[[torch.nn.Parameter, torch.Tensor, torch.Tensor], torch.Tensor]


class ServedLookup:
    """One deferred tied embedding's fetch and lookup ([Note: the lookup served from the shards])."""

    def __init__(self, split: TiedSplit, embedding: torch.nn.Embedding, step_rows: StepRows,
                 finish: Callable[[], None], gathering: Callable[[], engine.Work | None]):
        self.split, self.embedding, self.step_rows, self.finish = split, embedding, step_rows, finish
        self.gathering = gathering  # the group's all-gather in flight, if the output layer can follow its progress
        self.param = split.param
        self._lock = threading.Lock()
        self._offered = threading.Event()
        self.ids: torch.Tensor | None = None  # this rank's distinct ids, as offered
        self.open = False  # a fetch is submitted and this rank has not offered or declined yet
        self.pending = False  # a fetch is submitted and the lookup has not used it yet
        self.sent: torch.Tensor | None = None  # the ids this rank's mask held (None: declined, or timed out)
        self.mask: torch.Tensor | None = None
        self.mask_work: engine.Work | None = None
        self.values: engine.Work | None = None
        self.served = 0  # lookups run on rows stepped alone (for tests and logs)
        self.used = False  # whether some rank made a gradient in the step fetched
        self.output_pending = False  # the group's update waits for its output layer (step() until finished)
        self.outputs_early = 0  # output layers run with their own rows first (for tests and logs)
        self.pieces_delivered = 0  # pieces of the other ranks' rows computed as the all-gather delivered them
        embedding.forward = self.lookup
        split.product = self.output

    # --- step(): the fetch -----------------------------------------------------------

    def submit_fetch(self) -> None:
        """Issue the fetch (``step()``, the split group combined, before the forward list)."""
        g, ps = self.split.bucket.index, self.split.process_set
        with self._lock:
            self.ids, self.sent, self.open, self.pending = None, None, True, True
            self._offered.clear()
        self.used = self.split.used  # (the split starts its next step before the lookup runs)
        self.output_pending = True
        mask_like = torch.empty(0, dtype=torch.uint8)
        self.mask_work = engine.submit_deferred([engine.unsized(core.OpKind.ALLREDUCE, f"fetch.{g}", mask_like, ps)],
                                                self._build_mask)  # (held: the engine uses its tensors)
        self.values = engine.submit_deferred(
            [engine.unsized(core.OpKind.ALLGATHER, f"fetchvalues.{g}", self.split.bucket.shard, ps)],
            self._build_values)

    def decline(self) -> None:
        """This rank's lookup will not offer ids this step: the engine thread need not wait for them."""
        self._offer(None)

    def _offer(self, ids: torch.Tensor | None) -> bool:
        with self._lock:
            if not self.open:
                return False
            self.ids, self.open = ids, False
        self._offered.set()
        return True

    def _build_mask(self) -> list[engine.Collective]:
        """Engine thread: the rows this rank looks up (waiting for its ids), to be or-ed over the ranks."""
        if not self._offered.wait(IDS_WAIT_SECONDS):
            self.decline()
            log.info("pipedap: the lookup of bucket %d did not offer its ids within %.0f s of its fetch: it waits "
                     "for the all-gather this step", self.split.bucket.index, IDS_WAIT_SECONDS)
        self.mask = torch.zeros(self.param.shape[0], dtype=torch.uint8)
        self.sent = self.ids
        if self.sent is not None:
            self.mask[self.sent] = 1
        g, ps = self.split.bucket.index, self.split.process_set
        return [engine.allreduce_collective(self.mask, self.mask, f"fetch.{g}", engine.Max, ps)]

    def _build_values(self) -> list[engine.Collective]:
        """Engine thread: the elements of the masked rows in this rank's shard, for an all-gather whose
        output is their reduced gradient, row by row."""
        b, ps, columns = self.split.bucket, self.split.process_set, self.param.shape[1]
        rows = self.mask.nonzero().squeeze(1)
        first, last = rows * columns, rows * columns + columns  # each row's elements: [first, last)
        shard, numel = b.shard.numel(), self.param.numel()
        counts = [int((last.clamp(max=min((r + 1) * shard, numel)) - first.clamp(min=r * shard)).clamp(min=0).sum())
                  for r in range(ps.size())]  # the masked elements in each rank's shard
        lo = b.shard_start
        inside = (last > lo) & (first < lo + shard)
        positions = (first[inside, None] + torch.arange(columns)).flatten() - lo
        mine = b.shard[positions[(positions >= 0) & (positions < min(shard, numel - lo))]]
        output = mine.new_empty(sum(counts))
        return [engine.collective(core.OpKind.ALLGATHER, f"fetchvalues.{b.index}", mine, output, counts,
                                  process_set=ps)]

    # --- forward: the lookup -----------------------------------------------------------

    def lookup(self, input: torch.Tensor) -> torch.Tensor:
        """The embedding's forward: with a fetch pending, on the stepped rows of this batch."""
        module = self.embedding
        if not self.pending:
            return torch.nn.Embedding.forward(module, input)
        self.pending = False
        served = self._serve(input)
        if served is None:
            self.finish()  # the whole all-gather and the update, as for an undeferred group
            return torch.nn.Embedding.forward(module, input)
        ids, stepped = served
        with torch.no_grad():
            old = self.param.index_select(0, ids)
            self.param.index_copy_(0, ids, stepped)
        try:
            return torch.nn.Embedding.forward(module, input)
        finally:
            with torch.no_grad():
                self.param.index_copy_(0, ids, old)

    def _serve(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(this batch's distinct ids, their rows stepped), or None if its ids are not in the fetch."""
        ids = torch.unique(input.reshape(-1))
        self._offer(ids)
        self.mask_work.wait()
        (values,) = self.values.wait()
        if self.sent is not ids:
            return None
        self.served += 1
        fetched = self.mask.nonzero().squeeze(1)
        return ids, self._stepped(ids, values.view(-1, self.param.shape[1])[torch.searchsorted(fetched, ids)])

    def _stepped(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The parameter's ``rows`` as the pending update will step them, ``grad`` their reduced gradient."""
        if not self.used:  # no rank made a gradient: the update leaves the parameter as it is
            return self.param.detach().index_select(0, rows)
        return self.step_rows(self.param, rows, grad)

    # --- forward: the output layer ------------------------------------------------------

    def output(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The output layer's product, ``F.linear(x, weight, bias)`` with the weight updated; where the group's
        update is still pending, the rows of this rank's shard first, then the other ranks' rows as the
        all-gather delivers them ([Note: the output layer's own rows first])."""
        if not self.output_pending:
            return F.linear(x, weight, bias)
        if weight is not self.param or autocasting(x.device.type):
            self.finish()
            return F.linear(x, weight, bias)
        gathering = self.gathering()
        if gathering is None or gathering.done():  # nothing to compute beside it
            self.finish()
            return F.linear(x, weight, bias)
        x2d, buffer, columns = x.reshape(-1, x.shape[-1]), self.split.bucket.buffer, self.param.shape[1]

        def product(rows: torch.Tensor, first: int, end: int) -> torch.Tensor:  # the columns of rows [first, end)
            return F.linear(x2d, rows, None if bias is None else bias[first:end])

        early = []  # (first row, end row, their columns), computed from the rows stepped alone
        for first, end, needed in self._pieces():
            if needed:
                gathering.wait_delivered(0, needed)
                if gathering.done():  # the rest from the updated weight: no need to step them alone
                    break
                self.pieces_delivered += 1
            stepped = self._stepped(torch.arange(first, end), buffer[first * columns:end * columns].view(-1, columns))
            early.append((first, end, product(stepped, first, end)))
        self.finish()  # the all-gather's end and the whole update: the rows of ``early`` become what they were stepped to
        self.outputs_early += 1
        parts, row = [], 0
        for first, end, y in sorted(early, key=lambda piece: piece[0]):
            if row < first:  # rows between two pieces (they straddle two blocks): from the updated weight
                parts.append(product(weight[row:first], row, first))
            parts.append(y)
            row = end
        if row < self.param.shape[0]:  # the rows no piece computed: from the updated weight
            parts.append(product(weight[row:], row, self.param.shape[0]))
        return torch.cat(parts, 1).view(*x.shape[:-1], -1)

    def _pieces(self) -> list[tuple[int, int, int]]:
        """The row ranges the output layer computes beside the all-gather, in the order it computes them, each with
        the bytes the all-gather must have delivered first: the rows wholly inside this rank's shard (0), then
        those wholly inside each other rank's block, in ``OUTPUT_PIECES`` pieces, in the order the ring delivers
        the blocks (ranks r-1, r-2, ...)."""
        bucket, ps, columns = self.split.bucket, self.split.process_set, self.param.shape[1]
        shard, numel, rank = bucket.shard.numel(), self.param.numel(), ps.rank()
        pieces, arrived = [], 0  # elements of the blocks received before this one
        for k in range(ps.size()):
            start = (rank - k) % ps.size() * shard
            first, end = -(-start // columns), min(start + shard, numel) // columns
            if k == 0:
                pieces.append((first, end, 0))
                continue
            cuts = [first + (end - first) * i // OUTPUT_PIECES for i in range(OUTPUT_PIECES + 1)]
            pieces += [(a, b, (arrived + b * columns - start) * bucket.buffer.element_size())
                       for a, b in zip(cuts, cuts[1:])]
            arrived += shard
        return [(a, b, needed) for a, b, needed in pieces if a < b]
