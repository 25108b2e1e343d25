"""DistributedOptimizer: decoupled all-reduce for any torch optimizer.

Every gradient all-reduce is split into a reduce-scatter (RS), issued during
backward as soon as a bucket's gradients are complete, and an all-gather (AG),
after which the bucket's update runs, just before its layers' next forward.
A *plan* (pipedap.planner.Plan) says which buckets exist and in which order
their RS / AG / AR are issued; the engine runs them in that order on every rank.

Schedules: ``wfbp`` (all-reduce in backward, update in ``step()``, as
Horovod/DDP), ``dear`` (all RS in backward, all AG in the next forward) and
``pipedap`` (a plan where some AGs run in backward, possibly merged with an RS).

[Note: the update of one bucket]
The wrapped optimizer's own ``step()`` runs with each ``param_groups[i]["params"]``
narrowed to the bucket's parameters, so its update rule, per-group
hyperparameters and per-parameter state are used unchanged, for any
``torch.optim.Optimizer`` (SGD, Adam, user subclasses, ...).

[Note: when updates happen]
After ``step()`` a bucket is *pending*: its AG may still be in flight. A forward
pre-hook on every module that owns parameters finishes the pending buckets of
those parameters (wait for the AG, apply the update) before the module runs,
also in ``eval()`` and under ``torch.no_grad()``. ``synchronize()``,
``state_dict()``, ``model.state_dict()`` and ``pipedap.flush(model)`` finish all
of them, so the last step's update is never lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable

import torch

from pipedap import comm, settings
from pipedap.buckets import Bucket, build_bucket, default_groups
from pipedap.compression import Compression
from pipedap.online_planner import OnlinePlanner
from pipedap.planner.plan import Group, Plan
from pipedap.planner.schedules import plan_of

log = logging.getLogger("pipedap")

SCHEDULES = ("wfbp", "dear", "pipedap")

# model -> optimizers wrapping it, for pipedap.flush(model)
_optimizers_of_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Submitted:
    """One submission to the engine, waited for once by whichever bucket needs it first."""

    def __init__(self, handle: int):
        self.handle = handle
        self.done = False

    def wait(self) -> None:
        if not self.done:
            comm.synchronize(self.handle)
            self.done = True


class _PlanRunner:
    """Issues a plan's submissions in plan order as the buckets' gradients become ready."""

    def __init__(self, plan: Plan, buckets: list[Bucket], op):
        self.plan, self.buckets, self.op = plan, buckets, op
        self.lock = threading.Lock()  # hooks may run on autograd's device threads
        self.reset()

    def reset(self) -> None:
        self.next = 0  # index of the next backward submission
        self.ready: set[int] = set()
        self.forward_submitted = False

    @property
    def started(self) -> bool:
        return self.next > 0 or bool(self.ready)

    def mark_ready(self, group: int) -> None:
        with self.lock:
            self.ready.add(group)
            self._advance()

    def flush_backward(self) -> None:
        """Treat every group as ready (gradients that never came are zero) and issue the rest."""
        with self.lock:
            self.ready = set(range(len(self.buckets)))
            self._advance()

    def submit_forward(self) -> None:
        with self.lock:
            if not self.forward_submitted:
                for sub in self.plan.forward:
                    self._submit(sub)
                self.forward_submitted = True

    def _advance(self) -> None:
        backward = self.plan.backward
        while self.next < len(backward):
            sub = backward[self.next]
            if any(kind != "ag" and g not in self.ready for kind, g in sub):
                return
            self._submit(sub)
            self.next += 1

    def _submit(self, sub) -> None:
        collectives = []
        for kind, g in sub:
            b = self.buckets[g]
            if kind == "rs":
                collectives.append(comm.reducescatter_collective(b.buffer, b.shard, f"rs.{g}", self.op))
            elif kind == "ag":
                collectives.append(comm.allgather_collective(b.shard, b.buffer, f"ag.{g}"))
            else:
                collectives.append(comm.allreduce_collective(b.buffer, b.buffer, f"ar.{g}", self.op))
        submitted = _Submitted(comm.submit_group(collectives))
        for kind, g in sub:
            self.buckets[g].handles[kind] = submitted


class _DistributedMixin:
    """Placed before the user's optimizer class in the MRO of the wrapped class.

    Attributes are set by :func:`DistributedOptimizer`; there is no ``__init__``
    (the user's optimizer is not constructed again: its state is shared).
    """

    # --- the public methods ------------------------------------------------------

    def step(self, closure=None):
        """Finish this iteration's gradient communication schedule; updates follow the plan.

        ``wfbp``: waits for the all-reduces and updates every parameter now. ``dear`` /
        ``pipedap``: issues the forward-phase all-gathers and returns at once; each bucket is
        updated just before its next forward (or by ``synchronize()``).
        """
        if self._pipedap_world == 1:
            return self._pipedap_local_step(closure)
        if closure is not None and not self._pipedap_plan.sync_before_forward:
            raise ValueError(f"step(closure) needs schedule='wfbp'; schedule {self._pipedap_schedule!r} "
                             "updates buckets lazily in the next forward")
        loss = closure() if closure is not None else None
        self._pipedap_flush_backward()
        runner = self._pipedap_runner
        runner.submit_forward()
        scale = self._pipedap_scale()
        hyper = self._pipedap_hyperparameters()
        for b in self._pipedap_buckets:
            b.pending_update, b.update_scale, b.hyperparameters = True, scale, hyper
        if self._pipedap_plan.sync_before_forward or self._pipedap_grads_complete:
            self._pipedap_finish_all()
        runner.reset()
        self._pipedap_grads_complete = False
        self._pipedap_clip_coef = None
        if self._pipedap_online is not None:
            self._pipedap_maybe_switch_plan()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. They stay views into the buckets (never None) so no copy is needed;
        a bucket whose update is still pending is zeroed right after that update."""
        if self._pipedap_world == 1:
            return super().zero_grad(set_to_none)
        for b in self._pipedap_buckets:
            if b.pending_update:
                b.zero_after_update = True
            else:
                b.buffer.zero_()
                b.attach_grads()

    def synchronize(self) -> None:
        """Complete communication and apply what is pending.

        Between backward and ``step()`` (Horovod usage, e.g. before clipping or AMP
        unscaling): finishes this iteration's gradient communication, so ``p.grad`` holds
        the averaged gradients and ``step()`` will update at once. Otherwise: applies every
        pending update (after training, before evaluation or saving).
        """
        if self._pipedap_world == 1:
            return
        if self._pipedap_runner.started:
            self._pipedap_flush_backward()
            self._pipedap_runner.submit_forward()
            for b in self._pipedap_buckets:
                for s in b.handles.values():
                    s.wait()
                b.attach_grads()
            self._pipedap_grads_complete = True
        else:
            self._pipedap_finish_all()

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Horovod's idiom: ``synchronize()``, modify gradients, then ``step()`` inside this block."""
        if self._pipedap_world > 1 and not self._pipedap_grads_complete:
            raise RuntimeError("skip_synchronize(): call optimizer.synchronize() first, after backward")
        yield

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside this block accumulate gradients locally and communicate nothing (like DDP)."""
        previous, self._pipedap_sync_enabled = self._pipedap_sync_enabled, False
        try:
            yield
        finally:
            self._pipedap_sync_enabled = previous

    def state_dict(self):
        self._pipedap_finish_all()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        self._pipedap_finish_all()
        return super().load_state_dict(state_dict)

    @property
    def plan(self) -> Plan:
        """The plan this optimizer runs (groups and ordered submissions)."""
        return self._pipedap_plan

    # --- internals ---------------------------------------------------------------

    def _pipedap_maybe_switch_plan(self) -> None:
        """After the online planner's last profiling step, run its plan (same step on every rank).

        No digest check here: rank 0 broadcasts the plan with its digest and every rank's
        ``Plan.from_json`` verifies it (measure.plan_on_rank0), so it is the same everywhere.
        """
        plan = self._pipedap_online.step_done()
        if plan is None:
            return
        self._pipedap_plan = plan
        self._pipedap_runner = _PlanRunner(plan, self._pipedap_buckets, self._pipedap_runner.op)
        self._pipedap_online = None
        self._pipedap_forward_end_hook.remove()

    def _pipedap_local_step(self, closure):
        """World size 1: the plain step, with the same gradient scaling (accumulation, clipping)."""
        scale = self._pipedap_scale()
        if scale != 1.0:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        self._pipedap_clip_coef = None
        return super().step(closure)

    def _pipedap_scale(self) -> float:
        scale = 1.0 / self._pipedap_passes  # k accumulated micro-batches = one large batch
        if self._pipedap_clip_coef is not None:
            scale *= self._pipedap_clip_coef
        return scale

    def _pipedap_flush_backward(self) -> None:
        self._pipedap_finish_all()  # buckets not used since the last step() still hold a pending update
        self._pipedap_runner.flush_backward()

    def _pipedap_finish_all(self) -> None:
        self._pipedap_finish([b for b in self._pipedap_buckets if b.pending_update])

    def _pipedap_finish(self, buckets: list[Bucket]) -> None:
        """Wait for the buckets' communication and apply their update, in one optimizer step.

        One step for many buckets (WFBP's step(), synchronize(), state_dict()) avoids the
        optimizer's per-call overhead, which is milliseconds for a large model.
        """
        if not buckets:
            return
        for b in buckets:
            for s in b.handles.values():
                s.wait()
            b.attach_grads()
            if b.update_scale != 1.0:
                b.buffer[: b.grad_numel].mul_(b.update_scale)
        started = time.perf_counter()
        self._pipedap_update(buckets)
        seconds = (time.perf_counter() - started) / len(buckets)
        for b in buckets:
            b.last_update_seconds = seconds
            b.handles.clear()
            b.ready.clear()
            b.pending_update = False
            if b.zero_after_update:
                b.buffer.zero_()
                b.zero_after_update = False

    def _pipedap_hyperparameters(self) -> list[dict]:
        """Each param group's options now (tensors copied: schedulers may update them in place)."""
        return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}
                for group in self.param_groups]

    def _pipedap_update(self, buckets: list[Bucket]) -> None:
        """The wrapped optimizer's step on the buckets' parameters that got a gradient on some rank.

        It runs with the hyperparameters in force at ``step()`` (pending buckets all come from
        the same step): an LR scheduler stepped in between must not change an update that
        belongs to the previous step.
        """
        used = {id(p) for b in buckets for p in b.used_params()}
        if not used:
            return
        saved = [dict(group) for group in self.param_groups]
        try:
            for group, hyper in zip(self.param_groups, buckets[0].hyperparameters):
                group.update(hyper)
                group["params"] = [p for p in group["params"] if id(p) in used]
            super().step()
        finally:
            for group, original in zip(self.param_groups, saved):
                group.clear()
                group.update(original)

    def _pipedap_grad_ready(self, p: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: mark p ready; submit its bucket when complete (in plan order)."""
        if not self._pipedap_sync_enabled:
            return
        delay = self._pipedap_delay
        delay[p] -= 1
        if delay[p] > 0:
            return
        delay[p] = self._pipedap_passes
        b, i = self._pipedap_bucket_of[p]
        if b.pending_update:
            raise RuntimeError(
                f"parameter '{b.names[i]}' got a gradient before its pending update was applied: it was used "
                "outside the forward of a module that owns it, so it was stale. Call pipedap.flush(model) "
                "before such use, or use schedule='wfbp'."
            )
        if i in b.ready:
            raise RuntimeError(
                f"gradients of '{b.names[i]}' were computed more than backward_passes_per_step="
                f"{self._pipedap_passes} times before step(); raise backward_passes_per_step or use no_sync()"
            )
        b.ready.add(i)
        if p.grad is not None and p.grad.data_ptr() != b.grads[i].data_ptr():
            b.grads[i].copy_(p.grad)  # the gradient was re-allocated (grad set to None, create_graph)
            p.grad = b.grads[i]
        b.flags[i] = 1
        if len(b.ready) == len(b.params):
            if self._pipedap_online is not None:
                self._pipedap_online.bucket_ready(b.index)
            self._pipedap_runner.mark_ready(b.index)

    def _pipedap_before_forward(self, module: torch.nn.Module, args) -> None:
        online = self._pipedap_online
        for b in self._pipedap_module_buckets.get(module, ()):
            enter = time.monotonic()
            b.last_update_seconds = 0.0
            if b.pending_update:
                self._pipedap_finish([b])
            if online is not None:
                online.bucket_entered(b.index, enter, time.monotonic(), b.last_update_seconds)


def _named_trainable(optimizer, model, named_parameters) -> list[tuple[str, torch.nn.Parameter]]:
    """The optimizer's parameters that require grad, named, in the model's order."""
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if model is not None:
        named = list(model.named_parameters())
    elif named_parameters is not None:
        named = list(named_parameters)
    else:
        named = [(f"param.{i}", p) for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]
    known = {id(p) for _, p in named}
    missing = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) not in known]
    if missing:
        raise ValueError(f"the optimizer has {len(missing)} parameter(s) that are not in the model / "
                         "named_parameters; wrap the optimizer of this model")
    return [(n, p) for n, p in named if id(p) in in_optimizer and p.requires_grad]


def _check_ranks_agree(named: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Same parameter count, names, shapes, dtypes and order on every rank, or an error on every rank."""
    mine = [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in named]
    digest = hashlib.sha256(repr(mine).encode()).hexdigest()
    everyone = comm.allgather_object((digest, mine))
    if all(d == everyone[0][0] for d, _ in everyone):
        return
    ref = everyone[0][1]
    for r, (_, theirs) in enumerate(everyone):
        for i in range(max(len(ref), len(theirs))):
            a = ref[i] if i < len(ref) else None
            b = theirs[i] if i < len(theirs) else None
            if a != b:
                def show(x):
                    return "nothing" if x is None else f"'{x[0]}' {x[1]} {x[2]}"
                raise ValueError(
                    f"DistributedOptimizer: the model differs between ranks: parameter #{i} is {show(a)} on "
                    f"rank 0 but {show(b)} on rank {r} (rank 0 has {len(ref)} trainable parameters, rank {r} "
                    f"has {len(theirs)}). Every rank must build the same model and optimizer."
                )


def _resolve_plan(schedule: str, plan, named, fusion_bytes: int, world: int) -> tuple[Plan, bool]:
    """The plan to start with, and whether to plan online.

    The given plan (validated against the model), else the built-in plan of `schedule`.
    ``pipedap`` without a plan (neither ``plan=`` nor ``$PIPEDAP_PLAN``) starts from DeAR's
    and plans online; a given plan is kept whatever its schedule (DeAR's included).
    """
    names = [n for n, _ in named]
    if plan is None and schedule == "pipedap":
        plan = settings.get("PIPEDAP_PLAN")
    if plan is not None:
        if isinstance(plan, (str, os.PathLike)):
            with open(plan) as f:
                plan = Plan.from_json(f.read(), params=names, where=str(plan))
        elif isinstance(plan, Plan):
            plan = Plan.from_json(plan.to_dict(), params=names)  # validated against this model
        else:
            raise TypeError(f"plan must be a pipedap.planner.Plan or a JSON file path, not {type(plan).__name__}")
        if plan.world_size != world:
            log.warning("plan %s was made for %d workers, running on %d", plan.schedule, plan.world_size, world)
        return plan, False
    sizes = {n: p.numel() * p.element_size() for n, p in named}
    groups = [Group(f"{g[0]}..{g[-1]}" if len(g) > 1 else g[0], tuple(g), sum(sizes[n] for n in g))
              for g in default_groups(named, fusion_bytes)]
    plan_online = schedule == "pipedap"
    return plan_of("dear" if plan_online else schedule, groups, world), plan_online


def _resolve_plan_on_every_rank(schedule: str, plan, named, fusion_bytes: int, world: int) -> tuple[Plan, bool]:
    """:func:`_resolve_plan`, then the same plan on every rank, or an error on every rank.

    Like the parameter check, every rank shares its plan's digest and schedule (one small
    all-gather at wrap time); a rank whose plan cannot be resolved shares its error instead
    of leaving the others waiting in the first collective.
    """
    try:
        resolved = _resolve_plan(schedule, plan, named, fusion_bytes, world)
        mine = (resolved[0].digest(), resolved[0].schedule, None)
    except (OSError, TypeError, ValueError) as err:  # PlanError is a ValueError
        resolved, mine = err, (None, None, f"{type(err).__name__}: {err}")
    everyone = comm.allgather_object(mine, name="DistributedOptimizer.plan")
    if isinstance(resolved, Exception):
        raise resolved
    for r, (_, _, error) in enumerate(everyone):
        if error:
            raise ValueError(f"DistributedOptimizer: rank {r} could not resolve its plan: {error}")
    ranks_of: dict[tuple[str, str], list[int]] = {}
    for r, (digest, name, _) in enumerate(everyone):
        ranks_of.setdefault((digest, name), []).append(r)
    if len({digest for digest, _ in ranks_of}) > 1:
        plans = "; ".join(f"plan {digest} (schedule {name!r}) on rank{'s' if len(rs) > 1 else ''} "
                          f"{', '.join(map(str, rs))}" for (digest, name), rs in ranks_of.items())
        raise ValueError(
            f"DistributedOptimizer: the plan differs between ranks: {plans}. Every rank must run the same "
            "plan; likely cause: a different plan file or $PIPEDAP_PLAN on some ranks (or, without a plan, "
            "a different schedule or fusion_bytes)."
        )
    return resolved


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module | None = None,
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
    schedule: str | None = None,
    plan: Plan | str | None = None,
    backward_passes_per_step: int = 1,
    op=comm.Average,
    compression=Compression.none,
    fusion_bytes: int | None = None,
):
    """Wrap ``optimizer`` so that gradients are averaged over all ranks with a communication schedule.

    Args:
        optimizer: any ``torch.optim.Optimizer``; the returned object is an instance of its class.
        model: the model being trained; needed for ``dear`` / ``pipedap`` (updates run in its
            modules' forward pre-hooks). Without it, the schedule defaults to ``wfbp``.
        named_parameters: Horovod compatibility: names for the parameters when no model is given.
        schedule: ``pipedap``, ``dear`` or ``wfbp``; default ``$PIPEDAP_SCHEDULE``, else ``pipedap``
            with a model and ``wfbp`` without.
        plan: a :class:`pipedap.planner.Plan` or its JSON file (``python -m pipedap.plan`` writes
            one; or ``$PIPEDAP_PLAN``). It fixes the buckets and the order. ``pipedap`` without a
            plan plans itself: the first ``$PIPEDAP_PROFILE_STEPS`` (5) steps after one warm-up run
            DeAR while measuring layer and communication times, then rank 0 plans
            (``$PIPEDAP_PLANNER``: ``optimal``, or ``greedy`` as in the paper) and all ranks switch.
        backward_passes_per_step: communicate and update every k-th backward; the k accumulated
            gradients are averaged, which equals one k-times larger batch.
        op: ``pipedap.Average`` (default) or ``pipedap.Sum`` over ranks.
        compression: only ``Compression.none`` is supported.
        fusion_bytes: without a plan, fuse consecutive modules into buckets of about this many
            bytes (default ``$PIPEDAP_FUSION_BYTES`` or 4 MiB; 0: one bucket per module).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedMixin):
        raise ValueError("this optimizer is already wrapped by pipedap.DistributedOptimizer")
    schedule = (schedule or settings.get("PIPEDAP_SCHEDULE") or ("pipedap" if model is not None else "wfbp")).lower()
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if model is None and schedule != "wfbp":
        raise ValueError(f"schedule {schedule!r} needs model=: updates run just before each layer's forward")
    if compression is not Compression.none:
        raise NotImplementedError("DistributedOptimizer supports compression=Compression.none only")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    if fusion_bytes is None:
        fusion_bytes = settings.get("PIPEDAP_FUSION_BYTES")

    cls = type(optimizer.__class__.__name__, (_DistributedMixin, optimizer.__class__), {})
    wrapped = cls.__new__(cls)
    # Share the user's optimizer state; an instance-level `step` (an LR scheduler's
    # call counter) would bypass ours, so it is left behind.
    wrapped.__dict__.update({k: v for k, v in optimizer.__dict__.items() if k != "step"})
    world, rank = comm.size(), comm.rank()
    wrapped._pipedap_world = world
    wrapped._pipedap_schedule = schedule
    wrapped._pipedap_passes = backward_passes_per_step
    wrapped._pipedap_sync_enabled = True
    wrapped._pipedap_grads_complete = False
    wrapped._pipedap_clip_coef = None
    if world == 1:  # nothing to communicate: the plain optimizer
        wrapped._pipedap_plan = None
        wrapped._pipedap_buckets = []
        wrapped._pipedap_online = None
        return wrapped

    named = _named_trainable(optimizer, model, named_parameters)
    _check_ranks_agree(named)
    plan, plan_online = _resolve_plan_on_every_rank(schedule, plan, named, fusion_bytes, world)
    by_name = dict(named)
    buckets = [build_bucket(i, [(n, by_name[n]) for n in g.params], world, rank) for i, g in enumerate(plan.groups)]
    wrapped._pipedap_plan = plan
    wrapped._pipedap_buckets = buckets
    wrapped._pipedap_online = None
    if plan_online:  # measure, then plan
        wrapped._pipedap_online = OnlinePlanner(
            buckets, steps=settings.get("PIPEDAP_PROFILE_STEPS"), planner=settings.get("PIPEDAP_PLANNER"))
        wrapped._pipedap_forward_end_hook = model.register_forward_hook(
            lambda *_: wrapped._pipedap_online.forward_ended())  # removed when the plan switches
    wrapped._pipedap_runner = _PlanRunner(plan, buckets, op)
    wrapped._pipedap_bucket_of = {p: (b, i) for b in buckets for i, p in enumerate(b.params)}
    wrapped._pipedap_delay = {p: backward_passes_per_step for b in buckets for p in b.params}
    for b in buckets:
        for p in b.params:
            p.register_post_accumulate_grad_hook(wrapped._pipedap_grad_ready)
    if model is not None:
        module_buckets = {}
        bucket_of = wrapped._pipedap_bucket_of
        for module in model.modules():
            owned = sorted({bucket_of[p][0].index for p in module.parameters(recurse=False) if p in bucket_of})
            if owned:
                module_buckets[module] = [buckets[i] for i in owned]
                module.register_forward_pre_hook(wrapped._pipedap_before_forward)
        wrapped._pipedap_module_buckets = module_buckets
        model.register_state_dict_pre_hook(lambda *_: wrapped._pipedap_finish_all())
        _optimizers_of_model.setdefault(model, weakref.WeakSet()).add(wrapped)
    else:
        wrapped._pipedap_module_buckets = {}
    log.info("DistributedOptimizer: schedule %s, %d buckets, %d parameters, %d ranks",
             schedule, len(buckets), len(named), world)
    return wrapped


def flush(model: torch.nn.Module) -> None:
    """Apply every pending update of the optimizers wrapping ``model`` (its parameters are then current)."""
    for opt in list(_optimizers_of_model.get(model, ())):
        opt._pipedap_finish_all()


def clip_grad_norm_(optimizer, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the averaged gradients' global L2 norm to ``max_norm``; returns the norm before clipping.

    With ``dear`` / ``pipedap`` the norm comes from the reduce-scatter shards (each rank
    sums the squares of its shard; one scalar all-reduce), without waiting for the
    all-gathers; the scaling is applied to each bucket just before its update. Call it
    between ``backward()`` and ``step()``.
    """
    if float(norm_type) != 2.0:
        raise NotImplementedError("pipedap.clip_grad_norm_ supports norm_type=2 only")
    if not isinstance(optimizer, _DistributedMixin):
        raise TypeError("clip_grad_norm_ expects an optimizer returned by pipedap.DistributedOptimizer")
    squares = torch.zeros(1, dtype=torch.float64)
    if optimizer._pipedap_world == 1:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    squares += p.grad.double().pow(2).sum()
    else:
        optimizer._pipedap_flush_backward()
    for b in optimizer._pipedap_buckets:
        reduced = b.handles.get("rs") or b.handles.get("ar")
        if reduced is not None:
            reduced.wait()
        # This rank's shard holds its share of the reduced gradients (after an all-reduce the
        # whole buffer does, so counting only the shard counts every element once overall).
        lo, hi = b.shard_start, min(b.shard_start + b.shard.numel(), b.grad_numel)
        if lo < hi:
            squares += b.buffer[lo:hi].double().pow(2).sum()
    total = comm.allreduce(squares, op=comm.Sum, name="clip_grad_norm")
    # the gradients the optimizer will see are also divided by the accumulation count
    norm = (total.sqrt() / optimizer._pipedap_passes).reshape(())
    coef = float(max_norm) / (float(norm) + 1e-6)
    optimizer._pipedap_clip_coef = min(coef, 1.0)
    return norm.float()
