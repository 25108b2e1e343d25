"""The pipeline's cost on 2 local ranks: time per minibatch against the slowest stage's compute alone.

    mpirun -np 2 python benchmarks/pipeline_overhead.py --json pipeline_overhead.json

For each model (``models.<name>.gpus=2``, its ``mp_conf.json``: one stage per rank)
it measures, on synthetic images:

* each stage's compute alone (forward, backward and step of one minibatch, no
  communication, while the other rank waits; the median of ``--iters``), and
  the slower of the two; also *side by side*, both ranks computing at once
  without communicating, which is how busy the cores are in the pipeline;
* the activation transfer alone: the boundary's activation and targets from
  rank 0 to rank 1 and its gradient back, with nothing to compute;
* the pipeline's time per minibatch in steady state, 1F1B and with no input
  pipelining: the median interval between the last stage's updates
  (``StageRuntime.step_times``) after the pipeline has filled, and how long
  each rank waited for its receives per minibatch (``receive_waits``).

The slowest stage computes all the time unless it waits for a receive; what it
waits per minibatch in the 1F1B run is the transfer left exposed (at most), so
hidden = 1 - min(waited, transfer alone) / transfer alone. Measured in the same
run as the pipeline's time, it does not depend on the machine's load the way
the figures taken at different times do. Each rank computes with ``--threads`` threads (default 1: 2 ranks, 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import models
import pipedap
from pipedap.pipeline import StageRuntime
from pipedap.pipeline.communication import (
    ACTIVATION,
    GRADIENT,
    TARGET,
    receive_tensor,
    send_tensor,
    tag,
)


def median_seconds(work, iters: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compute_alone(runtime: StageRuntime, sample, iters: int) -> tuple[list[float], list[float]]:
    """Each stage's forward, backward and step of one minibatch without communication: one rank at a time
    (the other waits), and both ranks at once (as busy as in the pipeline: on a loaded machine they share
    the cores)."""
    stage = runtime.module

    def work():
        if runtime.is_first:
            x, y = sample
        else:
            x = torch.randn(runtime.input_spec[0].shape).requires_grad_()
            y = torch.randint(0, 10, runtime.input_spec[1].shape)
        out = stage(x, y)
        out.backward(None if runtime.is_last else torch.randn_like(out))
        runtime.optimizer.step()
        runtime.optimizer.zero_grad()

    alone = []
    for rank in range(pipedap.size()):
        pipedap.barrier()
        alone.append(median_seconds(work, iters) if rank == pipedap.rank() else 0.0)
    pipedap.barrier()
    together = median_seconds(work, iters)
    everyone = pipedap.allgather_object((alone, together))
    return [max(column) for column in zip(*(a for a, _ in everyone))], [t for _, t in everyone]


def transfer_alone(runtime: StageRuntime, iters: int) -> float:
    """The boundary's activation and target forward and its gradient back, nothing else."""
    activation, target = runtime.specs[0]
    unit = iter(range(10**9))

    def work():
        j = next(unit)
        if runtime.is_first:
            sends = [send_tensor(torch.randn(activation.shape), 1, tag(j, ACTIVATION)),
                     send_tensor(torch.zeros(target.shape, dtype=target.dtype), 1, tag(j, TARGET))]
            receive_tensor(activation, 1, tag(j, GRADIENT)).wait()
        else:
            received = [receive_tensor(activation, 0, tag(j, ACTIVATION)), receive_tensor(target, 0, tag(j, TARGET))]
            for r in received:
                r.wait()
            sends = [send_tensor(torch.randn(activation.shape), 0, tag(j, GRADIENT))]
        for s in sends:
            s.wait()

    pipedap.barrier()
    return median_seconds(work, iters)


def pipeline_per_minibatch(modules, config, sample, schedule: str, minibatches: int) -> tuple[float, float]:
    """Steady state, after the fill (the first ``minibatches // 3`` updates): the median interval between the
    last stage's updates (0 elsewhere), and the seconds per minibatch this rank waited for receives."""
    runtime = StageRuntime(modules, config, optimizer=sgd, sample=sample, schedule=schedule)
    runtime.train(iter(lambda: sample, None), minibatches)
    runtime.close()
    steps = runtime.step_times[minibatches // 3:]
    intervals = [b - a for a, b in zip(steps, steps[1:])]
    waited = sum(seconds for arrived, seconds in runtime.receive_waits if steps[0] < arrived <= steps[-1])
    return (statistics.median(intervals) if runtime.is_last else 0.0), waited / len(intervals)


def sgd(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def one_round(modules, config, sample, args, say) -> dict:
    """Every figure once: compute alone per stage, transfer alone, 1F1B and no pipelining per minibatch."""
    runtime = StageRuntime(modules, config, optimizer=sgd, sample=sample, schedule="1f1b")
    figures = dict(zip(("stage_seconds", "side_by_side_seconds"), compute_alone(runtime, sample, args.iters)))
    figures["transfer_seconds"] = max(pipedap.allgather_object(transfer_alone(runtime, args.iters)))
    runtime.close()
    for schedule in ("1f1b", "no_pipelining"):
        everyone = pipedap.allgather_object(
            pipeline_per_minibatch(modules, config, sample, schedule, args.minibatches))
        figures[schedule] = max(seconds for seconds, _ in everyone)
        figures[f"{schedule}_waits"] = [waited for _, waited in everyone]
    stages = ", ".join(f"stage {s} {1e3 * t:.1f} ms ({1e3 * u:.1f} side by side)"
                       for s, (t, u) in enumerate(zip(figures["stage_seconds"], figures["side_by_side_seconds"])))
    waits = ", ".join(f"{1e3 * w:.1f}" for w in figures["1f1b_waits"])
    say(f"  compute alone: {stages}; transfer alone {1e3 * figures['transfer_seconds']:.2f} ms; per minibatch: "
        f"1f1b {1e3 * figures['1f1b']:.1f} ms (waiting for receives per rank: {waits} ms), "
        f"no pipelining {1e3 * figures['no_pipelining']:.1f} ms")
    return figures


def measure(name: str, args, say) -> dict:
    """The medians over ``--rounds`` rounds (rounds alternate the measurements, so drift hits all alike)."""
    package = importlib.import_module(f"models.{name}.gpus=2")
    config = Path(package.__file__).parent / "mp_conf.json"
    modules = package.model(nn.CrossEntropyLoss(), num_classes=10)
    sample = models.synthetic_batch(name, args.batch, image_size=args.image_size, num_classes=10,
                                    generator=torch.Generator().manual_seed(0))
    probe = StageRuntime(modules, config, optimizer=sgd, sample=sample)
    boundary = probe.specs[0][0]
    probe.close()
    mbytes = torch.Size(boundary.shape).numel() * boundary.dtype.itemsize / 2**20
    say(f"# {name}: batch {args.batch}, {args.image_size}x{args.image_size} images, 2 stages, boundary "
        f"{boundary} ({mbytes:.2f} MiB), {args.threads} thread(s) per rank")
    rounds = [one_round(modules, config, sample, args, say) for _ in range(args.rounds)]
    stage_seconds, side_by_side = ([statistics.median(r[key][s] for r in rounds) for s in range(2)]
                                   for key in ("stage_seconds", "side_by_side_seconds"))
    transfer, pipeline, unpipelined = (statistics.median(r[k] for r in rounds)
                                       for k in ("transfer_seconds", "1f1b", "no_pipelining"))
    slowest = max(stage_seconds)
    bottleneck = stage_seconds.index(slowest)
    exposed = statistics.median(r["1f1b_waits"][bottleneck] for r in rounds)
    hidden = 1.0 - min(exposed, transfer) / transfer
    say(f"  median: slowest stage {bottleneck}: {1e3 * slowest:.1f} ms alone ({1e3 * side_by_side[bottleneck]:.1f} "
        f"side by side); 1f1b {1e3 * pipeline:.1f} ms per minibatch = {pipeline / slowest:.3f} x alone, "
        f"{pipeline / side_by_side[bottleneck]:.3f} x side by side; stage {bottleneck} waits {1e3 * exposed:.2f} ms per minibatch for "
        f"receives, the transfer alone takes {1e3 * transfer:.2f} ms: {100 * hidden:.0f}% hidden; no pipelining "
        f"{1e3 * unpipelined:.1f} ms")
    return {"model": name, "batch": args.batch, "image_size": args.image_size, "threads": args.threads,
            "boundary": str(boundary), "boundary_mib": mbytes, "rounds": rounds, "stage_seconds": stage_seconds,
            "slowest_stage_seconds": slowest, "transfer_seconds": transfer, "pipeline_seconds": pipeline,
            "bottleneck_stage": bottleneck, "bottleneck_receive_wait_seconds": exposed,
            "side_by_side_seconds": side_by_side, "no_pipelining_seconds": unpipelined,
            "pipeline_over_slowest": pipeline / slowest,
            "pipeline_over_side_by_side": pipeline / side_by_side[bottleneck],
            "transfer_hidden": hidden}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5, help="timed repetitions of compute and transfer alone")
    parser.add_argument("--minibatches", type=int, default=12, help="minibatches of each pipeline run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--json", help="write the figures here (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipedap.init()
    if pipedap.size() != 2:
        raise SystemExit("run it on 2 ranks: mpirun -np 2 python benchmarks/pipeline_overhead.py")
    rank = pipedap.rank()
    say = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    results = [measure(name, args, say) for name in args.models]
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
