"""main_with_runtime.py, PipeDream's per-process entry: its users' command lines, image folders, checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mpi_launch import assert_ok, run_mpi, run_ranks

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "main_with_runtime.py")
SMALL = ["-b", "4", "--image-size", "32", "--num-classes", "2", "-j", "0"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """ImageNet's layout, DIR/train/<class>/*.jpg: 2 classes of 16 JPEGs (reddish and bluish, with noise)."""
    import torch
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(16):
            pixels = (torch.tensor(colour).view(1, 1, 3) + 30 * torch.randn(40, 48, 3, generator=g)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{i}.jpg")
    return root


def one_process(*args: str, timeout: float = 120):
    (result,) = run_ranks(MAIN, 1, *args, timeout=timeout, torch_env=False)
    return result


def test_the_seeds_two_shell_command_lines_train_on_an_image_folder(image_folder):
    """PipeDream's README: one shell per rank, --rank and --master_addr, gloo, mp_conf.json."""
    ranks = run_ranks(MAIN, 2, "--module", "models.resnet50.gpus=2", *SMALL, "--data_dir", str(image_folder),
                      "--rank", "{rank}", "--local_rank", "{rank}", "--master_addr", "127.0.0.1", "--master_port",
                      "{port}", "--config_path", "models/resnet50/gpus=2/mp_conf.json", "--distributed_backend",
                      "gloo", "--num_minibatches", "4", "--print-freq", "2", timeout=180, torch_env=False)
    output = "\n".join(f"--- rank {r} ---\n{p.stdout}" for r, p in enumerate(ranks))
    assert all(r.returncode == 0 for r in ranks), output
    assert f"rank 0 (stage 0 of 2): data: {image_folder / 'train'}: 32 images, 2 classes, 8 minibatches per epoch " \
           "for replica 0 of 1" in ranks[0].stdout, output
    assert re.search(r"^Epoch: \[0\]\[4/4\]\tTime: [\d.]+ s/minibatch\tLoss: [\d.]+", ranks[1].stdout, re.M), output
    for r in (0, 1):
        assert re.search(rf"^rank {r} \(stage {r} of 2\): epoch 0: 4 minibatches in [\d.]+ s, [\d.]+ images/s for "
                         "the whole job", ranks[r].stdout, re.M), output


def test_under_mpirun_each_replica_reads_its_own_shard(image_folder):
    """dp_conf.json with --distributed_backend mpi: PipeDAP's engine; every epoch of the data by default."""
    result = run_mpi(MAIN, 2, "--module", "models.resnet50.gpus=2", *SMALL, "--data_dir", str(image_folder),
                     "--config_path", "dp_conf.json", "--distributed_backend", "mpi", "--no_input_pipelining",
                     "--epochs", "2", timeout=240)
    assert_ok(result)
    for r in (0, 1):
        assert f"rank {r} (stage 0 of 1): data: {image_folder / 'train'}: 32 images, 2 classes, 4 minibatches per " \
               f"epoch for replica {r} of 2" in result.output, result.output
        for epoch in (0, 1):
            assert re.search(rf"^rank {r} \(stage 0 of 1\): epoch {epoch}: 8 minibatches in", result.output,
                             re.M), result.output


def test_one_process_trains_on_synthetic_data_saying_so_then_resumes_from_its_checkpoint(tmp_path):
    first = one_process("--module", "models.vgg16.gpus=2", *SMALL, "--num_minibatches", "2",
                        "--checkpoint_dir", str(tmp_path))
    assert first.returncode == 0, first.stdout
    assert "data: synthetic images (2 classes, 32 px; pass --data_dir for an image folder)" in first.stdout
    assert "heap: retained (freed memory is kept for reuse" in first.stdout
    assert f"saved checkpoint to {tmp_path / 'checkpoint.0.pth.tar'}" in first.stdout, first.stdout
    resumed = one_process("--module", "models.vgg16.gpus=2", *SMALL, "--num_minibatches", "2", "--epochs", "2",
                          "--resume", str(tmp_path / "checkpoint"))
    assert resumed.returncode == 0, resumed.stdout
    assert f"loaded {tmp_path / 'checkpoint.0.pth.tar'} (epoch 1)" in resumed.stdout, resumed.stdout
    assert "1 epoch(s) of 2 minibatches" in resumed.stdout and "epoch 1: 2 minibatches" in resumed.stdout
    assert "epoch 0:" not in resumed.stdout


def test_forward_only_runs_the_forward_passes_of_both_stages():
    ranks = run_ranks(MAIN, 2, "--module", "models.resnet50.gpus=2", *SMALL, "--forward_only", "--rank", "{rank}",
                      "--master_addr", "127.0.0.1", "--master_port", "{port}", "--config_path", "mp_conf.json",
                      "--num_minibatches", "3", timeout=120, torch_env=False)
    output = "\n".join(p.stdout for p in ranks)
    assert all(r.returncode == 0 for r in ranks), output
    assert "3 minibatches of 4 images, forward only" in ranks[0].stdout, output
    assert re.search(r"^rank 1 \(stage 1 of 2\): epoch 0: 3 minibatches in .* mean loss [\d.]+$", ranks[1].stdout,
                     re.M), output


def test_a_missing_data_dir_fails_on_every_rank_naming_it():
    ranks = run_ranks(MAIN, 2, "--module", "models.resnet50.gpus=2", *SMALL, "--data_dir", "/nonexistent/imagenet",
                      "--rank", "{rank}", "--master_addr", "127.0.0.1", "--master_port", "{port}", "--config_path",
                      "mp_conf.json", timeout=120, torch_env=False)
    output = "\n".join(p.stdout for p in ranks)
    for r in ranks:
        assert r.returncode != 0
        assert "pipeline data: rank 0: --data_dir /nonexistent/imagenet: image folder '/nonexistent/imagenet' " \
               "does not exist" in r.stdout, output


def test_a_missing_checkpoint_fails_every_rank_naming_the_stage(tmp_path):
    ranks = run_ranks(MAIN, 2, "--module", "models.resnet50.gpus=2", *SMALL, "--resume", str(tmp_path / "checkpoint"),
                      "--rank", "{rank}", "--master_addr", "127.0.0.1", "--master_port", "{port}", "--config_path",
                      "mp_conf.json", timeout=120, torch_env=False)
    output = "\n".join(p.stdout for p in ranks)
    for r in ranks:
        assert r.returncode != 0
        assert f"pipeline resume: rank 0: --resume {tmp_path / 'checkpoint'}: no checkpoint " \
               f"{tmp_path / 'checkpoint.0.pth.tar'} for stage 0" in r.stdout, output


@pytest.mark.parametrize("args, message", [
    (["--no_input_pipelining", "--schedule", "flush"], "--no_input_pipelining is --schedule no_pipelining"),
    (["--recompute"], "--recompute (recomputing activations in backward) is not implemented"),
    (["--distributed_backend", "mpi"], "--distributed_backend mpi runs over PipeDAP's engine, which needs an MPI "
                                       "launcher"),
    (["--distributed_backend", "nccl"], "--distributed_backend nccl runs over PipeDAP's engine"),
    (["-b", "0"], "--batch-size must be >= 1"),
    (["--config_path", "mp_conf.json", "--rank", "0"], "needs MASTER_ADDR: pass --master_addr"),
    (["--forward_only", "--schedule", "flush"], "--forward_only runs whole minibatches"),
    (["--extra-in-flight", "-1"], "--extra-in-flight must be >= 0, got -1"),
    (["--extra-in-flight", "1", "--schedule", "flush"], "--extra-in-flight admits more minibatches into 1F1B training; "
                                                        "drop it, or drop --no_input_pipelining / --forward_only / "
                                                        "--schedule flush"),
])
def test_what_cannot_run_is_refused_naming_the_flag(args, message):
    result = one_process("--module", "models.resnet50.gpus=2", *args, timeout=60)
    assert result.returncode != 0 and message in result.stdout, result.stdout


def test_trace_records_every_ranks_events_and_splits_each_stages_time(tmp_path):
    """--trace: both stages' events of the last epoch and their compute alone, in one file from the last stage,
    with the split printed; the split adds up to each rank's wall time per minibatch."""
    from pipedap.pipeline import trace

    out = tmp_path / "trace.json"
    ranks = run_ranks(MAIN, 2, "--module", "models.resnet50.gpus=2", *SMALL, "--rank", "{rank}", "--master_addr",
                      "127.0.0.1", "--master_port", "{port}", "--config_path", "models/resnet50/gpus=2/mp_conf.json",
                      "--num_minibatches", "10", "--epochs", "2", "--warmup", "2", "--trace", str(out), timeout=240,
                      torch_env=False)
    output = "\n".join(f"--- rank {r} ---\n{p.stdout}" for r, p in enumerate(ranks))
    assert all(r.returncode == 0 for r in ranks), output
    assert f"rank 1: trace written to {out}" in ranks[1].stdout and "slowest stage alone" in ranks[1].stdout, output
    doc = json.loads(out.read_text())
    assert [(r["rank"], r["stage"]) for r in doc["ranks"]] == [(0, 0), (1, 1)]
    for r in doc["ranks"]:
        kinds = [e[0] for e in r["events"]]
        assert kinds.count("forward") == kinds.count("backward") == 10 and kinds.count("step") == 10  # last epoch
        assert r["alone"]["forward"] > 0 and r["alone"]["backward"] > 0
    for row in trace.summarize(doc):
        assert sum(row[part] for part in trace.PARTS) == pytest.approx(row["wall"])
        assert row["units"] == 10 - 2 - trace.TAIL - 1  # from unit 2 to the start of unit 6


def test_trace_under_mpirun_leaves_a_replicated_stage_training_as_without_it(tmp_path):
    """compute_alone runs the stage's forward and backward before training: with replicas over PipeDAP's engine
    (dp_conf.json), its DistributedOptimizer must see none of it. The losses are those of the same run untraced."""
    def mean_losses(*extra: str) -> list[str]:
        result = run_mpi(MAIN, 2, "--module", "models.resnet50.gpus=2", *SMALL, "--config_path", "dp_conf.json",
                         "--distributed_backend", "mpi", "--num_minibatches", "8", "--warmup", "1", *extra,
                         timeout=240)
        assert_ok(result)
        return sorted(re.findall(r"^rank \d \(stage 0 of 1\): epoch 0: .*mean loss ([\d.]+)", result.output, re.M))

    plain = mean_losses()
    traced = mean_losses("--trace", str(tmp_path / "trace.json"))
    assert len(plain) == 2 and traced == plain
    doc = json.loads((tmp_path / "trace.json").read_text())
    assert [r["stage"] for r in doc["ranks"]] == [0, 0]
