"""Every bad input, one table: the error names the key, the value and what is accepted.

Issue 18 item 4 (after the safety issue's settings): the ``PIPEDAP_*`` variables, the
launcher's, the planner's, the benchmark's, the comparison's and the partitioner's options,
``main_with_runtime.py``'s flags, the driver's YAML and the pipeline configs. Each row is
(where, the bad input, the fragments its message must contain: key, value, accepted).
Semantic refusals (a combination that cannot run, a config whose stages do not fit the
job) are tested beside their code.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

from pipedap import settings
from pipedap.pipeline import driver
from pipedap.pipeline.config import PipelineConfig, PipelineConfigError
from pipedap.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]
POWER = "busy=W,idle=W[,link_busy=W,link_idle=W]"
DRIVER = "module: m\nbatch_size: 4\nmachines: [localhost:0]\nlog_directory: x\n"
TINY_BENCH = ["--model", "resnet50", "--image-size", "32", "--batch-size", "2"]
PARTITION = ["--model", "resnet50", "--workers", "2", "--bandwidth", "1gbit", "--out", "unused"]


def env(name_value: tuple[str, str], tmp_path: Path) -> str:
    """A PIPEDAP_* variable: pipedap.init() checks the environment with check_environment."""
    name, value = name_value
    with pytest.raises(SettingsError) as checked:
        settings.check_environment({name: value})
    if name in settings.SETTINGS:  # reading it says the same, as a ValueError
        with pytest.raises(SettingsError) as read:
            settings.get(name, {name: value})
        assert str(read.value) == str(checked.value) and isinstance(read.value, ValueError)
    return str(checked.value)


def cli(module: str):
    """A command-line tool run in this process: its error on stderr, exit status 2."""
    def run(argv: list[str], tmp_path: Path) -> str:
        main = __import__(module, fromlist=["main"]).main
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main(argv)
            except SystemExit as e:
                status = e.code
        assert status == 2, (argv, status, err.getvalue())
        return err.getvalue()
    return run


def main_with_runtime(argv: list[str], tmp_path: Path) -> str:
    sys.path.insert(0, str(ROOT))
    try:
        import main_with_runtime as entry
    finally:
        sys.path.remove(str(ROOT))
    parser = entry.build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        entry.check_arguments(parser, parser.parse_args(["--module", "models.resnet50.gpus=2", *argv]))
    assert exit_info.value.code == 2
    return err.getvalue()


def driver_yaml(text: str, tmp_path: Path) -> str:
    path = tmp_path / "job.yml"
    path.write_text(text)
    with pytest.raises(driver.DriverConfigError) as err:
        driver.load(path)
    return str(err.value)


def pipeline_config(raw, tmp_path: Path) -> str:
    with pytest.raises(PipelineConfigError) as err:
        PipelineConfig.load(raw)
    return str(err.value)


SETTINGS_ROWS = [  # (variable, value, what the message must say is accepted)
    ("PIPEDAP_PROFILE_STEPS", "abc", "an integer >= 1"),
    ("PIPEDAP_PROFILE_STEPS", "0", "an integer >= 1"),
    ("PIPEDAP_FUSION_BYTES", "abc", "an integer >= 0"),
    ("PIPEDAP_FUSION_BYTES", "-1", "an integer >= 0"),
    ("PIPEDAP_FUSION_BYTES", "4.5", "an integer >= 0"),
    ("PIPEDAP_RING_MIN_BYTES", "-5", "an integer >= 0"),
    ("PIPEDAP_SEGMENT_BYTES", "4", "an integer >= 8"),
    ("PIPEDAP_MESSAGE_BYTES", "2e6", "an integer >= 8"),
    ("PIPEDAP_POLL_SPIN_US", "fast", "an integer >= 0"),
    ("PIPEDAP_POLL_MAX_SLEEP_US", "-1", "an integer >= 0"),
    ("PIPEDAP_STALL_SECONDS", "-1", "a number >= 0"),
    ("PIPEDAP_STALL_SECONDS", "nan", "a number >= 0"),
    ("PIPEDAP_TIMEOUT_SECONDS", "ten", "a number >= 0"),
    ("PIPEDAP_TIMEOUT_SECONDS", "inf", "a number >= 0"),
    ("PIPEDAP_ALGORITHM", "fastest", "auto, ring or mpi"),
    ("PIPEDAP_PLANNER", "exact", "optimal or greedy"),
    ("PIPEDAP_SCHEDULE", "ddp", "pipedap, dear, wfbp or bytescheduler"),
    ("PIPEDAP_ABORT_ON_EXCEPTION", "maybe", "0 or 1"),
    ("PIPEDAP_ABORT_ON_EXCEPTION", "yes", "0 or 1"),
    ("PIPEDAP_WITH_NCCL", "maybe", "auto, 0 or 1"),
    ("PIPEDAP_BUILD_JOBS", "two", "an integer >= 0"),
    ("PIPEDAP_PLAN", "/nonexistent/plan.json", "an existing file"),
    ("PIPEDAP_TESTBED_CORE", "-1", "an integer >= 0"),
    ("PIPEDAP_RESTART_COUNT", "first", "an integer >= 0"),
]

TABLE = [
    *[pytest.param(env, (name, value), [f"{name}='{value}': expected {accepted} (default "], id=f"{name}={value}")
      for name, value, accepted in SETTINGS_ROWS],
    # python -m pipedap.tools.launch
    pytest.param(cli("pipedap.tools.launch"), ["-np", "0", "--", "true"], ["-np/--np", "'0'", "an integer >= 1"],
                 id="launch-np"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "2", "--max-restarts", "-1", "--", "true"],
                 ["--max-restarts", "'-1'", "an integer >= 0"], id="launch-max-restarts"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "2", "--min-np", "3", "--", "true"],
                 ["--min-np 3", "at most -np 2"], id="launch-min-np"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "2", "--probe-timeout", "0", "--", "true"],
                 ["--probe-timeout", "'0'", "a number of seconds > 0"], id="launch-probe-timeout"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "2", "-H", "a:0", "--", "true"],
                 ["-H 'a:0'", "'a:0' is not HOST or HOST:SLOTS (SLOTS >= 1)"], id="launch-hosts"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "3", "-H", "a:1,b", "--", "true"],
                 ["-np 3", "the hosts have 2 slot(s)"], id="launch-slots"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "1", "--hostfile", "/nonexistent/hosts", "--", "true"],
                 ["--hostfile /nonexistent/hosts", "not found", "'HOST slots=K'"], id="launch-hostfile"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "1", "--mpirun-args", "'unclosed", "--", "true"],
                 ["--mpirun-args", "'unclosed", "No closing quotation"], id="launch-mpirun-args"),
    pytest.param(cli("pipedap.tools.launch"), ["-np", "2"], ["no command", "put it after --"], id="launch-command"),
    # python -m pipedap.tools.plan
    pytest.param(cli("pipedap.tools.plan"), ["--model", "resnet50", "--workers", "4", "--bandwidth", "fast"],
                 ["--bandwidth", "'fast'", "a rate > 0 like 500mbit"], id="plan-bandwidth"),
    pytest.param(cli("pipedap.tools.plan"), ["--model", "resnet50", "--workers", "1"],
                 ["--workers", "'1'", "an integer >= 2"], id="plan-workers"),
    pytest.param(cli("pipedap.tools.plan"), ["--model", "resnet50", "--latency", "soon"],
                 ["--latency", "'soon'", "a duration >= 0 like 50us"], id="plan-latency"),
    pytest.param(cli("pipedap.tools.plan"), ["--model", "resnet50", "--power", "busy=300,idle=sixty"],
                 ["--power", "idle='sixty'", "a number of watts >= 0"], id="plan-power"),
    pytest.param(cli("pipedap.tools.plan"), ["--model", "resnet50", "--interference", "lots"],
                 ["--interference", "'lots'", "a number >= 0 like 0.3 or 30%"], id="plan-interference"),
    # python -m pipedap.tools.bench (its option table of combinations is in test_bench.py)
    pytest.param(cli("pipedap.tools.bench"), [*TINY_BENCH, "--num-iters", "0"], ["--num-iters", "got 0", ">= 1"],
                 id="bench-num-iters"),
    pytest.param(cli("pipedap.tools.bench"), [*TINY_BENCH, "--compression", "zip"],
                 ["--compression", "'zip'", "'none', 'fp16', 'bf16'"], id="bench-compression"),
    pytest.param(cli("pipedap.tools.bench"), [*TINY_BENCH, "--power", "gpu=300"],
                 ["--power", "'gpu=300'", POWER], id="bench-power"),
    pytest.param(cli("pipedap.tools.bench"), [*TINY_BENCH, "--power", "busy=1,idle=1", "--link-rate", "fast"],
                 ["--link-rate 'fast'", "a rate > 0 like 500mbit"], id="bench-link-rate"),
    # python -m pipedap.tools.compare
    pytest.param(cli("pipedap.tools.compare"), ["--rates", "fast"], ["--rates", "'fast'", "like 10gbit, 500mbit"],
                 id="compare-rates"),
    pytest.param(cli("pipedap.tools.compare"), ["--batch-size", "0"], ["--batch-size", "got 0", ">= 1"],
                 id="compare-batch-size"),
    pytest.param(cli("pipedap.tools.compare"), ["--systems", "PipeDAP,NCCL"], ["--systems", "NCCL", "choose from PipeDAP"],
                 id="compare-systems"),
    pytest.param(cli("pipedap.tools.compare"), ["--power", "busy=300"], ["--power", "'busy=300'", "give both busy and idle"],
                 id="compare-power"),
    # python -m pipedap.tools.partition
    *[pytest.param(cli("pipedap.tools.partition"), [*PARTITION, option, value], [option, repr(value), accepted],
                   id=f"partition{option}")
      for option, value, accepted in [
          ("--workers", "0", "an integer >= 1"), ("--bandwidth", "fast", "a rate > 0 like 500mbit"),
          ("--latency", "soon", "a duration >= 0"), ("--batch-size", "0", "an integer >= 1"),
          ("--image-size", "3", "an integer >= 32"), ("--iterations", "0", "an integer >= 1"),
          ("--threads", "0", "an integer >= 1"), ("--costs", "/nonexistent", "an existing file"),
          ("--cost-model", "/nonexistent", "an existing file"),
          ("--parallelism", "diagonal", "'pipeline', 'hybrid', 'data'")]],
    # main_with_runtime.py (PipeDream's flags)
    pytest.param(main_with_runtime, ["-b", "0"], ["--batch-size", "got 0", ">= 1"], id="mwr-batch-size"),
    pytest.param(main_with_runtime, ["--num_minibatches", "0"], ["--num_minibatches", "got 0", ">= 1"],
                 id="mwr-num-minibatches"),
    pytest.param(main_with_runtime, ["--distributed_backend", "tcp"], ["--distributed_backend", "'tcp'", "'gloo'"],
                 id="mwr-backend"),
    # the driver's YAML (driver.py --config_file)
    pytest.param(driver_yaml, DRIVER + "learning_rat: 0.1\n",
                 ["job.yml:5", "unknown key 'learning_rat'", "the keys are log_directory, module"], id="yaml-key"),
    pytest.param(driver_yaml, "module: m\nmachines: [localhost:0]\nlog_directory: x\n",
                 ["job.yml", "missing key 'batch_size'"], id="yaml-missing"),
    pytest.param(driver_yaml, DRIVER.replace("batch_size: 4", "batch_size: four"),
                 ["job.yml:2", "batch_size", "expected int, got 'four'"], id="yaml-type"),
    pytest.param(driver_yaml, DRIVER.replace("[localhost:0]", "[localhost]"),
                 ["job.yml:3", "machines entry 0 is 'localhost'", "expected host:device"], id="yaml-machine"),
    pytest.param(driver_yaml, DRIVER.replace("machines: [localhost:0]", "machines:\n  - localhost:0\n  - localhost:1\n"
                                             "  - localhost:0"),
                 ["job.yml:6", "machines", "'localhost:0' is listed twice (entries 0 and 2)"], id="yaml-twice"),
    pytest.param(driver_yaml, DRIVER + "compress_activations: True\n",
                 ["job.yml:5", "compress_activations: True", "is not implemented"], id="yaml-compress"),
    pytest.param(driver_yaml, DRIVER + "model_type: speech_to_text\n",
                 ["job.yml:5", "model_type 'speech_to_text'", "image classifiers only"], id="yaml-model-type"),
    pytest.param(driver_yaml, "- module\n", ["job.yml", "expected keys like `module: models.resnet50.gpus=2`"],
                 id="yaml-not-a-mapping"),
    # the pipeline configs (*_conf.json)
    pytest.param(pipeline_config, [0, 1], ["expected a JSON object"], id="conf-not-object"),
    pytest.param(pipeline_config, {"module_to_stage_map": [0]}, ["missing key 'stage_to_rank_map'"], id="conf-missing"),
    pytest.param(pipeline_config, {"module_to_stage_map": [0, -1], "stage_to_rank_map": {}},
                 ["'module_to_stage_map'", "must be a list of stage"], id="conf-stage-map"),
    pytest.param(pipeline_config, {"module_to_stage_map": [0], "stage_to_rank_map": {"first": [0]}},
                 ["'stage_to_rank_map'", "has key 'first'", "keys are stage numbers"], id="conf-rank-map-key"),
    pytest.param(pipeline_config, {"module_to_stage_map": [0], "stage_to_rank_map": {"0": 0}},
                 ["stage 0", "expected a list of ranks"], id="conf-rank-map-value"),
]


@pytest.mark.parametrize("where, bad, fragments", TABLE)
def test_a_bad_input_names_the_key_the_value_and_what_is_accepted(where, bad, fragments, tmp_path):
    message = where(bad, tmp_path)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
