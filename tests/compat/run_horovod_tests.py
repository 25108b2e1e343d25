#!/usr/bin/env python
"""Run Horovod's own PyTorch test suite against pipedap, through the shim in horovod_shim/.

    python tests/compat/run_horovod_tests.py --horovod PATH [--np 2] [--one-job] [-k EXPR]
                                             [--timeout 60] [--json OUT]

PATH is a Horovod checkout (its test/parallel/test_torch.py and test/utils/common.py are used;
nothing is fetched). By default every test runs in its own ``mpirun -np N`` job, killed with its
process group after ``--timeout`` seconds; ``--one-job`` runs the whole file in one job (as
Horovod's CI does) with ``--timeout`` for the job. Each rank runs pytest with a small plugin that
appends every test's outcome to a per-rank JSON-lines file as it happens, so a job that hangs or
is killed still reports the tests it finished and names the one it was in.

A test's outcome combines the ranks: failed if any rank failed, timeout if a rank started it
and never finished, skipped if every rank that ran it skipped (a skip for want of a GPU is
counted apart as ``skipped_gpu``), passed otherwise.

The script is also its own rank entry point: ``mpirun ... python run_horovod_tests.py --rank-job
OUTDIR -- PYTEST_ARGS``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "horovod_shim"
FALLBACKS = HERE / "fallbacks"
REPO = HERE.parent.parent
TEST_FILE = Path("test") / "parallel" / "test_torch.py"
OUTCOMES = ("passed", "failed", "timeout", "skipped", "skipped_gpu")
GPU_SKIP = re.compile(r"\b(GPU|GPUs|CUDA|NCCL|cuda)\b")


# --- the test list -----------------------------------------------------------


def list_tests(test_file: Path) -> list[str]:
    """``Class::method`` for every ``test_*`` method of every class in ``test_file``, in file order (read, not run)."""
    tree = ast.parse(Path(test_file).read_text(), filename=str(test_file))
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                    found.append(f"{node.name}::{item.name}")
    return found


def keyword_matches(expr: str | None, name: str) -> bool:
    """A subset of pytest's ``-k``: words match as case-insensitive substrings, joined by and/or/not/()."""
    if not expr:
        return True
    tokens = re.findall(r"\(|\)|[^\s()]+", expr)
    python = []
    for token in tokens:
        if token in ("(", ")", "and", "or", "not"):
            python.append(token)
        else:
            python.append(repr(token.lower() in name.lower()))
    try:
        return bool(eval(" ".join(python), {"__builtins__": {}}))  # only literals and operators remain
    except SyntaxError:
        raise ValueError(f"-k {expr!r}: not an expression of words, and, or, not and parentheses") from None


# --- the rank side: a pytest plugin writing outcomes as they happen -------------


class OutcomeRecorder:
    """pytest plugin: one JSON line per test phase (and a line when a test starts) to ``path``."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def pytest_runtest_logstart(self, nodeid, location):
        self._write({"event": "start", "nodeid": nodeid})

    def pytest_runtest_logreport(self, report):
        self._write({"event": "report", "nodeid": report.nodeid, "when": report.when,
                     "outcome": report.outcome, "message": first_error_line(report)})

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def first_error_line(report) -> str:
    """The line that says what went wrong (``E  ...`` of a failure) or why a test skipped."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and crash.message:
        return crash.message.splitlines()[0]
    return str(longrepr).strip().splitlines()[-1] if str(longrepr).strip() else ""


def rank_job(outdir: Path, pytest_args: list[str]) -> int:
    import pytest

    rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") or "0"
    (outdir / f"pid-{rank}").write_text(str(os.getpid()))  # mpirun gives ranks their own process groups
    recorder = OutcomeRecorder(outdir / f"rank-{rank}.jsonl")
    return int(pytest.main(["-p", "no:cacheprovider", "-q", "--rootdir", os.getcwd(), *pytest_args], plugins=[recorder]))


# --- the runner side: jobs, and folding the ranks' records into outcomes ----------


def read_records(outdir: Path) -> dict[str, list[dict]]:
    """rank file name -> its records; a line cut short by a kill is dropped."""
    records = {}
    for path in sorted(outdir.glob("rank-*.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        records[path.stem] = rows
    return records


def rank_outcomes(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """nodeid -> (outcome, message) on one rank; a test started and never finished is ``timeout``."""
    result: dict[str, tuple[str, str]] = {}
    for row in rows:
        nodeid = row["nodeid"]
        if row["event"] == "start":
            result[nodeid] = ("timeout", "")
            continue
        outcome, message, when = row["outcome"], row["message"], row["when"]
        previous = result.get(nodeid, ("timeout", ""))
        if outcome == "failed":
            if previous[0] != "failed":  # the first failure (call before teardown) says what broke
                result[nodeid] = ("failed", f"{message}" if when == "call" else f"[{when}] {message}")
        elif outcome == "skipped":
            if previous[0] != "failed":
                result[nodeid] = ("skipped_gpu" if GPU_SKIP.search(message) else "skipped", message)
        elif when == "call" and previous[0] != "failed":
            result[nodeid] = ("passed", "")
        elif when == "teardown" and previous[0] == "timeout":
            result[nodeid] = ("passed", "")  # a test with nothing to call (not expected from unittest)
    return result


def combine(per_rank: list[dict[str, tuple[str, str]]], expected: list[str]) -> dict[str, dict]:
    """nodeid -> {"outcome", "message"} over every rank: failed > timeout > passed > skipped."""
    order = {"failed": 0, "timeout": 1, "passed": 2, "skipped_gpu": 3, "skipped": 4}
    combined = {}
    for nodeid in expected:
        seen = [ranks[nodeid] for ranks in per_rank if nodeid in ranks]
        if not seen:
            combined[nodeid] = {"outcome": "timeout", "message": "not reached (the job ended or was killed first)"}
            continue
        outcome, message = min(seen, key=lambda item: order[item[0]])
        if outcome != "timeout" and len(seen) < len(per_rank):
            outcome, message = "timeout", "a rank never reached this test"
        combined[nodeid] = {"outcome": outcome, "message": message}
    return combined


def mpirun_command(np: int, outdir: Path, pytest_args: list[str]) -> list[str]:
    mpirun = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    return [mpirun, "-np", str(np), "--oversubscribe", "--bind-to", "none",
            sys.executable, str(Path(__file__).resolve()), "--rank-job", str(outdir), "--", *pytest_args]


def job_environment() -> dict:
    paths = [str(SHIM), str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)), str(FALLBACKS)]
    # no third-party pytest plugins: Horovod's tests need none, and hypothesis' alone costs each rank ~2 s
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
                OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                OMPI_MCA_rmaps_base_oversubscribe="1")


def run_job(np: int, pytest_args: list[str], cwd: Path, timeout: float, nodeids: list[str],
            log_path: Path | None = None) -> tuple[dict[str, dict], bool, float]:
    """One mpirun job; returns (outcomes of ``nodeids``, whether it timed out, seconds)."""
    with tempfile.TemporaryDirectory(prefix="hvdcompat-") as tmp:
        outdir = Path(tmp)
        started = time.monotonic()
        proc = subprocess.Popen(mpirun_command(np, outdir, pytest_args), cwd=cwd, env=job_environment(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_job(proc, outdir, signal.SIGTERM)
            try:
                output, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                kill_job(proc, outdir, signal.SIGKILL)
                output, _ = proc.communicate()
        seconds = time.monotonic() - started
        if log_path is not None:
            log_path.write_text(output)
        per_rank = [rank_outcomes(rows) for rows in read_records(outdir).values()]
        while len(per_rank) < np:
            per_rank.append({})  # a rank that never started pytest
        outcomes = combine(per_rank, nodeids)
        if not timed_out:
            for result in outcomes.values():
                if result["outcome"] == "timeout":  # the job ended (a crash), not our clock
                    result["outcome"] = "failed"
                    result["message"] = result["message"] or "the job ended before this test finished"
                    result["message"] += f" (exit code {proc.returncode}; last output: {last_line(output)})"
        return outcomes, timed_out, seconds


def kill_job(proc: subprocess.Popen, outdir: Path, sig: int) -> None:
    """Signal mpirun's process group and each rank (they run in process groups of their own)."""
    groups = [proc.pid] if proc.poll() is None else []
    for path in outdir.glob("pid-*"):
        try:
            groups.append(int(path.read_text()))
        except ValueError:
            pass
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "none"


def counts_of(outcomes: dict[str, dict]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for result in outcomes.values():
        counts[result["outcome"]] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--rank-job"]:
        rest = argv[2:]
        return rank_job(Path(argv[1]), rest[1:] if rest[:1] == ["--"] else rest)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horovod", required=True, type=Path, help="a Horovod checkout (nothing is fetched)")
    parser.add_argument("--np", type=int, default=2, help="ranks per job (default 2)")
    parser.add_argument("--one-job", action="store_true", help="run the whole file in one job")
    parser.add_argument("-k", dest="keyword", help="select tests: words (substrings), and, or, not, ()")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per test (default 60); with --one-job, for the job (default 60 x tests)")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    parser.add_argument("--logs", type=Path, help="keep each job's output in this folder")
    args = parser.parse_args(argv)

    test_file = args.horovod / TEST_FILE
    if not test_file.is_file():
        parser.error(f"{test_file} not found: --horovod must be a Horovod checkout")
    selected = [name for name in list_tests(test_file) if keyword_matches(args.keyword, name)]
    nodeids = [f"{TEST_FILE.name}::{name}" for name in selected]
    cwd = test_file.parent
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    outcomes: dict[str, dict] = {}
    started = time.monotonic()
    one_job = None
    if args.one_job:
        timeout = args.timeout * len(nodeids) if args.timeout == parser.get_default("timeout") else args.timeout
        pytest_args = list(nodeids) if args.keyword else [TEST_FILE.name]
        outcomes, timed_out, seconds = run_job(args.np, pytest_args, cwd, timeout, nodeids,
                                               args.logs / "one-job.log" if args.logs else None)
        one_job = {"finished": not timed_out, "seconds": round(seconds, 1), "timeout": timeout}
        print(f"one job: {'finished' if not timed_out else 'killed after the timeout'} in {seconds:.0f} s")
    else:
        for index, nodeid in enumerate(nodeids, 1):
            log = args.logs / (nodeid.split("::")[-1] + ".log") if args.logs else None
            result, _, seconds = run_job(args.np, [nodeid], cwd, args.timeout, [nodeid], log)
            outcomes.update(result)
            outcome = result[nodeid]
            print(f"[{index}/{len(nodeids)}] {outcome['outcome']:<11} {seconds:5.1f}s {nodeid.split('::')[-1]}"
                  + (f"  {outcome['message'][:150]}" if outcome["outcome"] in ("failed", "timeout") else ""),
                  flush=True)

    counts = counts_of(outcomes)
    print("\nfailures:")
    for nodeid, result in outcomes.items():
        if result["outcome"] in ("failed", "timeout"):
            print(f"  {result['outcome']:<7} {nodeid.split('::')[-1]}: {result['message'][:200]}")
    print("\n" + ", ".join(f"{counts[name]} {name}" for name in OUTCOMES)
          + f" of {len(nodeids)} tests in {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"horovod": str(args.horovod), "np": args.np, "one_job": one_job,
                                         "counts": counts, "tests": outcomes}, indent=1) + "\n")
    return 0 if counts["failed"] == counts["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
