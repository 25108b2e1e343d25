"""Every system against the bound on an emulated cluster: ``python -m pipedap.tools.compare --help``.

For each host count it brings up one testbed (:class:`pipedap.tools.testbed.Testbed`) and, per
link rate (reshaped in place), per model, runs every system with the same batch and
iteration counts under ``pipedap.tools.bench``: PipeDAP with the exact planner (online plan),
PipeDAP with the paper's greedy planner (``PIPEDAP_PLANNER=greedy``), DeAR, WFBP, DDP (gloo)
and Horovod (when it imports).

[Note: the bound] No data-parallel system beats ``max(compute, communication)``:

* compute: the single-process job with no communication (:mod:`pipedap.tools.compare_compute`),
  one copy per rank at once, each pinned to that rank's core (alone it would run faster
  than any rank of the distributed job, whose cores are busy);
* communication: a ring all-reduce of the gradients moves ``2(p-1)/p x bytes`` over each
  link, at the nominal rate. The rate the comm core achieved on this testbed (calibration,
  ``pipedap.tools.bench_comm`` all-reduce) is reported next to it, with the bound it implies.

[Note: timing decoupled schedules] DeAR and PipeDAP leave a batch's last collectives
running when ``step()`` returns. The benchmark's timed window starts after a barrier (nothing
pending) and its last iteration waits for what is still running, so the window holds
exactly n batches of communication. Its edges are not steady state, though: in the first
iteration the link idles through the forward (no all-gathers are pending yet), and the last
one waits for its whole tail with no forward to hide it. Where communication dominates
this adds about one forward per window (ResNet-50 at 125 Mbit/s, greedy plan: 4.5, 7.2, 7.4
and 11.6 s), i.e. forward/n to the window mean. So the time per batch is the mean of the
iterations between the edges (steady state; each waits for exactly one batch's
all-gathers), the same for every system; the window mean is kept next to it (see
steady_statistics). With fewer than 3 iterations there are no inner ones: all count.

Each system's time per batch (steady state, with its 95% confidence interval) is reported
with its distance from the bound, PipeDAP's speedup over it, and, where the
system has a plan, the predicted time. Outputs: one JSON with everything (commands, testbed
settings, affinity, each run's benchmark JSON), three charts, a table on stdout, and each
run's log. A system that fails is recorded with the tail of its output; the sweep goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import models
from pipedap import settings
from pipedap.tools.bench import confidence
from pipedap.tools.testbed import calibrate
from pipedap.tools.testbed.network import TestbedError, stop_process_group
from pipedap.tools.testbed.pin import core_for
from pipedap.tools.testbed.testbed import Testbed, signals_as_exceptions
from pipedap.units import parse_rate_bps

JSON_VERSION = 1
LAUNCH_S = 5.0  # mpirun, imports and model construction per run
CALIBRATION_SIZE = "16m"
# gloo (DDP) finds rank 0 through the hosts' NIC: their names do not resolve
TESTBED_ENV = {"GLOO_SOCKET_IFNAME": "eth0"}
ENV_CLEARED = ("PIPEDAP_PLAN", "PIPEDAP_PLANNER", "PIPEDAP_SCHEDULE")  # would change what a system runs


@dataclass(frozen=True)
class System:
    """One compared system: a label, the bench baseline that runs it, and extra environment."""

    label: str
    baseline: str
    env: dict[str, str] = field(default_factory=dict)


SYSTEMS = (
    System("PipeDAP", "PipeDAP", {"PIPEDAP_PLANNER": "optimal"}),
    System("PipeDAP-greedy", "PipeDAP", {"PIPEDAP_PLANNER": "greedy"}),
    System("DeAR", "DeAR"),
    System("WFBP", "WFBP"),
    System("DDP", "DDP"),
    System("Horovod", "Horovod"),
)
REFERENCE = "PipeDAP"  # whose speedup over the others is reported
SPEEDUP_BASE = "DDP"  # the chart's speedups are over this one


class CompareError(Exception):
    """The comparison cannot run as asked; the message says what to change."""


# -- the bound --------------------------------------------------------------------------------------

def gradient_bytes(model: str) -> int:
    """Bytes of the model's gradients: float32, one per parameter."""
    return models.count_parameters(model) * 4


def ring_allreduce_s(nbytes: float, ranks: int, rate_bps: float) -> float:
    """Seconds a ring all-reduce of ``nbytes`` needs on links of ``rate_bps``: 2(p-1)/p x bytes per link."""
    return 2 * (ranks - 1) / ranks * nbytes * 8 / rate_bps if ranks > 1 else 0.0


# -- running jobs -----------------------------------------------------------------------------------

@dataclass
class Job:
    """A finished (or stopped) subprocess: exit status, duration, where its output went."""

    command: list[str]
    returncode: int
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, chars: int = 3000) -> str:
        """The end of its output, for the record of a failure."""
        return self.log.read_text(errors="replace")[-chars:]


def start_job(command: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, float]:
    """Start ``command`` in its own process group with stdout and stderr into ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, time.perf_counter()


def finish_job(proc: subprocess.Popen, started: float, deadline: float, log: Path) -> Job:
    """Wait until ``deadline`` (perf_counter); then stop the whole process group (exit 124)."""
    try:
        returncode = proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        returncode = 124
    finally:
        stop_process_group(proc)  # timeout or Ctrl-C: stop mpirun and its ranks
    seconds = time.perf_counter() - started
    if returncode == 124:
        with log.open("a") as out:
            out.write(f"\n[pipedap.tools.compare] stopped after {seconds:.0f} s: over its timeout\n")
    return Job(list(map(str, proc.args)), returncode, seconds, log)


def run_job(command: list[str], env: dict[str, str], log: Path, timeout: float) -> Job:
    """Run ``command`` to the end or for ``timeout`` seconds at most."""
    proc, started = start_job(command, env, log)
    return finish_job(proc, started, started + timeout, log)


# -- the sweep --------------------------------------------------------------------------------------

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
                "--no-progress", *size]

    def batches(self, system: System | None) -> int:
        """Batches one run trains (PipeDAP's warmup lasts until it has planned)."""
        warmup = self.args.warmup
        if system is not None and system.baseline == "PipeDAP":
            warmup = max(warmup, settings.get("PIPEDAP_PROFILE_STEPS") + 2)  # PipeDAP switches plans after these
        return warmup + self.args.iters * self.args.batches_per_iter

    def estimate_s(self, batch_s: float, system: System | None) -> float:
        return LAUNCH_S + self.batches(system) * batch_s

    def timeout_s(self, batch_s: float, system: System | None) -> float:
        return self.args.timeout or 60 + 3 * self.estimate_s(batch_s, system)

    # -- compute-only reference

    def measure_compute(self, model: str, hosts: int) -> dict:
        """The compute-only time per batch: one pinned copy per rank at once, their mean."""
        ranks = hosts * self.args.slots
        folder = self.out / "compute" / f"{model}-{ranks}ranks"
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
                    for system in self.systems:
                        if system.label in self.skipped:
                            self.runs.append({"model": model, "hosts": hosts, "rate": rate, "system": system.label,
                                              "baseline": system.baseline, "status": "skipped",
                                              "reason": self.skipped[system.label]})
                            continue
                        self.runs.append(self.run_system(tb, model, rate, system))

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

    def run_system(self, tb: Testbed, model: str, rate: str, system: System) -> dict:
        """One benchmark run on the testbed; its record, failed or not."""
        a = self.args
        name = f"{model}-{tb.hosts}h-{rate}-{system.label}"
        runs = self.out / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        json_path, trace = runs / f"{name}.json", runs / f"{name}.trace.json"
        command = tb.mpirun([sys.executable, "-m", "pipedap.tools.bench", *self.bench_options(model),
                             "--baseline", system.baseline, "--json", str(json_path), "--timeline", str(trace)])
        env = dict(clean_env(tb.env()), **TESTBED_ENV, **system.env)
        # a cost model measured at one rate must not be reused at the next: same host names
        env["PIPEDAP_CACHE_DIR"] = str(self.out / "costmodels" / f"{tb.hosts}h-{rate}")
        batch_guess = self.batch_guess(model, tb.hosts, rate)
        timeout = self.timeout_s(batch_guess, system)
        self.done_runs += 1
        print(f"[{self.done_runs}/{self.total_runs}] {name}: about {self.estimate_s(batch_guess, system):.0f} s "
              f"(timeout {timeout:.0f} s) ...", flush=True)
        job = run_job(command, env, self.out / "logs" / f"{name}.log", timeout)
        record = {"model": model, "hosts": tb.hosts, "ranks": tb.hosts * a.slots, "rate": rate,
                  "system": system.label, "baseline": system.baseline, "env": system.env, "command": job.command,
                  "seconds": job.seconds, "log": str(job.log), "pinned": pinned_cores(job.log)}
        if not job.ok:
            why = "timed out" if job.returncode == 124 else f"exit {job.returncode}"
            print(f"  FAILED ({why}) after {job.seconds:.0f} s; log {job.log}", flush=True)
            return dict(record, status="failed", returncode=job.returncode, error_tail=job.tail())
        result = json.loads(json_path.read_text())
        record = dict(record, status="ok", json=str(json_path), timeline=str(trace), unit=result["unit"],
                      plan=result["plan"], description=result["description"], result=result,
                      **run_statistics(result))
        print(f"  {record['batch_s']['mean']:.3f} s per batch, {record['throughput']['mean']:.1f} "
              f"{result['unit']}/s in total; took {job.seconds:.0f} s", flush=True)
        return record

    def batch_guess(self, model: str, hosts: int, rate: str) -> float:
        """A pessimistic time per batch before measuring it: compute plus all-reduce, not overlapped."""
        compute = next(c["batch_s"] for c in self.compute if c["model"] == model and c["hosts"] == hosts)
        return compute + ring_allreduce_s(gradient_bytes(model), hosts * self.args.slots, parse_rate_bps(rate))

    @property
    def runnable(self) -> list[System]:
        return [s for s in self.systems if s.label not in self.skipped]

    @property
    def total_runs(self) -> int:
        return len(self.args.hosts) * len(self.args.rates) * len(self.args.models) * len(self.runnable)

    def plan_estimate_s(self) -> float:
        """Seconds the testbed part should take (runs, launches, calibrations)."""
        total = 0.0
        for hosts in self.args.hosts:
            for rate in self.args.rates:
                total += 20.0 if self.args.calibrate else 0.0
                for model in self.args.models:
                    guess = self.batch_guess(model, hosts, rate)
                    total += sum(self.estimate_s(guess, s) for s in self.runnable)
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
                calib = next((t["calibration"].get(rate) for t in self.testbeds if t["hosts"] == hosts), None)
                achieved = calib["allreduce_achieved_bps"] if calib and calib["status"] == "ok" else None
                comm = ring_allreduce_s(gradient_bytes(model), ranks, parse_rate_bps(rate))
                rows.append(compare_row(model, hosts, ranks, self.args.batch_size, rate, ref["batch_s"], comm,
                                        achieved, runs))
        return rows


def steady_statistics(seconds: Sequence[float]) -> tuple[float, float | None, float]:
    """(steady-state mean, half-width of its 95% interval, window mean) of timed iterations.

    Steady state: the iterations between the window's first and last (see the module's
    note), or all of them when there are fewer than 3.
    """
    inner = list(seconds[1:-1]) if len(seconds) >= 3 else list(seconds)
    mean, ci95, _ = confidence(inner)
    return mean, ci95, statistics.fmean(seconds)


def run_statistics(result: dict) -> dict:
    """A benchmark result's time per batch and throughput (each with its interval), predicted vs measured."""
    mean, ci95, window = steady_statistics([it["seconds"] / result["batches_per_iter"]
                                            for it in result["per_iteration"]])
    samples_per_batch = result["world_size"] * result["batch_size"]
    predicted = result["batch_time"]["predicted_s"]
    return {"batch_s": {"mean": mean, "ci95": ci95, "iterations": len(result["per_iteration"]),
                        "window_mean": window},
            "throughput": {"mean": samples_per_batch / mean,
                           "ci95": samples_per_batch / mean * ci95 / mean if ci95 is not None else None},
            "predicted_s": predicted, "predicted_over_measured": predicted / mean if predicted else None}


def compare_row(model: str, hosts: int, ranks: int, batch_size: int, rate: str, compute: float, comm: float,
                achieved_bps: float | None, runs: dict[str, dict]) -> dict:
    """The bound of one setting and each system's distance from it and PipeDAP's speedup over it."""
    bound = max(compute, comm)
    comm_achieved = comm * parse_rate_bps(rate) / achieved_bps if achieved_bps else None
    ok = {label: r["batch_s"]["mean"] for label, r in runs.items() if r["status"] == "ok"}
    systems = {}
    for label, r in runs.items():
        entry = {"status": r["status"]}
        if label in ok:
            t = ok[label]
            entry.update(batch_s=t, ci95=r["batch_s"]["ci95"], window_s=r["batch_s"].get("window_mean"),
                         throughput=r["throughput"]["mean"],
                         throughput_ci95=r["throughput"]["ci95"], over_bound_pct=100 * (t / bound - 1),
                         pipedap_speedup=t / ok[REFERENCE] if REFERENCE in ok else None,
                         speedup_over_ddp=ok[SPEEDUP_BASE] / t if SPEEDUP_BASE in ok else None,
                         predicted_s=r["predicted_s"], predicted_over_measured=r["predicted_over_measured"])
        else:
            entry["why"] = r.get("reason") or telling_line(r.get("error_tail", ""))
        systems[label] = entry
    return {"model": model, "hosts": hosts, "ranks": ranks, "batch_size": batch_size, "rate": rate, "rate_bps": parse_rate_bps(rate),
            "gradient_bytes": gradient_bytes(model), "compute_s": compute, "comm_s": comm,
            "comm_achieved_s": comm_achieved, "achieved_bps": achieved_bps, "bound_s": bound,
            "bound_achieved_s": max(compute, comm_achieved) if comm_achieved else None,
            "bound_throughput": ranks * batch_size / bound,
            "bound_by": "compute" if compute >= comm else "communication", "comm_over_compute": comm / compute,
            "systems": systems}


def table(rows: list[dict]) -> str:
    """The comparison as text: one block per setting, one line per system."""
    lines = []
    for row in rows:
        achieved = (f", achieved {row['achieved_bps'] / 1e6:.0f} Mbit/s -> {row['comm_achieved_s']:.2f} s"
                    if row["achieved_bps"] else "")
        lines += ["", f"{row['model']}, {row['ranks']} ranks on {row['hosts']} hosts, {row['rate']}: "
                      f"compute {row['compute_s']:.2f} s, all-reduce {row['gradient_bytes'] / 1e6:.0f} MB at "
                      f"nominal {row['comm_s']:.2f} s{achieved}; bound {row['bound_s']:.2f} s ({row['bound_by']}), "
                      f"comm/compute {row['comm_over_compute']:.2f}",
                  f"  {'system':<15} {'s/batch':>15} {'window':>7} {'samples/s':>13} {'vs bound':>9} "
                  f"{'PipeDAP x':>9} {'predicted':>9} {'pred/meas':>9}"]
        for label, s in row["systems"].items():
            if s["status"] != "ok":
                lines.append(f"  {label:<15} {s['status'].upper()}: {s['why']}")
                continue
            lines.append(f"  {label:<15} {s['batch_s']:7.3f} +-{fmt(s['ci95'], '.3f'):>6} "
                         f"{fmt(s.get('window_s'), '7.3f'):>7} {s['throughput']:6.2f} +-{fmt(s['throughput_ci95'], '.2f'):>4} "
                         f"{s['over_bound_pct']:+8.1f}% {fmt(s['pipedap_speedup'], '.2f'):>9} "
                         f"{fmt(s['predicted_s'], '.3f'):>9} {fmt(s['predicted_over_measured'], '.2f'):>9}")
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def telling_line(text: str) -> str:
    """The line of a failure's output that says most: its last error line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("-")]
    errors = [line for line in lines if re.search(r"Error\b|Exception\b|error:|timeout", line)]
    return ((errors or lines)[-1] if lines else "no output")[:200]


def clean_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the settings that would make a system run something else than asked."""
    return {k: v for k, v in env.items() if k not in ENV_CLEARED}


def pinned_cores(log: Path) -> dict[str, int]:
    """rank -> core, as the testbed's pinning wrapper reported it in the run's output."""
    found = re.findall(r"\[pipedap\.tools\.testbed\.pin\] rank (\d+) on \S+ pinned to core (\d+)", log.read_text(errors="replace"))
    return {rank: int(core) for rank, core in found}


def horovod_available() -> str | None:
    """Why Horovod cannot run here, or None when ``horovod.torch`` imports (checked in a subprocess)."""
    done = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, text=True,
                          timeout=120)
    return None if done.returncode == 0 else f"`import horovod.torch` failed: {telling_line(done.stderr)}"


# -- command line -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipedap.tools.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (the real measurement, about an hour):\n  python -m pipedap.tools.compare --out out/compare\n"
               "Smoke run (a few minutes):\n  python -m pipedap.tools.compare --quick --out out/compare-quick")
    parser.add_argument("--models", help="comma-separated models, e.g. resnet50,vgg16,bert_base "
                                                             "(default resnet50)")
    parser.add_argument("--hosts", default="2", help="comma-separated host counts, one testbed each (default 2; "
                                                     "4 hosts on 2 cores share cores)")
    parser.add_argument("--slots", type=int, default=1, help="ranks per host (default 1)")
    parser.add_argument("--rates", help="comma-separated link rates, each way (default 500mbit,250mbit,125mbit; "
                                        "--quick: 500mbit)")
    parser.add_argument("--systems", default=",".join(s.label for s in SYSTEMS),
                        help="comma-separated subset of the systems (default: all; Horovod only when it imports)")
    parser.add_argument("--batch-size", type=int, help="per rank (default 8; --quick: 2)")
    parser.add_argument("--image-size", type=int, help="image side of image models (default: the model's; --quick: 32)")
    parser.add_argument("--sentence-len", type=int, help="sequence length of language models (default: the model's)")
    parser.add_argument("--warmup", type=int, help="untimed batches (default 3; --quick: 1); PipeDAP's warmup "
                                                   "lasts until it has planned online")
    parser.add_argument("--iters", type=int, help="timed iterations; time per batch is the mean of the inner "
                                                  "ones, see the note above (default 6; --quick: 3)")
    parser.add_argument("--batches-per-iter", type=int, default=1, help="batches per timed iteration (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet50 at 32x32, batch 2, 1 warmup, "
                                                             "3 iterations, one rate (explicit options win)")
    parser.add_argument("--qdisc", default="tbf", choices=("tbf", "htb"), help="the testbed's rate limiter")
    parser.add_argument("--burst", default="256kb", help="token bucket size (default 256kb)")
    parser.add_argument("--latency", default="20ms", help="tbf queueing limit (default 20ms)")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="skip measuring the achieved link rate at each rate (about 20 s each)")
    parser.add_argument("--timeout", type=float, help="seconds per run (default: 60 + 3x its estimate)")
    parser.add_argument("--out", help="output folder (default out/compare-<date>-<time>)")
    parser.add_argument("--summarize", metavar="FOLDER",
                        help="no runs: recompute the table, JSON and charts of the sweep in FOLDER from its "
                             "compare.json and the benchmark results it holds")
    return parser


QUICK = {"models": "resnet50", "rates": "500mbit", "batch_size": 2, "image_size": 32, "warmup": 1, "iters": 3}
DEFAULTS = {"models": "resnet50", "rates": "500mbit,250mbit,125mbit", "batch_size": 8, "warmup": 3, "iters": 6}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the options; CompareError says which one is wrong."""
    args = build_parser().parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:  # explicit options win over --quick
            setattr(args, key, value)
    args.models = args.models.split(",")
    for model in args.models:
        try:
            models.info(model)
        except ValueError as err:
            raise CompareError(str(err)) from None
    args.rates = args.rates.split(",")
    for rate in args.rates:
        try:
            parse_rate_bps(rate)
        except ValueError as err:
            raise CompareError(f"--rates: {err}") from None
    try:
        args.hosts = [int(h) for h in args.hosts.split(",")]
    except ValueError:
        raise CompareError(f"--hosts takes comma-separated integers, got {args.hosts!r}") from None
    if any(h < 2 for h in args.hosts):
        raise CompareError("--hosts: a comparison needs at least 2 hosts (the compute-only job is the 1-rank case)")
    labels = {s.label.lower(): s for s in SYSTEMS}
    unknown = [s for s in args.systems.split(",") if s.lower() not in labels]
    if unknown:
        raise CompareError(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(s.label for s in SYSTEMS)}")
    args.systems = [labels[s.lower()] for s in args.systems.split(",")]
    for name in ("batch_size", "iters", "batches_per_iter", "slots"):
        if getattr(args, name) < 1:
            raise CompareError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise CompareError(f"--warmup must be >= 0, got {args.warmup}")
    args.out = args.out or f"out/compare-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return args


def summarize(folder: str) -> int:
    """Recompute a finished sweep's statistics, comparison, table and charts from its compare.json."""
    path = Path(folder) / "compare.json"
    if not path.exists():
        print(f"error: --summarize: {path} does not exist; give the --out folder of a sweep", file=sys.stderr)
        return 2
    doc = json.loads(path.read_text())
    settings = doc["settings"]
    sweep = Sweep(argparse.Namespace(**dict(settings, out=folder, systems=[System(**s) for s in settings["systems"]])))
    sweep.args.out = settings["out"]  # as the sweep recorded it; the files go to sweep.out (folder)
    sweep.compute, sweep.testbeds, sweep.cores = doc["compute"], doc["testbeds"], doc["cores"]
    sweep.runs = [dict(r, **run_statistics(r["result"])) if r["status"] == "ok" else r for r in doc["runs"]]
    write_results(sweep, doc["wall_seconds"], doc["command"])
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        args = parse_args(argv)
        if args.summarize:
            return summarize(args.summarize)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    sweep = Sweep(args)
    sweep.out.mkdir(parents=True, exist_ok=True)
    if any(s.label == "Horovod" for s in args.systems):
        reason = horovod_available()
        if reason:
            sweep.skipped["Horovod"] = reason
            print(f"Horovod is skipped: {reason}", flush=True)
    cores = len(sweep.cores)
    for hosts in args.hosts:
        if hosts * args.slots > cores:
            print(f"note: {hosts * args.slots} ranks on {cores} cores: ranks share cores (rank r on core r mod "
                  f"{cores}), so compute is slower than on real hosts; the compute-only reference shares them "
                  "the same way", flush=True)
    with signals_as_exceptions():  # SIGTERM stops the running job and still writes what was measured
        try:
            for hosts in args.hosts:
                for model in args.models:
                    print(f"compute-only reference: {model}, {hosts * args.slots} pinned single-process jobs at once ...",
                          flush=True)
                    sweep.compute.append(sweep.measure_compute(model, hosts))
                    print(f"  {sweep.compute[-1]['batch_s']:.3f} s per batch", flush=True)
            estimate = sweep.plan_estimate_s()
            print(f"\n{sweep.total_runs} runs ({len(sweep.runnable)} systems x {len(args.rates)} rates x "
                  f"{len(args.models)} models x {len(args.hosts)} host counts); estimated {estimate / 60:.0f} min "
                  f"(each run: launch + {args.warmup} warmup + {args.iters}x{args.batches_per_iter} timed batches at "
                  "compute + all-reduce time, PipeDAP planning included)", flush=True)
            for hosts in args.hosts:
                sweep.sweep_hosts(hosts)
        except (CompareError, TestbedError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        finally:
            write_results(sweep, time.perf_counter() - began, [sys.executable, "-m", "pipedap.tools.compare", *argv])
    return 0 if all(r["status"] != "failed" for r in sweep.runs) else 1


def write_results(sweep: Sweep, seconds: float, command: list[str]) -> None:
    """The JSON, the charts and the table of whatever has been measured (also after an error)."""
    from pipedap.tools import compare_charts

    args = sweep.args
    rows = sweep.comparison() if sweep.compute else []
    settings = {k: v for k, v in vars(args).items() if k != "systems"}
    settings["systems"] = [dataclasses.asdict(s) for s in args.systems]
    doc = {"version": JSON_VERSION, "command": command,
           "wall_seconds": seconds, "settings": settings, "cores": sweep.cores,
           "compute": sweep.compute, "testbeds": sweep.testbeds, "runs": sweep.runs, "comparison": rows}
    path = sweep.out / "compare.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    charts = compare_charts.draw(rows, sweep.out) if rows else []
    print(table(rows))
    print(f"\nwrote {path}" + "".join(f", {c}" for c in charts) + f"; logs in {sweep.out / 'logs'}; "
          f"took {seconds / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
