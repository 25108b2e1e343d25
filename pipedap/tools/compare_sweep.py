"""The sweep of a comparison: per host count one testbed, per rate (reshaped in place) and model
a calibration and, in interleaved rounds, one benchmark run of every system per round, after the
compute-only reference.

[Note: interleaved rounds] A shared machine drifts (other jobs, thermal state, page cache):
systems measured one after the other see different machines, and their difference can be the
drift's. So every system runs once per round, the order rotated each round (round k starts
at the k-th system), and a system's figure is the mean of its rounds' steady-state
iterations with the interval of its rounds' means (:func:`pipedap.tools.stats.rounds_statistics`).
The compute-only reference drifts too (3.70 and 4.60 s per batch for ResNet-50, measured
40 minutes apart on the development machine): it is measured again at the start of every
round of every rate, and a rate's bound uses the mean of its rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import models
from pipedap import settings
from pipedap.tools.compare_jobs import finish_job, pinned_cores, run_job, start_job
from pipedap.tools.compare_report import compare_row, gradient_bytes, ring_allreduce_s
from pipedap.tools.stats import rounds_statistics
from pipedap.tools.testbed import calibrate
from pipedap.tools.testbed.network import TestbedError
from pipedap.tools.testbed.pin import core_for
from pipedap.tools.testbed.testbed import Testbed
from pipedap.units import parse_rate_bps

LAUNCH_S = 5.0  # mpirun, imports and model construction per run
CALIBRATION_SIZE = "16m"
# gloo (DDP) finds rank 0 through the hosts' NIC: their names do not resolve
TESTBED_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}
ENV_CLEARED = ("PIPEDAP_PLAN", "PIPEDAP_PLANNER", "PIPEDAP_SCHEDULE", "PIPEDAP_INTERFERENCE", "PIPEDAP_RETAIN_HEAP",
               "GLIBC_TUNABLES")  # would change what a system runs


@dataclass(frozen=True)
class System:
    """One compared system: a label, what runs it, and extra environment.

    ``program`` ``bench``: data parallelism, ``pipedap.tools.bench --baseline <baseline>``;
    ``pipeline``: ``main_with_runtime.py`` with the model's stage package for this many ranks
    (``models/<model>/gpus=<ranks>/mp_conf.json``) and schedule ``baseline`` (flush: 4 micro-batches,
    or the most of 4, 2, 1 that divides the batch into micro-batches of 2 or more: BatchNorm needs 2),
    with ``extra_in_flight`` minibatches admitted beyond PipeDream's count (1f1b).
    """

    label: str
    baseline: str
    env: dict[str, str] = field(default_factory=dict)
    program: str = "bench"
    compression: str = "none"  # bench --compression (data parallelism only)
    shard_update: bool = False  # bench --shard-update (pipedap's data-parallel schedules only)
    extra_in_flight: int = 0  # main_with_runtime.py --extra-in-flight (pipeline 1f1b only)


SYSTEMS = (
    System("PipeDAP", "PipeDAP", {"PIPEDAP_PLANNER": "optimal"}),
    System("PipeDAP-greedy", "PipeDAP", {"PIPEDAP_PLANNER": "greedy"}),
    System("PipeDAP-plain", "PipeDAP", {"PIPEDAP_PLANNER": "optimal", "PIPEDAP_INTERFERENCE": "off"}),
    System("PipeDAP-whole", "PipeDAP", {"PIPEDAP_PLANNER": "optimal", "PIPEDAP_TIED_SPLIT": "0"}),
    System("PipeDAP-undeferred", "PipeDAP", {"PIPEDAP_PLANNER": "optimal", "PIPEDAP_TIED_DEFER": "0"}),
    System("DeAR", "DeAR"),
    System("WFBP", "WFBP"),
    System("ByteScheduler", "ByteScheduler"),
    System("DDP", "DDP"),
    System("Horovod", "Horovod"),
    System("Pipeline-1F1B", "1f1b", program="pipeline"),
    System("Pipeline-1F1B+1", "1f1b", program="pipeline", extra_in_flight=1),
    System("Pipeline-flush", "flush", program="pipeline"),
)
MAIN_WITH_RUNTIME = Path(__file__).resolve().parents[2] / "main_with_runtime.py"
COMPRESSIONS = ("fp16", "bf16")
SHARDED = "sharded"
GLIBC_MALLOC = "glibcmalloc"  # suffix: PIPEDAP_RETAIN_HEAP=0, glibc's malloc defaults ([Note: retained heap])
SHARDABLE = ("PipeDAP", "DeAR", "WFBP")


class CompareError(Exception):
    """The comparison cannot run as asked; the message says what to change."""


def system_named(name: str) -> System:
    """The system ``name`` (case-insensitive) of SYSTEMS, or one with suffixes: ``-fp16``/``-bf16`` (a
    data-parallel system with its gradients compressed), ``-sharded`` (PipeDAP, DeAR or WFBP with
    shard_update) and ``-glibcmalloc`` (any system, its ranks with PIPEDAP_RETAIN_HEAP=0), in that order,
    e.g. ``DeAR-fp16-sharded`` or ``Pipeline-1F1B-glibcmalloc``."""
    labels = {s.label.lower(): s for s in SYSTEMS}
    base, compression, sharded, glibc_malloc = name.lower(), "none", False, False
    if base not in labels and base.endswith(f"-{GLIBC_MALLOC}"):
        base, glibc_malloc = base[: -len(GLIBC_MALLOC) - 1], True
    if base not in labels and base.endswith(f"-{SHARDED}"):
        base, sharded = base[: -len(SHARDED) - 1], True
    if base not in labels and base.rpartition("-")[2] in COMPRESSIONS:
        base, _, compression = base.rpartition("-")
    if base not in labels:
        raise CompareError(f"--systems: unknown {name}; choose from {', '.join(s.label for s in SYSTEMS)}, each "
                           f"data-parallel one also with -{' or -'.join(COMPRESSIONS)}, {', '.join(SHARDABLE)} "
                           f"also with -{SHARDED}, and any with -{GLIBC_MALLOC} last")
    system = labels[base]
    if compression != "none" and system.program != "bench":
        raise CompareError(f"--systems: {name}: compression is for data-parallel systems; a pipeline sends "
                           "activations, not gradients")
    if sharded and system.baseline not in SHARDABLE:
        raise CompareError(f"--systems: {name}: -{SHARDED} (DistributedOptimizer's shard_update) is for "
                           f"{', '.join(SHARDABLE)}")
    label = (system.label + (f"-{compression}" if compression != "none" else "") + (f"-{SHARDED}" if sharded else "")
             + (f"-{GLIBC_MALLOC}" if glibc_malloc else ""))
    env = dict(system.env, PIPEDAP_RETAIN_HEAP="0") if glibc_malloc else system.env
    return dataclasses.replace(system, label=label, compression=compression, shard_update=sharded, env=env)


def clean_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the settings that would make a system run something else than asked."""
    return {k: v for k, v in env.items() if k not in ENV_CLEARED}


class Sweep:
    """The settings of one comparison and what it has measured so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).absolute()  # the ranks write there, maybe from another folder
        self.cores = sorted(os.sched_getaffinity(0))
        self.runs: list[dict] = []
        self.compute: list[dict] = []
        self.testbeds: list[dict] = []
        self.systems: list[System] = args.systems
        self.skipped: dict[str, str] = {}  # system label -> why it cannot run here
        self.done_runs = 0

    # -- commands

    def bench_options(self, model: str) -> list[str]:
        """The benchmark options every run of ``model`` shares (compute-only included)."""
        a = self.args
        size = []
        if a.image_size and models.info(model).kind == "image":
            size = ["--image-size", str(a.image_size)]
        if a.sentence_len and models.info(model).kind == "language":
            size = ["--sentence-len", str(a.sentence_len)]
        return ["--model", model, "--batch-size", str(a.batch_size), "--num-warmup-batches", str(a.warmup),
                "--num-batches-per-iter", str(a.batches_per_iter), "--num-iters", str(a.iters),
                "--optimizer", a.optimizer, "--no-progress", *size]

    def batches(self, system: System | None) -> int:
        """Batches one run trains (PipeDAP's warmup lasts until it has planned)."""
        warmup = self.args.warmup
        planned_online = system is not None and system.baseline in ("PipeDAP", "ByteScheduler") and not system.shard_update
        if planned_online:  # they switch plans after these
            warmup = max(warmup, settings.get("PIPEDAP_PROFILE_STEPS") + 2)
        return warmup + self.args.iters * self.args.batches_per_iter

    def estimate_s(self, batch_s: float, system: System | None) -> float:
        return LAUNCH_S + self.batches(system) * batch_s

    def timeout_s(self, batch_s: float, system: System | None) -> float:
        return self.args.timeout or 60 + 3 * self.estimate_s(batch_s, system)

    # -- compute-only reference

    def measure_compute(self, model: str, hosts: int, tag: str = "") -> dict:
        """The compute-only time per batch: one pinned copy per rank at once, their mean."""
        ranks = hosts * self.args.slots
        folder = self.out / "compute" / (f"{model}-{ranks}ranks" + (f"-{tag}" if tag else ""))
        jobs = []
        guess = 10.0 * self.args.batch_size  # seconds per batch, generous: nothing is measured yet
        deadline = time.perf_counter() + (self.args.timeout or 60 + 3 * self.estimate_s(guess, None))
        for rank in range(ranks):
            core = core_for(rank, self.cores)
            json_path = folder / f"rank{rank}.json"
            command = ["taskset", "-c", str(core), sys.executable, "-m", "pipedap.tools.compare_compute",
                       *self.bench_options(model), "--json", str(json_path)]
            proc, started = start_job(command, clean_env(dict(os.environ)), folder / f"rank{rank}.log")
            jobs.append((rank, core, json_path, proc, started))
        processes = []
        for rank, core, json_path, proc, started in jobs:
            job = finish_job(proc, started, deadline, folder / f"rank{rank}.log")
            entry = {"rank": rank, "core": core, "command": job.command, "status": "ok" if job.ok else "failed",
                     "seconds": job.seconds, "log": str(job.log)}
            if job.ok:
                entry["batch_s"] = json.loads(json_path.read_text())["batch_time"]["measured_s"]
            else:
                entry["error_tail"] = job.tail()
            processes.append(entry)
        failed = [p for p in processes if p["status"] != "ok"]
        if failed:
            raise CompareError(f"the compute-only job of {model} failed on core {failed[0]['core']} "
                               f"(log {failed[0]['log']}):\n{failed[0]['error_tail']}")
        batch_s = statistics.fmean(p["batch_s"] for p in processes)
        return {"model": model, "hosts": hosts, "ranks": ranks, "batch_s": batch_s, "processes": processes,
                "note": "one single-process job per rank at once, each pinned to that rank's core"}

    # -- one testbed

    def sweep_hosts(self, hosts: int) -> None:
        """Bring up ``hosts`` hosts once; per rate (reshaped) and model, calibrate and run every system."""
        a = self.args
        with Testbed(hosts=hosts, rate=a.rates[0], slots=a.slots, qdisc=a.qdisc, burst=a.burst,
                     latency=a.latency) as tb:
            record = {"hosts": hosts, "slots": a.slots, "run_id": tb.run_id, "names": tb.names,
                      "subnet": str(tb.subnet), "affinity": {str(r): c for r, c in tb.affinity().items()},
                      "mpirun_args": tb.mpirun_args(), "shaping": {}, "calibration": {}}
            self.testbeds.append(record)
            print(f"testbed: {tb.describe()}", flush=True)
            for rate in a.rates:
                tb.reshape(dataclasses.replace(tb.shaping, rate=rate))
                record["shaping"][rate] = dataclasses.asdict(tb.shaping)
                print(f"\n== {hosts} hosts, {tb.shaping.describe()}", flush=True)
                if a.calibrate:
                    record["calibration"][rate] = self.calibrate(tb, rate)
                for model in a.models:
                    rounds: dict[str, list[dict]] = {s.label: [] for s in self.runnable}
                    for k in range(a.rounds):  # [Note: interleaved rounds]
                        self.remeasure_compute(model, hosts, rate, k)
                        start = k % len(self.runnable)
                        for system in self.runnable[start:] + self.runnable[:start]:
                            rounds[system.label].append(self.run_system(tb, model, rate, system, k))
                    for system in self.systems:
                        if system.label in self.skipped:
                            self.runs.append({"model": model, "hosts": hosts, "rate": rate, "system": system.label,
                                              "baseline": system.baseline, "status": "skipped",
                                              "reason": self.skipped[system.label]})
                        else:
                            self.runs.append(merge_rounds(rounds[system.label]))

    def reference(self, model: str, hosts: int) -> dict:
        return next(c for c in self.compute if c["model"] == model and c["hosts"] == hosts)

    def remeasure_compute(self, model: str, hosts: int, rate: str, round_index: int) -> None:
        """Round ``round_index``'s compute-only reference at ``rate`` ([Note: interleaved rounds])."""
        sample = self.measure_compute(model, hosts, tag=f"{rate}-round{round_index}")
        self.reference(model, hosts).setdefault("by_rate", {}).setdefault(rate, []).append(sample["batch_s"])
        print(f"compute-only reference, round {round_index}: {sample['batch_s']:.3f} s per batch", flush=True)

    def compute_s(self, ref: dict, rate: str) -> float:
        """The compute-only time per batch a rate's bound uses: the mean of its rounds' references."""
        rounds = ref.get("by_rate", {}).get(rate)
        return statistics.fmean(rounds) if rounds else ref["batch_s"]

    def calibrate(self, tb: Testbed, rate: str) -> dict:
        """Achieved link rate of each primitive (comm core and mpi4py) at CALIBRATION_SIZE."""
        print(f"calibrating {rate}: pipedap.tools.bench_comm {CALIBRATION_SIZE} ...", flush=True)
        began = time.perf_counter()
        try:
            rows = calibrate.measure_mpi(tb, CALIBRATION_SIZE, min_time=0.5, timeout=300)
        except TestbedError as err:
            print(f"  calibration failed (the sweep goes on): {err}", flush=True)
            return {"status": "failed", "error_tail": str(err)[-3000:]}
        ratios = calibrate.link_ratios(rows, parse_rate_bps(rate))
        achieved = ratios["pipedap"]["allreduce"] * parse_rate_bps(rate)
        print(f"  comm core all-reduce reaches {achieved / 1e6:.0f} Mbit/s per link "
              f"({ratios['pipedap']['allreduce']:.0%} of nominal); took {time.perf_counter() - began:.0f} s",
              flush=True)
        return {"status": "ok", "size": CALIBRATION_SIZE, "ratio_of_nominal": ratios,
                "allreduce_achieved_bps": achieved, "rows": rows}

    def run_system(self, tb: Testbed, model: str, rate: str, system: System, round_index: int) -> dict:
        """One benchmark run on the testbed (round ``round_index``); its record, failed or not."""
        a = self.args
        name = f"{model}-{tb.hosts}h-{rate}-{system.label}" + (f"-round{round_index}" if a.rounds > 1 else "")
        runs = self.out / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        json_path, trace = runs / f"{name}.json", runs / f"{name}.trace.json"
        ranks = tb.hosts * a.slots
        record = {"model": model, "hosts": tb.hosts, "ranks": ranks, "rate": rate, "system": system.label,
                  "baseline": system.baseline, "env": system.env, "round": round_index}
        if system.program == "pipeline":
            package = stage_package(model, ranks)
            if not package.is_dir():
                return dict(record, status="skipped", reason=f"no stage package {package}: generate it with "
                            f"python -m pipedap.tools.partition --model {model} --workers {ranks} --out {package}")
            command = tb.mpirun([sys.executable, str(MAIN_WITH_RUNTIME), *self.pipeline_options(model, ranks, system),
                                 "--json", str(json_path), "--trace", str(trace)])
        else:
            command = tb.mpirun([sys.executable, "-m", "pipedap.tools.bench", *self.bench_options(model),
                                 "--baseline", system.baseline, "--compression", system.compression,
                                 *(["--shard-update"] if system.shard_update else []),
                                 "--json", str(json_path), "--timeline", str(trace)])
        env = dict(clean_env(tb.env()), **TESTBED_ENV, **system.env)
        # a cost model measured at one rate must not be reused at the next: same host names
        env["PIPEDAP_CACHE_DIR"] = str(self.out / "costmodels" / f"{tb.hosts}h-{rate}")
        batch_guess = self.batch_guess(model, tb.hosts, rate)
        timeout = self.timeout_s(batch_guess, system)
        self.done_runs += 1
        print(f"[{self.done_runs}/{self.total_runs}] {name}: about {self.estimate_s(batch_guess, system):.0f} s "
              f"(timeout {timeout:.0f} s) ...", flush=True)
        job = run_job(command, env, self.out / "logs" / f"{name}.log", timeout)
        record.update(command=job.command, seconds=job.seconds, log=str(job.log), pinned=pinned_cores(job.log))
        if not job.ok:
            why = "timed out" if job.returncode == 124 else f"exit {job.returncode}"
            print(f"  FAILED ({why}) after {job.seconds:.0f} s; log {job.log}", flush=True)
            return dict(record, status="failed", returncode=job.returncode, error_tail=job.tail())
        result = json.loads(json_path.read_text())
        record = dict(record, status="ok", json=str(json_path), unit=result["unit"], plan=result["plan"],
                      description=result["description"], result=result, **rounds_statistics([result]))
        record["timeline" if system.program != "pipeline" else "stage_trace"] = str(trace)
        print(f"  {record['batch_s']['mean']:.3f} s per batch, {record['throughput']['mean']:.1f} "
              f"{result['unit']}/s in total; took {job.seconds:.0f} s", flush=True)
        return record

    def pipeline_options(self, model: str, ranks: int, system: System) -> list[str]:
        """main_with_runtime.py's flags: the same batch, image size and timed minibatches as the benchmark."""
        a = self.args
        size = ["--image-size", str(a.image_size)] if a.image_size else []
        warmup = max(a.warmup, ranks + 1 + system.extra_in_flight)  # the pipeline fills before its steady state
        return ["--module", f"models.{model}.gpus={ranks}", "--config_path", "mp_conf.json", "-b", str(a.batch_size),
                "--lr", "0.01",  # the benchmark's SGD
                *size, "--num_minibatches", str(warmup + a.iters * a.batches_per_iter + 1), "--warmup", str(warmup),
                "--distributed_backend", "mpi", "--schedule", system.baseline, "-j", "0", "--print-freq", "1000",
                *(["--micro-batches", str(next(m for m in (4, 2, 1) if a.batch_size % m == 0 and a.batch_size // m >= 2))]
                  if system.baseline == "flush" else []),
                *(["--extra-in-flight", str(system.extra_in_flight)] if system.extra_in_flight else [])]

    def achieved_bps(self, hosts: int, rate: str) -> float | None:
        calib = next((t["calibration"].get(rate) for t in self.testbeds if t["hosts"] == hosts), None)
        return calib["allreduce_achieved_bps"] if calib and calib["status"] == "ok" else None

    def batch_guess(self, model: str, hosts: int, rate: str) -> float:
        """A pessimistic time per batch before measuring it: compute plus all-reduce, not overlapped."""
        compute = self.reference(model, hosts)["batch_s"]
        return compute + ring_allreduce_s(gradient_bytes(model), hosts * self.args.slots, parse_rate_bps(rate))

    @property
    def runnable(self) -> list[System]:
        return [s for s in self.systems if s.label not in self.skipped]

    @property
    def total_runs(self) -> int:
        a = self.args
        return len(a.hosts) * len(a.rates) * len(a.models) * len(self.runnable) * a.rounds

    def plan_estimate_s(self) -> float:
        """Seconds the testbed part should take (runs, launches, calibrations)."""
        total = 0.0
        for hosts in self.args.hosts:
            for rate in self.args.rates:
                total += 20.0 if self.args.calibrate else 0.0
                for model in self.args.models:
                    guess = self.batch_guess(model, hosts, rate)
                    total += self.args.rounds * sum(self.estimate_s(guess, s) for s in self.runnable)
        return total

    # -- summary

    def comparison(self) -> list[dict]:
        """Per (model, hosts, rate): the bound and every system against it."""
        rows = []
        for rate in self.args.rates:
            for ref in self.compute:
                model, hosts, ranks = ref["model"], ref["hosts"], ref["ranks"]
                runs = {r["system"]: r for r in self.runs
                        if r["model"] == model and r["hosts"] == hosts and r["rate"] == rate}
                if not runs:
                    continue
                achieved = self.achieved_bps(hosts, rate)
                compute = self.compute_s(ref, rate)
                comm = ring_allreduce_s(gradient_bytes(model), ranks, parse_rate_bps(rate))
                systems = {s.label: s for s in self.systems}
                for label, r in runs.items():
                    system = systems.get(label)
                    if r["status"] != "ok" or system is None:
                        continue
                    if system.program == "pipeline":
                        runs[label] = dict(r, own_bound=pipeline_bound(stage_package(model, ranks), achieved,
                                                                       parse_rate_bps(rate), self.args.batch_size,
                                                                       self.args.image_size, compute))
                    elif system.compression != "none":  # half the bytes on the link (sharded: the all-gathers
                        fraction = 0.75 if system.shard_update else 0.5  # carry full-size parameters)
                        runs[label] = dict(r, own_bound={"bound_s": max(compute, comm * fraction),
                                                         "comm_s": comm * fraction,
                                                         "why": f"gradients as {system.compression}"})
                rows.append(compare_row(model, hosts, ranks, self.args.batch_size, rate, compute, comm,
                                        achieved, runs, getattr(self.args, "power", None),
                                        interference_of(runs.values())))
        return rows


def interference_of(runs) -> list[float]:
    """Every σ that a setting's jobs measured, one per planned job (the online planner records it
    in the benchmark JSON's ``planning``; a job that turned it off records None)."""
    sigmas = []
    for run in runs:
        for record in run.get("rounds") or [run]:
            sigma = ((record.get("result") or {}).get("planning") or {}).get("interference")
            if sigma is not None:
                sigmas.append(float(sigma))
    return sigmas


def merge_rounds(rounds: list[dict]) -> dict:
    """One system's record from its rounds' records: the first successful round's fields (its
    command, log, JSON), the statistics of every successful round, and every round's record."""
    ok = [r for r in rounds if r["status"] == "ok"]
    if not ok:
        return dict(rounds[0], rounds=rounds)
    merged = dict(ok[0], rounds=rounds, **rounds_statistics([r["result"] for r in ok]))
    if len(ok) < len(rounds):
        merged["failed_rounds"] = [r["round"] for r in rounds if r["status"] != "ok"]
    return merged


def stage_package(model: str, ranks: int) -> Path:
    """Where the model's stage package for ``ranks`` ranks is (PipeDream's layout)."""
    return MAIN_WITH_RUNTIME.parent / "models" / model / f"gpus={ranks}"


def pipeline_bound(package: Path, achieved_bps: float | None, nominal_bps: float, batch_size: int,
                   image_size: int | None, compute_s: float) -> dict:
    """[Note: the pipeline's bound] No pipeline of the package's stages beats
    ``max(the slowest stage's compute, the boundary's activation bytes per minibatch at the nominal rate)``.

    A stage's compute is its forward, backward and optimizer step (the step was left out
    before its time was measured per module: VGG-16's second stage spent 1.2-1.3 s of its
    4.9 s per minibatch in it, as main_with_runtime.py --trace showed, and the bound was low
    by that much). The split of compute between stages is the partition's (``partition.json``); its total is
    ``compute_s``, this sweep's compute-only reference (one pinned process per rank at once),
    because the partition may have been measured on another load. Also given: the slowest
    stage's compute plus its sends at the achieved rate (``with_sends_s``), which is what a
    stage would take if it could not compute while its transfers run. It is not a bound:
    the engine thread moves the data while the stage computes (VGG-16 at 250 and 125
    Mbit/s ran 8 and 12% below it). Valid for the partition's batch and image size only.
    """
    record = json.loads((package / "partition.json").read_text())
    if record["batch_size"] != batch_size or (image_size or 224) != record["image_size"]:
        return {"bound_s": None, "why": f"{package / 'partition.json'} measured batch {record['batch_size']} at "
                                        f"{record['image_size']} px, this run uses batch {batch_size}"}
    modules = record["modules"]

    def compute(m: dict) -> float:  # the optimizer step too: the reference runs it (0 in older partition files)
        return m["forward"] + m["backward"] + m.get("update", 0.0)

    scale = compute_s / sum(map(compute, modules))
    rate = (achieved_bps or nominal_bps) / 8
    last = len(record["stages"]) - 1
    stages = []
    for s, stage in enumerate(record["stages"]):
        stage_compute = scale * sum(map(compute, modules[stage["start"]:stage["end"]]))
        sent = ((modules[stage["end"] - 1]["output_bytes"] if s < last else 0)
                + (modules[stage["start"] - 1]["output_bytes"] if s > 0 else 0))
        stages.append({"compute_s": stage_compute, "send_s": sent / rate})
    link = max((modules[st["end"] - 1]["output_bytes"] for st in record["stages"][:-1]), default=0) * 8 / nominal_bps
    return {"bound_s": max([st["compute_s"] for st in stages] + [link]), "stages": stages, "link_s": link,
            "with_sends_s": max(st["compute_s"] + st["send_s"] for st in stages), "rate_bps": rate * 8,
            "compute_scale": scale, "rate_is": "achieved" if achieved_bps else "nominal",
            "predicted_s": record["seconds_per_minibatch"]}
