"""pipedap.log: every record of the "pipedap" logger names its rank; PIPEDAP_LOG_RANKS picks the ranks
whose INFO records are logged, warnings are logged from every rank; an application's own logging
configuration is left alone."""

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mpi_launch import assert_ok, run_mpi

from pipedap import settings
from pipedap.log import RankFilter
from pipedap.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]


def record(level: int = logging.INFO, msg: str = "step %d done", args: tuple = (3,)) -> logging.LogRecord:
    return logging.LogRecord("pipedap", level, __file__, 1, msg, args, None)


def logged(rank: int, level: int, log_ranks: str | None) -> bool:
    environ = {} if log_ranks is None else {"PIPEDAP_LOG_RANKS": log_ranks}
    return RankFilter(rank=rank, environ=environ).filter(record(level))


def test_the_message_starts_with_the_rank_and_the_record_carries_it():
    rec = record()
    assert RankFilter(rank=3, environ={"PIPEDAP_LOG_RANKS": "all"}).filter(rec)
    assert rec.getMessage() == "[rank 3] step 3 done"
    assert rec.rank == 3
    assert logging.Formatter("%(rank)s|%(levelname)s|%(message)s").format(rec) == "3|INFO|[rank 3] step 3 done"


@pytest.mark.parametrize("log_ranks, shown", [
    (None, {0}),  # the default: rank 0 only
    ("0", {0}),
    ("1", {1}),
    ("0,3", {0, 3}),
    (" 1 , 2 ", {1, 2}),
    ("all", {0, 1, 2, 3}),
    ("ALL", {0, 1, 2, 3}),
])
def test_info_and_debug_are_logged_on_the_selected_ranks_only(log_ranks, shown):
    for level in (logging.DEBUG, logging.INFO):
        assert {r for r in range(4) if logged(r, level, log_ranks)} == shown, (level, log_ranks)


@pytest.mark.parametrize("log_ranks", [None, "1", "0,3"])
def test_warnings_and_errors_are_logged_on_every_rank(log_ranks):
    for level in (logging.WARNING, logging.ERROR, logging.CRITICAL):
        assert all(logged(r, level, log_ranks) for r in range(4)), (level, log_ranks)


@pytest.mark.parametrize("value", ["-1", "one", "0,", "0;1", "1.5", "all,0", "0 1"])
def test_a_bad_value_names_the_variable_the_value_and_what_is_accepted(value):
    expected = f"PIPEDAP_LOG_RANKS='{value}': expected all, or ranks like 0 or 0,3 (default 0): "
    with pytest.raises(SettingsError) as err:
        settings.get("PIPEDAP_LOG_RANKS", {"PIPEDAP_LOG_RANKS": value})
    assert str(err.value).startswith(expected)
    with pytest.raises(SettingsError) as checked:
        settings.check_environment({"PIPEDAP_LOG_RANKS": value})
    assert str(checked.value) == str(err.value)


def test_good_values_parse_to_a_set_of_ranks_or_none_for_all():
    assert settings.get("PIPEDAP_LOG_RANKS", {}) == frozenset({0})
    assert settings.get("PIPEDAP_LOG_RANKS", {"PIPEDAP_LOG_RANKS": "2,0,2"}) == frozenset({0, 2})
    assert settings.get("PIPEDAP_LOG_RANKS", {"PIPEDAP_LOG_RANKS": "all"}) is None


def test_every_module_logs_to_the_pipedap_logger():
    """The RankFilter sits on the "pipedap" logger: a child logger's records would bypass it."""
    for path in (ROOT / "pipedap").rglob("*.py"):
        for name in re.findall(r"logging\.getLogger\(([^)]*)\)", path.read_text()):
            assert name == '"pipedap"' or (path.name == "log.py" and name == ""), (path, name)


# --- in a fresh interpreter: the launcher's rank before init(), pipedap's handler -------------


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPEDAP_") and k not in settings.RANK_VARIABLES}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_before_init_the_rank_is_the_launchers_and_the_applications_format_is_used():
    done = python("""
        import logging
        import pipedap
        logging.basicConfig(level=logging.INFO, format="app %(levelname)s %(message)s")
        log = logging.getLogger("pipedap")
        log.info("info")
        log.warning("warning")
        assert logging.getLogger("pipedap").handlers == []
    """, OMPI_COMM_WORLD_RANK="1", PIPEDAP_LOG_RANKS="1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["app INFO [rank 1] info", "app WARNING [rank 1] warning"]
    quiet = python("""
        import logging
        import pipedap
        logging.basicConfig(level=logging.INFO, format="app %(levelname)s %(message)s")
        logging.getLogger("pipedap").info("info")
    """, OMPI_COMM_WORLD_RANK="1")  # the default: rank 0's INFO only
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_pipedap_adds_no_handler_warnings_reach_stderr_through_python_s_last_resort():
    done = python("""
        import logging
        import pipedap.log
        log = logging.getLogger("pipedap")
        pipedap.log.start(0)  # what pipedap.init() does once the engine runs
        log.info("hidden: nothing configured")
        log.warning("shown")
        assert log.handlers == [] and logging.getLogger().handlers == []
    """)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["[rank 0] shown"]


# --- a real job: the engine's rank after init() ------------------------------------------------------


def test_two_ranks_log_their_warnings_and_only_the_selected_ranks_info():
    result = run_mpi("log_ranks.py", 2, env={"PIPEDAP_LOG_RANKS": "1"}, timeout=120)
    assert_ok(result)
    lines = result.output.splitlines()
    assert "INFO:pipedap:[rank 1] info from 1" in lines
    assert "WARNING:pipedap:[rank 0] warning from 0" in lines
    assert "WARNING:pipedap:[rank 1] warning from 1" in lines
    assert not [line for line in lines if "info from 0" in line], result.output
