"""Predicted iteration times of every schedule for resnet50, vgg16 and bert_base.

    python benchmarks/planner_report.py [--out FILE] [--refresh]

For each model, world size (2, 4, 8, 16, 64) and link (1 and 10 Gb/s, 50 us per ring
step), the table gives the simulated iteration time of WFBP, ByteScheduler (tuned),
DeAR, the PipeDAP greedy and the exact planner on per-layer groups (no fusion), the
exact planner after the joint fusion + order search, the lower bound, and speedups.
It also times the planners on ~400 groups. Results go to a JSON file (--out).

Layer profiles: measured with pipedap.profiler on the real model (CPU, batch 2) and cached
in benchmarks/profiles/ (committed, so the report reproduces without re-measuring; pass
--refresh to measure again). Without the models package, a synthetic profile with the
models' real layer sizes is used instead (see synthetic_profile).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipedap.planner import costmodel, fusion, schedules
from pipedap.planner.profile import Layer, Profile
from pipedap.planner.simulator import Problem

HERE = Path(__file__).resolve().parent
MODELS = ("resnet50", "vgg16", "bert_base")
WORKERS = (2, 4, 8, 16, 64)
LINKS = {"1Gb/s": 1e9 / 8, "10Gb/s": 10e9 / 8}
LATENCY = 50e-6
BATCH = 2
PLANNING_GROUPS = 400


def measured_profile(name: str, refresh: bool) -> Profile | None:
    """The cached CPU profile of `name`, measured first if needed; None without `models`."""
    path = HERE / "profiles" / f"{name}_bs{BATCH}_cpu.json"
    if path.exists() and not refresh:
        return Profile.load(path)
    try:
        import torch

        import models
        from pipedap.profiler import profile_model
    except ImportError:
        return None
    print(f"profiling {name} on the CPU (batch {BATCH}) ...", flush=True)
    torch.manual_seed(0)
    inputs, targets = models.synthetic_batch(name, BATCH, generator=torch.Generator().manual_seed(0))
    profile = profile_model(models.get(name), inputs, targets, models.loss_fn(name), warmup=1, iterations=3,
                            meta={"model": name, "batch_size": BATCH, "threads": torch.get_num_threads()})
    path.parent.mkdir(exist_ok=True)
    profile.save(path)
    return profile


def synthetic_profile(name: str) -> Profile:
    """A stand-in profile with the model's real per-module parameter counts (float32).

    Times are an assumption, not a measurement: forward 50 us + 1 ms per 4 MB of
    parameters, backward twice the forward, update at 4 GB/s of parameters.
    """
    counts = {"resnet50": _resnet50_counts, "vgg16": _vgg16_counts, "bert_base": _bert_base_counts}[name]()
    layers = []
    for module, params in counts:
        nbytes = 4 * params
        tf = 50e-6 + nbytes / 4e6 * 1e-3
        layers.append(Layer(module, (f"{module}.weight",), nbytes, tf, 2 * tf, nbytes / 4e9))
    return Profile(tuple(layers), {"model": name, "synthetic": True})


def _resnet50_counts() -> list[tuple[str, int]]:
    out = [("conv1", 3 * 64 * 49), ("bn1", 128)]
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            out += [(f"{p}.conv1", cin * width), (f"{p}.bn1", 2 * width), (f"{p}.conv2", 9 * width * width),
                    (f"{p}.bn2", 2 * width), (f"{p}.conv3", width * 4 * width), (f"{p}.bn3", 8 * width)]
            if b == 0:
                out += [(f"{p}.downsample.0", cin * 4 * width), (f"{p}.downsample.1", 8 * width)]
            cin = 4 * width
    return out + [("fc", 2048 * 1000 + 1000)]


def _vgg16_counts() -> list[tuple[str, int]]:
    channels = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    out, cin = [], 3
    for i, cout in enumerate(channels):
        out.append((f"features.conv{i}", 9 * cin * cout + cout))
        cin = cout
    return out + [("classifier.0", 25088 * 4096 + 4096), ("classifier.3", 4096 * 4096 + 4096),
                  ("classifier.6", 4096 * 1000 + 1000)]


def _bert_base_counts() -> list[tuple[str, int]]:
    h, ffn = 768, 3072
    out = [("embeddings.word", 30522 * h), ("embeddings.position", 512 * h), ("embeddings.type", 2 * h),
           ("embeddings.LayerNorm", 2 * h)]
    for i in range(12):
        p = f"encoder.layer.{i}"
        out += [(f"{p}.{n}", h * h + h) for n in ("query", "key", "value", "attention.output")]
        out += [(f"{p}.attention.LayerNorm", 2 * h), (f"{p}.intermediate", h * ffn + ffn),
                (f"{p}.output", ffn * h + h), (f"{p}.output.LayerNorm", 2 * h)]
    return out + [("pooler", h * h + h), ("cls.transform", h * h + h), ("cls.LayerNorm", 2 * h),
                  ("cls.decoder.bias", 30522), ("cls.seq_relationship", 2 * h + 2)]


def report_row(profile: Profile, workers: int, bandwidth: float) -> dict:
    """Every schedule's predicted time for one (model, workers, link)."""
    cost = costmodel.from_link(workers, bandwidth, LATENCY)
    problem = Problem(profile, cost)
    greedy = schedules.pipedap(problem)
    times = {
        "wfbp": schedules.wfbp(problem).iteration_time,
        "bytescheduler": schedules.bytescheduler(problem).iteration_time,
        "dear": schedules.dear(problem).iteration_time,
        "pipedap": greedy.iteration_time,
    }
    exact = schedules.optimal(problem, seed=greedy)
    times["optimal"] = exact.iteration_time
    best, _ = fusion.search(profile, cost, planners=("optimal",))
    times["fused_optimal"] = best.schedule.iteration_time
    return {
        "workers": workers, "bandwidth_gbit": bandwidth * 8 / 1e9, "times": times,
        "lower_bound": problem.lower_bound(), "proven_optimal": exact.info["proven_optimal"],
        "best_fusion": best.fusion,
        "compute": problem.compute_bound(), "link_ar": sum(problem.costs["ar"]),
    }


def planning_times(profile: Profile) -> list[dict]:
    """Greedy and exact planning time on `profile` tiled to PLANNING_GROUPS groups."""
    layers = [profile.layers[i % len(profile)] for i in range(PLANNING_GROUPS)]
    tiled = Profile(tuple(Layer(f"g{i}", (f"g{i}.p",), x.nbytes, x.tf, x.tb, x.u) for i, x in enumerate(layers)))
    out = []
    for workers in (8, 64):
        for link, bandwidth in LINKS.items():
            problem = Problem(tiled, costmodel.from_link(workers, bandwidth, LATENCY))
            start = time.perf_counter()
            greedy = schedules.pipedap(problem)
            middle = time.perf_counter()
            exact = schedules.optimal(problem, seed=greedy)
            end = time.perf_counter()
            out.append({"groups": PLANNING_GROUPS, "workers": workers, "link": link,
                        "greedy_s": middle - start, "exact_s": end - middle,
                        "proven_optimal": exact.info["proven_optimal"],
                        "exact_vs_greedy": exact.iteration_time / greedy.iteration_time})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE.parent / "out" / "planner_report.json"),
                        help="JSON output (default out/planner_report.json, not tracked)")
    parser.add_argument("--refresh", action="store_true", help="re-measure the cached profiles")
    args = parser.parse_args()
    report: dict = {"latency_s": LATENCY, "models": {}}
    header = (f"{'model':<10}{'p':>3} {'link':<7}{'WFBP':>8}{'BytSch':>8}{'DeAR':>8}{'greedy':>8}{'exact':>8}"
              f"{'fused':>8}{'bound':>8}  {'xWFBP':>6}{'xDeAR':>6} proven")
    print("predicted iteration time in ms on per-layer groups; fused: exact planner after the joint fusion +\n"
          "order search; bound: lower bound for per-layer groups; xWFBP, xDeAR: speedup of the exact plan")
    print(header)
    for name in MODELS:
        profile = measured_profile(name, args.refresh) or synthetic_profile(name)
        rows = []
        for workers in WORKERS:
            for link, bandwidth in LINKS.items():
                row = report_row(profile, workers, bandwidth)
                rows.append(row)
                t = {k: v * 1e3 for k, v in row["times"].items()}
                print(f"{name:<10}{workers:>3} {link:<7}{t['wfbp']:>8.1f}{t['bytescheduler']:>8.1f}{t['dear']:>8.1f}"
                      f"{t['pipedap']:>8.1f}{t['optimal']:>8.1f}{t['fused_optimal']:>8.1f}{row['lower_bound'] * 1e3:>8.1f}"
                      f"  {t['wfbp'] / t['optimal']:>6.3f}{t['dear'] / t['optimal']:>6.3f} {row['proven_optimal']}",
                      flush=True)
        report["models"][name] = {"layers": len(profile), "meta": dict(profile.meta), "rows": rows}
    report["planning"] = planning_times(measured_profile("resnet50", False) or synthetic_profile("resnet50"))
    print(f"\nplanning time on {PLANNING_GROUPS} groups (resnet50 layers tiled):")
    for row in report["planning"]:
        print(f"  {row['workers']:>2} workers {row['link']:<7} greedy {row['greedy_s'] * 1e3:7.1f} ms  "
              f"exact {row['exact_s'] * 1e3:7.1f} ms  proven {row['proven_optimal']}  "
              f"exact/greedy {row['exact_vs_greedy']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
