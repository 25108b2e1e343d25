"""Train an image classifier split into pipeline stages: PipeDream's main_with_runtime.py, on PipeDAP's runtime.

One process per rank. As PipeDream's users start it, one shell per rank (torch.distributed, gloo):

    python main_with_runtime.py --module models.resnet50.gpus=2 -b 8 --data_dir DIR --rank 0 --local_rank 0 \\
        --master_addr localhost --config_path models/resnet50/gpus=2/mp_conf.json --distributed_backend gloo
    python main_with_runtime.py ... --rank 1 --local_rank 1 ...                      # the same, rank 1

or every rank at once under an MPI launcher, over PipeDAP's engine (rank and world from the launcher;
replicated stages can use the dear and pipedap schedules):

    mpirun -np 2 python main_with_runtime.py --module models.resnet50.gpus=2 -b 8 --config_path mp_conf.json

or one process (no --config_path: every module on one stage), or through driver.py.
``--module`` is a stage package (``arch()``, ``model(criterion)``; PipeDream's generated
packages load too); ``--config_path`` a PipeDream config (a bare name is looked up beside the
package). ``--data_dir`` is an ImageNet-style folder (``DIR/train/<class>/*.jpg``, or
``DIR/<class>/*.jpg``); without it the job trains on synthetic images and says so. Each
replica of stage 0 reads its own shard, reshuffled every epoch; the labels travel with the
activations. The last stage prints the loss every ``--print-freq`` minibatches and every rank
its throughput per epoch, in images per second of the whole job.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from models import data as model_data
from pipedap import heap
from pipedap.pipeline import SCHEDULES, StageRuntime, startup, trace, transport
from pipedap.pipeline.config import PipelineConfig
from pipedap.pipeline.transport import (
    DEFAULT_MASTER_PORT,
    DEFAULT_TIMEOUT_SECONDS,
    under_mpi_launcher,
)

LR_POLICIES = ("step", "polynomial", "exponential_decay")
BACKENDS = ("gloo", "nccl", "mpi")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--module", "-m", required=True, help="stage package, e.g. models.resnet50.gpus=2")
    add("--config_path", help="PipeDream config (mp_conf.json, dp_conf.json, hybrid_conf.json; a bare name is found "
                              "beside --module). Default: every module on one stage over every rank")
    add("-b", "--batch-size", type=int, default=8, help="minibatch size per replica of stage 0 (default 8)")
    add("--data_dir", help="image folder (DIR/train/<class>/*.jpg or DIR/<class>/*.jpg); default: synthetic images")
    add("-s", "--synthetic_data", action="store_true", help="synthetic images even with --data_dir")
    add("-j", "--workers", type=int, default=2, help="data-loading worker processes (default 2)")
    add("--image-size", type=int, default=224, help="image side in pixels (default 224, PipeDream's)")
    add("--num-classes", type=int, default=1000, help="classes of the model's output (default 1000, ImageNet's)")
    add("--epochs", type=int, default=1, help="epochs (default 1)")
    add("--num_minibatches", type=int, help="minibatches per epoch (default: an epoch of the data; synthetic: 100)")
    add("--lr", "--learning-rate", type=float, default=0.1, help="initial learning rate (default 0.1)")
    add("--lr_policy", choices=LR_POLICIES, default="step", help="PipeDream's per-epoch policies (default step: "
                                                                 "x0.1 every 30 epochs)")
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", "--wd", type=float, default=1e-4)
    add("--print-freq", "-p", type=int, default=10, help="print the loss every N minibatches (default 10)")
    add("-v", "--verbose_frequency", type=int, default=0, help="PipeDream's verbose logging: the runtime's progress")
    add("--seed", type=int, default=0, help="initial weights, data order and synthetic data")
    add("--no_input_pipelining", action="store_true", help="one minibatch at a time (schedule no_pipelining)")
    add("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default 1f1b, PipeDream's)")
    add("--micro-batches", type=int, default=1, help="micro-batches per minibatch, with --schedule flush")
    add("--extra-in-flight", type=int, default=0, metavar="N",
        help="with --schedule 1f1b: minibatches each stage admits per later stage beyond PipeDream's count, to hide "
             "transfers as long as a stage's compute (default 0; the partitioner's partition.json says how many; "
             "each costs one more stashed weight version and one more update of staleness)")
    add("--dp-schedule", default="wfbp", help="how replicas of a stage average gradients: wfbp, dear, pipedap "
                                              "(dear and pipedap under mpirun)")
    add("--forward_only", action="store_true", help="forward passes only (no training)")
    add("--recompute", action="store_true", help="PipeDream's activation recomputation (refused: not implemented)")
    add("--resume", metavar="PATH", help="checkpoint prefix: each stage loads PATH.<stage>.pth.tar")
    add("--checkpoint_dir", metavar="DIR", help="save DIR/checkpoint.<stage>.pth.tar after every epoch")
    add("--json", metavar="FILE", help="the last stage writes the last epoch's time per minibatch here (the "
                                       "benchmark's JSON form, for pipedap.tools.compare)")
    add("--warmup", type=int, default=3, help="minibatches left out of the --json and --trace timing (default 3)")
    add("--trace", metavar="FILE", help="time each stage's compute alone before training, record every rank's "
                                        "events in the last epoch, and write them here (from the last stage), with "
                                        "where each stage's time per minibatch went (python -m pipedap.pipeline.trace "
                                        "FILE prints it again)")
    launch = parser.add_argument_group("starting each rank by hand (ignored under an MPI launcher)")
    launch.add_argument("--rank", type=int, help="this process's rank (default: $RANK)")
    launch.add_argument("--local_rank", type=int, default=0, help="GPU on this host (CUDA runs only)")
    launch.add_argument("--num_ranks_in_server", type=int, default=1, help="ranks per host (PipeDream's flag)")
    launch.add_argument("--master_addr", help="rank 0's host (default: $MASTER_ADDR)")
    launch.add_argument("--master_port", type=int, help=f"rendezvous port (default $MASTER_PORT or "
                                                        f"{DEFAULT_MASTER_PORT})")
    launch.add_argument("--distributed_backend", choices=BACKENDS, default="gloo",
                        help="gloo: torch.distributed (CPU tensors); mpi or nccl: PipeDAP's engine under mpirun")
    launch.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                        help="seconds a rank waits for a peer before failing, naming it")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error for what cannot run here, naming the flag and the fix."""
    if args.recompute:
        parser.error("--recompute (recomputing activations in backward) is not implemented by pipedap's runtime; "
                     "drop the flag (activations are kept), or use fewer units in flight (--schedule flush)")
    if args.distributed_backend in ("mpi", "nccl") and not under_mpi_launcher():
        parser.error(f"--distributed_backend {args.distributed_backend} runs over PipeDAP's engine, which needs an MPI "
                     "launcher: start every rank with `mpirun -np N python main_with_runtime.py ...`, or pass "
                     "--distributed_backend gloo for one shell per rank")
    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        parser.error("--distributed_backend nccl needs CUDA GPUs and this machine has none; use mpi (CPU tensors "
                     "over MPI) or gloo")
    for flag in ("batch_size", "epochs", "print_freq", "micro_batches", "image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_minibatches is not None and args.num_minibatches < 1:
        parser.error(f"--num_minibatches must be >= 1, got {args.num_minibatches}")
    if args.forward_only and args.schedule == "flush":
        parser.error("--forward_only runs whole minibatches; drop --schedule flush")
    if args.extra_in_flight < 0:
        parser.error(f"--extra-in-flight must be >= 0, got {args.extra_in_flight}")
    if args.extra_in_flight and (args.schedule != "1f1b" or args.no_input_pipelining or args.forward_only):
        parser.error("--extra-in-flight admits more minibatches into 1F1B training; drop it, or drop "
                     "--no_input_pipelining / --forward_only / --schedule " + args.schedule)
    if args.no_input_pipelining and args.schedule != "1f1b":
        parser.error(f"--no_input_pipelining is --schedule no_pipelining; drop one of it and --schedule "
                     f"{args.schedule}")


def load_stages(args: argparse.Namespace) -> tuple[object, list]:
    """The package and its ``model(criterion)``, with --num-classes where the package takes it."""
    try:
        package = importlib.import_module(args.module)
    except ImportError as err:
        raise SystemExit(f"--module {args.module}: cannot import it ({err}); run from the repository root, or "
                         "generate it with python -m pipedap.tools.partition") from None
    wants = inspect.signature(package.model).parameters
    takes_classes = "num_classes" in wants or any(p.kind is p.VAR_KEYWORD for p in wants.values())
    model = package.model(nn.CrossEntropyLoss(), **({"num_classes": args.num_classes} if takes_classes else {}))
    return package, model


def config_path(args: argparse.Namespace, package) -> Path | None:
    """--config_path (a bare name is looked up beside the package); None without it."""
    if args.config_path is None:
        return None
    path = Path(args.config_path)
    if not path.exists() and path.name == args.config_path:
        path = Path(package.__file__).parent / args.config_path
    return path


def one_stage(num_modules: int, world: int) -> PipelineConfig:
    """Without --config_path: every module on one stage, replicated over the ``world`` ranks."""
    return PipelineConfig.load({"module_to_stage_map": [0] * num_modules, "stage_to_rank_map": {"0": list(range(world))}})


class Data:
    """Stage 0's minibatches for one replica: its shard of an image folder, or synthetic images."""

    def __init__(self, args: argparse.Namespace, replica: int, replicas: int):
        self.args, self.replica, self.replicas = args, replica, replicas
        self.loader = None
        if args.data_dir and not args.synthetic_data:
            root = Path(args.data_dir)
            root = root / "train" if (root / "train").is_dir() else root
            self.loader = model_data.image_folder_loader(
                root, args.batch_size, args.image_size, seed=args.seed, rank=replica, world_size=replicas,
                num_workers=args.workers, drop_last=True)
            self.root, self.num_classes = root, len(self.loader.dataset.classes)
            if self.num_classes > args.num_classes:
                raise ValueError(f"{root} has {self.num_classes} classes but the model {args.num_classes} outputs; "
                                 f"pass --num-classes {self.num_classes}")
            if len(self.loader) == 0:
                raise ValueError(f"{len(self.loader.dataset)} images make no minibatch of "
                                 f"{args.batch_size} per replica ({replicas} replica(s)); use a smaller -b")
        else:
            self.num_classes = args.num_classes

    def describe(self) -> str:
        if self.loader is None:
            return (f"synthetic images ({self.num_classes} classes, {self.args.image_size} px; "
                    "pass --data_dir for an image folder)")
        return (f"{self.root}: {len(self.loader.dataset)} images, {self.num_classes} classes, "
                f"{len(self.loader)} minibatches per epoch for replica {self.replica} of {self.replicas}")

    def batches_per_epoch(self) -> int | None:
        return None if self.loader is None else len(self.loader)

    def epoch(self, epoch: int):
        """This replica's minibatches of ``epoch``."""
        if self.loader is None:
            return model_data.template_images(self.args.batch_size, self.args.image_size, self.num_classes,
                                              seed=self.args.seed + 1000 * epoch + self.replica)
        self.loader.sampler.set_epoch(epoch)
        return iter(self.loader)


def learning_rate(args: argparse.Namespace, epoch: int) -> float:
    """PipeDream's policies, per epoch."""
    if args.lr_policy == "step":
        return args.lr * 0.1 ** (epoch // 30)
    if args.lr_policy == "polynomial":
        return args.lr * (1.0 - epoch / args.epochs) ** 2
    return args.lr * 0.97 ** (epoch / args.epochs)


def minibatches_per_epoch(args: argparse.Namespace, runtime: StageRuntime, shared: int | None) -> int:
    """The job's minibatches per epoch: --num_minibatches, else an epoch of the data (``shared``: the fewest
    batches a replica of stage 0 has); under 1F1B and no pipelining a multiple of every stage's replicas,
    which update together. With flush each replica reads its share of every minibatch."""
    config = runtime.config
    if runtime.schedule == "flush":
        return args.num_minibatches or shared or 100
    wanted = args.num_minibatches or (shared * len(config.ranks(0)) if shared else 100)
    step = math.lcm(*(len(config.ranks(s)) for s in range(config.num_stages)))
    rounded = wanted // step * step
    if rounded < 1:
        raise SystemExit(f"{wanted} minibatches per epoch cannot be shared by stages of {step} replicas; "
                         f"pass --num_minibatches {step} or more")
    return rounded


def save_checkpoint(args, runtime: StageRuntime, package, epoch: int) -> None:
    path = Path(args.checkpoint_dir) / f"checkpoint.{runtime.stage}.pth.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch + 1, "arch": package.arch(), "state_dict": runtime.module.state_dict(),
                "optimizer": runtime.optimizer.state_dict() if runtime.optimizer else None}, path)
    print(f"rank {runtime.rank} (stage {runtime.stage}): saved checkpoint to {path}", flush=True)


def resume(args, runtime: StageRuntime) -> int:
    """Load this stage's checkpoint; the epoch to start at. A missing file fails every rank (agreed)."""
    path = Path(f"{args.resume}.{runtime.stage}.pth.tar")
    error = None if path.is_file() else (f"--resume {args.resume}: no checkpoint {path} for stage {runtime.stage} "
                                         "(expected --resume DIR/checkpoint, as written by --checkpoint_dir DIR)")
    startup.agree(runtime.transport, error, "resume")
    state = torch.load(path, weights_only=False)
    runtime.module.load_state_dict(state["state_dict"])
    if runtime.optimizer is not None and state.get("optimizer") is not None:
        runtime.optimizer.load_state_dict(state["optimizer"])
    print(f"rank {runtime.rank} (stage {runtime.stage}): loaded {path} (epoch {state['epoch']})", flush=True)
    return int(state["epoch"])


def connect(args: argparse.Namespace, path: Path | None) -> tuple[object, PipelineConfig | Path | None]:
    """This rank's transport: the launcher's world, or the config's ranks over gloo (one process needs no flags).

    With it, the config read once: without a launcher it is read here (it names the world);
    under one, StageRuntime reads it, every rank agreeing (a rank that cannot read it is named).
    """
    if under_mpi_launcher():
        return transport.connect(timeout=args.timeout), path
    config = None if path is None else PipelineConfig.load(path)
    world = 1 if config is None else len({r for s in range(config.num_stages) for r in config.ranks(s)})
    rank, master = args.rank, args.master_addr
    if world == 1 and rank is None:
        rank, master = 0, master or "localhost"
    link = transport.connect(rank=rank, world_size=world, master_addr=master, master_port=args.master_port,
                             timeout=args.timeout)
    return link, config


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    check_arguments(parser, args)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO if args.verbose_frequency else logging.WARNING, format="%(message)s")
    torch.manual_seed(args.seed)  # every rank builds the same weights: replicas of a stage start equal
    package, model = load_stages(args)
    link, config = connect(args, config_path(args, package))
    config = config or one_stage(len(model), link.size)
    schedule = "no_pipelining" if args.no_input_pipelining else args.schedule
    # Every minibatch has this shape; the runtime learns the shapes between stages from it.
    sample = (torch.zeros(args.batch_size, 3, args.image_size, args.image_size),
              torch.zeros(args.batch_size, dtype=torch.int64))

    def sgd(params):
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    runtime = StageRuntime(model, config, optimizer=sgd, sample=sample, schedule=schedule,
                           micro_batches=args.micro_batches, dp_schedule=args.dp_schedule,
                           extra_in_flight=args.extra_in_flight)
    data, error = None, None
    if runtime.is_first:
        try:  # a bad --data_dir fails on every rank (agreed), not only on the ranks that read it
            data = Data(args, runtime.replica, len(runtime.config.ranks(0)))
        except (OSError, ValueError, ImportError) as err:
            error = f"--data_dir {args.data_dir}: {err}"
    startup.agree(runtime.transport, error, "data")
    # No try/finally: a rank that fails must not wait in close() for the others; its error ends the job.
    run(args, runtime, package, data)
    runtime.close()
    runtime.transport.close()


def run(args, runtime: StageRuntime, package, data: Data | None) -> None:
    """The epochs: train (or evaluate), print progress and throughput, save checkpoints."""
    who = f"rank {runtime.rank} (stage {runtime.stage} of {runtime.num_stages})"
    if data is not None:
        print(f"{who}: data: {data.describe()}", flush=True)
    print(f"{who}: heap: {heap.describe()}", flush=True)
    start_epoch = resume(args, runtime) if args.resume else 0
    shared = runtime.transport.all_gather_object(data.batches_per_epoch() if data else None, "epoch length")
    per_replica = min((n for n in shared if n is not None), default=None)
    replicas0 = len(runtime.config.ranks(0))
    n = minibatches_per_epoch(args, runtime, per_replica)
    mode = "forward only" if args.forward_only else f"schedule {runtime.schedule}"
    if runtime.extra_in_flight and not args.forward_only:
        mode += f", {runtime.extra_in_flight} extra minibatch(es) in flight"
    print(f"{who}: {args.epochs - start_epoch} epoch(s) of {n} minibatches of {args.batch_size} images, {mode}",
          flush=True)
    alone = runtime.compute_alone() if args.trace else None
    hint = in_flight_hint(args, runtime, package) if runtime.rank == 0 else None
    if hint:
        print(f"{who}: {hint}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        lr = learning_rate(args, epoch)
        if runtime.optimizer is not None:
            for group in runtime.optimizer.param_groups:
                group["lr"] = lr
        started = time.perf_counter()
        finished: list[float] = []  # when each minibatch's loss was known (last stage)

        def progress(unit: int, loss: float, epoch=epoch, started=started, lr=lr, finished=finished) -> None:
            if (unit + 1) % runtime.micro_batches:
                return  # flush: report a minibatch at its last micro-batch
            finished.append(time.perf_counter())
            done = unit // runtime.micro_batches + 1
            if done % args.print_freq == 0 or done == n:
                elapsed = time.perf_counter() - started
                print(f"Epoch: [{epoch}][{done}/{n}]\tTime: {elapsed / done:.3f} s/minibatch\tLoss: {loss:.4f}\t"
                      f"lr {lr:g}", flush=True)

        batches = data.epoch(epoch) if data else None
        step = runtime.evaluate if args.forward_only else runtime.train
        losses = step(batches, n, on_loss=progress)
        seconds = time.perf_counter() - started
        images = n * args.batch_size * (replicas0 if runtime.schedule == "flush" else 1)  # -b is per replica
        mean = f", mean loss {sum(losses) / len(losses):.4f}" if losses else ""
        print(f"{who}: epoch {epoch}: {n} minibatches in {seconds:.1f} s, {images / seconds:.2f} images/s for the "
              f"whole job{mean}", flush=True)
        if args.checkpoint_dir and not args.forward_only and runtime.replica == 0:
            save_checkpoint(args, runtime, package, epoch)
        if args.json and runtime.is_last and runtime.replica == 0:
            write_timing(args, runtime, package, finished, images // n)
    if args.trace:
        write_trace(args, runtime, alone)


def partition_record(args, package) -> dict | None:
    """The partitioner's partition.json beside the package, when this run uses its stages (mp_conf.json)."""
    partition = Path(package.__file__).parent / "partition.json"
    if partition.exists() and args.config_path and Path(args.config_path).name == "mp_conf.json":
        return json.loads(partition.read_text())
    return None


def in_flight_hint(args, runtime: StageRuntime, package) -> str | None:
    """The partitioner's advice when this 1F1B run admits fewer units than hide its transfers."""
    partition = partition_record(args, package)
    wanted = (partition or {}).get("extra_in_flight") or 0
    if runtime.schedule != "1f1b" or args.forward_only or wanted <= runtime.extra_in_flight:
        return None
    return (f"hint: the partitioner found that 1F1B hides these stages' transfers at {partition['bandwidth']} with "
            f"--extra-in-flight {wanted} (partition.json; one more update of staleness each), this run has "
            f"{runtime.extra_in_flight}")


def write_timing(args, runtime: StageRuntime, package, finished: list[float], samples: int) -> None:
    """The time per minibatch in steady state, in the benchmark's JSON form (one iteration per minibatch).

    The last stage's replica 0 knows when each of its minibatches ended; with n replicas
    of the last stage it sees every n-th, so an interval counts n minibatches.
    """
    replicas = len(runtime.config.ranks(runtime.num_stages - 1))
    steady = finished[args.warmup:]
    if len(steady) < 2:
        raise SystemExit(f"--json: {len(finished)} minibatches seen by rank {runtime.rank} leave fewer than 2 after "
                         f"--warmup {args.warmup}; pass a larger --num_minibatches")
    intervals = [(b - a) / replicas for a, b in zip(steady, steady[1:])]
    partition = partition_record(args, package)
    predicted = partition["seconds_per_minibatch"] if partition else None
    in_flight = f" +{runtime.extra_in_flight} in flight" if runtime.extra_in_flight else ""
    record = {"unit": "images", "world_size": runtime.transport.size, "batch_size": args.batch_size,
              "samples_per_batch": samples, "batches_per_iter": 1, "per_iteration": [{"seconds": s} for s in intervals],
              "batch_time": {"measured_s": sum(intervals) / len(intervals), "predicted_s": predicted},
              "plan": None, "description": f"pipeline {runtime.schedule}{in_flight}, {runtime.num_stages} stages of "
                                           f"{args.module} ({args.config_path or 'one stage'})"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"rank {runtime.rank}: timing written to {args.json}", flush=True)


def write_trace(args, runtime: StageRuntime, alone: dict[str, float]) -> None:
    """Every rank's events of the last epoch and its compute alone, written by the last stage's first replica
    with the split of pipedap.pipeline.trace (collective: every rank calls it)."""
    mine = {"rank": runtime.rank, "stage": runtime.stage, "replica": runtime.replica, "alone": alone,
            "events": runtime.event_times}
    ranks = runtime.transport.all_gather_object(mine, "trace")
    if runtime.is_last and runtime.replica == 0:
        doc = {"schedule": runtime.schedule, "warmup": args.warmup, "module": args.module,
               "config": args.config_path, "ranks": ranks}
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        Path(args.trace).write_text(json.dumps(doc) + "\n")
        print(f"rank {runtime.rank}: trace written to {args.trace}", flush=True)
        try:
            print(trace.report(trace.summarize(doc)), flush=True)
        except ValueError as err:
            print(f"rank {runtime.rank}: --trace: {err}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
