"""The reducer: runs a plan's gradient communication for one model, between optimizer and engine.

It owns the buckets (pipedap.buckets: the layout), one readiness tracker (which
gradients of this step are complete), the plan runner (issues the plan's
submissions in plan order as buckets become ready), the state of the step whose
updates are pending (gradient scale, hyperparameters) and the hand-off to the
online planner. It registers the hooks that drive it: a post-accumulate-grad
hook per parameter and a forward pre-hook per module that owns parameters.

A word embedding tied to an output layer, alone in its bucket, is reduced in two parts
(pipedap/tied_split.py, [Note: tied embeddings]) where the plan says so (``Plan.split``): the
runner then submits its rows where the plan has its reduce-scatter, and completes its shard
before its all-gather. Where the plan also defers it (``Plan.defer``), ``step()`` issues a fetch
of the next lookup's rows before the forward list, the lookup runs on its rows stepped alone,
and the group is finished by its output layer (pipedap/tied_lookup.py, [Note: the lookup served
from the shards]).

The update rule itself stays with the optimizer: the reducer calls
``apply_update(params, hyperparameters)`` once the buckets' communication is done.

[Note: when updates happen]
After ``end_step()`` every bucket is *pending*: its all-gather may still be in
flight. The forward pre-hook of a module finishes the pending buckets of its
parameters (wait, scale, update) before the module runs, also in ``eval()`` and
under ``torch.no_grad()``; ``finish_all()`` finishes all of them.

[Note: sharded steps]
With ``shard_update`` (pipedap/shard_update.py) the plan is ``Plan.sharded()``: every
all-gather is in the forward phase. ``end_step()`` then, for each forward submission in
order, waits for its buckets' reduce-scatters, scales the shards, steps this rank's
pieces of them and submits the all-gather of the updated parameters, so the first
buckets' all-gathers travel while the later buckets update (under WFBP the forward
submissions follow the reduce-scatters' order: see ``Plan.sharded``). Pending buckets
wait only for their all-gather. Which parameters got a gradient somewhere comes from a
small all-reduce of the bucket's used flags, submitted with its reduce-scatter (after the
reduce-scatter only one rank holds the flags): a bucket's update waits for nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from pipedap import comm, engine, settings
from pipedap.buckets import Bucket
from pipedap.online_planner import OnlinePlanner
from pipedap.planner.plan import Plan
from pipedap.planner.profile import Tie
from pipedap.process_sets import ProcessSet
from pipedap.shard_update import Piece
from pipedap.tied_embeddings import RowCounter, lookup_refusal, lookup_ties, split_enabled
from pipedap.tied_lookup import ServedLookup
from pipedap.tied_split import TiedSplit

log = logging.getLogger("pipedap")

# apply_update(parameters, or with shard_update their pieces, that got a gradient on some rank,
#              param-group options in force at step())
ApplyUpdate = Callable[[list[torch.nn.Parameter], list[dict]], None]
# optimizer_step_rows(parameter, rows, their gradient, param-group options): the rows as the optimizer's rule
#                     steps them (pipedap.tied_lookup's StepRows is this with the pending step's options)
OptimizerStepRows = Callable[[torch.nn.Parameter, torch.Tensor, torch.Tensor, list[dict]], torch.Tensor]


@dataclass
class _PendingStep:
    """What the pending updates need from the step that produced them."""

    scale: float  # applied to the averaged gradients just before the update
    hyperparameters: list[dict]  # param-group options at step() (an LR scheduler may change them since)


class Reducer:
    """One model's gradient communication over one process set, following one plan."""

    def __init__(self, plan: Plan, buckets: list[Bucket], apply_update: ApplyUpdate, *, op, passes: int,
                 process_set: ProcessSet, online: OnlinePlanner | None = None,
                 shard_pieces: list[list[Piece]] | None = None, step_rows: OptimizerStepRows | None = None,
                 elementwise: Callable[[], bool] = lambda: False):
        self.shard_pieces = shard_pieces  # per bucket: this rank's pieces, with shard_update ([Note: sharded steps])
        self.group_of_piece = {id(pc.tensor): pc.group for pieces in shard_pieces or () for pc in pieces}
        self.plan = plan.sharded() if shard_pieces is not None else plan
        self.buckets, self.apply_update = buckets, apply_update
        self.op, self.passes, self.process_set, self.online = op, passes, process_set, online
        self.planning: dict | None = None  # how the online planner made the plan (OnlinePlanner.planning)
        self.where = {p: (b, i) for b in buckets for i, p in enumerate(b.params)}
        self.countdown = dict.fromkeys(self.where, passes)  # backward passes left before p's gradient is final
        self.ready: list[set[int]] = [set() for _ in buckets]  # per bucket: indices of complete gradients
        self.works: list[dict[str, engine.Work]] = [{} for _ in buckets]  # per bucket: "rs"/"ag"/"ar" -> its work
        self.pending: set[int] = set()  # buckets communicated (or in flight) whose update is not applied
        self.packed: set[int] = set()  # compressed buckets whose wire buffer holds a result not yet unpacked
        self.used_flags: list[torch.Tensor | None] = [None] * len(buckets)  # sharded: all-reduced with the RS
        self.zero_after_update: set[int] = set()
        self.update_seconds = [0.0] * len(buckets)  # the latest update's duration (for the online planner)
        self.pending_step = _PendingStep(1.0, [])
        self.module_buckets: dict[torch.nn.Module, list[int]] = {}
        self.sync_enabled = True  # False inside no_sync()
        self.grads_complete = False  # synchronize() ran between backward and step() (step() then warns ...)
        self.skipping_synchronize = False  # ... unless inside skip_synchronize(), as Horovod
        self.clip_coef: float | None = None  # set by clip_grad_norm_ for this step
        self.sparse_grads: set[torch.nn.Parameter] = set()  # parameters whose gradients came sparse (embeddings)
        self._lock = threading.Lock()  # gradient hooks may run on autograd's device threads
        self._forward_end_hook = None
        self.rows: RowCounter | None = None  # rows the tied embeddings look up, while the online planner measures
        self.splits: dict[int, TiedSplit] = {}  # tied embeddings reduced in two parts ([Note: tied embeddings])
        self.splitting: set[int] = set()  # those of them the current plan lets split
        self.step_rows, self.elementwise = step_rows, elementwise  # the optimizer's, for served lookups
        self.lookups: dict[int, ServedLookup] = {}  # split ones whose lookup can be served from the shards
        self.deferring: set[int] = set()  # those of them the current plan defers
        self._new_step()

    # --- hooks ---------------------------------------------------------------------

    def attach(self, model: torch.nn.Module | None) -> None:
        """Register the hooks that drive the reducer (a model is needed for lazy updates)."""
        for p in self.where:
            p.register_post_accumulate_grad_hook(self.grad_ready)
            self._note_layout_once(p)
        if model is None:
            return
        for module in model.modules():
            owned = sorted({self.where[p][0].index for p in module.parameters(recurse=False) if p in self.where})
            if owned:
                self.module_buckets[module] = owned
                module.register_forward_pre_hook(self.before_forward)
        if self.online is not None:  # removed when the plan switches
            self._forward_end_hook = model.register_forward_hook(lambda *_: self.online.forward_ended())
        compressed = any(b.wire is not None for b in self.buckets)
        if split_enabled(compressed=compressed, sharded=self.shard_pieces is not None, passes=self.passes):
            for g, (_, users) in lookup_ties(model, self.buckets).items():
                self.splits[g] = TiedSplit(self.buckets[g], users, op=self.op, process_set=self.process_set,
                                           tapping=lambda g=g: self.sync_enabled and g in self.splitting,
                                           lock=self._lock, on_pieces=functools.partial(self._pieces_ready, g))
            self._serve_lookups(model, lookup_ties(model, self.buckets))
            self._choose_splits()
            if self.online is not None and self.splits:  # the planner may split them: it needs their rows
                self.rows = RowCounter(model)
                self.online.ties = self._ties

    def _serve_lookups(self, model: torch.nn.Module, ties: dict) -> None:
        """Make the split embeddings' lookups servable from the shards, where they can be ([Note: the lookup
        served from the shards])."""
        if not (settings.get("PIPEDAP_TIED_DEFER") and self.step_rows is not None):
            return
        for g, (embedding, _) in ties.items():
            why = lookup_refusal(embedding, self.buckets[g].params[0], self.elementwise())
            if why:
                log.info("pipedap: the lookup of '%s' waits for its all-gather: %s", self.buckets[g].names[0], why)
                continue
            self.lookups[g] = ServedLookup(self.splits[g], embedding, self._step_rows,
                                           finish=functools.partial(self._finish_pending, g),
                                           gathering=functools.partial(self._gathering, g))
        if self.lookups:
            engine.add_blocking_wait_hook(self._decline_fetches)
            model.register_forward_hook(self._forward_ended)

    def _step_rows(self, param: torch.nn.Parameter, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """A served lookup's rows as the pending update will step them (its scale and hyperparameters)."""
        return self.step_rows(param, rows, grad * self.pending_step.scale, self.pending_step.hyperparameters)

    def _finish_pending(self, g: int) -> None:
        """Finish group g if its update is still pending (a served lookup's or output layer's)."""
        self.finish([g] if g in self.pending else [])

    def _gathering(self, g: int) -> engine.Work | None:
        """Group g's all-gather, if its update is pending and what it delivers is the gradients themselves
        (not packed for the link: those arrive in ``wire`` and are unpacked at the end)."""
        return self.works[g].get("ag") if g in self.pending and g not in self.packed else None

    def _decline_fetches(self) -> None:
        """Before this thread waits for communication: the lookups will not offer ids before that ends."""
        for lookup in self.lookups.values():
            lookup.decline()

    def _forward_ended(self, *_) -> None:
        """The model's forward hook: a deferred group its output layer did not finish is finished now."""
        self.finish([g for g in sorted(self.deferring) if g in self.pending])

    def _pieces_ready(self, g: int, first: float, last: float) -> None:
        if self.online is not None:  # the planner times the pieces ([Note: ties in a profile])
            self.online.dense_pieces(g, first, last, len(self.splits[g].bounds) - 1)

    def _ties(self) -> tuple[Tie, ...]:
        """The tied buckets as the planner's profile has them ([Note: ties in a profile])."""
        group_of = {self.buckets[g].names[0]: g for g in self.splits}
        return tuple(dataclasses.replace(tie, deferrable=group_of[tie.param] in self.lookups)
                     for tie in self.rows.ties() if tie.param in group_of)

    def _choose_splits(self) -> None:
        """The tied buckets the plan splits (``Plan.split``: where the planner found it faster)."""
        self.splitting = {g for g in self.splits if g in self.plan.split}
        self.deferring = {g for g in self.splitting if g in self.plan.defer and g in self.lookups}
        for g in set(self.plan.defer) - self.deferring:
            log.warning("pipedap: the plan defers bucket %d's all-gather, but its lookup cannot be served from the "
                        "shards here (see [Note: the lookup served from the shards]): the lookup waits for the "
                        "all-gather, which the plan put late", g)

    def _note_layout_once(self, p: torch.nn.Parameter) -> None:
        """Note whether p's first gradient comes sparse (an embedding's): it accumulates dense into the
        bucket, and the update gets it back sparse. One look is enough: a module's layout is fixed."""
        def look(grad: torch.Tensor) -> None:
            if grad.is_sparse:
                self.sparse_grads.add(p)
            handle.remove()

        handle = p.register_hook(look)

    def grad_ready(self, p: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: count p's gradient; submit its bucket when complete (in plan order)."""
        if not self.sync_enabled:
            return
        self.countdown[p] -= 1
        if self.countdown[p] > 0:
            return
        self.countdown[p] = self.passes
        b, i = self.where[p]
        if b.index in self.pending:
            raise RuntimeError(
                f"parameter '{b.names[i]}' got a gradient before its pending update was applied: it was used "
                "outside the forward of a module that owns it, so it was stale. Call pipedap.flush(model) "
                "before such use, or use schedule='wfbp'."
            )
        ready = self.ready[b.index]
        if i in ready:
            raise RuntimeError(
                f"gradients of '{b.names[i]}' were computed more than backward_passes_per_step="
                f"{self.passes} times before step(); raise backward_passes_per_step or use no_sync()"
            )
        ready.add(i)
        if p.grad is not None and p.grad.is_sparse:  # the gradient was re-allocated, sparse
            b.grads[i].copy_(p.grad.to_dense())
            p.grad = b.grads[i]
        elif p.grad is not None and p.grad.data_ptr() != b.grads[i].data_ptr():
            b.grads[i].copy_(p.grad)  # the gradient was re-allocated (grad set to None, create_graph)
            p.grad = b.grads[i]
        if len(ready) == len(b.params):
            if self.online is not None:
                self.online.bucket_ready(b.index)
            with self._lock:
                self._advance()

    def before_forward(self, module: torch.nn.Module, args) -> None:
        """Forward pre-hook: finish the module's pending buckets (the online planner times it), but for a
        deferred embedding's, which its lookup serves and its output layer finishes ([Note: the lookup served
        from the shards], [Note: the output layer's own rows first])."""
        for g in self.module_buckets.get(module, ()):
            enter = time.monotonic()
            self.update_seconds[g] = 0.0
            lookup = self.lookups.get(g)
            left = lookup is not None and (lookup.pending and module is lookup.embedding
                                           or lookup.output_pending and module in lookup.split.outputs)
            if g in self.pending and not left:
                self.finish([g])
            if self.online is not None:
                self.online.bucket_entered(g, enter, time.monotonic(), self.update_seconds[g])

    # --- the plan runner ---------------------------------------------------------

    def _new_step(self) -> None:
        for split in self.splits.values():
            split.new_step()
        self.next_backward = 0  # index of the plan's next backward submission
        self.pieces_issued = [0] * len(self.buckets)  # of chunked all-reduces (Plan.chunks)
        self.backward_flushed = False  # every bucket counts as ready (gradients that never came are zero)
        self.forward_submitted = False

    @property
    def step_started(self) -> bool:
        return self.next_backward > 0 or any(self.ready)

    def _advance(self) -> None:
        """Issue the plan's backward submissions whose reduce-scatters' buckets are all complete."""
        backward = self.plan.backward
        while self.next_backward < len(backward):
            sub = backward[self.next_backward]
            if not self.backward_flushed and any(kind != "ag" and len(self.ready[g]) < len(self.buckets[g].params)
                                                 for kind, g in sub):
                return
            self._submit(sub)
            self.next_backward += 1

    def flush_backward(self) -> None:
        """Issue every backward submission left (the previous step's pending updates first)."""
        self.finish_all()  # buckets not used since the last step() still hold a pending update
        with self._lock:
            self.backward_flushed = True
            self._advance()

    def submit_forward(self) -> None:
        with self._lock:
            if not self.forward_submitted:
                for sub in self.plan.forward:
                    self._submit(sub)
                self.forward_submitted = True

    def _submit(self, sub) -> None:
        collectives, keys = [], []
        for kind, g in sub:
            b, ps = self.buckets[g], self.process_set
            pieces, piece = self.plan.pieces(g), self.pieces_issued[g]
            if kind == "rs" and g in self.splitting:  # the rows; the dense part went in backward
                self.splits[g].submit_rows(used=bool(self.ready[g]))
                continue
            if kind == "ag" and g in self.splitting:
                self.splits[g].combine()
            if kind == "rs" or (kind == "ar" and piece == 0):  # the gradients are complete: flag the ones that
                b.mark_used(self.ready[g])                       # came and cast them for the link
                b.pack()                                         # ([Note: compressed buckets])
            if kind != "rs" and b.wire is not None and self.shard_pieces is None:
                self.packed.add(g)
            if kind == "rs":
                collectives.append(engine.reducescatter_collective(b.sent, b.sent_shard, f"rs.{g}", self.op, ps))
                if self.shard_pieces is not None:  # which parameters got a gradient on some rank
                    self.used_flags[g] = b.flags.clone()
                    collectives.append(engine.allreduce_collective(self.used_flags[g], self.used_flags[g],
                                                                   f"used.{g}", comm.Sum, ps))
            elif kind == "ag" and self.shard_pieces is not None:  # the updated parameters
                collectives.append(engine.allgather_collective(b.params_shard, b.params_buffer, f"ag.{g}", ps))
            elif kind == "ag":
                collectives.append(engine.allgather_collective(b.sent_shard, b.sent, f"ag.{g}", ps))
            elif pieces > 1:  # the piece-th of `pieces` equal parts of the bucket (Plan.chunks)
                n = b.sent.numel()
                part = b.sent[piece * n // pieces:(piece + 1) * n // pieces]
                collectives.append(engine.allreduce_collective(part, part, f"ar.{g}.{piece}", self.op, ps))
                self.pieces_issued[g] += 1
                kind = f"ar.{piece}"
            else:
                collectives.append(engine.allreduce_collective(b.sent, b.sent, f"ar.{g}", self.op, ps))
            keys.append((kind, g))
        if not collectives:
            return
        work = engine.submit(collectives)
        for kind, g in keys:
            self.works[g][kind] = work

    # --- steps and updates -----------------------------------------------------------

    def scale(self) -> float:
        """The factor this step's averaged gradients get: 1/k for k accumulated passes, times clipping."""
        scale = 1.0 / self.passes
        return scale * self.clip_coef if self.clip_coef is not None else scale

    def end_step(self, hyperparameters: list[dict]) -> None:
        """``optimizer.step()``: finish issuing this step's plan; update now (WFBP, or sharded) or lazily."""
        self.flush_backward()
        if self.shard_pieces is not None:
            self._update_shards(hyperparameters)
        else:
            if not self.forward_submitted:  # the lookups' fetches go first ([Note: the lookup served from the shards])
                for g in sorted(self.deferring):
                    self.splits[g].combine()
                    with self._lock:
                        self.lookups[g].submit_fetch()
            self.submit_forward()
        self.pending_step = _PendingStep(self.scale(), hyperparameters)
        self.pending = set(range(len(self.buckets)))
        for ready in self.ready:  # this step's gradients are all taken (a pending bucket refuses new ones)
            ready.clear()
        if self.plan.sync_before_forward or self.grads_complete:
            self.finish_all()
        self._new_step()
        self.grads_complete = False
        self.clip_coef = None
        if self.online is not None:
            self._maybe_switch_plan()

    def _update_shards(self, hyperparameters: list[dict]) -> None:
        """Step this rank's pieces of every bucket and submit the all-gathers ([Note: sharded steps])."""
        scale = self.scale()
        with self._lock:
            for sub in self.plan.forward:
                pieces = []
                for _, g in sub:
                    b = self.buckets[g]
                    if not self.grads_complete:  # else synchronize() has waited and gathered the gradients
                        self.works[g].pop("rs").wait()  # (and the used flags)
                        b.unpack_shard()
                    if scale != 1.0:
                        b.shard.mul_(scale)
                    used = {id(p) for p in b.used_params(self.used_flags[g])}
                    pieces += [pc.tensor for pc in self.shard_pieces[g] if id(pc.param) in used]
                if pieces:
                    self.apply_update(pieces, hyperparameters)
                self._submit(sub)
            self.forward_submitted = True

    def synchronize(self) -> None:
        """Between backward and step(): complete the gradients (``p.grad`` averaged); else apply what is pending.

        With shard_update the gradients are then all-gathered once more (only this rank's shard
        is averaged after the reduce-scatter), so that every rank's ``p.grad`` is complete.
        """
        if not self.step_started:
            self.finish_all()
            return
        self.flush_backward()
        if self.shard_pieces is not None:
            self._gather_gradients()
        else:
            self.submit_forward()
        for g, b in enumerate(self.buckets):
            self._wait(g)
            b.attach_grads()
        self.grads_complete = True

    def _gather_gradients(self) -> None:
        """shard_update's synchronize(): after each reduce-scatter, all-gather the averaged gradients."""
        works = []
        for g, b in enumerate(self.buckets):
            self.works[g].pop("rs").wait()
            b.unpack_shard()
            works.append(engine.submit([engine.allgather_collective(b.shard, b.buffer, f"grads.{g}", self.process_set)]))
        for work in works:
            work.wait()

    def zero_grad(self) -> None:
        """Zero the gradients in place (they stay views into the buckets); pending buckets after their update."""
        for g, b in enumerate(self.buckets):
            if g in self.pending and self.shard_pieces is None:  # (a sharded all-gather moves parameters)
                self.zero_after_update.add(g)
            else:
                b.buffer.zero_()
                b.attach_grads()

    def finish_all(self) -> None:
        self.finish(sorted(self.pending))

    def finish(self, groups: list[int]) -> None:
        """Wait for the buckets' communication and apply their update, in one optimizer step.

        One step for many buckets (WFBP's step(), synchronize(), state_dict()) avoids the
        optimizer's per-call overhead, which is milliseconds for a large model.
        """
        if not groups:
            return
        if self.shard_pieces is not None:  # updated at step(): the all-gathers bring the parameters
            for g in groups:
                self._wait(g)
                self.works[g].clear()
                self.pending.discard(g)
            return
        scale = self.pending_step.scale
        for g in groups:
            b = self.buckets[g]
            self._wait(g)
            b.attach_grads()
            if scale != 1.0:
                b.buffer[: b.grad_numel].mul_(scale)
        for g in groups:
            if g in self.lookups:  # finished: its output layer computes as usual
                self.lookups[g].output_pending = False
        used = [p for g in groups for p in self.buckets[g].used_params()]
        started = time.perf_counter()
        if used:
            self.apply_update(used, self.pending_step.hyperparameters)
        seconds = (time.perf_counter() - started) / len(groups)
        for g in groups:
            self.update_seconds[g] = seconds
            self.works[g].clear()
            self.pending.discard(g)
            if g in self.zero_after_update:
                self.buckets[g].buffer.zero_()
                self.zero_after_update.discard(g)

    def _wait(self, g: int) -> None:
        """Wait for bucket g's communication; its buffer then holds the reduced gradients."""
        for work in self.works[g].values():
            work.wait()
        if g in self.packed:
            self.buckets[g].unpack()
            self.packed.discard(g)

    def reduced_square_sum(self) -> torch.Tensor:
        """Sum of squares of this rank's share of the reduced gradients (float64 scalar), for clipping.

        Issues what is left of the backward phase and waits for the reductions only, not
        the all-gathers: after a reduce-scatter this rank's shard holds its share; after an
        all-reduce the whole buffer does, so counting only the shard counts every element
        once over all ranks.
        """
        self.flush_backward()
        squares = torch.zeros(1, dtype=torch.float64)
        for g, b in enumerate(self.buckets):
            if g in self.splitting:
                self.splits[g].combine()
            for kind, work in self.works[g].items():
                if kind != "ag":  # the reduce-scatter, or the all-reduce (all its pieces)
                    work.wait()
            lo, hi = b.shard_start, min(b.shard_start + b.shard.numel(), b.grad_numel)
            if lo < hi:
                squares += b.sent[lo:hi].double().pow(2).sum().cpu()
        return squares

    def _maybe_switch_plan(self) -> None:
        """After the online planner's last profiling step, run its plan (same step on every rank).

        No digest check here: rank 0 broadcasts the plan with its digest and every rank's
        ``Plan.from_json`` verifies it (measure.plan_on_rank0), so it is the same everywhere.
        """
        plan = self.online.step_done()
        if plan is None:
            return
        self.plan, self.planning, self.online = plan, self.online.planning, None
        self._choose_splits()
        if self.rows is not None:
            self.rows.remove()
            self.rows = None
        if self._forward_end_hook is not None:
            self._forward_end_hook.remove()
