"""Training throughput benchmark on synthetic data: ``python -m pipedap.tools.bench --help``.

Run it under MPI, e.g.::

    mpirun -np 2 python -m pipedap.tools.bench --model resnet50 --batch-size 8 --baseline PipeDAP

It trains ``--model`` from the ``models`` package on random batches with SGD (momentum
0.9; or ``--optimizer adamw``) distributed by one baseline (see :mod:`pipedap.tools.bench_baselines`), and prints, like
upstream PipeDAP's benchmark (Horovod's synthetic benchmark), on rank 0::

    Img/sec per worker in each timed iteration (the mean over the 2 ranks' rates):
    Iter #0: 10.4 img/sec per worker            (per GPU on GPUs; sentences/sec for language models)
    Img/sec per worker: 10.3 +-0.2 (mean of the Iter lines +- its 95% confidence interval)
    Total img/sec on 2 worker(s): 20.6 +-0.4

followed by the measured time per batch next to the planner's prediction (when the plan
has one). ``--json FILE`` writes all of it::

    version, command, model, kind, unit, input_shape, batch_size, baseline, description,
    world_size, device, fp16, compression, optimizer, shard_update, threshold_bytes, warmup_batches, batches_per_iter, iterations,
    per_iteration: [{seconds, per_worker, total}], per_rank_mean: [rate of each rank],
    optimizer_state_bytes: [bytes of each rank's optimizer state tensors after the run],
    per_worker: {mean, ci95, std}, total: {mean, ci95},
    batch_time: {measured_s, predicted_s, predicted_over_measured},
    phases_ms: {forward, backward, step} (rank 0's means),
    plan: {schedule, groups, digest, predicted_iteration_s, source} or null,
    planning: {cost_model, cost_source, profile_layers, interference, profiling_steps, fit_samples} (PipeDAP
              with --bandwidth or --timeline, or planned online: then interference is the σ measured in this
              job, profiling_steps {measured_s, predicted_s, fitted_predicted_s, microbenchmark_predicted_s}
              the DeAR steps it planned from, as measured and as the cost models predict them, and
              fit_samples {rs, ag} the [bytes, seconds] the fit was made of, and profile the one planned on
              (Profile.to_dict(): pipedap.planner can simulate it again); else null) or null,
    energy: {seconds, compute: {busy_s, idle_s, joules}, link: {...} (with --link-rate), joules,
             joules_per_sample, power, link_rate, compute_busy_source} per worker and batch (--power) or null,
    timeline: FILE or null, wall_seconds

A rate is units (images or sentences) per second: per_worker is the mean over ranks,
total the sum. ``--timeline FILE`` writes a Chrome trace (see :mod:`pipedap.tools.timeline`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

import models
from pipedap import heap, units
from pipedap.planner import energy
from pipedap.tools import timeline
from pipedap.tools.bench_baselines import BenchError, Runtime, start
from pipedap.tools.bench_options import build_parser, validate
from pipedap.tools.stats import confidence

JSON_VERSION = 1
MAX_WARMUP = 200  # batches; a system not ready by then is reported, not waited for
MEMORY_WARMUP_EXTRA = 10  # batches beyond --num-warmup-batches while memory is still faulted in ([Note: warm memory])
GB = 1e9
MEMORY_WARN_FRACTION = 0.8  # of MemAvailable: above it --check warns that the job is close to not fitting


def launch_rank() -> int:
    """This process's rank according to the MPI launcher (0 when not launched by one)."""
    from pipedap import settings

    return settings.launch_rank(os.environ)


def make_batch(args: argparse.Namespace, rank: int, device: torch.device) -> tuple:
    """This rank's synthetic (inputs, targets); ranks draw different data, as in real training."""
    kind = models.info(args.model).kind
    sizes = {"image_size": args.image_size} if kind == "image" else {"seq_len": args.sentence_len}
    return models.synthetic_batch(args.model, args.batch_size, generator=torch.Generator().manual_seed(
        args.seed + 1 + rank), device=device, **sizes)


def make_data(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Iterator[tuple]:
    """This rank's batches, forever: its synthetic batch again and again, or its shard of ``--data-dir``,
    reshuffled every epoch and decoded by ``--workers`` processes (their time counts, as in training)."""
    if not args.data_dir:
        return itertools.repeat(make_batch(args, rank, device))
    root = Path(args.data_dir)
    root = root / "train" if (root / "train").is_dir() else root
    side = args.image_size or models.info(args.model).input_shape[-1]
    loader = models.data.image_folder_loader(root, args.batch_size, side, seed=args.seed, rank=rank,
                                             world_size=world, num_workers=args.workers, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"--data-dir {root}: {len(loader.dataset)} images make no batch of {args.batch_size} for "
                         f"each of {world} ranks; use a smaller --batch-size")

    def epochs() -> Iterator[tuple]:
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            for x, y in loader:
                yield x.to(device), y.to(device)

    return epochs()


def meminfo_kib(field: str, path: str = "/proc/meminfo") -> int | None:
    """A ``Field:  N kB`` value of a /proc file in KiB, or None where there is none (not Linux)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    return None


def saved_activation_bytes(model: torch.nn.Module, inputs, targets, loss_fn) -> int:
    """Bytes that autograd keeps for backward after one forward of this batch, parameters excluded.

    Measured, not guessed: every tensor saved for backward is counted once by its storage.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(model(inputs), targets)
    return sum(storages.values())


def memory_estimate(args: argparse.Namespace) -> dict[str, int]:
    """Bytes one CPU rank needs, by part: the Python/torch runtime (this process, measured now),
    parameters, gradients, the optimizer's state (SGD momentum: one copy of the weights; AdamW: two;
    the upper bound without --shard-update's saving), and the activations of one batch (those of a
    batch of 2 measured, scaled to the batch size; 2 because batch norm refuses a single sample)."""
    runtime = (meminfo_kib("VmRSS", "/proc/self/status") or 0) * 1024
    torch.manual_seed(args.seed)
    model = models.get(args.model)
    two = argparse.Namespace(**{**vars(args), "batch_size": 2})
    per_sample = saved_activation_bytes(model, *make_batch(two, 0, torch.device("cpu")), models.loss_fn(args.model)) / 2
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"runtime": runtime, "parameters": weights, "gradients": weights, "optimizer state": weights * (2 if args.optimizer == "adamw" else 1),
            "activations": round(per_sample * args.batch_size)}


def check_memory(args: argparse.Namespace) -> str:
    """Refuse a CPU job that clearly does not fit this host's available memory; a line to print.

    On GPUs the batch lives in GPU memory, which this does not check.
    """
    if args.device != "cpu":
        return f"memory: not estimated on {args.device} (host memory is not where the batch lives)"
    available_kib = meminfo_kib("MemAvailable")
    if available_kib is None:
        return "memory: not estimated (no MemAvailable in /proc/meminfo)"
    parts = memory_estimate(args)
    per_rank, available, ranks = sum(parts.values()), available_kib * 1024, args.ranks_per_host
    need = per_rank * ranks
    what = ", ".join(f"{name} {value / GB:.2f}" for name, value in parts.items())
    line = (f"about {per_rank / GB:.1f} GB per rank ({what} GB) x {ranks} rank(s) on this host "
            f"= {need / GB:.1f} GB; {available / GB:.1f} GB available (MemAvailable)")
    size = f"--image-size (now {args.image_size or 'the model default'})" if models.info(args.model).kind == "image" \
        else f"--sentence-len (now {args.sentence_len or 'the model default'})"
    lower = (f"lower the batch size (bs / --batch-size, now {args.batch_size}; activations grow with it), "
             f"{size}, or the ranks per host (nworkers, or slots in the hostfile; now {ranks})")
    if need > available:
        raise BenchError(f"this job does not fit in this host's memory and would be killed (signal 9): needs {line}. "
                         f"To fit, {lower}")
    if need > MEMORY_WARN_FRACTION * available:
        return f"warning: memory is tight: needs {line}; other programs or a larger peak may get it killed: {lower}"
    return f"memory: needs {line}"


def predict(plan, args: argparse.Namespace, batch: tuple, loss_fn, say) -> tuple:
    """The running plan with the planner's prediction, for plans that came without one (DeAR, WFBP).

    Collective (every rank): a fresh copy of the model is profiled on every rank at once
    (as in :mod:`pipedap.tools.bench_plan`), fused into the plan's groups and simulated on the
    cost model of ``--bandwidth``, or else the one measured on this cluster (cached).
    Returns (plan, planning facts).
    """
    import dataclasses

    from pipedap import engine, measure
    from pipedap.planner import costmodel, fusion
    from pipedap.planner.plan import Prediction
    from pipedap.planner.simulator import Problem, simulate
    from pipedap.tools.bench_plan import profile_for_planning

    say(f"predicting the {plan.schedule} plan: profiling a copy of the model on every rank")
    torch.manual_seed(args.seed)
    copy = models.get(args.model).to(batch[0].device)
    profile = profile_for_planning(copy, *batch, loss_fn, compressed=args.compression != "none",
                                   sharded=args.shard_update)
    if args.bandwidth:
        cost = costmodel.from_link(engine.size(), units.parse_bandwidth(args.bandwidth),
                                   units.parse_duration(args.latency))
        source = f"assumed ring on {args.bandwidth} links, {args.latency}"
    else:
        cost, source = measure.cost_model(), "measured on this cluster (pipedap.measure.cost_model, cached)"
    layer_of = {name: i for i, layer in enumerate(profile.layers) for name in layer.params}
    grouping = tuple(tuple(sorted({layer_of[p] for p in group.params})) for group in plan.groups)
    if plan.defer:  # the runtime serves the lookups the plan defers (else it warns: the prediction assumes it does)
        profile = dataclasses.replace(profile, ties=tuple(dataclasses.replace(t, deferrable=True)
                                                          for t in profile.ties))
    problem = Problem(fusion.fuse(profile, grouping), cost, split=bool(plan.split), defer=bool(plan.defer))
    timeline = simulate(problem, plan.backward, plan.forward, plan.sync_before_forward)
    say(f"  predicted {timeline.iteration_time * 1e3:.1f} ms per batch (cost model {source})")
    predicted = Prediction(timeline.iteration_time, timeline.lower_bound, timeline.plan_times)
    return dataclasses.replace(plan, predicted=predicted), costmodel.planning_facts(cost, source, len(profile))


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """--optimizer's torch optimizer: SGD with momentum 0.9, or AdamW."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def run(args: argparse.Namespace, runtime: Runtime) -> dict:
    """Warm up, time the iterations, gather every rank's numbers; the results dict on rank 0."""
    rank, world = runtime.rank(), runtime.size()

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    info = models.info(args.model)
    unit = "img" if info.kind == "image" else "sentences"
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", runtime.local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    who = "GPU" if device.type == "cuda" else "worker"
    torch.manual_seed(args.seed)  # the same initial weights everywhere (they are broadcast too)
    model = models.get(args.model).to(device)
    data = make_data(args, rank, world, device)
    inputs, targets = next(data)  # the first batch: for planning and the shapes
    loss_fn = models.loss_fn(args.model)
    say(f"Model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"input {tuple(inputs.shape[1:])})\nBatch size: {args.batch_size}\n"
        f"Number of {who}s: {world} ({device.type})\nBaseline: {args.baseline}\nHeap: {heap.describe()}")
    optimizer = make_optimizer(args, model)
    dist = runtime.distribute(model, optimizer, (inputs, targets), loss_fn, say)
    described = runtime.describe(dist)
    say(f"  {described}")

    recorder = timeline.Recorder(sync=torch.cuda.synchronize if args.timeline and device.type == "cuda" else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if args.fp16 else nullcontext
    model, optimizer = dist.model, dist.optimizer
    model.train()

    def batch() -> None:
        recorder.next_batch()
        inputs, targets = next(data)
        optimizer.zero_grad()
        with recorder.phase("forward"), autocast():
            loss = loss_fn(model(inputs), targets)
        with recorder.phase("backward"):
            loss.backward()
        with recorder.phase("step"):
            optimizer.step()

    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    from tqdm import tqdm

    total_batches = args.num_warmup_batches + args.num_iters * args.num_batches_per_iter
    bar = tqdm(total=total_batches, unit="batch", disable=rank != 0 or args.no_progress, desc="warmup",
               file=sys.stderr, dynamic_ncols=True)
    say(f"Running warmup: {args.num_warmup_batches} batches...")
    warm = []
    # every system's warm-up lasts until memory is warm too ([Note: warm memory] in pipedap.heap), at most
    # MEMORY_WARMUP_EXTRA batches more, so that the timed batches of every system are measured alike
    faulted, fresh = heap.faulted_in_bytes(), None
    memory_warm = args.num_warmup_batches == 0  # no warm-up asked for: none for memory either
    waited_for: dict[str, None] = {}  # what the warm-up went on for beyond --num-warmup-batches, in order
    while len(warm) < args.num_warmup_batches or not dist.warm() or not memory_warm:
        if len(warm) >= MAX_WARMUP:
            raise RuntimeError(f"{args.baseline} was still not ready to time after {MAX_WARMUP} warm-up batches "
                               "(the optimizer had not planned); run with fewer PIPEDAP_PROFILE_STEPS or a --plan")
        if len(warm) >= args.num_warmup_batches:
            bar.total += 1
            waited_for.update((why, None) for why, done in (("the optimizer had planned", dist.warm()),
                                                            ("memory was warm", memory_warm)) if not done)
        began = time.perf_counter()
        batch()
        wait()
        warm.append(time.perf_counter() - began)
        bar.update()
        now = heap.faulted_in_bytes()
        fresh, faulted = max(runtime.allgather_object(now - faulted)), now
        memory_warm = fresh <= heap.WARM_BYTES or len(warm) >= args.num_warmup_batches + MEMORY_WARMUP_EXTRA
    if warm:
        guess = statistics.median(warm[len(warm) // 2:]) * args.num_iters * args.num_batches_per_iter
        say(f"  warmup: {len(warm)} batches in {sum(warm):.1f} s; the timed part should take about {guess:.0f} s")
    if waited_for:
        memory = (f"at most {fresh / 2**20:.1f} MB faulted in by a rank in the last batch" if fresh <= heap.WARM_BYTES
                  else f"still {fresh / 2**20:.0f} MB faulted in by a rank in the last batch after "
                  f"{MEMORY_WARMUP_EXTRA} more: the timed batches may include page faults")
        say(f"  (warmup extended to {len(warm)} batches until {' and '.join(waited_for)}; memory: {memory})")
    if runtime.describe(dist) != described:
        say(f"  now: {runtime.describe(dist)}")
    bar.set_description("timed")
    say(f"Running benchmark: {args.num_iters} iterations x {args.num_batches_per_iter} batches...")
    runtime.barrier()
    recorder.start()
    runtime.listen(recorder.on_ops if runtime.comm_events else None)
    seconds = []
    for i in range(args.num_iters):
        began = time.perf_counter()
        for _ in range(args.num_batches_per_iter):
            batch()
            bar.update()
        if i == args.num_iters - 1:
            # [Note: a timed window of exactly n batches] The barrier above drained the
            # warmup's communication, so the first iteration carries none from before; DeAR
            # and PipeDAP leave the last batch's collectives running when step() returns, so
            # the last iteration waits for them here. The window then holds exactly n batches
            # of compute and communication, and the mean over iterations is exact.
            runtime.finish(optimizer)
        wait()
        seconds.append(time.perf_counter() - began)
    recorder.stop()
    runtime.listen(None)
    bar.close()

    compute_s = compute_alone(args, device, data, loss_fn, say) if args.power else None
    mine = {"seconds": seconds, "phases_ms": recorder.phase_means_ms(), "state_bytes": state_bytes(optimizer),
            "events": recorder.events(rank) if args.timeline else None, "compute_s": compute_s,
            "wire_bytes": wire_bytes_per_batch(model, world, args) if args.power else None}
    everyone = runtime.allgather_object(mine)
    plan = runtime.plan(optimizer)
    dist.facts.update(runtime.planning(optimizer))
    if args.timeline and plan is not None and plan.predicted is None:
        plan, planning = predict(plan, args, (inputs, targets), loss_fn, say)
        dist.facts.update(planning)
    if rank != 0:
        return {}
    if args.save_plan:
        plan.save(args.save_plan)
        print(f"plan that ran written to {args.save_plan}")
    context = {"model": args.model, "kind": info.kind, "unit": unit, "input_shape": list(inputs.shape[1:]),
               "description": runtime.describe(dist), "world_size": world, "device": device.type, "_who": who}
    return summarize(args, context, everyone, plan, dist.facts)


COMPUTE_ALONE_BATCHES = 3  # timed after one untimed batch


def compute_alone(args: argparse.Namespace, device: torch.device, data: Iterator[tuple], loss_fn, say) -> float:
    """Seconds per batch of this rank's compute alone (forward, backward, update of a fresh copy of
    the model with a plain optimizer, no communication): the compute device's busy time for --power."""
    say(f"Timing the compute alone for --power: 1 + {COMPUTE_ALONE_BATCHES} batches on a copy of the model")
    torch.manual_seed(args.seed)
    copy = models.get(args.model).to(device)
    plain = make_optimizer(args, copy)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if args.fp16 else nullcontext
    times = []
    for _ in range(1 + COMPUTE_ALONE_BATCHES):
        inputs, targets = next(data)
        began = time.perf_counter()
        plain.zero_grad()
        with autocast():
            loss = loss_fn(copy(inputs), targets)
        loss.backward()
        plain.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def wire_bytes_per_batch(model: torch.nn.Module, world: int, args: argparse.Namespace) -> float:
    """Bytes each worker sends (and receives) per batch for its gradients: a ring all-reduce moves
    2 (N-1)/N of them; compressed, 2 bytes per element; with --shard-update the all-gather
    half carries parameters in the model's dtype."""
    elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    gradient_bytes = 2 * elements if args.compression != "none" else model_bytes
    gather_bytes = model_bytes if args.shard_update else gradient_bytes
    return (world - 1) / world * (gradient_bytes + gather_bytes)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state tensors (with --shard-update: its shards' only)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def summarize(args: argparse.Namespace, context: dict, everyone: list[dict], plan, facts: dict) -> dict:
    """The results dict (the JSON fields, plus ``_``-prefixed ones for printing) from every rank's numbers."""
    units = args.batch_size * args.num_batches_per_iter
    per_iteration = []
    for i in range(args.num_iters):
        rates = [units / r["seconds"][i] for r in everyone]
        per_iteration.append({"seconds": statistics.fmean(r["seconds"][i] for r in everyone),
                              "per_worker": statistics.fmean(rates), "total": sum(rates)})
    worker = confidence([p["per_worker"] for p in per_iteration])
    total = confidence([p["total"] for p in per_iteration])
    predicted = plan.predicted.iteration_time if plan is not None and plan.predicted else None
    measured = statistics.fmean(p["seconds"] for p in per_iteration) / args.num_batches_per_iter
    return {
        "version": JSON_VERSION, "command": sys.argv, **context, "batch_size": args.batch_size,
        "baseline": args.baseline, "fp16": args.fp16, "compression": args.compression,
        "optimizer": args.optimizer, "shard_update": args.shard_update, "threshold_bytes": facts.get("threshold_bytes"),
        "warmup_batches": args.num_warmup_batches, "batches_per_iter": args.num_batches_per_iter,
        "iterations": args.num_iters, "per_iteration": per_iteration,
        "per_rank_mean": [units / statistics.fmean(r["seconds"]) for r in everyone],
        "per_worker": {"mean": worker[0], "ci95": worker[1], "std": worker[2]},
        "total": {"mean": total[0], "ci95": total[1]},
        "batch_time": {"measured_s": measured, "predicted_s": predicted,
                       "predicted_over_measured": predicted / measured if predicted else None},
        "phases_ms": everyone[0]["phases_ms"],
        "optimizer_state_bytes": [r["state_bytes"] for r in everyone],
        "plan": None if plan is None else {
            "schedule": plan.schedule, "groups": len(plan.groups), "digest": plan.digest(),
            "predicted_iteration_s": predicted, "source": facts.get("plan_source", "built-in")},
        "planning": {k: facts.get(k) for k in ("cost_model", "cost_source", "profile_layers", "interference",
                                               "profiling_steps", "fit_samples", "profile")}
        if "cost_model" in facts else None,
        "energy": energy_of(args, measured, everyone),
        "timeline": args.timeline,
        "_events": [r["events"] for r in everyone] if args.timeline else None, "_plan": plan,
    }


def energy_of(args: argparse.Namespace, batch_s: float, everyone: list[dict]) -> dict | None:
    """--power: busy and idle time per batch of each device, the energy per batch and per sample (per worker)."""
    if not args.power:
        return None
    link_s = (statistics.fmean(r["wire_bytes"] for r in everyone) / units.parse_bandwidth(args.link_rate)
              if args.link_rate else None)
    occupancy = energy.Occupancy(batch_s, statistics.fmean(r["compute_s"] for r in everyone), link_s)
    return {**energy.estimate(occupancy, args.power, args.batch_size), "link_rate": args.link_rate,
            "compute_busy_source": f"compute alone, median of {COMPUTE_ALONE_BATCHES} batches, mean over ranks"}


def report(result: dict, args: argparse.Namespace) -> None:
    """Print the summary (upstream's lines), write the JSON and the timeline (rank 0)."""
    unit, who, world = result["unit"], result["_who"], result["world_size"]
    worker, total = result["per_worker"], result["total"]
    def spread(ci: float | None) -> str:
        return "" if ci is None else f" +-{ci:.1f}"

    print(f"{unit.capitalize()}/sec per {who} in each timed iteration (the mean over the {world} ranks' rates):")
    for i, it in enumerate(result["per_iteration"]):
        print(f"Iter #{i}: {it['per_worker']:.1f} {unit}/sec per {who}")
    print(f"{unit.capitalize()}/sec per {who}: {worker['mean']:.1f}{spread(worker['ci95'])} "
          f"(mean of the Iter lines{'' if worker['ci95'] is None else ' +- its 95% confidence interval'})")
    print(f"Total {unit}/sec on {world} {who}(s): {total['mean']:.1f}{spread(total['ci95'])}")
    times = result["batch_time"]
    line = f"Time per batch: measured {times['measured_s'] * 1e3:.1f} ms"
    if times["predicted_s"] is not None:
        line += (f", predicted by the plan {times['predicted_s'] * 1e3:.1f} ms "
                 f"(predicted/measured {times['predicted_over_measured']:.2f})")
    print(line)
    phases = ", ".join(f"{name} {ms:.1f} ms" for name, ms in result["phases_ms"].items())
    print(f"Rank 0 phases per batch: {phases}")
    if result["energy"]:
        print(f"Per worker and batch: {energy.describe(result['energy'])}")
    if args.timeline:
        events = [e for rank_events in result["_events"] for e in rank_events]
        plan = result["_plan"]
        starts = [e["ts"] for e in result["_events"][0] if e.get("name") == "backward" and e.get("ph") == "X"]
        events += timeline.predicted_events(plan, starts, pid=world)
        meta = {k: result[k] for k in ("model", "baseline", "batch_size", "world_size", "device", "description")}
        meta.update(measured_iteration_s=times["measured_s"], predicted_iteration_s=times["predicted_s"],
                    plan_digest=result["plan"]["digest"] if result["plan"] else None,
                    clock="time.monotonic_ns, microseconds from each rank's origin taken after a common barrier")
        timeline.write_trace(args.timeline, events, meta)
        print(f"timeline written to {args.timeline} ({len(events)} events; python -m pipedap.tools.timeline "
              f"{args.timeline} draws it)")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")},
                                              indent=2) + "\n")
        print(f"results written to {args.json}")


def make_parents(*paths: str | None) -> None:
    """Create the folders of the output files (e.g. out/), so a fresh clone can write there."""
    for path in filter(None, paths):
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def main(argv: Sequence[str] | None = None, runtime: Runtime | None = None) -> int:
    """The benchmark of ``--baseline``, or with ``runtime`` given, of that one (the compute-only job)."""
    args = build_parser().parse_args(argv)
    began = time.perf_counter()
    try:
        validate(args)
    except (BenchError, ValueError, OSError) as err:
        if launch_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        try:
            memory = check_memory(args)
        except BenchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"options OK: {args.model}, batch {args.batch_size}, {args.baseline} on {args.device}\n{memory}")
        return 0
    if launch_rank() == 0:
        make_parents(args.json, args.timeline, args.save_plan)
    if runtime is None:
        runtime = start(args.baseline, args)
    else:
        args.baseline = runtime.name
    result = run(args, runtime)
    if runtime.rank() == 0:
        result["wall_seconds"] = time.perf_counter() - began
        report(result, args)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
