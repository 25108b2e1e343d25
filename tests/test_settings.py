"""pipedap.settings: every bad value or unknown variable fails naming it, good values parse, and the
README table, envs.conf and dist.sh agree with the declarations."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mpi_launch import run_bounded

from pipedap import settings
from pipedap.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict:
    """This environment without any setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEDAP_") and k not in settings.ENVS_CONF}
    return {**env, **extra}


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipedap.settings", *args], env=clean_env(**env),
                          capture_output=True, text=True, timeout=60)


# The bad values of each setting are rows of the one bad-input table: tests/test_bad_input.py.


def test_bounds_and_defaults_print_as_integers():
    with pytest.raises(SettingsError) as err:
        settings.get("PIPEDAP_FUSION_BYTES", {"PIPEDAP_FUSION_BYTES": "-1"})
    assert str(err.value).startswith("PIPEDAP_FUSION_BYTES='-1': expected an integer >= 0 (default 4194304): ")
    with pytest.raises(SettingsError) as err:
        settings.get("PIPEDAP_TIMEOUT_SECONDS", {"PIPEDAP_TIMEOUT_SECONDS": "-1"})
    assert "a number >= 0 (default 600)" in str(err.value) and ".0" not in str(err.value)


@pytest.mark.parametrize("name, value, message", [
    ("PIPEDAP_FUSION_BYTE", "1", "not a PipeDAP setting; did you mean PIPEDAP_FUSION_BYTES?"),
    ("PIPEDAP_PROFILE_STEP", "3", "not a PipeDAP setting; did you mean PIPEDAP_PROFILE_STEPS?"),
    ("PIPEDAP_ALGO", "ring", "not a PipeDAP setting; did you mean PIPEDAP_ALGORITHM?"),
    ("PIPEDAP_TIMEOUT", "5", "not a PipeDAP setting; did you mean PIPEDAP_TIMEOUT_SECONDS?"),
    ("PIPEDAP_XYZZY", "1", "not a PipeDAP setting (python -m pipedap.settings lists them all)"),
    ("PIPEDAP_FUSION_BYTE", "", "did you mean PIPEDAP_FUSION_BYTES?"),  # even empty: a typo is never ignored
    ("PIPEDAP_CHECK_ORDER", "1", "no longer needed: every operation is checked across ranks; unset it"),
])
def test_an_unknown_variable_is_an_error_with_a_did_you_mean(name, value, message):
    with pytest.raises(SettingsError) as err:
        settings.check_environment({name: value, "HOME": "/root"})
    assert str(err.value).startswith(f"{name}='{value}': ") and message in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as err:
        settings.check_environment({"PIPEDAP_FUSION_BYTES": "-1", "PIPEDAP_CHECK_ORDER": "1",
                                    "PIPEDAP_PLANER": "greedy", "PIPEDAP_ALGORITHM": "ring"})
    lines = str(err.value).splitlines()
    assert [line.split("=")[0] for line in lines] == ["PIPEDAP_CHECK_ORDER", "PIPEDAP_FUSION_BYTES",
                                                      "PIPEDAP_PLANER"]


@pytest.mark.parametrize("name, value, expected", [
    ("PIPEDAP_ALGORITHM", "ring", "ring"),
    ("PIPEDAP_ALGORITHM", "MPI", "mpi"),
    ("PIPEDAP_FUSION_BYTES", "0", 0),
    ("PIPEDAP_PROFILE_STEPS", " 7 ", 7),
    ("PIPEDAP_STALL_SECONDS", "0.5", 0.5),
    ("PIPEDAP_TIMEOUT_SECONDS", "0", 0.0),
    ("PIPEDAP_ABORT_ON_EXCEPTION", "0", False),
    ("PIPEDAP_ABORT_ON_EXCEPTION", "1", True),
    ("PIPEDAP_SCHEDULE", "DeAR", "dear"),
    ("PIPEDAP_CACHE_DIR", "~/models", Path.home() / "models"),
    ("PIPEDAP_TESTBED_CORE", "3", 3),
    ("PIPEDAP_PLAN", __file__, __file__),
    ("PIPEDAP_FUSION_BYTES", "", 4 << 20),  # empty: the default
    ("PIPEDAP_SCHEDULE", "", None),
])
def test_good_values_parse_to_the_right_type(name, value, expected):
    value = settings.get(name, {name: value})
    assert value == expected and type(value) is type(expected)


def test_engine_config_defaults_and_overrides():
    assert settings.engine_config({}) == {
        "algorithm": "auto", "ring_min_bytes": 65536, "segment_bytes": 1048576, "message_bytes": 2097152,
        "poll_spin_us": 500, "poll_max_sleep_us": 200, "poll_patience": 0.1, "stall_seconds": 60.0,
        "timeout_seconds": 600.0}
    config = settings.engine_config({"PIPEDAP_ALGORITHM": "ring", "PIPEDAP_TIMEOUT_SECONDS": "0",
                                     "PIPEDAP_SEGMENT_BYTES": "4096"})
    assert (config["algorithm"], config["timeout_seconds"], config["segment_bytes"]) == ("ring", 0.0, 4096)
    assert [type(v) for v in config.values()] == [str, int, int, int, int, int, float, float, float]


def test_every_declaration_is_consistent():
    for setting in [*settings.SETTINGS.values(), *settings.ENVS_CONF.values()]:
        assert setting.reader in settings.READERS, setting
        if setting.default is not None:
            setting.parse(setting.default)  # a default that does not parse would fail every run
    assert all(name.startswith("PIPEDAP_") for name in settings.SETTINGS)
    assert not set(settings.RETIRED) & set(settings.SETTINGS)
    settings.check_environment({})


def test_launch_rank_reads_the_launchers_variable():
    assert settings.launch_rank({}) == 0
    assert settings.launch_rank({"OMPI_COMM_WORLD_RANK": "3"}) == 3
    with pytest.raises(SettingsError, match="PMI_RANK='x': expected an integer >= 0"):
        settings.launch_rank({"PMI_RANK": "x"})


def test_the_cli_lists_every_setting_and_checks_the_environment():
    table = cli()
    assert table.returncode == 0, table.stderr
    for setting in [*settings.SETTINGS.values(), *settings.ENVS_CONF.values()]:
        assert re.search(rf"^{setting.name} +{re.escape(setting.shown_default)} ", table.stdout, re.M), setting.name
    assert cli("--check", PIPEDAP_FUSION_BYTES="1024").returncode == 0
    bad = cli("--check", PIPEDAP_FUSION_BYTES="abc", PIPEDAP_CHEK="1")
    assert bad.returncode == 2
    assert "pipedap.settings: error: PIPEDAP_FUSION_BYTES='abc': expected an integer >= 0" in bad.stderr
    assert "PIPEDAP_CHEK='1': not a PipeDAP setting" in bad.stderr


# --- README ----------------------------------------------------------------------------------


def test_the_readme_table_is_generated_from_the_declarations():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `PIPEDAP_")]
    assert rows == settings.markdown_rows(), "regenerate them with python -m pipedap.settings --markdown"
    for name, setting in settings.SETTINGS.items():
        assert f"| `{name}` | {setting.shown_default} |" in readme


def test_every_pipedap_name_in_the_readme_is_declared():
    readme = (ROOT / "README.md").read_text()
    undeclared = set(re.findall(r"PIPEDAP_[A-Z_]*[A-Z]", readme)) - set(settings.SETTINGS) - set(settings.RETIRED)
    assert not undeclared
    # a retired variable may still be mentioned in prose (being retired), never in the table
    assert not [name for name in settings.RETIRED if f"| `{name}`" in readme]


# --- envs.conf and dist.sh ------------------------------------------------------------------------


@pytest.fixture
def configs(tmp_path) -> Path:
    folder = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", folder)
    return folder


def test_the_shipped_envs_conf_passes():
    settings.check_envs_file(ROOT / "configs" / "envs.conf", clean_env())
    assert cli("--check-envs", str(ROOT / "configs" / "envs.conf")).returncode == 0


@pytest.mark.parametrize("line, env, message", [
    ("NOSUCHKEY=hello", {}, ":4: NOSUCHKEY='hello': not a key of envs.conf (PY, MPIPATH, ETH_INTERFACE,"),
    ("TESTBD=${TESTBD:-1}", {}, ":4: TESTBD='${TESTBD:-1}': not a key of envs.conf (PY, MPIPATH, "
     "ETH_INTERFACE, MPIRUN_FLAGS, TESTBED, TESTBED_RATE or PIPEDAP_*); did you mean TESTBED?"),
    ("TESTBED = 1", {}, ":4: expected KEY=value, got 'TESTBED = 1'"),
    ("", {"TESTBED": "yes"}, "TESTBED='yes': expected 0 or 1 (default 0)"),
    ("TESTBED=true", {}, "TESTBED='true': expected 0 or 1 (default 0)"),
    ("TESTBED_RATE=fast", {}, "TESTBED_RATE='fast': expected a rate like 500mbit, 1gbit or 125MB/s"),
    ("", {"TESTBED_RATE": "0mbit"}, "TESTBED_RATE='0mbit': expected a rate like"),
    ("PIPEDAP_FUSION_BYTES=-1", {}, "PIPEDAP_FUSION_BYTES='-1': expected an integer >= 0"),
    ("PIPEDAP_FUSION_BYTE=1", {}, "PIPEDAP_FUSION_BYTE='1': not a PipeDAP setting; did you mean"),
])
def test_a_bad_envs_conf_is_reported_by_the_cli(configs, line, env, message):
    envs = configs / "envs.conf"
    envs.write_text("# a comment\nPY=${PY:-python3}\n\n" + line + "\n")  # the line above is line 4
    expected = f"{envs}{message}" if message.startswith(":") else message  # a line number follows the path
    result = cli("--check-envs", str(envs), **env)
    assert result.returncode == 2
    assert f"pipedap.settings: error: {expected}" in result.stderr
    with pytest.raises(SettingsError, match=re.escape(expected)):
        settings.check_envs_file(envs, clean_env(**env))


def test_the_environment_overrides_envs_conf_as_in_dist_sh(configs):
    envs = configs / "envs.conf"
    envs.write_text(envs.read_text().replace("TESTBED_RATE=${TESTBED_RATE:-500mbit}", "TESTBED_RATE=${TESTBED_RATE:-x}"))
    with pytest.raises(SettingsError, match="TESTBED_RATE='x'"):
        settings.check_envs_file(envs, clean_env())
    settings.check_envs_file(envs, clean_env(TESTBED_RATE="250mbit"))


@pytest.mark.parametrize("line, env, message", [
    ("NOSUCHKEY=hello", {}, "NOSUCHKEY='hello': not a key of envs.conf"),
    ("", {"TESTBED": "yes"}, "TESTBED='yes': expected 0 or 1"),
    ("", {"PIPEDAP_CHECK_ORDER": "1"}, "PIPEDAP_CHECK_ORDER='1': no longer needed"),
])
def test_dist_sh_stops_on_a_bad_setting_before_launching(configs, line, env, message):
    envs = configs / "envs.conf"
    envs.write_text(envs.read_text() + line + "\n")
    result = run_bounded([str(ROOT / "dist.sh")], clean_env(configs=str(configs), **env), 60, cwd=ROOT,
                         merge_stderr=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "running:" not in result.stdout
