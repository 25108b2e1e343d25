"""The options of ``python -m pipedap.tools.bench``: the parser and the checks made before any
process group starts, so that a wrong option fails at once on rank 0 with what to change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import models
from pipedap import units
from pipedap.planner import energy
from pipedap.tools.bench_baselines import BASELINES, BenchError, canonical, check_runnable


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipedap.tools.bench",
        description="Synthetic-data training throughput of a model under one data-parallel system "
                    "(run it with mpirun -np N). Prints images (or sentences) per second per worker "
                    "and in total, and the planner's prediction next to the measured batch time.",
        epilog=f"models: {', '.join(models.names())}. Baselines: PipeDAP (a plan from --plan or "
               "made now), DeAR, WFBP, ByteScheduler (pipedap's runtime; ByteScheduler runs its simulated "
               "piece order), DDP (torch over gloo), Horovod (when horovod.torch imports).",
    )
    parser.add_argument("--model", default="resnet50", help="model name (default resnet50)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size per worker (default 32)")
    parser.add_argument("--num-warmup-batches", type=int, default=10,
                        help="untimed batches first (default 10); more while a rank still faults in new memory "
                             "(up to 10 more; not with 0) or the optimizer has not planned")
    parser.add_argument("--num-batches-per-iter", type=int, default=10, help="batches per timed iteration (default 10)")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations (default 10)")
    parser.add_argument("--baseline", "--schedule", default="PipeDAP", metavar="NAME",
                        help=f"{', '.join(BASELINES)} (case-insensitive; default PipeDAP)")
    parser.add_argument("--threshold", type=int, metavar="BYTES",
                        help="tensor-fusion threshold in bytes (pipedap buckets, DDP bucket_cap, Horovod "
                             "fusion buffer; PipeDAP plans with this fusion). Default: each system's own")
    parser.add_argument("--fp16", action="store_true",
                        help="mixed precision (torch.autocast float16) forward and loss; needs CUDA")
    parser.add_argument("--compression", choices=("none", "fp16", "bf16"), default="none",
                        help="gradients on the link in this dtype (PipeDAP's DistributedOptimizer(compression=), "
                             "DDP's fp16/bf16 compress hook, Horovod's Compression.fp16); default none")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                        help="sgd (momentum 0.9, lr 0.01; default) or adamw (lr 1e-4, weight decay 0.01)")
    parser.add_argument("--shard-update", action="store_true",
                        help="PipeDAP, DeAR, WFBP: DistributedOptimizer(shard_update=True): each rank updates only "
                             "its shard and keeps optimizer state for it; the all-gathers carry parameters")
    parser.add_argument("--sentence-len", type=int, help="sequence length of language models (default: the model's)")
    parser.add_argument("--image-size", type=int, help="image side of image models (default: the model's)")
    parser.add_argument("--data-dir", "--data_dir", metavar="DIR", help="train on this image folder (DIR/train/<class>/"
                        "*.jpg or DIR/<class>/*.jpg; each rank its shard) instead of a synthetic batch")
    parser.add_argument("--workers", type=int, default=2, help="with --data-dir: data-loading processes per rank "
                        "(default 2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the local rank's GPU when CUDA is available, else CPU")
    parser.add_argument("--plan", metavar="FILE", help="PipeDAP: run this plan (python -m pipedap.tools.plan --out); "
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
    parser.add_argument("--power", metavar="SPEC", type=energy.power_argument,
                        help="estimate the energy per iteration and per sample from each device's busy and idle "
                             "time: busy=W,idle=W[,link_busy=W,link_idle=W] or a JSON file "
                             "(pipedap/planner/energy.py); times a few batches of compute alone after the run")
    parser.add_argument("--link-rate", metavar="RATE", help="with --power: each worker's link rate (e.g. 500mbit), "
                                                            "for the link's busy time (default: no link estimate)")
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
    if args.compression == "bf16" and args.baseline == "Horovod":
        raise BenchError("--compression bf16: Horovod has no bf16 compressor (Compression.fp16 only); use fp16")
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
    if args.data_dir and info.kind != "image":
        raise BenchError(f"--data-dir is an image folder; {args.model} is a language model")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise BenchError(f"--data-dir {args.data_dir}: no such folder (expected DIR/train/<class>/*.jpg)")
    if args.workers < 0:
        raise BenchError(f"--workers must be >= 0, got {args.workers}")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise BenchError("--device cuda: torch sees no CUDA GPU")
    args.device = "cuda" if args.device == "auto" and cuda else ("cpu" if args.device == "auto" else args.device)
    if args.fp16 and args.device != "cuda":
        raise BenchError("--fp16 is not supported on CPU: it means float16 mixed-precision compute, which CPUs "
                         "do not accelerate (timings would not mean anything); run on GPUs or drop --fp16")
    if args.fp16 and args.baseline == "Horovod":
        raise BenchError("--fp16 with Horovod is not implemented here; drop --fp16 or pick another baseline")
    if args.compression == "bf16" and args.baseline == "DDP" and args.device != "cuda":
        raise BenchError("--compression bf16 with DDP needs CUDA (torch's bf16_compress_hook runs on NCCL only); "
                         "use fp16, or another baseline")
    if args.shard_update and args.baseline not in ("PipeDAP", "DeAR", "WFBP"):
        raise BenchError(f"--shard-update is pipedap's DistributedOptimizer(shard_update=True): for PipeDAP, DeAR "
                         f"and WFBP, not {args.baseline}")
    pipedap_only = [opt for opt in ("plan", "save_plan") if getattr(args, opt)]
    if pipedap_only and args.baseline != "PipeDAP":
        raise BenchError(f"--{pipedap_only[0].replace('_', '-')} is for --baseline PipeDAP (it sets PipeDAP's plan)")
    if args.bandwidth and args.baseline not in ("PipeDAP", "DeAR", "WFBP", "ByteScheduler"):
        raise BenchError(f"--bandwidth is for PipeDAP, DeAR, WFBP and ByteScheduler (their plans are simulated); "
                         f"{args.baseline} has no plan")
    if args.link_rate is not None:
        if not args.power:
            raise BenchError("--link-rate is for the energy estimate: give --power too")
        try:
            if units.parse_bandwidth(args.link_rate) <= 0:
                raise ValueError
        except ValueError:
            raise BenchError(f"--link-rate {args.link_rate!r}: expected a rate > 0 like 500mbit, 1gbit or 125MB/s") from None
    if args.plan and args.bandwidth:
        raise BenchError("--plan and --bandwidth exclude each other: --bandwidth plans a new schedule")
    if args.plan:
        from pipedap.planner.plan import Plan

        Plan.load(args.plan)  # readable and well-formed; matched against the model later
