"""Cut a model into pipeline stages and write PipeDream's stage package: ``python -m pipedap.tools.partition --help``.

Measures each module of the model's chain (``models.sequential``) on one minibatch
(or reads the measurements of an earlier run with ``--costs``), chooses the stages
and their replicas (:mod:`pipedap.pipeline.partition`: PipeDream's dynamic programme,
replicated stages priced by PipeDAP's planner), and writes into ``--out``:

* ``__init__.py``: the stage package, ``arch()`` and ``model(criterion)`` in PipeDream's
  convention, for ``main_with_runtime.py --module``;
* the config of the chosen partition (``mp_conf.json`` for a pipeline, ``hybrid_conf.json``
  for replicated stages, ``dp_conf.json`` for one stage) and ``dp_conf.json`` (data
  parallelism over the same modules, for comparison);
* ``partition.json``: the inputs (the module measurements, the link), the stages and the
  predicted time per minibatch of every stage and boundary.

Example (VGG-16 on 2 workers over 125 Mbit/s, about a minute of measuring on a 2-core CPU)::

    python -m pipedap.tools.partition --model vgg16 --batch-size 16 --image-size 112 --workers 2 \\
        --bandwidth 125mbit --parallelism pipeline --out models/vgg16/gpus=2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pipedap import units
from pipedap.pipeline import partition as P
from pipedap.planner import costmodel
from pipedap.tools import options
from pipedap.tools.progress import step

CONFIG_FILE = {"pipeline": "mp_conf.json", "hybrid": "hybrid_conf.json", "data": "dp_conf.json"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipedap.tools.partition",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a chain from the models package (resnet50, vgg16, "
                        "densenet201, inceptionv4)")
    parser.add_argument("--workers", type=options.integer(1), required=True, help="ranks of the job")
    parser.add_argument("--bandwidth", type=options.rate, required=True,
                        help="the link between workers, e.g. 125mbit, 10gbit, 1.25GB/s")
    parser.add_argument("--latency", type=options.duration, default="50us", help="per-message latency (default 50us)")
    parser.add_argument("--cost-model", metavar="FILE", type=options.existing_file, help="fitted cost model (pipedap.tools.bench_comm) for the "
                        "collectives of replicated stages (default: a ring on --bandwidth)")
    parser.add_argument("--interference", type=options.fraction, metavar="SIGMA",
                        help="how much slower compute runs beside a transfer, e.g. 0.3 or 30%%: charged to each stage "
                             "for its boundaries' transfers (default: the --cost-model's, else 0)")
    parser.add_argument("--parallelism", choices=P.PARALLELISMS, default="pipeline",
                        help="pipeline: one rank per stage; hybrid: stages and replicas chosen; data: one stage "
                             "(default pipeline)")
    parser.add_argument("-b", "--batch-size", type=options.integer(1), default=8, help="minibatch size (default 8)")
    parser.add_argument("--image-size", type=options.integer(32), default=224,
                        help="image side in pixels, at least 32 (default 224)")
    parser.add_argument("--iterations", type=options.integer(1), default=3, help="timed runs per module (default 3)")
    parser.add_argument("--threads", type=options.integer(1), default=1, help="torch threads while measuring (default 1, as each "
                        "rank of main_with_runtime.py and the benchmarks computes)")
    parser.add_argument("--costs", metavar="FILE", type=options.existing_file, help="reuse the module measurements of a partition.json")
    parser.add_argument("--out", required=True, help="the package directory to write, e.g. models/vgg16/gpus=2")
    return parser


def module_costs(args: argparse.Namespace) -> list[P.ModuleCost]:
    """The chain's measurements: from --costs, or measured now."""
    if args.costs:
        doc = json.loads(Path(args.costs).read_text())
        if doc.get("model") != args.model:
            raise ValueError(f"{args.costs} measured {doc.get('model')!r}, not {args.model!r}")
        return [P.ModuleCost(**m) for m in doc["modules"]]
    import torch

    from models import sequential

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    chain = sequential.chain(args.model)
    sample = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    return P.measure(chain, sample, iterations=args.iterations)


def describe(result: P.Partition, costs: Sequence[P.ModuleCost], extra_in_flight: int | None) -> list[str]:
    """One line per stage and boundary, and what 1F1B needs to hide the transfers (None: not estimated)."""
    lines = []
    for s, stage in enumerate(result.stages):
        first, last = costs[stage.start].label, costs[stage.end - 1].label
        lines.append(f"stage {s}: modules {stage.start}-{stage.end - 1} ({first} .. {last}), {stage.replicas} "
                     f"rank(s), {stage.seconds:.3f} s per minibatch (compute {_compute(costs, stage):.3f} s)")
        if s < len(result.boundaries):
            out = costs[stage.end - 1]
            lines.append(f"  boundary {s} -> {s + 1}: {out.output_bytes / 1e6:.1f} MB each way, "
                         f"{result.boundaries[s]:.3f} s per minibatch")
    lines.append(f"pipeline: {result.seconds:.3f} s per minibatch, bound by the slowest stage or boundary")
    if extra_in_flight:
        lines.append(f"1F1B: the transfers outlast what PipeDream's count of minibatches in flight covers; run "
                     f"main_with_runtime.py with --extra-in-flight {extra_in_flight} to hide them (one more update of "
                     "staleness each)")
    elif extra_in_flight == 0:
        lines.append("1F1B: PipeDream's count of minibatches in flight covers the transfers")
    return lines


def _compute(costs: Sequence[P.ModuleCost], stage: P.Stage) -> float:
    return sum(m.compute for m in costs[stage.start:stage.end])


def write_package(out: Path, args: argparse.Namespace, result: P.Partition, costs: Sequence[P.ModuleCost],
                  command: str, extra_in_flight: int | None, interference: float = 0.0) -> list[Path]:
    """The stage package, its configs and partition.json in ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    stages = [[m.label for m in costs[s.start:s.end]] for s in result.stages]
    summary = "\n".join(describe(result, costs, extra_in_flight))
    init = out / "__init__.py"
    init.write_text(f'''"""{args.model} in {len(stages)} stage(s) on {result.workers} rank(s), written by the partitioner:

    {command}

{summary}

Regenerate rather than edit. ``model(criterion)`` returns PipeDream's stage list:
[(stage module, input names, output names), ..., (criterion, [last output], ["loss"])].
"""

from models.sequential import stage_modules

MODEL = {args.model!r}
STAGES = {json.dumps(stages, indent=4)}


def arch() -> str:
    return MODEL


def model(criterion, **kwargs):
    """The stage modules, then ``criterion``; ``kwargs`` go to ``models.get`` (e.g. num_classes)."""
    return stage_modules(MODEL, STAGES, criterion, **kwargs)
''')
    written = [init]
    configs = {CONFIG_FILE[result.kind()]: {"module_to_stage_map": result.module_to_stage_map(),
                                           "stage_to_rank_map": result.stage_to_rank_map()},
               "dp_conf.json": {"module_to_stage_map": [0] * (len(stages) + 1),
                                "stage_to_rank_map": {"0": list(range(result.workers))}}}
    for name, config in configs.items():
        (out / name).write_text(json.dumps(config) + "\n")
        written.append(out / name)
    record = {"model": args.model, "command": command, "workers": args.workers, "parallelism": args.parallelism,
              "batch_size": args.batch_size, "image_size": args.image_size, "bandwidth": args.bandwidth,
              "latency": args.latency, "cost_model": args.cost_model, "interference": interference,
              "seconds_per_minibatch": result.seconds,
              "stages": [{"modules": labels, **asdict(stage)} for labels, stage in zip(stages, result.stages)],
              "boundaries": list(result.boundaries), "extra_in_flight": extra_in_flight,
              "modules": [asdict(m) for m in costs]}
    (out / "partition.json").write_text(json.dumps(record, indent=1) + "\n")
    return written + [out / "partition.json"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python -m pipedap.tools.partition " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        bandwidth, latency = units.parse_bandwidth(args.bandwidth), units.parse_duration(args.latency)
        what = (f"reading the measurements in {args.costs}" if args.costs else
                f"measuring each module of {args.model} (batch {args.batch_size}, {args.image_size} px, "
                f"{args.iterations} runs, {args.threads} thread(s); a minute or two on a CPU)")
        with step(what):
            costs = module_costs(args)
        print(f"  {len(costs)} modules, compute {sum(m.compute for m in costs):.3f} s per minibatch, "
              f"{sum(m.param_bytes for m in costs) / 1e6:.1f} MB of parameters")
        sync, interference = None, args.interference
        if args.cost_model:
            sync = lambda m: costmodel.load(args.cost_model, m)  # noqa: E731
            if interference is None:
                interference = sync(args.workers).interference
        interference = interference or 0.0
        if interference:
            print(f"  each stage's compute {100 * interference:.0f}% slower while its boundaries' transfers run")
        cost = P.Costs(costs, bandwidth=bandwidth, latency=latency, sync_model=sync, interference=interference)
        with step(f"choosing the {args.parallelism} partition over {args.workers} workers at {args.bandwidth}"):
            result = P.best_partition(len(costs), args.workers, cost.stage_time, cost.boundary_time,
                                      args.parallelism)
        extra = cost.extra_in_flight(result)
        print("\n".join(describe(result, costs, extra)))
        for path in write_package(Path(args.out), args, result, costs, command, extra, interference):
            print(f"wrote {path}")
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
