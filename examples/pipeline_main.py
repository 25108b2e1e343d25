"""Train a model split into pipeline stages, as PipeDream's main_with_runtime.py does (synthetic images).

    mpirun -np 2 python examples/pipeline_main.py --module models.resnet50.gpus=2 -b 16
    mpirun -np 2 python examples/pipeline_main.py --module models.vgg16.gpus=2 --no_input_pipelining
    mpirun -np 3 python examples/pipeline_main.py --config hybrid_conf.json --schedule flush --micro-batches 4
    mpirun -np 2 python examples/pipeline_main.py --config dp_conf.json --no_input_pipelining --dp-schedule dear

``--module`` is imported with importlib (a folder named ``gpus=2`` imports fine
that way) and gives the stage modules (``model(criterion)``); ``--config`` is a
PipeDream config, looked up beside the module when it is a bare file name.
Each class is a fixed random image and a sample is its class's image plus
noise. The rank(s) of the last stage print the mean loss of the first and the
last tenth of the run, and the time.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch
from torch import nn

import pipedap
from pipedap.pipeline import SCHEDULES, StageRuntime


def synthetic_images(batch: int, side: int, classes: int, seed: int):
    """Minibatches forever: class templates plus noise, a new draw each time."""
    templates = torch.randn(classes, 3, side, side, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    while True:
        labels = torch.randint(0, classes, (batch,), generator=g)
        yield templates[labels] + torch.randn(batch, 3, side, side, generator=g), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="models.resnet50.gpus=2", help="stage modules: model(criterion)")
    parser.add_argument("--config", default="mp_conf.json", help="PipeDream config (a bare name: beside --module)")
    parser.add_argument("-b", "--batch-size", type=int, default=16, help="minibatch size")
    parser.add_argument("--minibatches", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--no_input_pipelining", action="store_true", help="PipeDream's flag: --schedule no_pipelining")
    parser.add_argument("--micro-batches", type=int, default=1, help="with --schedule flush")
    parser.add_argument("--dp-schedule", default="wfbp", help="replicated stages: wfbp, dear or pipedap")
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(1)

    package = importlib.import_module(args.module)
    config = Path(args.config)
    if not config.exists() and config.name == args.config:
        config = Path(package.__file__).parent / args.config
    modules = package.model(nn.CrossEntropyLoss(), num_classes=10)
    data = synthetic_images(args.batch_size, args.image_size, 10, seed=0)
    sample = next(synthetic_images(args.batch_size, args.image_size, 10, seed=0))
    runtime = StageRuntime(modules, config, sample=sample,
                           optimizer=lambda params: torch.optim.SGD(params, lr=args.lr, momentum=0.9),
                           schedule="no_pipelining" if args.no_input_pipelining else args.schedule,
                           micro_batches=args.micro_batches, dp_schedule=args.dp_schedule)
    start = time.perf_counter()
    losses = runtime.train(data if runtime.is_first else None, args.minibatches)
    seconds = time.perf_counter() - start
    if losses:
        tenth = max(1, len(losses) // 10)
        first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
        print(f"rank {pipedap.rank()} (stage {runtime.stage}): {args.minibatches} minibatches in {seconds:.1f} s, "
              f"loss {first:.3f} -> {last:.3f}", flush=True)
    runtime.close()


if __name__ == "__main__":
    main()
