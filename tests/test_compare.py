"""python -m pipedap.tools.compare: the bound and table arithmetic, and a smoke run on 2 emulated hosts.

The unit tests run anywhere. The others create network namespaces (skipped with the reason
where that is impossible, as in test_testbed.py): every system trains a tiny ResNet-50 for a
few iterations on the testbed and is recorded, and every schedule matches single-process
training when its ranks run on the emulated hosts (check_optimizer.py matrix).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipedap.tools import compare, compare_jobs, compare_report, compare_sweep, stats
from pipedap.tools.testbed import network, teardown

ROOT = Path(__file__).resolve().parents[1]


# -- unit tests: no namespaces -------------------------------------------------------------------

def test_ring_allreduce_moves_2_p_minus_1_over_p_of_the_bytes_per_link() -> None:
    assert compare_report.ring_allreduce_s(1e6, 2, 8e6) == pytest.approx(1.0)  # 1 MB each way at 8 Mbit/s
    assert compare_report.ring_allreduce_s(1e6, 4, 8e6) == pytest.approx(1.5)
    assert compare_report.ring_allreduce_s(1e6, 1, 8e6) == 0.0
    assert compare_report.gradient_bytes("resnet50") == 25_557_032 * 4


def _run(system: str, batch_s: float) -> dict:
    return {"system": system, "status": "ok", "batch_s": {"mean": batch_s, "ci95": 0.1},
            "throughput": {"mean": 16 / batch_s, "ci95": 0.2}, "predicted_s": None,
            "predicted_over_measured": None}


def test_row_against_the_bound() -> None:
    runs = {"PipeDAP": dict(_run("PipeDAP", 4.4), predicted_s=4.0, predicted_over_measured=4.0 / 4.4),
            "DDP": _run("DDP", 6.6), "Horovod": {"status": "skipped", "reason": "not installed"},
            "WFBP": {"status": "failed", "error_tail": "----\nRuntimeError: boom\n-----\nprterun has exited"}}
    row = compare_report.compare_row("resnet50", 2, 2, 8, "250mbit", compute=4.0, comm=3.0, achieved_bps=200e6, runs=runs)
    assert row["bound_s"] == 4.0 and row["bound_by"] == "compute" and row["bound_throughput"] == 4.0
    assert row["comm_achieved_s"] == pytest.approx(3.0 * 250 / 200) and row["bound_achieved_s"] == 4.0
    pipedap, ddp = row["systems"]["PipeDAP"], row["systems"]["DDP"]
    assert pipedap["over_bound_pct"] == pytest.approx(10.0) and ddp["over_bound_pct"] == pytest.approx(65.0)
    assert ddp["pipedap_speedup"] == pytest.approx(1.5) and pipedap["speedup_over_ddp"] == pytest.approx(1.5)
    assert row["systems"]["Horovod"] == {"status": "skipped", "why": "not installed"}
    assert row["systems"]["WFBP"]["why"] == "RuntimeError: boom"
    text = compare_report.table([row])
    assert "bound 4.00 s (compute)" in text and "WFBP            FAILED: RuntimeError: boom" in text


def test_a_pipeline_is_judged_against_its_own_bound_and_compared_in_samples_per_second() -> None:
    """A pipeline's batch is one minibatch of 8 images; a data-parallel batch is 8 per rank (16)."""
    pipeline = dict(_run("Pipeline-1F1B", 2.0), own_bound={"bound_s": 1.6})
    pipeline["throughput"] = {"mean": 8 / 2.0, "ci95": None}
    runs = {"PipeDAP": _run("PipeDAP", 8.0), "Pipeline-1F1B": pipeline}
    row = compare_report.compare_row("vgg16", 2, 2, 8, "125mbit", compute=4.0, comm=7.0, achieved_bps=None, runs=runs)
    entry = row["systems"]["Pipeline-1F1B"]
    assert entry["bound_s"] == 1.6 and entry["over_bound_pct"] == pytest.approx(25.0)
    assert entry["pipedap_speedup"] == pytest.approx(2.0 / 4.0)  # PipeDAP: 16 images / 8 s; pipeline: 8 / 2 s


def test_the_pipeline_bound_comes_from_the_packages_measurements() -> None:
    package = compare_sweep.stage_package("vgg16", 2)
    record = json.loads((package / "partition.json").read_text())
    bound = compare_sweep.pipeline_bound(package, None, 125e6, record["batch_size"], record["image_size"], 9.0)
    boundary = record["modules"][record["stages"][0]["end"] - 1]["output_bytes"]
    assert [s["send_s"] for s in bound["stages"]] == pytest.approx([boundary * 8 / 125e6] * 2)
    assert sum(s["compute_s"] for s in bound["stages"]) == pytest.approx(9.0)  # scaled to the run's compute
    assert bound["bound_s"] == max(max(s["compute_s"] for s in bound["stages"]), bound["link_s"])
    assert bound["with_sends_s"] == max(s["compute_s"] + s["send_s"] for s in bound["stages"]) > bound["bound_s"]
    other = compare_sweep.pipeline_bound(package, None, 125e6, 2, 32, 1.0)
    assert other["bound_s"] is None and "this run uses batch 2" in other["why"]


def test_steady_state_leaves_out_the_window_edges() -> None:
    # ResNet-50 at 125 Mbit/s, greedy plan: the link idles in the first forward, the last
    # iteration waits for its whole tail
    seconds = [4.49, 7.22, 7.35, 11.57]
    mean, ci95, window = stats.steady_statistics(seconds)
    assert mean == pytest.approx((7.22 + 7.35) / 2) and window == pytest.approx(sum(seconds) / 4)
    assert ci95 == pytest.approx(stats.confidence([7.22, 7.35])[1])
    assert stats.steady_statistics([4.0, 6.0]) == (5.0, pytest.approx(stats.confidence([4.0, 6.0])[1]), 5.0)
    assert stats.steady_statistics([8.8, 18.83, 32.09])[:2] == (18.83, None)  # one inner iteration
    result = {"per_iteration": [{"seconds": 2 * t} for t in seconds], "batches_per_iter": 2, "world_size": 2,
              "batch_size": 8, "batch_time": {"predicted_s": 7.0}}
    run = stats.run_statistics(result)
    assert run["batch_s"]["mean"] == pytest.approx(mean) and run["batch_s"]["iterations"] == 4
    assert run["batch_s"]["window_mean"] == pytest.approx(window)
    assert run["throughput"]["mean"] == pytest.approx(16 / mean)
    # throughput's interval: the relative interval of the time (first-order)
    assert run["throughput"]["ci95"] / run["throughput"]["mean"] == pytest.approx(ci95 / mean)
    assert run["predicted_over_measured"] == pytest.approx(7.0 / mean)


def _result(seconds: list[float], predicted: float | None = None) -> dict:
    return {"per_iteration": [{"seconds": t} for t in seconds], "batches_per_iter": 1, "world_size": 2,
            "batch_size": 8, "batch_time": {"predicted_s": predicted}}


def test_rounds_pool_their_steady_iterations_and_take_the_interval_from_the_round_means() -> None:
    rounds = [_result([9.0, 4.0, 5.0, 9.0], 4.0), _result([9.0, 6.0, 7.0, 9.0], 5.0), _result([1.0, 5.0, 6.0, 1.0], 6.0)]
    run = stats.rounds_statistics(rounds)
    assert run["batch_s"]["rounds"] == 3 and run["batch_s"]["iterations"] == 12 and run["batch_s"]["steady_iterations"] == 6
    assert run["batch_s"]["mean"] == pytest.approx(33 / 6)  # the edges of every round left out
    assert run["batch_s"]["round_means"] == [4.5, 6.5, 5.5]
    assert run["batch_s"]["ci95"] == pytest.approx(stats.confidence([4.5, 6.5, 5.5])[1])
    assert run["predicted_s"] == pytest.approx(5.0) and run["throughput"]["mean"] == pytest.approx(16 / (33 / 6))
    single = stats.run_statistics(rounds[0])
    single["batch_s"]["rounds"] = 1
    assert stats.rounds_statistics(rounds[:1]) == single


def _rounds(system: str, seconds_per_round: dict[int, float]) -> dict:
    """A merged record whose rounds (by index; a missing index failed) took the given seconds per batch."""
    rounds = [{"round": k, "status": "ok", "result": _result([9.0, t, t, 9.0])} for k, t in seconds_per_round.items()]
    return dict(_run(system, sum(seconds_per_round.values()) / len(seconds_per_round)), rounds=rounds)


def test_the_speedup_over_ddp_is_paired_round_by_round() -> None:
    """Round 1 was slow for both: the paired ratio is exactly 1.5 in each round, the unpaired
    means' interval would span that drift. A round only one system finished is left out."""
    runs = {"PipeDAP": _rounds("PipeDAP", {0: 4.0, 1: 8.0, 2: 4.0}), "DDP": _rounds("DDP", {0: 6.0, 1: 12.0, 3: 5.0})}
    row = compare_report.compare_row("resnet50", 2, 2, 8, "250mbit", compute=4.0, comm=3.0, achieved_bps=None, runs=runs)
    paired = row["systems"]["PipeDAP"]["paired_speedup_over_ddp"]
    assert paired["mean"] == pytest.approx(1.5) and paired["ci95"] == pytest.approx(0.0) and paired["rounds"] == 2
    assert row["systems"]["DDP"]["paired_pipedap_speedup"]["mean"] == pytest.approx(1.5)
    runs["DDP"]["rounds"][1]["result"] = _result([9.0, 8.0, 8.0, 9.0])  # now 1.5 and 1.0
    row = compare_report.compare_row("resnet50", 2, 2, 8, "250mbit", compute=4.0, comm=3.0, achieved_bps=None, runs=runs)
    paired = row["systems"]["PipeDAP"]["paired_speedup_over_ddp"]
    assert paired["mean"] == pytest.approx(1.25) and paired["ci95"] == pytest.approx(stats.confidence([1.5, 1.0])[1])
    assert "1.250 +-" in compare_report.table([row])


def test_every_round_runs_every_system_in_a_rotated_order_and_a_failed_round_is_kept(monkeypatch, tmp_path) -> None:
    class FakeTestbed:
        """What sweep_hosts uses of a testbed, without namespaces."""

        def __init__(self, hosts, rate, **_):
            self.hosts, self.run_id, self.names, self.subnet = hosts, 1, ["h0", "h1"], "10.0.0.0/24"
            self.shaping = network.Shaping(rate=rate)

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def affinity(self):
            return {0: 0, 1: 1}

        def mpirun_args(self):
            return []

        def reshape(self, shaping):
            self.shaping = shaping

        def describe(self):
            return "fake"

    order = []

    def run_system(self, tb, model, rate, system, round_index):
        order.append((round_index, system.label))
        if (round_index, system.label) == (1, "DDP"):
            return {"system": system.label, "round": round_index, "status": "failed", "error_tail": "boom"}
        return {"model": model, "hosts": 2, "rate": rate, "system": system.label, "round": round_index, "status": "ok",
                "result": _result([9.0, 2.0 + round_index, 9.0]), "json": f"{system.label}-{round_index}.json"}

    references = iter([2.0, 3.0, 7.0])

    def measure_compute(self, model, hosts, tag=""):
        order.append(("compute", tag))
        return {"batch_s": next(references)}

    monkeypatch.setattr(compare_sweep, "Testbed", FakeTestbed)
    monkeypatch.setattr(compare_sweep.Sweep, "run_system", run_system)
    monkeypatch.setattr(compare_sweep.Sweep, "measure_compute", measure_compute)
    args = compare.parse_args(["--systems", "PipeDAP,DeAR,DDP", "--rates", "1gbit", "--no-calibrate",
                               "--out", str(tmp_path)])
    assert (args.rounds, args.iters) == (3, 4)
    sweep = compare_sweep.Sweep(args)
    sweep.compute = [{"model": "resnet50", "hosts": 2, "ranks": 2, "batch_s": 9.0}]  # measured before the testbed
    sweep.sweep_hosts(2)
    assert [what for what in order if what[0] == "compute"] == [("compute", f"1gbit-round{k}") for k in range(3)]
    order[:] = [what for what in order if what[0] != "compute"]
    assert sweep.compute[0]["by_rate"] == {"1gbit": [2.0, 3.0, 7.0]}
    assert sweep.comparison()[0]["compute_s"] == pytest.approx(4.0)  # the rounds' mean, not the first 9.0
    assert order == [(0, "PipeDAP"), (0, "DeAR"), (0, "DDP"), (1, "DeAR"), (1, "DDP"), (1, "PipeDAP"),
                     (2, "DDP"), (2, "PipeDAP"), (2, "DeAR")]
    pipedap, _, ddp = sweep.runs
    assert pipedap["rounds"][2]["round"] == 2 and pipedap["json"] == "PipeDAP-0.json"
    assert pipedap["batch_s"]["round_means"] == [2.0, 3.0, 4.0] and pipedap["batch_s"]["mean"] == pytest.approx(3.0)
    assert ddp["status"] == "ok" and ddp["failed_rounds"] == [1] and ddp["batch_s"]["round_means"] == [2.0, 4.0]


def test_a_compressed_system_is_named_with_its_dtype_and_judged_against_half_the_bytes(tmp_path) -> None:
    args = compare.parse_args(["--systems", "PipeDAP,pipedap-FP16,DDP-bf16", "--out", str(tmp_path)])
    assert [(s.label, s.baseline, s.compression) for s in args.systems] == [
        ("PipeDAP", "PipeDAP", "none"), ("PipeDAP-fp16", "PipeDAP", "fp16"), ("DDP-bf16", "DDP", "bf16")]
    assert args.systems[1].env == {"PIPEDAP_PLANNER": "optimal"}
    for bad, message in (("Pipeline-1F1B-fp16", "compression is for data-parallel systems"),
                         ("PipeDAP-int8", "unknown PipeDAP-int8")):
        with pytest.raises(compare_sweep.CompareError, match=message):
            compare.parse_args(["--systems", bad])
    sweep = compare_sweep.Sweep(args)
    assert "--optimizer" in sweep.bench_options("resnet50")
    sweep.compute = [{"model": "resnet50", "hosts": 2, "ranks": 2, "batch_s": 1.0}]
    sweep.runs = [dict(_run(label, 2.0), model="resnet50", hosts=2, rate="125mbit") for label in
                  ("PipeDAP", "PipeDAP-fp16")]
    sweep.args.rates = ["125mbit"]
    (row,) = sweep.comparison()
    comm = compare_report.ring_allreduce_s(compare_report.gradient_bytes("resnet50"), 2, 125e6)
    assert row["bound_s"] == pytest.approx(comm) and row["systems"]["PipeDAP"]["own_bound"] is None
    assert row["systems"]["PipeDAP-fp16"]["bound_s"] == pytest.approx(comm / 2)


def test_the_reachable_bound_charges_compute_the_cpu_cost_of_every_second_the_link_is_busy() -> None:
    """max(link, compute + link x σ/(1+σ)): with σ = 0.5 a busy second costs compute a third of a second."""
    assert compare_report.reachable_bound(4.0, 3.0, 0.5) == pytest.approx(5.0)  # compute + its bytes' CPU decide
    assert compare_report.reachable_bound(2.0, 6.0, 0.5) == pytest.approx(6.0)  # the link decides
    assert compare_report.reachable_bound(4.0, 3.0, 0.0) == pytest.approx(4.0)  # no interference: the plain bound
    fp16 = dict(_run("PipeDAP-fp16", 4.5), own_bound={"bound_s": 4.0, "comm_s": 1.5, "why": "gradients as fp16"})
    pipeline = dict(_run("Pipeline-1F1B", 2.0), own_bound={"bound_s": 1.6, "link_s": 1.0})
    runs = {"PipeDAP": _run("PipeDAP", 5.5), "PipeDAP-fp16": fp16, "DDP": _run("DDP", 6.0), "Pipeline-1F1B": pipeline}
    # the link busy 3 s at the nominal rate (not the calibrated 200 Mbit/s: [Note: the reachable bound]),
    # at σ 0.5 (the mean of the rounds)
    row = compare_report.compare_row("resnet50", 2, 2, 8, "250mbit", compute=4.0, comm=3.0, achieved_bps=200e6,
                                     runs=runs, interference=[0.4, 0.6])
    assert row["interference"] == {"mean": pytest.approx(0.5), "runs": [0.4, 0.6]}
    assert row["cpu_cost_s"] == pytest.approx(1.0) and row["reachable_s"] == pytest.approx(5.0)
    assert row["bound_s"] == 4.0  # the plain bound is unchanged
    assert row["ddp_over_reachable"] == pytest.approx(1.2)  # no system can be more than 1.2x DDP here
    systems = row["systems"]
    assert systems["PipeDAP"]["over_reachable_pct"] == pytest.approx(10.0)
    # fp16 halves the busy link (1.5 s) and so its CPU cost (0.5 s)
    assert systems["PipeDAP-fp16"]["reachable_s"] == pytest.approx(4.5)
    assert systems["PipeDAP-fp16"]["over_reachable_pct"] == pytest.approx(0.0, abs=1e-9)
    assert systems["Pipeline-1F1B"]["reachable_s"] is None  # a pipeline is judged against its own bound only
    text = compare_report.table([row])
    assert "reachable 5.00 s = max(link 3.00 s, compute + the CPU cost of its bytes 1.00 s at interference +50%)" in text
    assert "DDP is 1.20x it" in text
    assert "| 250 Mbit/s | 4.00 (pipeline: 1.60) | 5.00 (fp16: 4.50) | 5.50 +- 0.10 |" in compare_report.markdown([row])
    # vs_bound.png draws it as a level of its own
    import matplotlib.pyplot as plt

    from pipedap.tools import compare_charts
    _, ax = plt.subplots()
    compare_charts._vs_bound(ax, [row])
    levels = {c.get_label(): c.get_segments()[0][0][1] for c in ax.collections if c.get_label().startswith("reachable")}
    plt.close("all")
    assert levels == {"reachable max(comm, compute + its CPU cost)": pytest.approx(5.0)}


def test_without_a_measured_interference_there_is_no_reachable_bound_and_old_tables_stay_as_they_were() -> None:
    runs = {"PipeDAP": _run("PipeDAP", 5.0), "DDP": _run("DDP", 6.0)}
    row = compare_report.compare_row("resnet50", 2, 2, 8, "250mbit", compute=4.0, comm=3.0, achieved_bps=None, runs=runs)
    assert row["reachable_s"] is None and row["interference"] is None and row["ddp_over_reachable"] is None
    assert row["systems"]["PipeDAP"]["over_reachable_pct"] is None
    assert "reachable" not in compare_report.table([row]).split("\n")[1]
    assert compare_report.markdown([row]).splitlines()[2] == "| rate | bound | PipeDAP | DDP |"


def test_the_interference_of_a_setting_is_every_sigma_its_planned_jobs_measured() -> None:
    def planned(sigma):
        return {"status": "ok", "result": {"planning": {"cost_model": {}, "interference": sigma}}}
    runs = [{"rounds": [planned(0.3), {"status": "failed"}, planned(0.5)]},  # a failed round has no result
            {"rounds": [planned(None)]},  # PIPEDAP_INTERFERENCE=off (PipeDAP-plain)
            {"rounds": [{"status": "ok", "result": {"planning": None}}]},  # DDP: no plan
            planned(0.4)]  # a record without rounds
    assert compare_sweep.interference_of(runs) == [0.3, 0.5, 0.4]


def test_summarize_needs_a_sweep_folder(tmp_path: Path, capsys) -> None:
    assert compare.main(["--summarize", str(tmp_path)]) == 2
    assert "compare.json does not exist" in capsys.readouterr().err


def test_summarize_recomputes_a_stored_sweep_and_keeps_what_it_recorded(tmp_path: Path) -> None:
    def run(system: str, seconds: list[float], predicted: float | None) -> dict:
        result = {"per_iteration": [{"seconds": t} for t in seconds], "batches_per_iter": 1, "world_size": 2,
                  "batch_size": 8, "batch_time": {"predicted_s": predicted}}
        return {"model": "resnet50", "hosts": 2, "rate": "500mbit", "system": system, "status": "ok",
                "batch_s": {"mean": 99.0, "ci95": None}, "result": result}  # stale figures: recomputed

    systems = [{"label": "PipeDAP", "baseline": "PipeDAP", "env": {}}, {"label": "DDP", "baseline": "DDP", "env": {}}]
    doc = {"version": 1, "command": ["python", "-m", "pipedap.tools.compare", "--out", "out/x"], "wall_seconds": 60.0,
           "settings": {"models": ["resnet50"], "hosts": [2], "slots": 1, "rates": ["500mbit"], "batch_size": 8,
                        "image_size": None, "sentence_len": None, "warmup": 1, "iters": 3, "batches_per_iter": 1,
                        "quick": False, "out": "out/x", "systems": systems},  # an older file: no "summarize"
           "cores": [0, 7], "compute": [{"model": "resnet50", "hosts": 2, "ranks": 2, "batch_s": 4.0}],
           "testbeds": [{"hosts": 2, "calibration": {"500mbit": {"status": "ok", "allreduce_achieved_bps": 480e6}}}],
           "runs": [run("PipeDAP", [3.0, 4.4, 5.8], 4.0), run("DDP", [6.6, 6.6, 6.6], None)], "comparison": []}
    (tmp_path / "compare.json").write_text(json.dumps(doc))
    assert compare.main(["--summarize", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "compare.json").read_text())
    assert (again["command"], again["cores"], again["settings"]["out"]) == (doc["command"], [0, 7], "out/x")
    (row,) = again["comparison"]
    pipedap, ddp = row["systems"]["PipeDAP"], row["systems"]["DDP"]
    assert ddp["batch_s"] == pytest.approx(6.6) and ddp["throughput"] == pytest.approx(16 / 6.6)
    assert pipedap["batch_s"] == pytest.approx(4.4) and pipedap["predicted_over_measured"] == pytest.approx(4 / 4.4)
    assert pipedap["ci95"] is None  # one inner iteration
    assert pipedap["speedup_over_ddp"] == pytest.approx(1.5) and row["bound_s"] == 4.0
    assert (tmp_path / "vs_bound.png").stat().st_size > 0
    assert "energy" not in pipedap and not (tmp_path / "energy.png").exists()

    # issue 18: the same sweep with device powers: joules per sample from each system's throughput
    assert compare.main(["--summarize", str(tmp_path), "--power", "busy=300,idle=60,link_busy=10,link_idle=5"]) == 0
    again = json.loads((tmp_path / "compare.json").read_text())
    assert again["settings"]["power"]["compute"] == {"busy": 300.0, "idle": 60.0}
    (row,) = again["comparison"]
    for label, s in row["systems"].items():  # compute 4.0 s per batch of 8, the all-reduce row["comm_s"]
        busy_c = min(2, s["throughput"] * 4.0 / 8)
        busy_l = min(2, s["throughput"] * row["comm_s"] / 8)
        watts = 300 * busy_c + 60 * (2 - busy_c) + 10 * busy_l + 5 * (2 - busy_l)
        assert s["joules_per_sample"] == pytest.approx(watts / s["throughput"]), label
    assert row["systems"]["PipeDAP"]["joules_per_sample"] < row["systems"]["DDP"]["joules_per_sample"]
    assert (tmp_path / "energy.png").stat().st_size > 0


def test_quick_defaults_and_explicit_options() -> None:
    args = compare.parse_args(["--quick", "--rates", "1gbit", "--systems", "ddp,PipeDAP"])
    assert (args.models, args.rates, args.batch_size, args.image_size, args.iters) == (
        ["resnet50"], ["1gbit"], 2, 32, 3)
    assert [s.label for s in args.systems] == ["DDP", "PipeDAP"]
    real = compare.parse_args([])
    assert (real.rates, real.batch_size, real.hosts, real.image_size) == (
        ["500mbit", "250mbit", "125mbit"], 8, [2], None)
    for bad, message in ((["--models", "alexnet"], "unknown model"), (["--rates", "fast"], "--rates"),
                         (["--hosts", "1"], "at least 2 hosts"), (["--systems", "NCCL"], "unknown NCCL"),
                         (["--rounds", "0"], "--rounds must be >= 1")):
        with pytest.raises(compare_sweep.CompareError, match=message):
            compare.parse_args(bad)


def test_pinned_cores_come_from_the_wrappers_lines(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("[pipedap.tools.testbed.pin] rank 1 on pdtb5h1 pinned to core 1\nnoise\n"
                   "[pipedap.tools.testbed.pin] rank 0 on pdtb5h0 pinned to core 0\n")
    assert compare_jobs.pinned_cores(log) == {"1": 1, "0": 0}


# -- on emulated hosts ----------------------------------------------------------------------------

def run_testbed_job(command: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    """Run a command that brings up a testbed (its run id is its pid); on timeout stop it with SIGTERM,
    so that it tears its hosts down, remove whatever is left, and fail with its output."""
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, **env), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        raise AssertionError(f"`{' '.join(command)}` did not finish in {timeout} s; output:\n{out}") from None
    finally:
        teardown(proc.pid)
    return subprocess.CompletedProcess(command, proc.returncode, out)


_REASON = network.namespaces_unavailable(98)
needs_netns = pytest.mark.skipif(_REASON is not None, reason=f"cannot create network namespaces: {_REASON}")


@needs_netns
@pytest.mark.mpi
def test_every_system_runs_on_two_emulated_hosts_and_is_recorded(tmp_path: Path) -> None:
    # 1 Gbit/s and a 2-step profile keep the 100 MB of ResNet-50 gradients per batch cheap
    done = run_testbed_job([sys.executable, "-m", "pipedap.tools.compare", "--quick", "--rates", "1gbit", "--no-calibrate",
                            "--out", str(tmp_path)], timeout=240, PIPEDAP_PROFILE_STEPS="2")
    assert done.returncode == 0, done.stdout
    doc = json.loads((tmp_path / "compare.json").read_text())
    labels = [s.label for s in compare_sweep.SYSTEMS]
    assert [r["system"] for r in doc["runs"]] == labels
    for run in doc["runs"]:
        if run["status"] == "skipped":  # only Horovod, and only where it does not import
            assert run["system"] == "Horovod" and "horovod" in run["reason"]
            continue
        assert run["status"] == "ok", run.get("error_tail")
        assert run["batch_s"]["mean"] > 0 and run["batch_s"]["iterations"] == doc["settings"]["iters"]
        assert run["pinned"] == {"0": 0, "1": 1} or len(doc["cores"]) < 2
        assert Path(run["json"]).exists()
        if run["system"].startswith("Pipeline"):  # the stage package's timing; its bound needs its batch size
            assert "main_with_runtime.py --module models.resnet50.gpus=2" in " ".join(run["command"])
            own = doc["comparison"][0]["systems"][run["system"]]["own_bound"]
            assert own["bound_s"] is None and "measured batch 8" in own["why"]
        else:
            assert "pipedap.tools.bench" in run["command"]
    (testbed,) = doc["testbeds"]
    assert testbed["hosts"] == 2 and testbed["shaping"]["1gbit"]["rate"] == "1gbit"
    assert [p["status"] for p in doc["compute"][0]["processes"]] == ["ok", "ok"]
    (row,) = doc["comparison"]
    assert row["bound_s"] == max(row["compute_s"], row["comm_s"]) and set(row["systems"]) == set(labels)
    assert row["systems"]["PipeDAP"]["predicted_s"] > 0
    for chart in ("throughput.png", "speedup_vs_ddp.png", "vs_bound.png"):
        assert (tmp_path / chart).stat().st_size > 0
    assert "PipeDAP-greedy" in done.stdout and "bound" in done.stdout
    assert network.leftovers(testbed["run_id"]) == ([], [])
    # --summarize recomputes the same comparison from the stored results, keeping the sweep's command
    (tmp_path / "throughput.png").unlink()
    assert compare.main(["--summarize", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "compare.json").read_text())
    assert again["command"] == doc["command"] and again["comparison"] == doc["comparison"]
    assert (tmp_path / "throughput.png").stat().st_size > 0


@needs_netns
@pytest.mark.mpi
def test_schedules_match_single_process_training_on_emulated_hosts() -> None:
    done = run_testbed_job([sys.executable, "-m", "pipedap.tools.testbed", "run", "--hosts", "2", "--rate", "500mbit",
                            "--timeout", "150", "--", sys.executable, "tests/mpi_scripts/check_optimizer.py",
                            "matrix"], timeout=180)
    assert done.returncode == 0, done.stdout
    assert done.stdout.count("matrix OK") == 2, done.stdout


def test_help_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "pipedap.tools.compare", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "--quick" in done.stdout and "bound" in done.stdout


def test_a_sharded_system_is_named_with_its_suffix_and_runs_bench_with_shard_update(tmp_path) -> None:
    """Issue 17: -sharded after the dtype, for pipedap's own schedules only."""
    args = compare.parse_args(["--systems", "DeAR,DeAR-sharded,pipedap-fp16-SHARDED", "--optimizer", "adamw",
                               "--out", str(tmp_path)])
    assert [(s.label, s.baseline, s.compression, s.shard_update) for s in args.systems] == [
        ("DeAR", "DeAR", "none", False), ("DeAR-sharded", "DeAR", "none", True),
        ("PipeDAP-fp16-sharded", "PipeDAP", "fp16", True)]
    sweep = compare_sweep.Sweep(args)
    options = sweep.bench_options("bert_base")
    assert options[options.index("--optimizer") + 1] == "adamw"
    # a sharded PipeDAP does not plan online: no longer warmup
    assert sweep.batches(args.systems[2]) == sweep.batches(args.systems[0])
    # compressed and sharded: 16-bit reduce-scatters, full-size all-gathers of parameters
    sweep.compute = [{"model": "resnet50", "hosts": 2, "ranks": 2, "batch_s": 1.0}]
    sweep.runs = [dict(_run("PipeDAP-fp16-sharded", 2.0), model="resnet50", hosts=2, rate="125mbit")]
    sweep.args.rates = ["125mbit"]
    (row,) = sweep.comparison()
    comm = compare_report.ring_allreduce_s(compare_report.gradient_bytes("resnet50"), 2, 125e6)
    assert row["systems"]["PipeDAP-fp16-sharded"]["bound_s"] == pytest.approx(comm * 0.75)
    for bad, message in (("DDP-sharded", "is for PipeDAP, DeAR, WFBP"), ("DeAR-sharded-fp16", "unknown"),
                         ("Pipeline-flush-sharded", "is for PipeDAP, DeAR, WFBP")):
        with pytest.raises(compare_sweep.CompareError, match=message):
            compare.parse_args(["--systems", bad])


def test_a_glibcmalloc_system_runs_with_glibcs_heap_defaults_and_the_others_with_the_retained_heap() -> None:
    """[Note: retained heap]: the suffix turns it off for one system, side by side with the same system."""
    args = compare.parse_args(["--systems", "Pipeline-1F1B,Pipeline-1F1B-glibcmalloc,DeAR-fp16-sharded-GLIBCMALLOC"])
    plain, glibc, dear = args.systems
    assert (glibc.label, glibc.baseline, glibc.program) == ("Pipeline-1F1B-glibcmalloc", "1f1b", "pipeline")
    assert glibc.env == {"PIPEDAP_RETAIN_HEAP": "0"} and plain.env == {}
    assert (dear.label, dear.compression, dear.shard_update) == ("DeAR-fp16-sharded-glibcmalloc", "fp16", True)
    assert "PIPEDAP_RETAIN_HEAP" not in compare_sweep.clean_env({"PIPEDAP_RETAIN_HEAP": "0", "GLIBC_TUNABLES": "x"})
    with pytest.raises(compare_sweep.CompareError, match="unknown"):
        compare.parse_args(["--systems", "DeAR-glibcmalloc-fp16"])


def test_the_readmes_rounds_tables_are_generated_from_the_committed_sweeps() -> None:
    """Issue 16 item 7: the README quotes the committed JSON, printed by compare_report's markdown()."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    sweeps = [("dp_compression_bytescheduler/resnet50.json", "| 125 Mbit/s | 6.54 (fp16: 4.19) | 7.52 +- 0.77 |", 4),
              ("dp_bert_250mbit/bert_base_250mbit.json", "| 250 Mbit/s | 14.09 (fp16: 9.97) | 18.61 +- 2.08 |", 3),
              ("dp_vgg16_250mbit/vgg16_250mbit.json", "| 250 Mbit/s | 17.71 (fp16: 8.85) | 18.68 +- 1.53 |", 3),
              ("dp_vgg16_500mbit/vgg16_500mbit.json", "| 500 Mbit/s | 8.85 (fp16: 5.37) | 9.51 +- 0.22 |", 3),
              ("dp_reachable/resnet50_250_125mbit.json", "| 125 Mbit/s | 6.54 | 6.54 | 7.23 +- 0.51 |", 4),
              ("dp_reachable/resnet50_250mbit_6rounds.json", "| 250 Mbit/s | 3.27 | 3.50 | 3.84 +- 0.24 | 4.66 +- 0.05 |", 3),
              ("dp_reachable/resnet50_125mbit_6rounds.json", "| 125 Mbit/s | 6.54 | 6.54 | 7.16 +- 0.15 | 8.30 +- 0.19 |", 3),
              ("dp_reachable/resnet50_500mbit_6rounds.json", "| 500 Mbit/s | 2.73 | 3.09 | 3.19 +- 0.11 | 3.10 +- 0.12 |", 3),
              ("dp_reachable/bert_base_250mbit.json", "| 250 Mbit/s | 14.09 | 14.09 | 17.43 +- 0.32 |", 3),
              ("dp_bert_500mbit/bert_base_500mbit.json", "| 500 Mbit/s | 9.03 | 10.96 (fp16: 10.00) | 12.19 +- 0.62 |", 3),
              ("dp_bert_500mbit/bert_base_500mbit_6rounds.json", "| 500 Mbit/s | 8.38 | 9.92 | 11.45 +- 0.38 | 12.12 +- 0.16 |", 3),
              ("dp_vgg16_125mbit/vgg16_125mbit_fp16.json", "| 125 Mbit/s | 35.42 (fp16: 17.71) | 35.42 (fp16: 17.71) |", 3),
              ("dp_vgg16_125mbit/vgg16_125mbit.json", "| 125 Mbit/s | 35.42 | 35.42 | 37.62 +- 0.23 | 40.16 +- 1.13 |", 3),
              ("dp_bert_125mbit/bert_base_125mbit.json", "| 125 Mbit/s | 28.19 (fp16: 14.09) | 28.19 (fp16: 14.09) | 32.89", 3),
              ("tied_split/bert_base_500mbit_3rounds.json", "| 500 Mbit/s | 8.04 | 9.44 | 10.64 +- 0.49 | 11.16 +- 0.07 |", 3),
              ("tied_split/bert_base_250mbit_pieces_3rounds.json",
               "| 250 Mbit/s | 14.09 | 14.09 | 16.64 +- 0.46 | 17.19 +- 0.71 | 19.60 +- 0.18 |", 3),
              ("tied_split/bert_base_500mbit_pieces_3rounds.json",
               "| 500 Mbit/s | 8.21 | 9.66 | 10.93 +- 0.86 | 11.37 +- 0.32 | 11.96 +- 0.44 |", 3),
              ("tied_split/bert_base_500mbit_deferred_4rounds.json",
               "| 500 Mbit/s | 9.07 | 10.72 | 11.28 +- 1.45 | 12.75 +- 2.28 | 12.92 +- 1.33 |", 3),
              ("tied_split/bert_base_250mbit_own_rows_3rounds.json",
               "| 250 Mbit/s | 14.09 | 14.09 | 16.37 +- 1.45 | 16.75 +- 0.81 | 20.96 +- 1.64 |", 3),
              ("tied_split/bert_base_250mbit_own_rows_pair_3rounds.json",
               "| 250 Mbit/s | 14.09 | 14.09 | 16.24 +- 0.34 | 20.11 +- 0.73 |", 3),
              ("tied_split/bert_base_500mbit_own_rows_3rounds.json",
               "| 500 Mbit/s | 8.99 | 10.39 | 11.78 +- 0.87 | 12.94 +- 2.83 | 12.62 +- 0.23 |", 3),
              ("tied_split/bert_base_250mbit_arrival_pieces_3rounds.json",
               "| 250 Mbit/s | 14.09 | 14.09 | 16.13 +- 0.11 | 19.78 +- 0.31 |", 3),
              ("tied_split/bert_base_125_500mbit_arrival_pieces_3rounds.json",
               "| 500 Mbit/s | 8.09 | 9.52 | 10.46 +- 0.63 | 12.03 +- 0.22 |", 4),
              ("online_fit/bert_base_250mbit_warm_3rounds.json",
               "| 250 Mbit/s | 14.09 | 14.09 | 16.00 +- 0.62 | 20.26 +- 0.46 |", 3)]
    for path, last_row, rows in sweeps:
        doc = json.loads((root / "benchmarks/results" / path).read_text())
        table = [line for line in compare_report.markdown(doc["comparison"]).splitlines() if line.startswith("|")]
        assert len(table) == rows and last_row in table[-1], (path, table)
        assert "\n".join(table) in readme, path
