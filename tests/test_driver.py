"""driver.py: PipeDream's YAML driver configs, checked with file and line, and the jobs it starts."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipedap.pipeline import driver
from pipedap.tools.testbed import network

ROOT = Path(__file__).resolve().parents[1]
BASE = {"log_directory": "LOG", "module": "models.resnet50.gpus=2", "config_file": "models/resnet50/gpus=2/mp_conf.json",
        "machines": ["localhost:0", "localhost:1"], "batch_size": 4, "num_minibatches": 2, "image_size": 32,
        "num_classes": 2, "workers": 0}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yml"
    path.write_text(text)
    return path


def config(tmp_path: Path, **changes) -> Path:
    values = {**BASE, "log_directory": str(tmp_path / "logs"), **changes}
    return write(tmp_path, yaml.safe_dump({k: v for k, v in values.items() if v is not None}, sort_keys=False))


@pytest.mark.parametrize("name", ["resnet50_single_machine.yml", "resnet50_2hosts.yml", "vgg16_hybrid.yml"])
def test_the_example_configs_load(name):
    settings = driver.load(ROOT / "driver_configs" / name)
    assert settings.world in (2, 3)


# a bad key or value in the YAML: tests/test_bad_input.py


def test_keys_become_main_with_runtimes_flags(tmp_path):
    settings = driver.load(config(tmp_path, learning_rate=0.05, no_input_pipelining=True, synthetic_data=False))
    flags = settings.flags()
    assert flags[:4] == ["--module", "models.resnet50.gpus=2", "--batch-size", "4"]
    assert ["--lr", "0.05"] == flags[flags.index("--lr"):flags.index("--lr") + 2]
    assert "--no_input_pipelining" in flags and "--synthetic_data" not in flags
    command = driver.rank_command(settings, 1, 29999)
    assert command[-8:] == ["--rank", "1", "--local_rank", "1", "--master_addr", "127.0.0.1", "--master_port", "29999"]


def test_each_setting_chooses_how_the_ranks_start(tmp_path):
    assert driver.mode(driver.load(config(tmp_path))) == "local"
    assert driver.mode(driver.load(config(tmp_path, distributed_backend="mpi"))) == "mpirun"
    assert driver.mode(driver.load(config(tmp_path, testbed={"rate": "125mbit"}))) == "testbed"
    remote = driver.load(config(tmp_path, machines=["node1:0", "node2:0"], distributed_backend="mpi"))
    assert driver.mode(remote) == "hosts"
    assert "--host" in (line := driver.mpirun_command(remote)) and line[line.index("--host") + 1] == "node1:1,node2:1"
    with pytest.raises(driver.DriverConfigError, match=r"machines on other hosts \(node1, node2\) start through "
                                                       "mpirun.*set distributed_backend: mpi"):
        driver.mode(driver.load(config(tmp_path, machines=["node1:0", "node2:0"])))


def test_a_container_runs_through_docker_or_is_refused_naming_the_key(tmp_path):
    settings = driver.load(config(tmp_path, container="nvcr.io/nvidia/pytorch:19.05-py3"))
    line = driver.in_container(settings, driver.rank_command(settings, 0, 29999))
    assert line[:3] == ["docker", "run", "--rm"] and "nvcr.io/nvidia/pytorch:19.05-py3" in line
    assert line[line.index("nvcr.io/nvidia/pytorch:19.05-py3") + 1:][:2] == ["python", str(driver.PROGRAM)]
    try:
        driver.check_docker(settings)
    except driver.DriverConfigError as err:  # no docker, or no daemon: the refusal names the key and its line
        assert f"{settings.where}:{settings.lines['container']}: container 'nvcr.io/" in str(err)
        assert "remove the key to run without containers" in str(err)
    else:
        pytest.skip("docker can run containers here; the refusal cannot be shown")


def test_the_driver_runs_two_local_ranks_and_logs_settings_and_output(tmp_path, capsys):
    assert driver.main(["--config_file", str(config(tmp_path)), "--timeout", "240"]) == 0
    (folder,) = (tmp_path / "logs").iterdir()
    record = yaml.safe_load((folder / "settings.yml").read_text())
    assert record["launch"] == "local" and len(record["commands"]) == 2 and "--rank 1" in record["commands"][1]
    assert "epoch 0: 2 minibatches in" in (folder / "output.log.1").read_text()
    printed = capsys.readouterr().out
    assert "[rank 1] Epoch: [0][2/2]" in printed and f"driver: finished; logs in {folder}" in printed


def test_when_one_rank_fails_the_driver_ends_the_others_and_names_it(tmp_path, capsys):
    fake = tmp_path / "fake_main.py"
    fake.write_text("import sys, time\nrank = int(sys.argv[sys.argv.index('--rank') + 1])\n"
                    "print('rank', rank, 'up', flush=True)\nif rank == 1:\n    sys.exit(3)\ntime.sleep(120)\n")
    started = time.monotonic()
    code = driver.run(driver.load(config(tmp_path)), timeout=100, program=fake)
    assert code == 3 and time.monotonic() - started < 60
    assert "driver: rank 1 failed (exit code 3); ended the other ranks" in capsys.readouterr().out


def test_a_job_past_its_timeout_is_ended(tmp_path, capsys):
    fake = tmp_path / "sleepy.py"
    fake.write_text("import time\ntime.sleep(120)\n")
    assert driver.run(driver.load(config(tmp_path)), timeout=2, program=fake) == 124
    assert "ran past its timeout of 2 s; ended every rank" in capsys.readouterr().out


@pytest.mark.skipif(network.namespaces_unavailable(98) is not None, reason="cannot create network namespaces")
def test_the_driver_runs_a_job_on_two_emulated_hosts(tmp_path, capsys):
    path = config(tmp_path, machines=["host0:0", "host1:0"], testbed={"rate": "500mbit"}, distributed_backend="mpi")
    assert driver.main(["--config_file", str(path), "--timeout", "240"]) == 0
    printed = capsys.readouterr().out
    assert "driver: emulated cluster: 2 hosts" in printed and "epoch 0: 2 minibatches in" in printed
    assert network.leftovers(os.getpid()) == ([], [])  # the driver's testbed is torn down


def test_the_root_driver_script_shows_the_keys():
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "driver.py"), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0 and "compress_activations" in out.stdout and "--config_file" in out.stdout
