"""DistributedOptimizer cost: one worker against the plain optimizer; schedules side by side at N workers.

    python benchmarks/optimizer_overhead.py                      # 1 worker: wrapped vs plain
    mpirun -np 2 python benchmarks/optimizer_overhead.py         # every schedule, same run

Each configuration trains the same model on synthetic data; configurations
alternate round by round so drift on a shared machine hits them alike, and
the median iteration time per configuration is reported (and written as JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import pipedap


def make_model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":  # many small layers: the worst case for per-layer hook and update overhead
        layers = [nn.Linear(512, 512) for _ in range(24)]
        model = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())], nn.Linear(512, 10))
        return model, torch.randn(64, 512), torch.randint(0, 10, (64,))
    import models

    model = models.get(name)
    x, y = models.synthetic_batch(name, 4, generator=torch.Generator().manual_seed(0))
    return model, x, y


def run(config: str, model_name: str, iters: int) -> list[float]:
    model, x, y = make_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if config != "plain":
        opt = pipedap.DistributedOptimizer(opt, model=model, schedule=config)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(iters + 2):
        start = time.perf_counter()
        opt.zero_grad()
        out = model(x)
        loss_fn(out if isinstance(out, torch.Tensor) else out[0], y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    opt_sync = getattr(opt, "synchronize", None)
    if opt_sync:
        opt_sync()
    return times[2:]  # the first two: warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", help="mlp (24x512 linear layers) or a name from models")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    pipedap.init()
    world, rank = pipedap.size(), pipedap.rank()
    configs = ["plain", "dear"] if world == 1 else ["wfbp", "dear", "pipedap"]
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"# {args.model}, {world} worker(s): {', '.join(configs)}, {args.rounds} rounds x {args.iters} iterations")
    samples: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for config in configs:
            samples[config] += run(config, args.model, args.iters)
            say(f"  round {r + 1}: {config:8s} median {1e3 * statistics.median(samples[config]):8.2f} ms")
    medians = {c: statistics.median(v) for c, v in samples.items()}
    base = medians[configs[0]]
    for config, m in medians.items():
        say(f"{config:8s} {1e3 * m:8.2f} ms/iter  ({m / base:.3f}x {configs[0]})")
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "world_size": world, "median_seconds": medians}, f, indent=2)


if __name__ == "__main__":
    main()
