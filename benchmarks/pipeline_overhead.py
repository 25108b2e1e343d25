"""The pipeline's cost on 2 local ranks: time per minibatch against the slowest stage's compute alone.

    mpirun -np 2 python benchmarks/pipeline_overhead.py --json pipeline_overhead.json

For each model (``models.<name>.gpus=2``, its ``mp_conf.json``: one stage per rank)
it measures, on synthetic images:

* each stage's compute alone (forward, backward and step of one minibatch, no
  communication, while the other rank waits; the median of ``--iters``), and
  the slower of the two;
* the activation transfer alone: the boundary's activation and targets from
  rank 0 to rank 1 and its gradient back, with nothing to compute;
* the pipeline's time per minibatch in steady state, 1F1B and with no input
  pipelining: (T(N2) - T(N1)) / (N2 - N1) over two runs, which cancels the
  fill and drain.

The transfer is *hidden* as far as the pipeline costs less than the slowest
compute plus the transfer: hidden = (slowest + transfer - pipeline) / transfer,
clipped to [0, 1]. Each rank computes with ``--threads`` threads (default 1: 2 ranks, 2 cores).
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


def compute_alone(runtime: StageRuntime, sample, iters: int) -> list[float]:
    """Each stage's forward, backward and step of one minibatch, one rank at a time (the other waits)."""
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

    seconds = []
    for rank in range(pipedap.size()):
        pipedap.barrier()
        seconds.append(median_seconds(work, iters) if rank == pipedap.rank() else 0.0)
    return [max(column) for column in zip(*pipedap.allgather_object(seconds))]


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


def pipeline_per_minibatch(modules, config, sample, schedule: str, short: int, long: int) -> float:
    """Steady-state seconds per minibatch: the difference of a long and a short run, per extra minibatch."""
    runtime = StageRuntime(modules, config, optimizer=sgd, sample=sample, schedule=schedule)
    seconds = []
    for n in (short, long):
        pipedap.barrier()
        start = time.perf_counter()
        runtime.train(iter(lambda: sample, None), n)
        pipedap.barrier()
        seconds.append(time.perf_counter() - start)
    runtime.close()
    return (seconds[1] - seconds[0]) / (long - short)


def sgd(params):
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def measure(name: str, args, say) -> dict:
    package = importlib.import_module(f"models.{name}.gpus=2")
    config = Path(package.__file__).parent / "mp_conf.json"
    modules = package.model(nn.CrossEntropyLoss(), num_classes=10)
    sample = models.synthetic_batch(name, args.batch, image_size=args.image_size, num_classes=10,
                                    generator=torch.Generator().manual_seed(0))
    say(f"# {name}: batch {args.batch}, {args.image_size}x{args.image_size} images, 2 stages")
    runtime = StageRuntime(modules, config, optimizer=sgd, sample=sample, schedule="1f1b")
    boundary = runtime.specs[0][0]
    stage_seconds = compute_alone(runtime, sample, args.iters)
    say(f"  compute alone: stage 0 {1e3 * stage_seconds[0]:.1f} ms, stage 1 {1e3 * stage_seconds[1]:.1f} ms")
    transfer = max(pipedap.allgather_object(transfer_alone(runtime, args.iters)))
    mbytes = torch.Size(boundary.shape).numel() * boundary.dtype.itemsize / 2**20
    say(f"  transfer alone: {1e3 * transfer:.2f} ms ({mbytes:.2f} MiB activation {boundary} and its gradient)")
    runtime.close()
    times = {}
    for schedule in ("1f1b", "no_pipelining"):
        times[schedule] = max(pipedap.allgather_object(
            pipeline_per_minibatch(modules, config, sample, schedule, args.short, args.long)))
        say(f"  {schedule}: {1e3 * times[schedule]:.1f} ms per minibatch")
    slowest = max(stage_seconds)
    hidden = min(1.0, max(0.0, (slowest + transfer - times["1f1b"]) / transfer))
    say(f"  1f1b / slowest stage: {times['1f1b'] / slowest:.3f}; transfer hidden: {100 * hidden:.0f}%")
    return {"model": name, "batch": args.batch, "threads": args.threads, "image_size": args.image_size, "boundary": str(boundary),
            "boundary_mib": mbytes, "stage_seconds": stage_seconds, "slowest_stage_seconds": slowest,
            "transfer_seconds": transfer, "pipeline_seconds": times["1f1b"],
            "no_pipelining_seconds": times["no_pipelining"], "pipeline_over_slowest": times["1f1b"] / slowest,
            "transfer_hidden": hidden}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5, help="timed repetitions of compute and transfer alone")
    parser.add_argument("--short", type=int, default=4, help="minibatches of the short pipeline run")
    parser.add_argument("--long", type=int, default=12, help="minibatches of the long pipeline run")
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
