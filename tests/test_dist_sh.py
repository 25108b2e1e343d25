"""dist.sh: input and configuration checks (exit status 2 with a message), and one real short run."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mpi_launch import run_bounded

ROOT = Path(__file__).resolve().parents[1]


def dist(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ./dist.sh with these variables; kill its whole process group on timeout."""
    return run_bounded([str(ROOT / "dist.sh"), *args], {**os.environ, **env}, timeout, cwd=ROOT, merge_stderr=False)


@pytest.fixture
def configs(tmp_path) -> Path:
    """A configs folder like the shipped one, plus a 3-slot cluster3."""
    folder = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", folder)
    (folder / "cluster3").write_text("# comment\nlocalhost slots=2\n\nlocalhost\n")  # no slots= counts 1
    return folder


@pytest.mark.parametrize("env, message", [
    ({"nworkers": "two"}, "nworkers must be a positive integer, got 'two'"),
    ({"bs": "0"}, "bs must be a positive integer, got '0'"),
    ({"nworkers": "5"}, "cluster5 not found: create it with one 'HOST slots=K' line per host"),
    ({"nworkers": "4", "_cluster4": "localhost slots=2\n"}, "nworkers=4 but {configs}/cluster4 has only 2 slot(s)"),
    ({"MPIPATH": "/nonexistent/mpi"}, "MPI not found: /nonexistent/mpi/bin/mpirun is not an executable"),
    ({"PY": "/nonexistent/python"}, "Python '/nonexistent/python' not found"),
    ({"_no_envs": "1"}, "envs.conf not found"),
])
def test_bad_inputs_fail_with_the_documented_message(configs, env, message):
    env = dict(env)
    if env.pop("_no_envs", None):
        (configs / "envs.conf").unlink()
    if "_cluster4" in env:
        (configs / "cluster4").write_text(env.pop("_cluster4"))
    result = dist({"configs": str(configs), **env})
    assert result.returncode == 2, result.stdout + result.stderr
    assert message.format(configs=configs) in result.stderr
    assert "running:" not in result.stdout  # nothing was launched


@pytest.mark.parametrize("env, message", [
    ({"dnn": "resnet5"}, "unknown model 'resnet5'"),
    ({"baseline": "Gloo"}, "unknown baseline 'Gloo'; choose one of PipeDAP, DeAR, WFBP, ByteScheduler, DDP, Horovod"),
])
def test_unknown_model_or_baseline_is_refused_before_launch(configs, env, message):
    result = dist({"configs": str(configs), **env})
    assert result.returncode == 2 and message in result.stderr
    assert "running:" not in result.stdout



def test_a_job_that_does_not_fit_in_memory_is_refused_before_launch(configs):
    # cluster3 places 2 of the 3 ranks on one host: the estimate is for 2 ranks sharing its memory
    result = dist({"configs": str(configs), "nworkers": "3", "bs": "100000"}, "--image-size", "32", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "does not fit in this host's memory" in result.stderr and "x 2 rank(s) on this host" in result.stderr
    assert "lower the batch size (bs / --batch-size, now 100000" in result.stderr
    assert "running:" not in result.stdout

@pytest.mark.mpi
def test_a_short_run_on_the_shipped_configs(tmp_path):
    out = tmp_path / "result.json"
    result = dist({"dnn": "resnet50", "bs": "2", "nworkers": "2", "baseline": "DeAR"}, "--image-size", "32",
                  "--num-warmup-batches", "1", "--num-batches-per-iter", "1", "--num-iters", "2", "--no-progress",
                  "--json", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hosts from" in result.stdout and "configs/cluster2 (2 slots)" in result.stdout
    assert "Total img/sec on 2 worker(s): " in result.stdout
    assert "finished with exit status 0" in result.stdout
    doc = json.loads(out.read_text())
    assert (doc["world_size"], doc["baseline"], doc["batch_size"], doc["iterations"]) == (2, "DeAR", 2, 2)
