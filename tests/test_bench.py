"""python -m pipedap.tools.bench end to end at mpirun -np 2 (tiny ResNet-50 input), and its refusals."""

import json
import subprocess
import sys

import pytest
import torch
from mpi_launch import assert_ok, run_mpi

import pipedap.tools.bench as bench_module
from pipedap.planner.profile import Profile
from pipedap.tools.bench import main
from pipedap.tools.bench_options import build_parser

# ResNet-50 on 32x32 images, batch 2: a few hundred ms per batch on a CPU core.
TINY = ("--model", "resnet50", "--image-size", "32", "--batch-size", "2", "--num-warmup-batches", "1",
        "--num-batches-per-iter", "1", "--num-iters", "3", "--no-progress")
FIELDS = {"version", "command", "model", "kind", "unit", "input_shape", "batch_size", "baseline", "description",
          "world_size", "device", "fp16", "compression", "optimizer", "shard_update", "threshold_bytes", "warmup_batches", "batches_per_iter", "iterations",
          "per_iteration", "per_rank_mean", "per_worker", "total", "batch_time", "phases_ms", "plan", "planning",
          "timeline", "wall_seconds", "optimizer_state_bytes", "energy"}


def bench(tmp_path, baseline: str, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    result = run_mpi("bench_main.py", 2, *TINY, "--baseline", baseline, "--json", str(out), *extra, timeout=240)
    assert_ok(result)
    return json.loads(out.read_text()), result.output


def check_common(doc: dict, output: str, baseline: str) -> None:
    assert set(doc) == FIELDS
    assert doc["baseline"] == baseline and doc["world_size"] == 2 and doc["unit"] == "img"
    assert doc["input_shape"] == [3, 32, 32] and doc["device"] == "cpu"
    assert len(doc["per_iteration"]) == 3 and len(doc["per_rank_mean"]) == 2
    for it in doc["per_iteration"]:
        assert it["seconds"] > 0
        assert it["total"] == pytest.approx(2 * it["per_worker"])
        assert it["per_worker"] == pytest.approx(2 / it["seconds"], rel=0.5)  # 2 images per batch
    assert doc["per_worker"]["mean"] > 0 and doc["per_worker"]["ci95"] >= 0
    assert doc["total"]["mean"] == pytest.approx(2 * doc["per_worker"]["mean"])
    assert set(doc["phases_ms"]) == {"forward", "backward", "step"}
    for i, it in enumerate(doc["per_iteration"]):  # the same quantity as the mean and its interval
        assert f"Iter #{i}: {it['per_worker']:.1f} img/sec per worker" in output
    assert "(the mean over the 2 ranks' rates)" in output and "(mean of the Iter lines +- its 95%" in output
    assert "Img/sec per worker: " in output and "Total img/sec on 2 worker(s): " in output
    assert "Heap: retained (freed memory is kept for reuse" in output  # [Note: retained heap]


@pytest.mark.mpi
@pytest.mark.parametrize("baseline", ["WFBP", "DeAR"])
def test_pipedap_runtime_baselines_run_their_schedule(tmp_path, baseline):
    doc, output = bench(tmp_path, baseline.lower())  # names are case-insensitive
    check_common(doc, output, baseline)
    assert doc["plan"]["schedule"] == baseline.lower() and doc["plan"]["source"] == "built-in"
    assert doc["plan"]["predicted_iteration_s"] is None and doc["batch_time"]["predicted_s"] is None


@pytest.mark.mpi
def test_shard_update_keeps_half_of_adamw_state_on_each_rank(tmp_path):
    """Issue 17: --shard-update --optimizer adamw; AdamW's state is two float32 copies of the weights."""
    doc, output = bench(tmp_path, "PipeDAP", "--optimizer", "adamw", "--shard-update")
    check_common(doc, output, "PipeDAP")
    assert doc["shard_update"] is True and doc["optimizer"] == "adamw"
    assert doc["plan"]["schedule"] == "dear" and "shard_update moves every all-gather" in doc["plan"]["source"]
    assert "sharded update" in doc["description"]
    import models

    weights = 4 * sum(p.numel() for p in models.get("resnet50").parameters())
    per_rank = doc["optimizer_state_bytes"]
    assert sum(per_rank) == pytest.approx(2 * weights, rel=1e-3), per_rank  # (plus Adam's step counters)
    assert max(per_rank) / min(per_rank) < 1.05, per_rank


@pytest.mark.mpi
def test_pipedap_plans_online_then_times_its_plan_against_the_prediction(tmp_path):
    doc, output = bench(tmp_path, "PipeDAP", "--threshold", "8000000")
    check_common(doc, output, "PipeDAP")
    assert doc["plan"]["schedule"] in ("optimal", "pipedap")  # switched from the DeAR it measured with
    assert "planned online" in doc["plan"]["source"]
    assert doc["warmup_batches"] == 1 and "until the optimizer had planned" in output
    predicted = doc["batch_time"]["predicted_s"]
    assert predicted == doc["plan"]["predicted_iteration_s"] and predicted > 0
    assert doc["batch_time"]["predicted_over_measured"] == pytest.approx(predicted / doc["batch_time"]["measured_s"])
    assert "predicted by the plan" in output and doc["threshold_bytes"] == 8000000
    # how it planned, for compare's reachable bound (σ is None: PIPEDAP_INTERFERENCE=off in tests, see conftest.py)
    planning = doc["planning"]
    assert planning["cost_model"]["world_size"] == 2 and planning["profile_layers"] == doc["plan"]["groups"]
    assert planning["cost_source"] and planning["interference"] is None
    assert planning["profiling_steps"]["measured_s"] > 0 and planning["profiling_steps"]["predicted_s"] > 0
    assert set(planning["fit_samples"]) == {"rs", "ag"}
    assert len(Profile.from_dict(planning["profile"])) == doc["plan"]["groups"]  # what it planned on, whole


@pytest.mark.mpi
def test_pipedap_on_one_rank_times_without_waiting_for_a_plan(tmp_path):
    """One worker has nothing to plan: the warm-up used to wait for a plan switch that never came."""
    out = tmp_path / "result.json"
    result = run_mpi("bench_main.py", 1, *TINY, "--baseline", "PipeDAP", "--json", str(out), timeout=120)
    assert_ok(result)
    assert "one worker, no communication" in result.output and "the optimizer had planned" not in result.output
    assert len(json.loads(out.read_text())["per_iteration"]) == 3


@pytest.mark.mpi
def test_a_warmup_that_never_plans_ends_with_an_error(tmp_path):
    """The warm-up waits for the online plan at most MAX_WARMUP batches (3 here), then names the fix."""
    env = {"PIPEDAP_ONE_RANK_THROUGH_ENGINE": "1", "PIPEDAP_PROFILE_STEPS": "50"}
    result = run_mpi("bench_short_warmup.py", 1, *TINY, "--baseline", "PipeDAP", env=env, timeout=120)
    assert result.returncode != 0
    assert "PipeDAP was still not ready to time after 3 warm-up batches" in result.output
    assert "PIPEDAP_PROFILE_STEPS" in result.output


@pytest.mark.mpi
def test_bytescheduler_plans_its_piece_order_online_and_runs_it(tmp_path):
    doc, output = bench(tmp_path, "bytescheduler", "--threshold", "8000000")
    check_common(doc, output, "ByteScheduler")
    assert doc["plan"]["schedule"] == "bytescheduler" and "planned online" in doc["plan"]["source"]
    assert "until the optimizer had planned" in output
    assert doc["batch_time"]["predicted_s"] > 0


@pytest.mark.mpi
def test_ddp_over_gloo_with_an_energy_estimate(tmp_path):
    doc, output = bench(tmp_path, "DDP", "--threshold", str(4 << 20), "--power", "busy=300,idle=60,link_busy=10,"
                        "link_idle=5", "--link-rate", "8gbit")
    check_common(doc, output, "DDP")
    assert doc["plan"] is None and "gloo (rendezvous 127.0.0.1:" in doc["description"]
    assert doc["threshold_bytes"] == 4 << 20 and "buckets of 4 MiB" in doc["description"]
    assert doc["compression"] == "none" and "compress" not in doc["description"]
    # issue 18: the compute alone is timed after the run; the link from ResNet-50's gradients (2 ranks: one copy)
    e, batch_s = doc["energy"], doc["batch_time"]["measured_s"]
    import models

    gradient_bytes = 4 * sum(p.numel() for p in models.get("resnet50").parameters())
    assert e["seconds"] == batch_s and 0 < e["compute"]["busy_s"] <= batch_s
    assert e["compute"]["busy_s"] + e["compute"]["idle_s"] == pytest.approx(batch_s)
    assert e["link"]["busy_s"] == pytest.approx(min(batch_s, gradient_bytes / 1e9), rel=1e-6)
    assert e["joules"] == pytest.approx(e["compute"]["joules"] + e["link"]["joules"])
    assert e["compute"]["joules"] == pytest.approx(300 * e["compute"]["busy_s"] + 60 * e["compute"]["idle_s"])
    assert e["joules_per_sample"] == pytest.approx(e["joules"] / 2) and e["link_rate"] == "8gbit"
    assert "Timing the compute alone for --power" in output and "Per worker and batch: compute busy" in output


@pytest.mark.mpi
@pytest.mark.parametrize("baseline, compression", [("DeAR", "bf16"), ("DDP", "fp16")])
def test_compression_runs_and_is_recorded(tmp_path, baseline, compression):
    doc, output = bench(tmp_path, baseline, "--compression", compression)
    check_common(doc, output, baseline)
    assert doc["compression"] == compression and f"gradients sent as {compression}" in doc["description"]


def horovod_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import horovod.torch"], capture_output=True, timeout=60)
    return probe.returncode == 0


@pytest.mark.mpi
@pytest.mark.skipif(not horovod_importable(), reason="horovod.torch does not import (scripts/build_horovod.sh)")
def test_horovod(tmp_path):
    doc, output = bench(tmp_path, "Horovod")
    check_common(doc, output, "Horovod")
    assert doc["plan"] is None and doc["description"].startswith("horovod.torch ")
    assert doc["threshold_bytes"] == 64 << 20


def refused(capsys, *args: str) -> str:
    """The bench must refuse with exit status 2 before starting anything (so: in this process)."""
    assert main([*TINY, *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err




def test_horovod_missing_gives_a_clear_message(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # makes `import horovod.torch` fail
    err = refused(capsys, "--baseline", "horovod")
    assert "Horovod is not available: `import horovod.torch` failed (" in err
    assert "scripts/build_horovod.sh" in err


@pytest.mark.parametrize("args, message", [
    (("--fp16",), "--fp16 is not supported on CPU"),
    (("--baseline", "NCCL"), "unknown baseline 'NCCL'; choose one of PipeDAP, DeAR, WFBP, ByteScheduler, DDP, Horovod"),
    (("--model", "resnet5"), "unknown model 'resnet5'; valid names: resnet50"),
    (("--sentence-len", "64"), "--sentence-len is for language models"),
    (("--baseline", "DeAR", "--plan", "p.json"), "--plan is for --baseline PipeDAP"),
    (("--num-iters", "0"), "--num-iters must be >= 1"),
    (("--baseline", "Horovod", "--compression", "bf16"), "Horovod has no bf16 compressor"),
    (("--baseline", "DDP", "--compression", "bf16"), "--compression bf16 with DDP needs CUDA"),
    (("--baseline", "DDP", "--shard-update"), "--shard-update is pipedap's DistributedOptimizer(shard_update=True): "
                                              "for PipeDAP, DeAR and WFBP, not DDP"),
    (("--link-rate", "1gbit"), "--link-rate is for the energy estimate: give --power too"),
    (("--power", "busy=1,idle=1", "--link-rate", "fast"), "--link-rate 'fast': expected a rate > 0"),
])
def test_bad_options_are_refused(capsys, args, message):
    assert message in refused(capsys, *args)


def test_check_accepts_good_options(capsys):
    assert main([*TINY, "--baseline", "wfbp", "--check"]) == 0
    assert "options OK: resnet50, batch 2, WFBP on cpu" in capsys.readouterr().out


def test_saved_activations_are_measured_per_batch_without_the_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(10, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 10))
    loss = torch.nn.functional.cross_entropy

    def saved(batch: int) -> int:
        return bench_module.saved_activation_bytes(model, torch.randn(batch, 10), torch.zeros(batch, dtype=torch.long),
                                                   loss)

    # the input (10 floats per sample) and the hidden activation (1000 floats), not the 40 kB of weights
    assert 1010 * 4 * 8 <= saved(8) < 1010 * 4 * 8 + 4096
    assert saved(16) == pytest.approx(2 * saved(8), rel=0.05)


def test_check_refuses_a_job_that_clearly_does_not_fit(capsys):
    err = refused(capsys, "--batch-size", "100000", "--ranks-per-host", "3", "--check")
    assert "this job does not fit in this host's memory and would be killed (signal 9)" in err
    assert "x 3 rank(s) on this host" in err and "GB available (MemAvailable)" in err
    assert "activations" in err and "lower the batch size (bs / --batch-size, now 100000" in err
    assert "--image-size (now 32)" in err and "ranks per host" in err


def test_check_passes_the_default_job_and_warns_when_memory_is_tight(capsys, monkeypatch):
    default_job = ("--image-size", "64", "--batch-size", "8", "--ranks-per-host", "2", "--check")
    assert main([*TINY, *default_job]) == 0
    out = capsys.readouterr().out
    assert "memory: needs about " in out and "x 2 rank(s) on this host" in out
    # 2 ranks of 1 GB each in 2.2 GB available: fits, but within 20% of the limit
    monkeypatch.setattr(bench_module, "memory_estimate", lambda args: {"runtime": 4e8, "activations": 6e8})
    monkeypatch.setattr(bench_module, "meminfo_kib", lambda field, path="/proc/meminfo": int(2.2e9 / 1024))
    assert main([*TINY, *default_job]) == 0
    assert "warning: memory is tight: needs about 1.0 GB per rank" in capsys.readouterr().out


def test_iter_lines_and_the_interval_are_the_rank_averaged_rate(capsys):
    args = build_parser().parse_args([*TINY, "--num-iters", "2"])  # 2 images per iteration
    everyone = [{"seconds": [1.0, 2.0], "phases_ms": {}, "state_bytes": 0},
                {"seconds": [0.5, 0.5], "phases_ms": {}, "state_bytes": 0}]
    context = {"model": "resnet50", "kind": "image", "unit": "img", "input_shape": [3, 32, 32], "description": "",
               "world_size": 2, "device": "cpu", "_who": "worker"}
    result = bench_module.summarize(args, context, everyone, None, {})
    bench_module.report(result, args)
    out = capsys.readouterr().out
    # iteration 0: ranks at 2 and 4 img/s -> 3.0; iteration 1: 1 and 4 -> 2.5 (rank 0 alone would say 2.0 and 1.0)
    assert "Iter #0: 3.0 img/sec per worker\nIter #1: 2.5 img/sec per worker\n" in out
    assert "Img/sec per worker: 2.8 +-3.2 (mean of the Iter lines +- its 95% confidence interval)" in out


@pytest.mark.mpi
def test_data_dir_trains_each_rank_on_its_shard_of_an_image_folder(tmp_path):
    """--data-dir (also ./dist.sh --data-dir): the batches come from the folder, not a synthetic batch."""
    from PIL import Image

    for c in range(2):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (36, 36), (40 + 100 * c, 20 * i, 90)).save(tmp_path / "train" / f"c{c}" / f"{i}.jpg")
    doc, output = bench(tmp_path, "WFBP", "--data-dir", str(tmp_path), "--workers", "0")
    check_common(doc, output, "WFBP")


def test_data_dir_must_be_a_folder_of_images_for_an_image_model(capsys, tmp_path):
    assert "--data-dir /nonexistent: no such folder" in refused(capsys, "--data-dir", "/nonexistent")
    assert main(["--model", "bert_base", "--data-dir", str(tmp_path), "--check"]) == 2
    assert "--data-dir is an image folder; bert_base is a language model" in capsys.readouterr().err


@pytest.mark.mpi
@pytest.mark.parametrize("faulting", [3, 50])
def test_the_warmup_lasts_until_every_rank_s_memory_is_warm(tmp_path, faulting):
    """[Note: warm memory] in pipedap.heap: every system's warm-up goes on while a rank faults in new memory (here
    64 MB a batch for its first 3 batches), at most MEMORY_WARMUP_EXTRA batches beyond the ones asked for."""
    out = tmp_path / "result.json"
    result = run_mpi("bench_faulting_warmup.py", 2, *TINY, "--baseline", "DeAR", "--json", str(out),
                     env={"FAULTING_BATCHES": str(faulting)}, timeout=240)
    assert_ok(result)
    if faulting == 3:
        assert "warmup extended to 4 batches until memory was warm; memory: at most 0.0 MB" in result.output
    else:
        extra = bench_module.MEMORY_WARMUP_EXTRA
        assert (f"warmup extended to {1 + extra} batches until memory was warm; memory: still 64 MB faulted in by a "
                f"rank in the last batch after {extra} more") in result.output
    assert len(json.loads(out.read_text())["per_iteration"]) == 3
