"""StageRuntime: runs this rank's stage of a pipeline (PipeDream's runtime, over PipeDAP's engine or gloo).

    modules = [block0, block1, block2, nn.CrossEntropyLoss()]        # the last module is the loss
    runtime = StageRuntime(modules, "mp_conf.json", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
                           sample=next(iter(loader)), schedule="1f1b")
    losses = runtime.train(loader, num_minibatches=100)              # every rank; data is used on stage 0
    runtime.close()

Every rank builds the same module list; the config says which modules are this
rank's stage. At start-up every rank connects (:func:`pipedap.pipeline.transport.connect`:
the engine under an MPI launcher, else torch.distributed with gloo), agrees on
the config, passes a sample through the stages in order to learn the shapes
sent between them, creates one group per stage and wraps the stage's optimizer
so that replicas average their gradients (engine: ``pipedap.DistributedOptimizer``
over the stage's process set with wfbp, dear or pipedap; gloo: an all-reduce
of buckets before each step, wfbp's semantics). Training runs the events of
:mod:`pipedap.pipeline.schedules`: forward (receive activation -> forward ->
send), backward (receive gradient -> backward -> send), step.

[Note: loss scaling] The loss is not scaled. A stage's update is the mean of the
gradients of the units it covers: ``DistributedOptimizer(op=Average,
backward_passes_per_step=k)`` divides the sum over its n replicas and k
accumulated backward passes by n * k (gloo's AveragingOptimizer does the same), which is the number of units per update
(n with 1F1B and no pipelining; m micro-batches with flush, k = m / n). With a
loss that is the mean over a unit's samples and equal units, the mean of unit
gradients is the gradient of the mean loss over all of them: flush equals
single-process training on the whole minibatch, and a replicated stage without
flush equals data parallelism over its units.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from pipedap.pipeline import schedules, startup, transport
from pipedap.pipeline.communication import (
    ACTIVATION,
    GRADIENT,
    TARGET,
    Received,
    TensorSpec,
    receive_tensor,
    send_tensor,
    tag,
)
from pipedap.pipeline.config import PipelineConfigError
from pipedap.pipeline.stashing import stash_weights

log = logging.getLogger("pipedap")

Batch = tuple[torch.Tensor, torch.Tensor]


class StageModule(nn.Module):
    """One stage's modules in order; on the last stage the final one is the loss, called as loss(output, target)."""

    def __init__(self, modules: Sequence[nn.Module], has_loss: bool):
        super().__init__()
        self.body = nn.Sequential(*(modules[:-1] if has_loss else modules))
        self.loss = modules[-1] if has_loss else None

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(x)
        return out if self.loss is None else self.loss(out, target)


def micro_batch(batch: Batch, micro_batches: int, index: int) -> Batch:
    """Micro-batch ``index`` of ``micro_batches`` equal slices of ``batch`` along its first dimension."""
    x, y = batch
    rows = x.shape[0]
    if rows % micro_batches or (y.dim() and y.shape[0] != rows):
        raise ValueError(f"a minibatch of {rows} samples (targets {list(y.shape)}) does not split into "
                         f"{micro_batches} equal micro-batches; use a batch size that is a multiple of it")
    size = rows // micro_batches
    return x.narrow(0, index * size, size), (y.narrow(0, index * size, size) if y.dim() else y)


def module_list(model: Sequence) -> list[nn.Module]:
    """The modules of ``model``, the last one the loss: a list of modules, or PipeDream's stage list.

    PipeDream's generated packages return ``[(module, input_names, output_names), ...]``
    from ``model(criterion)``. The runtime passes one tensor between consecutive
    modules, so each entry must take exactly the one output of the entry before it.
    """
    entries = list(model)
    if not entries:
        raise PipelineConfigError("the model has no modules; it needs at least a loss")
    if all(isinstance(e, nn.Module) for e in entries):
        return entries
    modules, previous = [], None
    for i, entry in enumerate(entries):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[0], nn.Module)):
            raise PipelineConfigError(
                f"model entry {i} is {type(entry).__name__}; give a list of modules, or PipeDream's list of "
                "(module, input_names, output_names)")
        module, inputs, outputs = entry
        if len(inputs) != 1 or len(outputs) != 1 or (previous is not None and list(inputs) != [previous]):
            raise PipelineConfigError(
                f"model entry {i} takes {list(inputs)} and returns {list(outputs)}; pipedap's runtime passes one "
                f"tensor between consecutive modules, so entry {i} must take only "
                f"{[previous] if previous else 'the input'} and return one tensor (regenerate the stages with "
                "python -m pipedap.tools.partition)")
        modules.append(module)
        previous = outputs[0]
    return modules


class _Units:
    """Stage 0's units for one replica, drawn from ``data``: this replica's minibatches, in order.

    Replica r of n runs units r, r + n, r + 2n, ... (with flush too: m is a multiple
    of n), so its p-th unit is unit p·n + r. Each of its minibatches holds
    ``per_batch`` of them: 1, or with flush the m / n micro-batches of the job's
    minibatch that are its share.
    """

    def __init__(self, data: Iterable[Batch], per_batch: int, replicas: int, expected: tuple[TensorSpec, TensorSpec],
                 device):
        self.batches, self.per_batch, self.replicas = iter(data), per_batch, replicas
        self.expected, self.device = expected, device
        self.drawn, self.current = 0, None

    def get(self, unit: int) -> Batch:
        position = unit // self.replicas
        index = position // self.per_batch
        while self.drawn <= index:
            try:
                self.current = next(self.batches)
            except StopIteration:
                raise ValueError(f"data ran out after {self.drawn} minibatches; train() needs this replica's share "
                                 "of the job's minibatches (see StageRuntime.train)") from None
            self.drawn += 1
        x, y = micro_batch(self.current, self.per_batch, position % self.per_batch)
        got = (TensorSpec.of(x), TensorSpec.of(y))
        if got != self.expected:
            raise ValueError(f"minibatch {index} gives units of input {got[0]}, target {got[1]}, but the pipeline was "
                             f"set up for {self.expected[0]}, {self.expected[1]} (sample=); every minibatch must have "
                             "the sample's shapes (e.g. a loader with drop_last=True)")
        return x.to(self.device), y.to(self.device)


class StageRuntime:
    """This rank's stage: its modules, its optimizer, and the schedule that runs them.

    Args:
        modules: the whole model as a list of modules, the last one the loss (the same list on every rank),
            or PipeDream's ``[(module, input_names, output_names), ...]`` (:func:`module_list`).
        config: a :class:`~pipedap.pipeline.config.PipelineConfig`, its JSON file or dict (PipeDream's format).
        optimizer: ``optimizer(params)`` builds the stage's optimizer on its parameters.
        sample: one minibatch ``(input, target)`` as ``data`` yields it on this rank (needed on stage 0's ranks).
        schedule: ``1f1b`` (with weight stashing), ``no_pipelining`` or ``flush``.
        micro_batches: with ``flush``, the micro-batches of a minibatch (a multiple of every stage's replicas).
        extra_in_flight: with ``1f1b``, units each stage admits per later stage beyond PipeDream's count, to hide
            transfers as long as compute (one more stashed weight version and one more update of staleness
            each; [Note: extra units in flight] in :mod:`pipedap.pipeline.schedules`).
        dp_schedule: how a replicated stage's gradients are averaged: ``wfbp``, ``dear`` or ``pipedap``
            (dear and pipedap need the engine: an MPI launcher).
        connection: keyword arguments of :func:`~pipedap.pipeline.transport.connect` (``rank``,
            ``master_addr``, ``master_port``, ``timeout``) for a job no MPI launcher started; the
            world size defaults to the config's number of ranks.
    """

    def __init__(self, modules: Sequence[nn.Module], config, *, optimizer: Callable[[list], torch.optim.Optimizer],
                 sample: Batch | None = None, schedule: str = "1f1b", micro_batches: int = 1,
                 dp_schedule: str = "wfbp", connection: dict | None = None, extra_in_flight: int = 0):
        modules = module_list(modules)
        connection = dict(connection or {})
        if "world_size" not in connection and not transport.under_mpi_launcher() and not os.environ.get("WORLD_SIZE"):
            connection["world_size"] = _config_ranks(config)
        self.transport = transport.connect(**connection)
        self.config = startup.checked_config(self.transport, config, len(modules))
        schedules.check(schedule, self.config, micro_batches, extra_in_flight)
        self._check_dp_schedule(dp_schedule)
        self.schedule, self.micro_batches, self.extra_in_flight = schedule, micro_batches, extra_in_flight
        self.rank = self.transport.rank
        self.stage = self.config.stage_of(self.rank)
        self.replica = self.config.ranks(self.stage).index(self.rank)
        self.num_stages = self.config.num_stages
        self.is_first, self.is_last = self.stage == 0, self.stage == self.num_stages - 1
        self.module = StageModule([modules[i] for i in self.config.modules_of(self.stage)], self.is_last)
        params = list(self.module.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self._per_batch = schedules.backward_passes_per_step(schedule, self.config, 0, micro_batches)
        probe = None if sample is None else (lambda: micro_batch(sample, self._per_batch, 0))
        self.specs = startup.boundary_specs(self.transport, self.config, self.stage, self.module, probe, self.device)
        self.input_spec = self.specs[self.stage - 1] if not self.is_first else None
        self.output_spec = self.specs[self.stage] if not self.is_last else None
        self._stage_sets, self.process_set = self._make_groups()
        self.optimizer = None
        if params:
            passes = schedules.backward_passes_per_step(schedule, self.config, self.stage, micro_batches)
            self.optimizer = self.transport.stage_optimizer(optimizer(params), self.module, self.process_set,
                                                            len(self.config.ranks(self.stage)), passes, dp_schedule)
        self._stash = schedules.stashes_weights(schedule, self.config, self.stage, extra_in_flight)
        self._sample_spec = tuple(TensorSpec.of(t) for t in probe()) if self.is_first else None
        self._start_run()
        in_flight = (f" ({schedules.admitted(self.config, self.stage, extra_in_flight)} units in flight)"
                     if schedule == "1f1b" else "")
        log.info("pipeline: stage %d of %d (replica %d of %d), schedule %s%s, %d modules", self.stage,
                 self.num_stages, self.replica, len(self.config.ranks(self.stage)), schedule, in_flight,
                 len(self.module.body))

    def _check_dp_schedule(self, dp_schedule: str) -> None:
        """ValueError (on every rank: the config is agreed) when gloo would have to run dear or pipedap replicas."""
        replicated = [s for s in range(self.config.num_stages) if len(self.config.ranks(s)) > 1]
        if replicated and dp_schedule != "wfbp" and isinstance(self.transport, transport.TorchTransport):
            raise ValueError(
                f"dp_schedule={dp_schedule!r} for the replicas of stage {replicated[0]} needs PipeDAP's engine, but "
                f"no MPI launcher started this job (rank {self.transport.rank} runs over {self.transport.name}, "
                "which averages replicas like wfbp): launch with `mpirun -np "
                f"{self.transport.size} python ...` for dear/pipedap, or use dp_schedule='wfbp'")

    def _make_groups(self):
        """One group per stage (every rank creates all, in stage order); the groups to remove, this stage's."""
        groups = [self.transport.stage_group(list(self.config.ranks(s))) for s in range(self.num_stages)]
        return groups, groups[self.stage]

    def parameters(self):
        return self.module.parameters()

    # --- training ------------------------------------------------------------------

    def train(self, data: Iterable[Batch] | None, num_minibatches: int,
              on_loss: Callable[[int, float], None] | None = None) -> list[float]:
        """Train on ``num_minibatches`` minibatches; returns the losses this rank computed (last stage).

        On stage 0's ranks ``data`` yields this replica's minibatches (its own shard, as
        each rank's sampler in data parallelism): with n replicas of stage 0, replica r
        runs the job's minibatches r, r + n, ... (``num_minibatches / n`` of them); with
        flush, its share of every minibatch: ``m / n`` of the ``m`` micro-batches
        (``num_minibatches`` batches of ``batch / n`` samples). Other ranks pass None.
        ``on_loss(unit, loss)`` is called on the last stage after each unit's forward.
        When it returns, every update is applied (the parameters are current).
        """
        schedules.check_length(self.schedule, self.config, num_minibatches)
        events = schedules.events(self.schedule, self.config, self.stage, self.replica, num_minibatches,
                                  self.micro_batches, self.extra_in_flight)
        self.module.train()
        return self._run(events, data, on_loss)

    def evaluate(self, data: Iterable[Batch] | None, num_minibatches: int,
                 on_loss: Callable[[int, float], None] | None = None) -> list[float]:
        """Forward passes only (PipeDream's ``--forward_only``): eval mode, no gradients, no update.

        ``data`` and the return value are as in :meth:`train`; not with ``flush``.
        """
        if self.schedule == "flush":
            raise ValueError("evaluate() runs whole minibatches; build the runtime with schedule '1f1b' or "
                             "'no_pipelining' to evaluate")
        schedules.check_length("no_pipelining", self.config, num_minibatches)
        events = [e for e in schedules.events("no_pipelining", self.config, self.stage, self.replica,
                                              num_minibatches) if e.kind == schedules.FORWARD]
        training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return self._run(events, data, on_loss)
        finally:
            self.module.train(training)

    def _run(self, events: list[schedules.Event], data, on_loss) -> list[float]:
        if self.is_first:
            if data is None:
                raise ValueError(f"rank {self.rank} runs stage 0: pass the job's minibatches as data")
            self._units = _Units(data, self._per_batch, len(self.config.ranks(0)), self._sample_spec, self.device)
        self._start_run()
        report_every = max(1, len(events) // 10)
        for i, event in enumerate(events):
            started, waits = time.perf_counter(), len(self.receive_waits)
            self._post_receives(events[i:i + 4])
            if event.kind == schedules.FORWARD:
                self._forward(event.unit)
                if self.is_last and on_loss is not None:
                    on_loss(event.unit, self._losses[-1])
            elif event.kind == schedules.BACKWARD:
                self._backward(event.unit)
            else:
                self._step()
            self._sends = [w for w in self._sends if not w.done()]
            self.event_times.append((event.kind, event.unit, started, time.perf_counter(),
                                     sum(waited for _, waited in self.receive_waits[waits:])))
            if self.is_last and self._losses and (i + 1) % report_every == 0:
                log.info("pipeline: %d/%d events, loss %.4f", i + 1, len(events), self._losses[-1])
        for work in self._sends:
            work.wait()
        self.transport.flush(self.module)
        return self._losses

    def _start_run(self) -> None:
        """The state of one train() call."""
        self._received: dict[tuple[int, int], Received] = {}  # (unit, kind) -> receive in flight
        self._sends: list = []  # the transport's works in flight
        self._in_flight: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # unit -> (input, output or loss)
        self._losses: list[float] = []
        # for measurements (time.perf_counter()): after each optimizer step; (arrival, seconds waited) per
        # receive; per event (kind, unit, start, end, seconds of it spent waiting for received data)
        self.step_times: list[float] = []
        self.receive_waits: list[tuple[float, float]] = []
        self.event_times: list[tuple[str, int, float, float, float]] = []

    def _peer(self, stage: int, unit: int) -> int:
        return self.config.rank_for(stage, unit)

    def _post_receives(self, upcoming: list[schedules.Event]) -> None:
        """Post the receives of the next events early, so their data arrives while this rank computes."""
        for e in upcoming:
            wanted = []
            if e.kind == schedules.FORWARD and not self.is_first:
                wanted = [(ACTIVATION, self.input_spec[0]), (TARGET, self.input_spec[1])]
            elif e.kind == schedules.BACKWARD and not self.is_last and self.output_spec[0].dtype.is_floating_point:
                wanted = [(GRADIENT, self.output_spec[0])]
            peer = self._peer(self.stage + (1 if e.kind == schedules.BACKWARD else -1), e.unit) if wanted else None
            for kind, spec in wanted:
                if (e.unit, kind) not in self._received:
                    self._received[e.unit, kind] = receive_tensor(spec, peer, tag(e.unit, kind), device=self.device,
                                                                  transport=self.transport)

    def _take(self, unit: int, kind: int) -> torch.Tensor:
        started = time.perf_counter()
        tensor = self._received.pop((unit, kind)).wait()
        ended = time.perf_counter()
        self.receive_waits.append((ended, ended - started))
        return tensor

    def _send(self, tensor: torch.Tensor, stage: int, unit: int, kind: int) -> None:
        self._sends.append(send_tensor(tensor, self._peer(stage, unit), tag(unit, kind), transport=self.transport))

    def _forward(self, unit: int) -> None:
        """Receive (or read) the unit's input, run the stage's modules, send the output on."""
        if self.is_first:
            x, y = self._units.get(unit)
        else:
            x, y = self._take(unit, ACTIVATION), self._take(unit, TARGET)
            if x.is_floating_point():
                x.requires_grad_()
        if self._stash and torch.is_grad_enabled():
            with stash_weights(self.module.parameters()):
                out = self.module(x, y)
        else:
            out = self.module(x, y)
        if self.is_last:
            self._losses.append(out.item())
        else:
            self._send(out, self.stage + 1, unit, ACTIVATION)
            self._send(y, self.stage + 1, unit, TARGET)
        if torch.is_grad_enabled():  # not in evaluate(): no backward will come
            self._in_flight[unit] = (x, out)

    def _backward(self, unit: int) -> None:
        """Receive the gradient of the unit's output, run backward, send the input's gradient back."""
        x, out = self._in_flight.pop(unit)
        self.transport.flush(self.module)  # 1F1B's drain: a backward right after a lazy (dear/pipedap) step
        if self.is_last:
            out.backward()
        elif out.requires_grad:
            out.backward(self._take(unit, GRADIENT))
        elif self.output_spec[0].dtype.is_floating_point:
            self._take(unit, GRADIENT)  # nothing here depends on it, but the message must be taken
        if not self.is_first and x.requires_grad:
            self._send(x.grad if x.grad is not None else torch.zeros_like(x), self.stage - 1, unit, GRADIENT)

    def _step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.step_times.append(time.perf_counter())

    def compute_alone(self, repeats: int = 3) -> dict[str, float]:
        """Seconds of this stage's forward and backward on one unit with nothing else running (median of
        ``repeats``, after one warm-up): what its compute costs when no transfer competes for the core.

        Local (no communication); inputs are zeros of the boundary's shapes. The backward is
        ``torch.autograd.grad``, which leaves ``p.grad`` alone and fires no gradient-accumulation
        hook, and the modules' forward hooks are set aside meanwhile: a DistributedOptimizer over
        the stage's replicas sees nothing (its hooks would submit collectives the other replicas
        never join). Buffers (BatchNorm statistics) are restored.
        """
        specs = self._sample_spec if self.is_first else self.input_spec
        x, y = (spec.empty(self.device).zero_() for spec in specs)
        if x.is_floating_point() and not self.is_first:
            x.requires_grad_()
        wrt = [p for p in self.module.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
        saved = {name: b.clone() for name, b in self.module.named_buffers()}
        hooks = [(m, m._forward_pre_hooks, m._forward_hooks) for m in self.module.modules()]
        times: dict[str, list[float]] = {"forward": [], "backward": []}
        try:
            for m, _, _ in hooks:
                m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                out = self.module(x, y)
                t1 = time.perf_counter()
                if out.requires_grad and wrt:
                    torch.autograd.grad(out, wrt, None if self.is_last else torch.ones_like(out), allow_unused=True)
                t2 = time.perf_counter()
                times["forward"].append(t1 - t0)
                times["backward"].append(t2 - t1)
        finally:
            for m, pre, post in hooks:
                m._forward_pre_hooks, m._forward_hooks = pre, post
            with torch.no_grad():
                for name, b in self.module.named_buffers():
                    b.copy_(saved[name])
        return {phase: statistics.median(t[1:]) for phase, t in times.items()}

    def close(self) -> None:
        """Apply pending updates and remove the stages' groups (every rank calls it); the transport stays connected."""
        self.transport.flush(self.module)
        self.transport.remove_groups(self._stage_sets)
        self._stage_sets = []


def _config_ranks(config) -> int:
    """The number of ranks ``config`` places: the world size of a job no launcher started (raises if unreadable)."""
    loaded = startup.PipelineConfig.load(config)
    return len({r for s in range(loaded.num_stages) for r in loaded.ranks(s)})
