"""Training throughput benchmark on synthetic data: ``python -m pipedap.tools.bench --help``.

Run it under MPI, e.g.::

    mpirun -np 2 python -m pipedap.tools.bench --model resnet50 --batch-size 8 --baseline PipeDAP

It trains ``--model`` from the ``models`` package on random batches with SGD (momentum
0.9) distributed by one baseline (see :mod:`pipedap.tools.bench_baselines`), and prints, like
upstream PipeDAP's benchmark (Horovod's synthetic benchmark), on rank 0::

    Img/sec per worker in each timed iteration (the mean over the 2 ranks' rates):
    Iter #0: 10.4 img/sec per worker            (per GPU on GPUs; sentences/sec for language models)
    Img/sec per worker: 10.3 +-0.2 (mean of the Iter lines +- its 95% confidence interval)
    Total img/sec on 2 worker(s): 20.6 +-0.4

followed by the measured time per batch next to the planner's prediction (when the plan
has one). ``--json FILE`` writes all of it::

    version, command, model, kind, unit, input_shape, batch_size, baseline, description,
    world_size, device, fp16, threshold_bytes, warmup_batches, batches_per_iter, iterations,
    per_iteration: [{seconds, per_worker, total}], per_rank_mean: [rate of each rank],
    per_worker: {mean, ci95, std}, total: {mean, ci95},
    batch_time: {measured_s, predicted_s, predicted_over_measured},
    phases_ms: {forward, backward, step} (rank 0's means),
    plan: {schedule, groups, digest, predicted_iteration_s, source} or null,
    planning: {cost_model, cost_source, profile_layers} (PipeDAP with --bandwidth) or null,
    timeline: FILE or null, wall_seconds

A rate is units (images or sentences) per second: per_worker is the mean over ranks,
total the sum. ``--timeline FILE`` writes a Chrome trace (see :mod:`pipedap.tools.timeline`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

import models
from pipedap import units
from pipedap.tools import timeline
from pipedap.tools.bench_baselines import (
    BASELINES,
    BenchError,
    Runtime,
    canonical,
    check_runnable,
    start,
)

JSON_VERSION = 1
MAX_WARMUP = 200  # batches; a system not ready by then is reported, not waited for
GB = 1e9
MEMORY_WARN_FRACTION = 0.8  # of MemAvailable: above it --check warns that the job is close to not fitting
# Two-sided 95% Student-t quantiles for 1..30 degrees of freedom; the normal 1.96 beyond.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipedap.tools.bench",
        description="Synthetic-data training throughput of a model under one data-parallel system "
                    "(run it with mpirun -np N). Prints images (or sentences) per second per worker "
                    "and in total, and the planner's prediction next to the measured batch time.",
        epilog=f"models: {', '.join(models.names())}. Baselines: PipeDAP (a plan from --plan or "
               "made now), DeAR, WFBP (pipedap's runtime), DDP (torch over gloo), Horovod (when "
               "horovod.torch imports); ByteScheduler is refused with the reason.",
    )
    parser.add_argument("--model", default="resnet50", help="model name (default resnet50)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per worker (default 32)")
    parser.add_argument("--num-warmup-batches", type=int, default=10, help="untimed batches first (default 10)")
    parser.add_argument("--num-batches-per-iter", type=int, default=10, help="batches per timed iteration (default 10)")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations (default 10)")
    parser.add_argument("--baseline", "--schedule", default="PipeDAP", metavar="NAME",
                        help=f"{', '.join(BASELINES)} (case-insensitive; default PipeDAP)")
    parser.add_argument("--threshold", type=int, metavar="BYTES",
                        help="tensor-fusion threshold in bytes (pipedap buckets, DDP bucket_cap, Horovod "
                             "fusion buffer; PipeDAP plans with this fusion). Default: each system's own")
    parser.add_argument("--fp16", action="store_true",
                        help="mixed precision (torch.autocast float16) forward and loss; needs CUDA")
    parser.add_argument("--sentence-len", type=int, help="sequence length of language models (default: the model's)")
    parser.add_argument("--image-size", type=int, help="image side of image models (default: the model's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the local rank's GPU when CUDA is available, else CPU")
    parser.add_argument("--plan", metavar="FILE", help="PipeDAP: run this plan (python -m pipedap.plan --out); "
                                                       "default: DistributedOptimizer plans online from its first steps")
    parser.add_argument("--bandwidth", help="PipeDAP: plan for ring links of this speed (e.g. 1gbit) from a profile "
                                            "taken now, instead of planning online from measurements. DeAR, WFBP "
                                            "with --timeline: predict their plan for this link (default: the cost "
                                            "model measured on this cluster)")
    parser.add_argument("--latency", default="50us", help="with --bandwidth: per-step latency (default 50us)")
    parser.add_argument("--save-plan", metavar="FILE", help="PipeDAP: write the plan that ran here (rank 0)")
    parser.add_argument("--timeline", metavar="FILE", help="write a Chrome trace of the timed batches and the plan's "
                                                           "predicted link lane (rank 0; DeAR and WFBP plans are "
                                                           "profiled and simulated after the timed part for it)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (rank 0)")
    parser.add_argument("--seed", type=int, default=0, help="model and data seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--check", action="store_true",
                        help="only check the options and whether the job fits this machine's memory, then exit "
                             "(dist.sh does this before mpirun)")
    parser.add_argument("--ranks-per-host", type=int, default=1, metavar="N",
                        help="with --check: ranks that will share this machine's memory (default 1; dist.sh "
                             "passes the most ranks it places on one host)")
    return parser


def validate(args: argparse.Namespace) -> None:
    """Check the options before any process group starts; BenchError says what to change."""
    args.baseline = canonical(args.baseline)
    check_runnable(args.baseline)
    try:
        info = models.info(args.model)
    except ValueError as err:
        raise BenchError(str(err)) from None
    for name in ("batch_size", "num_batches_per_iter", "num_iters"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_warmup_batches < 0:
        raise BenchError(f"--num-warmup-batches must be >= 0, got {args.num_warmup_batches}")
    if args.ranks_per_host < 1:
        raise BenchError(f"--ranks-per-host must be >= 1, got {args.ranks_per_host}")
    if args.threshold is not None and args.threshold < 0:
        raise BenchError(f"--threshold is in bytes and must be >= 0, got {args.threshold}")
    if info.kind == "image" and args.sentence_len is not None:
        raise BenchError(f"--sentence-len is for language models; {args.model} is an image model (--image-size)")
    if info.kind == "language" and args.image_size is not None:
        raise BenchError(f"--image-size is for image models; {args.model} is a language model (--sentence-len)")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise BenchError("--device cuda: torch sees no CUDA GPU")
    args.device = "cuda" if args.device == "auto" and cuda else ("cpu" if args.device == "auto" else args.device)
    if args.fp16 and args.device != "cuda":
        raise BenchError("--fp16 is not supported on CPU: it means float16 mixed-precision compute, which CPUs "
                         "do not accelerate (timings would not mean anything); run on GPUs or drop --fp16")
    if args.fp16 and args.baseline == "Horovod":
        raise BenchError("--fp16 with Horovod is not implemented here; drop --fp16 or pick another baseline")
    pipedap_only = [opt for opt in ("plan", "save_plan") if getattr(args, opt)]
    if pipedap_only and args.baseline != "PipeDAP":
        raise BenchError(f"--{pipedap_only[0].replace('_', '-')} is for --baseline PipeDAP (it sets PipeDAP's plan)")
    if args.bandwidth and args.baseline not in ("PipeDAP", "DeAR", "WFBP"):
        raise BenchError(f"--bandwidth is for PipeDAP, DeAR and WFBP (their plans are simulated); "
                         f"{args.baseline} has no plan")
    if args.plan and args.bandwidth:
        raise BenchError("--plan and --bandwidth exclude each other: --bandwidth plans a new schedule")
    if args.plan:
        from pipedap.planner.plan import Plan

        Plan.load(args.plan)  # readable and well-formed; matched against the model later


def launch_rank() -> int:
    """This process's rank according to the MPI launcher (0 when not launched by one)."""
    from pipedap import settings

    return settings.launch_rank(os.environ)


def confidence(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, half-width of the 95% confidence interval of the mean, standard deviation).

    With one value there is no spread: None (null in the JSON, which has no NaN).
    """
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    std = statistics.stdev(values)
    dof = len(values) - 1
    t = T95[dof - 1] if dof <= len(T95) else 1.96
    return mean, t * std / math.sqrt(len(values)), std


def make_batch(args: argparse.Namespace, rank: int, device: torch.device) -> tuple:
    """This rank's synthetic (inputs, targets); ranks draw different data, as in real training."""
    kind = models.info(args.model).kind
    sizes = {"image_size": args.image_size} if kind == "image" else {"seq_len": args.sentence_len}
    return models.synthetic_batch(args.model, args.batch_size, generator=torch.Generator().manual_seed(
        args.seed + 1 + rank), device=device, **sizes)


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
    parameters, gradients, SGD momentum, and the activations of one batch (those of a batch
    of 2 measured, scaled to the batch size; 2 because batch norm refuses a single sample)."""
    runtime = (meminfo_kib("VmRSS", "/proc/self/status") or 0) * 1024
    torch.manual_seed(args.seed)
    model = models.get(args.model)
    two = argparse.Namespace(**{**vars(args), "batch_size": 2})
    per_sample = saved_activation_bytes(model, *make_batch(two, 0, torch.device("cpu")), models.loss_fn(args.model)) / 2
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"runtime": runtime, "parameters": weights, "gradients": weights, "optimizer state": weights,
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
    (as in :mod:`pipedap.bench_plan`), fused into the plan's groups and simulated on the
    cost model of ``--bandwidth``, or else the one measured on this cluster (cached).
    Returns (plan, planning facts).
    """
    import dataclasses

    from pipedap import comm, measure
    from pipedap.bench_plan import PROFILE_ITERATIONS, PROFILE_WARMUP
    from pipedap.planner import costmodel, fusion
    from pipedap.planner.plan import Prediction
    from pipedap.planner.simulator import Problem, simulate
    from pipedap.profiler import profile_model

    say(f"predicting the {plan.schedule} plan: profiling a copy of the model on every rank "
        f"({PROFILE_WARMUP} + {PROFILE_ITERATIONS} batches)")
    torch.manual_seed(args.seed)
    copy = models.get(args.model).to(batch[0].device)
    profile = measure.agree_profile(profile_model(copy, *batch, loss_fn, warmup=PROFILE_WARMUP,
                                                  iterations=PROFILE_ITERATIONS))
    if args.bandwidth:
        cost = costmodel.from_link(comm.size(), units.parse_bandwidth(args.bandwidth),
                                   units.parse_duration(args.latency))
        source = f"assumed ring on {args.bandwidth} links, {args.latency}"
    else:
        cost, source = measure.cost_model(), "measured on this cluster (pipedap.measure.cost_model, cached)"
    layer_of = {name: i for i, layer in enumerate(profile.layers) for name in layer.params}
    grouping = tuple(tuple(sorted({layer_of[p] for p in group.params})) for group in plan.groups)
    timeline = simulate(Problem(fusion.fuse(profile, grouping), cost), plan.backward, plan.forward,
                        plan.sync_before_forward)
    say(f"  predicted {timeline.iteration_time * 1e3:.1f} ms per batch (cost model {source})")
    predicted = Prediction(timeline.iteration_time, timeline.lower_bound, tuple(zip(timeline.starts, timeline.ends)))
    facts = {"cost_model": cost.to_dict(), "cost_source": source, "profile_layers": len(profile)}
    return dataclasses.replace(plan, predicted=predicted), facts


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
    inputs, targets = make_batch(args, rank, device)
    loss_fn = models.loss_fn(args.model)
    say(f"Model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"input {tuple(inputs.shape[1:])})\nBatch size: {args.batch_size}\n"
        f"Number of {who}s: {world} ({device.type})\nBaseline: {args.baseline}")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dist = runtime.distribute(model, optimizer, (inputs, targets), loss_fn, say)
    described = runtime.describe(dist)
    say(f"  {described}")

    recorder = timeline.Recorder(sync=torch.cuda.synchronize if args.timeline and device.type == "cuda" else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if args.fp16 else nullcontext
    model, optimizer = dist.model, dist.optimizer
    model.train()

    def batch() -> None:
        recorder.next_batch()
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
    while len(warm) < args.num_warmup_batches or not dist.warm():
        if len(warm) == args.num_warmup_batches:
            bar.total += 1
            if len(warm) >= MAX_WARMUP:
                raise RuntimeError(f"{args.baseline} was still not ready to time after {MAX_WARMUP} batches")
        began = time.perf_counter()
        batch()
        wait()
        warm.append(time.perf_counter() - began)
        bar.update()
    if warm:
        guess = statistics.median(warm[len(warm) // 2:]) * args.num_iters * args.num_batches_per_iter
        say(f"  warmup: {len(warm)} batches in {sum(warm):.1f} s; the timed part should take about {guess:.0f} s")
    if len(warm) > args.num_warmup_batches:
        say("  (warmup extended until the optimizer had planned)")
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

    mine = {"seconds": seconds, "phases_ms": recorder.phase_means_ms(),
            "events": recorder.events(rank) if args.timeline else None}
    everyone = runtime.allgather_object(mine)
    plan = runtime.plan(optimizer)
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
        "baseline": args.baseline, "fp16": args.fp16, "threshold_bytes": facts.get("threshold_bytes"),
        "warmup_batches": args.num_warmup_batches, "batches_per_iter": args.num_batches_per_iter,
        "iterations": args.num_iters, "per_iteration": per_iteration,
        "per_rank_mean": [units / statistics.fmean(r["seconds"]) for r in everyone],
        "per_worker": {"mean": worker[0], "ci95": worker[1], "std": worker[2]},
        "total": {"mean": total[0], "ci95": total[1]},
        "batch_time": {"measured_s": measured, "predicted_s": predicted,
                       "predicted_over_measured": predicted / measured if predicted else None},
        "phases_ms": everyone[0]["phases_ms"],
        "plan": None if plan is None else {
            "schedule": plan.schedule, "groups": len(plan.groups), "digest": plan.digest(),
            "predicted_iteration_s": predicted, "source": facts.get("plan_source", "built-in")},
        "planning": {k: facts[k] for k in ("cost_model", "cost_source", "profile_layers")}
        if "cost_model" in facts else None,
        "timeline": args.timeline,
        "_events": [r["events"] for r in everyone] if args.timeline else None, "_plan": plan,
    }


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


def main(argv: Sequence[str] | None = None) -> int:
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
    runtime = start(args.baseline, args)
    result = run(args, runtime)
    if runtime.rank() == 0:
        result["wall_seconds"] = time.perf_counter() - began
        report(result, args)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
