"""DistributedOptimizer: decoupled all-reduce for any torch optimizer.

Every gradient all-reduce is split into a reduce-scatter (RS), issued during
backward as soon as a bucket's gradients are complete, and an all-gather (AG),
after which the bucket's update runs, just before its layers' next forward.
A *plan* (pipedap.planner.Plan) says which buckets exist and in which order
their RS / AG / AR are issued; the engine runs them in that order on every rank.

Schedules: ``wfbp`` (all-reduce in backward, update in ``step()``, as
Horovod/DDP), ``dear`` (all RS in backward, all AG in the next forward) and
``pipedap`` (a plan where some AGs run in backward, possibly merged with an RS).

This module is the wrapper users meet: the wrapped class, its public methods,
and the checks at wrap time. The communication of a step, and when each
bucket's update runs, belong to :class:`pipedap.reducer.Reducer`.

[Note: the update of one bucket]
The wrapped optimizer's own ``step()`` runs with each ``param_groups[i]["params"]``
narrowed to the bucket's parameters, so its update rule, per-group
hyperparameters and per-parameter state are used unchanged, for any
``torch.optim.Optimizer`` (SGD, Adam, user subclasses, ...). With ``shard_update``
the narrowed groups hold this rank's flat pieces of the bucket's parameters instead
(pipedap/shard_update.py), and the state exists for those pieces only.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch

from pipedap import comm, engine, settings
from pipedap import shard_update as shard_update_module
from pipedap.buckets import build_bucket, default_groups
from pipedap.compression import Compression, wire_dtype_for_buckets
from pipedap.online_planner import OnlinePlanner
from pipedap.planner.plan import Group, Plan
from pipedap.planner.schedules import plan_of
from pipedap.process_sets import ProcessSet, global_process_set
from pipedap.reducer import Reducer

log = logging.getLogger("pipedap")

SCHEDULES = ("wfbp", "dear", "pipedap", "bytescheduler")
PLANNED_ONLINE = ("pipedap", "bytescheduler")  # without a plan: measure under DeAR, then plan and switch

# Horovod's warning, word for word at the start (scripts and Horovod's tests match on it)
SYNCHRONIZE_THEN_STEP = (
    "optimizer.step() called without optimizer.skip_synchronize() context after optimizer.synchronize(). "
    "This can cause training slowdown. You may want to consider using optimizer.skip_synchronize() "
    "context if you use optimizer.synchronize() in your code."
)

# model -> optimizers wrapping it, for pipedap.flush(model)
_optimizers_of_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _DistributedMixin:
    """Placed before the user's optimizer class in the MRO of the wrapped class.

    Its one attribute, ``_pipedap`` (a :class:`Reducer`), is set by
    :func:`DistributedOptimizer`; there is no ``__init__`` (the user's optimizer is
    not constructed again: its state is shared). On a process set of one rank the
    reducer has no plan and the optimizer steps locally.
    """

    def step(self, closure=None):
        """Finish this iteration's gradient communication schedule; updates follow the plan.

        ``wfbp``: waits for the all-reduces and updates every parameter now. ``dear`` /
        ``pipedap``: issues the forward-phase all-gathers and returns at once; each bucket is
        updated just before its next forward (or by ``synchronize()``).
        """
        reducer = self._pipedap
        if reducer.grads_complete and not reducer.skipping_synchronize:
            warnings.warn(SYNCHRONIZE_THEN_STEP, stacklevel=2)
        if reducer.plan is None:
            return self._pipedap_local_step(closure)
        if closure is not None and not reducer.plan.sync_before_forward:
            raise ValueError(f"step(closure) needs schedule='wfbp'; schedule {reducer.plan.schedule!r} "
                             "updates buckets lazily in the next forward")
        loss = closure() if closure is not None else None
        reducer.end_step(self._pipedap_hyperparameters())
        return loss

    @property
    def _parameter_names(self) -> dict[torch.nn.Parameter, str]:
        """Horovod's attribute: each parameter whose gradient is reduced, and the name it is reduced under."""
        return {p: n for b in self._pipedap.buckets for n, p in zip(b.names, b.params)}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. They stay views into the buckets (never None) so no copy is needed;
        a bucket whose update is still pending is zeroed right after that update."""
        if self._pipedap.plan is None:
            return super().zero_grad(set_to_none)
        self._pipedap.zero_grad()

    def synchronize(self) -> None:
        """Complete communication and apply what is pending.

        Between backward and ``step()`` (Horovod usage, e.g. before clipping or AMP
        unscaling): finishes this iteration's gradient communication, so ``p.grad`` holds
        the averaged gradients and ``step()`` will update at once. Otherwise: applies every
        pending update (after training, before evaluation or saving).
        """
        self._pipedap.synchronize()

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Horovod's idiom: ``synchronize()``, modify gradients, then ``step()`` inside this block.

        ``step()`` after ``synchronize()`` outside this block warns (as Horovod does); the update is
        the same either way.
        """
        if self._pipedap.plan is not None and not self._pipedap.grads_complete:
            raise RuntimeError("skip_synchronize(): call optimizer.synchronize() first, after backward")
        previous, self._pipedap.skipping_synchronize = self._pipedap.skipping_synchronize, True
        try:
            yield
        finally:
            self._pipedap.skipping_synchronize = previous

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside this block accumulate gradients locally and communicate nothing (like DDP)."""
        previous, self._pipedap.sync_enabled = self._pipedap.sync_enabled, False
        try:
            yield
        finally:
            self._pipedap.sync_enabled = previous

    def state_dict(self):
        """The optimizer's state in torch's format. With ``shard_update`` it is gathered from every
        rank (call it on every rank): whole parameters, the same on every rank, loadable at any
        world size or into the plain torch optimizer."""
        self._pipedap.finish_all()
        if self._pipedap.shard_pieces is None:
            return super().state_dict()
        everyone = comm.allgather_object(self._pipedap_state_ranges(), name="optimizer.state_dict",
                                         process_set=self._pipedap.process_set)
        ranges = [r for rank_ranges in everyone for r in rank_ranges]
        return self._pipedap_with_state(
            {p: s for i, p in enumerate(self._pipedap_params())
             if (s := shard_update_module.whole_param_state(ranges, i, p)) is not None},
            super().state_dict)

    def load_state_dict(self, state_dict):
        """Load a state in torch's format (from this optimizer at any world size, or a plain one)."""
        self._pipedap.finish_all()
        super().load_state_dict(state_dict)
        if self._pipedap.shard_pieces is not None:  # keep this rank's pieces of it
            self._pipedap_load_ranges(shard_update_module.ranges_of_params(self.state, self._pipedap_index_of()))

    def sharded_state_dict(self) -> dict:
        """This rank's part of the state (no communication; with ``shard_update`` 1/N of it, else all
        of it): save one per rank. ``load_sharded_state_dict`` takes every rank's, at any world size."""
        self._pipedap.finish_all()
        groups = self._pipedap_with_state({}, super().state_dict)["param_groups"]
        return {"format": shard_update_module.SHARDED_FORMAT, "rank": self._pipedap.process_set.rank(),
                "world_size": self._pipedap.process_set.size(), "param_groups": groups,
                "ranges": self._pipedap_state_ranges()}

    def load_sharded_state_dict(self, parts: list[dict]) -> None:
        """Load the ``sharded_state_dict()`` of every rank of a save (made at any world size, sharded or not)."""
        shard_update_module.check_sharded_parts(parts)
        self._pipedap.finish_all()
        super().load_state_dict({"state": {}, "param_groups": parts[0]["param_groups"]})
        self._pipedap_load_ranges([r for part in parts for r in part["ranges"]])

    @property
    def plan(self) -> Plan | None:
        """The plan this optimizer runs (groups and ordered submissions); None on one rank."""
        return self._pipedap.plan

    @property
    def measuring(self) -> bool:
        """True while ``schedule="pipedap"`` without a plan still measures its first steps (running
        DeAR's order); False once it has planned and switched, and for every other optimizer."""
        return self._pipedap.online is not None

    @property
    def planning(self) -> dict | None:
        """How the running plan was made, once ``schedule="pipedap"`` without a plan has planned online:
        ``cost_model`` (``CostModel.to_dict()``: the α-β lines it simulated), ``cost_source``,
        ``profile_layers``, ``interference`` (the σ measured then, None with
        ``PIPEDAP_INTERFERENCE=off``), ``profile`` (the profile planned on, ``Profile.to_dict()``),
        ``profiling_steps`` (``measured_s``: the DeAR steps it
        measured; ``predicted_s``: what the cost model planned on predicts for them;
        ``fitted_predicted_s`` and ``microbenchmark_predicted_s``: what each candidate model did,
        None where not made or not asked) and ``fit_samples`` (``{"rs": [(bytes, seconds), ...],
        "ag": ...}``: one per operation, what the fit was made of). None before that, and for given
        or built-in plans."""
        return self._pipedap.planning

    # --- internals ---------------------------------------------------------------

    def _pipedap_params(self) -> list[torch.nn.Parameter]:
        """The parameters in param_groups order (their position is torch's state_dict key)."""
        return [p for group in self.param_groups for p in group["params"]]

    def _pipedap_index_of(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self._pipedap_params())}

    def _pipedap_pieces(self) -> list[shard_update_module.Piece]:
        return [pc for pieces in self._pipedap.shard_pieces for pc in pieces]

    def _pipedap_state_ranges(self) -> list[shard_update_module.StateRange]:
        """This rank's state as ranges ([Note: rank-independent optimizer state]): its pieces', or all of it."""
        if self._pipedap.shard_pieces is None:
            return shard_update_module.ranges_of_params(self.state, self._pipedap_index_of())
        return shard_update_module.ranges_of_pieces(self._pipedap_pieces(), self.state)

    def _pipedap_load_ranges(self, ranges: list[shard_update_module.StateRange]) -> None:
        """Make the state this rank's parts of ``ranges`` (its pieces', or whole parameters) and nothing else."""
        state = collections.defaultdict(dict)
        if self._pipedap.shard_pieces is None:
            for i, p in enumerate(self._pipedap_params()):
                if (s := shard_update_module.whole_param_state(ranges, i, p)) is not None:
                    state[p] = s
        else:
            for pc in self._pipedap_pieces():
                if (s := shard_update_module.assemble(ranges, pc.index, pc.start, pc.stop)) is not None:
                    state[pc.tensor] = s
        self.state = state

    def _pipedap_with_state(self, state: dict, call):
        """``call()`` while ``self.state`` is ``state`` (torch's state_dict packs whatever it holds)."""
        kept, self.state = self.state, state
        try:
            return call()
        finally:
            self.state = kept

    def _pipedap_local_step(self, closure):
        """One rank: the plain step, with the same gradient scaling (accumulation, clipping)."""
        scale = self._pipedap.scale()
        if scale != 1.0:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        self._pipedap.clip_coef = None
        return super().step(closure)

    def _pipedap_hyperparameters(self) -> list[dict]:
        """Each param group's options now (tensors copied: schedulers may update them in place)."""
        return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items() if k != "params"}
                for group in self.param_groups]

    @contextlib.contextmanager
    def _pipedap_narrowed(self, hyperparameters: list[dict], params_of: Callable[[int, list], list]):
        """Param group i holds ``params_of(i, its params)`` and the ``hyperparameters`` in force at ``step()``
        (an LR scheduler stepped in between must not change an update that belongs to the previous step);
        the groups are put back afterwards."""
        saved = [dict(group) for group in self.param_groups]
        try:
            for i, (group, hyper) in enumerate(zip(self.param_groups, hyperparameters)):
                group.update(hyper)
                group["params"] = params_of(i, group["params"])
            yield
        finally:
            for group, original in zip(self.param_groups, saved):
                group.clear()
                group.update(original)

    def _pipedap_step_rows(self, param: torch.nn.Parameter, rows: torch.Tensor, grad: torch.Tensor,
                           hyperparameters: list[dict]) -> torch.Tensor:
        """What the wrapped optimizer's step makes of ``param``'s ``rows`` given their gradient, leaving ``param``
        and its state as they are: a copy of the rows, with a copy of their state, stepped alone
        ([Note: the lookup served from the shards] in pipedap.tied_lookup; element-wise rules only)."""
        piece = torch.nn.Parameter(param.detach().index_select(0, rows))
        piece.grad = grad
        state = {key: (value.index_select(0, rows) if torch.is_tensor(value) and value.shape == param.shape
                       else value.clone() if torch.is_tensor(value) else value)
                 for key, value in self.state.get(param, {}).items()}
        with self._pipedap_narrowed(hyperparameters, lambda i, ps: [piece] if any(p is param for p in ps) else []):
            self._pipedap_with_state(collections.defaultdict(dict, {piece: state} if state else {}), super().step)
        return piece.detach()

    def _pipedap_apply_update(self, used: list[torch.nn.Parameter], hyperparameters: list[dict]) -> None:
        """The wrapped optimizer's step on ``used`` (parameters that got a gradient on some rank), with the
        hyperparameters in force at ``step()`` (pending buckets all come from the same step)."""
        ids = {id(p) for p in used}
        sparse = [(p, p.grad) for p in used if p in self._pipedap.sparse_grads]
        group_of_piece = self._pipedap.group_of_piece  # with shard_update, `used` are pieces

        def params_of(i: int, params: list) -> list:
            if group_of_piece:
                return [t for t in used if group_of_piece[id(t)] == i]
            return [p for p in params if id(p) in ids]

        with self._pipedap_narrowed(hyperparameters, params_of):
            try:
                for p, dense in sparse:  # as it came (SparseAdam takes sparse gradients only)
                    p.grad = dense.to_sparse()
                super().step()
            finally:
                for p, dense in sparse:
                    p.grad = dense


def _check_named_parameters(named_parameters) -> list[tuple[str, torch.nn.Parameter]]:
    """``named_parameters`` as a list of (name, parameter) with unique names, or Horovod's ValueError."""
    named = list(named_parameters)  # may be a generator (model.named_parameters()): read it once
    if any(not isinstance(item, tuple) for item in named):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                         "by model.named_parameters()")
    seen: set[str] = set()
    duplicates = sorted({name for name, _ in named if name in seen or seen.add(name)})
    if duplicates:
        raise ValueError("Parameter names in named_parameters must be unique. Found duplicates: "
                         + ", ".join(duplicates))
    return named


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


def _check_ranks_agree(named: list[tuple[str, torch.nn.Parameter]], process_set: ProcessSet) -> None:
    """Same parameter count, names, shapes, dtypes and order on every member, or an error on every member."""
    mine = [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in named]
    digest = hashlib.sha256(repr(mine).encode()).hexdigest()
    everyone = comm.allgather_object((digest, mine), name="DistributedOptimizer.params", process_set=process_set)
    if all(d == everyone[0][0] for d, _ in everyone):
        return
    ref, first = everyone[0][1], process_set.ranks[0]
    for r, (_, theirs) in zip(process_set.ranks, everyone):
        for i in range(max(len(ref), len(theirs))):
            a = ref[i] if i < len(ref) else None
            b = theirs[i] if i < len(theirs) else None
            if a != b:
                def show(x):
                    return "nothing" if x is None else f"'{x[0]}' {x[1]} {x[2]}"
                raise ValueError(
                    f"DistributedOptimizer: the model differs between ranks: parameter #{i} is {show(a)} on "
                    f"rank {first} but {show(b)} on rank {r} (rank {first} has {len(ref)} trainable parameters, rank {r} "
                    f"has {len(theirs)}). Every rank must build the same model and optimizer."
                )


def _resolve_plan(schedule: str, plan, named, fusion_bytes: int, world: int,
                  wire_dtype: torch.dtype | None = None) -> tuple[Plan, bool]:
    """The plan to start with, and whether to plan online (group sizes in bytes on the link).

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
    wire_size = torch.finfo(wire_dtype).bits // 8 if wire_dtype else None
    sizes = {n: p.numel() * (wire_size or p.element_size()) for n, p in named}
    groups = [Group(f"{g[0]}..{g[-1]}" if len(g) > 1 else g[0], tuple(g), sum(sizes[n] for n in g))
              for g in default_groups(named, fusion_bytes)]
    plan_online = schedule in PLANNED_ONLINE
    return plan_of("dear" if plan_online else schedule, groups, world), plan_online


def _resolve_plan_on_every_rank(schedule: str, plan, named, fusion_bytes: int, process_set: ProcessSet,
                                wire_dtype: torch.dtype | None = None) -> tuple[Plan, bool]:
    """:func:`_resolve_plan`, then the same plan on every rank, or an error on every rank.

    Like the parameter check, every rank shares its plan's digest and schedule (one small
    all-gather at wrap time); a rank whose plan cannot be resolved shares its error instead
    of leaving the others waiting in the first collective.
    """
    try:
        resolved = _resolve_plan(schedule, plan, named, fusion_bytes, process_set.size(), wire_dtype)
        mine = (resolved[0].digest(), resolved[0].schedule, None)
    except (OSError, TypeError, ValueError) as err:  # PlanError is a ValueError
        resolved, mine = err, (None, None, f"{type(err).__name__}: {err}")
    everyone = comm.allgather_object(mine, name="DistributedOptimizer.plan", process_set=process_set)
    if isinstance(resolved, Exception):
        raise resolved
    for r, (_, _, error) in zip(process_set.ranks, everyone):
        if error:
            raise ValueError(f"DistributedOptimizer: rank {r} could not resolve its plan: {error}")
    ranks_of: dict[tuple[str, str], list[int]] = {}
    for r, (digest, name, _) in zip(process_set.ranks, everyone):
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
    process_set: ProcessSet = global_process_set,
    sparse_as_dense: bool = False,
    shard_update: bool = False,
):
    """Wrap ``optimizer`` so that gradients are averaged over the ranks with a communication schedule.

    Args:
        optimizer: any ``torch.optim.Optimizer``; the returned object is an instance of its class.
        model: the model being trained; needed for ``dear`` / ``pipedap`` (updates run in its
            modules' forward pre-hooks). Without it, the schedule defaults to ``wfbp``.
        named_parameters: Horovod compatibility: names for the parameters when no model is given.
        schedule: ``pipedap``, ``dear``, ``wfbp`` or ``bytescheduler`` (a baseline: all-reduces cut
            into pieces, the earliest layers' first; it plans online like ``pipedap``, tuning the
            piece size by simulation); default ``$PIPEDAP_SCHEDULE``, else ``pipedap`` with a
            model and ``wfbp`` without.
        plan: a :class:`pipedap.planner.Plan` or its JSON file (``python -m pipedap.tools.plan`` writes
            one; or ``$PIPEDAP_PLAN``). It fixes the buckets and the order. ``pipedap`` without a
            plan plans itself: the first ``$PIPEDAP_PROFILE_STEPS`` (5) steps after a warm-up (until memory
            is warm: 1 to 10 steps) run
            DeAR while measuring layer and communication times, then rank 0 plans
            (``$PIPEDAP_PLANNER``: ``optimal``, or ``greedy`` as in the paper) and all ranks switch.
        backward_passes_per_step: communicate and update every k-th backward; the k accumulated
            gradients are averaged, which equals one k-times larger batch.
        op: ``pipedap.Average`` (default) or ``pipedap.Sum`` over ranks.
        compression: ``Compression.fp16`` or ``.bf16`` reduce-scatter and all-gather each bucket
            in that dtype (half of float32's bytes); the averaged gradient is cast back and the
            update, the optimizer state and the parameters stay in the parameters' dtype.
        fusion_bytes: without a plan, fuse consecutive modules into buckets of about this many
            bytes (default ``$PIPEDAP_FUSION_BYTES`` or 4 MiB; 0: one bucket per module).
        process_set: average over this set's ranks only (default: every rank), e.g. the
            replicas of one pipeline stage. On a rank outside the set the optimizer steps
            locally, communicating nothing (Horovod's rule).
        sparse_as_dense: Horovod's option, accepted with either value: sparse gradients (an
            ``nn.Embedding(sparse=True)``) are always reduced dense in their bucket, and the
            optimizer gets them back sparse (rows whose reduced gradient is zero left out).
        shard_update: ZeRO stage 1 (pipedap/shard_update.py): each rank updates only its shard of
            every bucket and keeps optimizer state for it (``optimizer.state`` then holds 1/N of
            it); the all-gathers carry the updated parameters, in the forward phase (a ``pipedap``
            plan's backward all-gathers move there too). Needs an element-wise update rule
            (tested at wrap time: LAMB-like or factored rules are refused) and a schedule other
            than ``bytescheduler``. ``state_dict()`` then communicates: call it on every rank.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedMixin):
        raise ValueError("this optimizer is already wrapped by pipedap.DistributedOptimizer")
    if named_parameters is not None:  # checked before anything communicates, as Horovod does
        named_parameters = _check_named_parameters(named_parameters)
    schedule = (schedule or settings.get("PIPEDAP_SCHEDULE") or ("pipedap" if model is not None else "wfbp")).lower()
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if model is None and schedule != "wfbp":
        raise ValueError(f"schedule {schedule!r} needs model=: updates run just before each layer's forward")
    if shard_update and schedule == "bytescheduler":
        raise ValueError("shard_update=True with schedule 'bytescheduler': ByteScheduler all-reduces buckets in "
                         "pieces, a sharded update needs each bucket reduce-scattered whole; use wfbp, dear or pipedap")
    if shard_update:
        shard_update_module.check_elementwise(optimizer)
    wire_dtype = wire_dtype_for_buckets(compression)
    engine.check_op(op, "DistributedOptimizer")
    if op not in (comm.Average, comm.Sum):
        raise ValueError(f"DistributedOptimizer reduces gradients with Average or Sum, not {op!r}")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    member = comm.check_member(process_set, "DistributedOptimizer", outsider_ok=True) >= 0
    if fusion_bytes is None:
        fusion_bytes = settings.get("PIPEDAP_FUSION_BYTES")

    cls = type(optimizer.__class__.__name__, (_DistributedMixin, optimizer.__class__), {})
    wrapped = cls.__new__(cls)
    # Share the user's optimizer state; an instance-level `step` (an LR scheduler's
    # call counter) would bypass ours, so it is left behind.
    wrapped.__dict__.update({k: v for k, v in optimizer.__dict__.items() if k != "step"})
    world = process_set.size()
    if not member:
        log.info("DistributedOptimizer: rank %d is not in %s: its optimizer steps locally (as Horovod's)",
                 engine.rank(), process_set)
    if engine.alone(process_set) or not member:  # nothing to communicate: the plain optimizer
        wrapped._pipedap = Reducer(None, [], wrapped._pipedap_apply_update, op=op, passes=backward_passes_per_step,
                                   process_set=process_set)
        return wrapped

    named = _named_trainable(optimizer, model, named_parameters)
    _check_ranks_agree(named, process_set)
    plan, plan_online = _resolve_plan_on_every_rank(schedule, plan, named, fusion_bytes, process_set, wire_dtype)
    by_name = dict(named)
    buckets = [build_bucket(i, [(n, by_name[n]) for n in g.params], world, process_set.rank(), wire_dtype)
               for i, g in enumerate(plan.groups)]
    online = None
    if plan_online and shard_update:
        log.info("DistributedOptimizer: shard_update puts every all-gather in the forward phase, so the online "
                 "planner has no order to choose: running DeAR's order on the buckets as they are")
    elif plan_online:  # measure, then plan
        planner = "bytescheduler" if schedule == "bytescheduler" else settings.get("PIPEDAP_PLANNER")
        online = OnlinePlanner(buckets, steps=settings.get("PIPEDAP_PROFILE_STEPS"), planner=planner,
                               process_set=process_set, max_warmup=settings.get("PIPEDAP_PROFILE_WARMUP_MAX"))
    shard_pieces = _shard(wrapped, buckets) if shard_update else None
    reducer = Reducer(plan, buckets, wrapped._pipedap_apply_update, op=op, passes=backward_passes_per_step,
                      process_set=process_set, online=online, shard_pieces=shard_pieces,
                      step_rows=wrapped._pipedap_step_rows,
                      elementwise=functools.cache(lambda: shard_update_module.elementwise_rule(optimizer)))
    wrapped._pipedap = reducer
    if shard_pieces is not None:
        existing = shard_update_module.ranges_of_params(wrapped.state, wrapped._pipedap_index_of())
        wrapped._pipedap_load_ranges(existing)  # a state loaded before wrapping: keep this rank's part
    reducer.attach(model)
    if model is not None:
        model.register_state_dict_pre_hook(lambda *_: reducer.finish_all())
        _optimizers_of_model.setdefault(model, weakref.WeakSet()).add(wrapped)
    log.info("DistributedOptimizer: schedule %s, %d buckets, %d parameters, %d ranks%s",
             schedule, len(buckets), len(named), world, f", gradients sent as {wire_dtype}" if wire_dtype else "")
    return wrapped


def _shard(optimizer, buckets) -> list[list[shard_update_module.Piece]]:
    """Move each bucket's parameters into its parameter buffer and cut out this rank's pieces."""
    index_of = optimizer._pipedap_index_of()
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    for b in buckets:
        b.flatten_params()
    return [shard_update_module.pieces_of(b, index_of, group_of) for b in buckets]


def flush(model: torch.nn.Module) -> None:
    """Apply every pending update of the optimizers wrapping ``model`` (its parameters are then current)."""
    for opt in list(_optimizers_of_model.get(model, ())):
        opt._pipedap.finish_all()


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
    reducer = optimizer._pipedap
    if reducer.plan is None:
        squares = torch.zeros(1, dtype=torch.float64)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    squares += p.grad.double().pow(2).sum().cpu()
        total = squares
    else:
        total = comm.allreduce(reducer.reduced_square_sum(), op=comm.Sum, name="clip_grad_norm",
                               process_set=reducer.process_set)
    # the gradients the optimizer will see are also divided by the accumulation count
    norm = (total.sqrt() / reducer.passes).reshape(())
    coef = float(max_norm) / (float(norm) + 1e-6)
    reducer.clip_coef = min(coef, 1.0)
    return norm.float()
