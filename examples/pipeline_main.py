"""Train a model split into pipeline stages, as PipeDream's main_with_runtime.py does (synthetic images).

    mpirun -np 2 python examples/pipeline_main.py --module models.resnet50.gpus=2 -b 16
    mpirun -np 2 python examples/pipeline_main.py --module models.vgg16.gpus=2 --no_input_pipelining
    mpirun -np 3 python examples/pipeline_main.py --config hybrid_conf.json --schedule flush --micro-batches 4
    mpirun -np 2 python examples/pipeline_main.py --config dp_conf.json --no_input_pipelining --dp-schedule dear

Without mpirun, as PipeDream's users start it: one command per rank, over
torch.distributed with gloo (world size: the config's ranks; replicas average
like wfbp; dear and pipedap need mpirun):

    python examples/pipeline_main.py --module models.resnet50.gpus=2 -b 16 --rank 0 --local_rank 0 \
        --master_addr localhost --config_path mp_conf.json --distributed_backend gloo   # and --rank 1

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
import logging
import time
from pathlib import Path

import torch
from torch import nn

from pipedap.pipeline import SCHEDULES, StageRuntime
from pipedap.pipeline.transport import (
    DEFAULT_MASTER_PORT,
    DEFAULT_TIMEOUT_SECONDS,
    under_mpi_launcher,
)


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
    parser.add_argument("--config", "--config_path", default="mp_conf.json",
                        help="PipeDream config (a bare name: beside --module)")
    parser.add_argument("-b", "--batch-size", type=int, default=16, help="minibatch size")
    parser.add_argument("--minibatches", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b")
    parser.add_argument("--no_input_pipelining", action="store_true", help="PipeDream's flag: --schedule no_pipelining")
    parser.add_argument("--micro-batches", type=int, default=1, help="with --schedule flush")
    parser.add_argument("--dp-schedule", default="wfbp", help="replicated stages: wfbp, dear or pipedap")
    parser.add_argument("--lr", type=float, default=0.01)
    launch = parser.add_argument_group("without mpirun (PipeDream's flags; torch.distributed's env also works)")
    launch.add_argument("--rank", type=int, help="this process's rank (default: $RANK)")
    launch.add_argument("--local_rank", type=int, help="accepted for PipeDream's command lines; CPU only, unused")
    launch.add_argument("--master_addr", help="rank 0's host (default: $MASTER_ADDR)")
    launch.add_argument("--master_port", type=int, help=f"rendezvous port (default: $MASTER_PORT or {DEFAULT_MASTER_PORT})")
    launch.add_argument("--distributed_backend", default="gloo", help="gloo (the only one without mpirun)")
    launch.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                        help="seconds a rank waits for a peer before failing, naming it")
    args = parser.parse_args()
    if args.distributed_backend != "gloo" and not under_mpi_launcher():  # under mpirun the engine decides
        parser.error(f"--distributed_backend {args.distributed_backend}: without mpirun the pipeline runs over "
                     "torch.distributed with gloo only (CPU tensors); pass --distributed_backend gloo, or start every "
                     "rank with mpirun for PipeDAP's engine (MPI, NCCL where compiled)")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # rank 0's start-up lines: stages, transport

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
                           micro_batches=args.micro_batches, dp_schedule=args.dp_schedule,
                           connection={"rank": args.rank, "master_addr": args.master_addr,
                                       "master_port": args.master_port, "timeout": args.timeout})
    start = time.perf_counter()
    losses = runtime.train(data if runtime.is_first else None, args.minibatches)
    seconds = time.perf_counter() - start
    if losses:
        tenth = max(1, len(losses) // 10)
        first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
        print(f"rank {runtime.rank} (stage {runtime.stage}): {args.minibatches} minibatches in {seconds:.1f} s, "
              f"loss {first:.3f} -> {last:.3f}", flush=True)
    runtime.close()
    runtime.transport.close()


if __name__ == "__main__":
    main()
