"""Every PipeDAP setting, declared once and parsed in one place.

Settings are environment variables (``PIPEDAP_*``) plus the keys of dist.sh's
``configs/envs.conf``. Each is declared below with its type, default, accepted
values, a one-line help and what reads it, so that a bad value fails with a
message naming the variable, the value and what is accepted, and so that an
unknown ``PIPEDAP_*`` variable (a typo) is an error instead of being ignored.
An empty value counts as unset.

    python -m pipedap.settings                     # the table of every setting
    python -m pipedap.settings --check             # validate the PIPEDAP_* environment
    python -m pipedap.settings --check-envs FILE   # validate an envs.conf for dist.sh (and the environment)
    python -m pipedap.settings --markdown          # the README's settings table
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipedap.units import parse_bandwidth

READERS = ("engine", "optimizer", "import", "logging", "bench", "build", "internal", "dist.sh",
           "launch")  # what reads a setting (launch: set by pipedap.tools.launch, read by the job)
ACCEPTED = {"flag": "0 or 1", "text": "any text", "path": "a folder path", "file": "an existing file",
            "rate": "a rate like 500mbit, 1gbit or 125MB/s", "ranks": "all, or ranks like 0 or 0,3"}  # types other than int, float and choice


class SettingsError(ValueError):
    """A setting with a value that is not accepted, or a variable that is not a setting."""


@dataclass(frozen=True)
class Setting:
    """One setting. ``default`` is written as a user would write the value (None: unset)."""

    name: str
    type: str
    default: str | None
    help: str
    reader: str
    minimum: int = 0  # int and float
    choices: tuple[str, ...] = ()  # choice

    @property
    def shown_default(self) -> str:
        return "none" if self.default is None else self.default

    @property
    def accepted(self) -> str:
        if self.type == "choice":
            return ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
        if self.type in ("int", "float"):
            return f"{'an integer' if self.type == 'int' else 'a number'} >= {self.minimum}"
        return ACCEPTED[self.type]

    def parse(self, text: str):
        """The value of ``text``: int, float, bool (flag), Path (path), bytes/s (rate), str, or
        (ranks) a frozenset of ranks, None for ``all``."""
        try:
            return self._convert(text.strip())
        except ValueError:
            raise SettingsError(
                f"{self.name}={text!r}: expected {self.accepted} (default {self.shown_default}): {self.help}"
            ) from None

    def _convert(self, text: str):
        if self.type == "int":
            value = int(text)
            if value < self.minimum:
                raise ValueError
            return value
        if self.type == "float":
            value = float(text)
            if not math.isfinite(value) or value < self.minimum:
                raise ValueError
            return value
        if self.type == "choice":
            if text.lower() not in self.choices:
                raise ValueError
            return text.lower()
        if self.type == "flag":
            if text not in ("0", "1"):
                raise ValueError
            return text == "1"
        if self.type == "path":
            return Path(text).expanduser()
        if self.type == "file":
            if not os.path.isfile(text):
                raise ValueError
            return text
        if self.type == "rate":
            value = parse_bandwidth(text)
            if value <= 0:
                raise ValueError
            return value
        if self.type == "ranks":
            if text.lower() == "all":
                return None
            parts = [part.strip() for part in text.split(",")]
            if not all(part.isdigit() for part in parts):  # isdigit: no sign, so no negative rank
                raise ValueError
            return frozenset(int(part) for part in parts)
        return text


_DECLARED = [
    # engine: the communication core (pipedap.init() passes engine_config() to it)
    Setting("PIPEDAP_ALGORITHM", "choice", "auto", "`ring` (our bandwidth-optimal ring over point-to-point), "
            "`mpi` (MPI's collectives), `auto` (the faster per kind and size as measured with the cost model, "
            "once installed by `pipedap.choose_algorithms()`; until then: ring from "
            "`PIPEDAP_RING_MIN_BYTES`)", "engine", choices=("auto", "ring", "mpi")),
    Setting("PIPEDAP_RING_MIN_BYTES", "int", "65536", "with `auto` and no measured choice: smallest operation "
            "(bytes) that uses the ring; the measurement keeps this rule where the two are within 5%", "engine"),
    Setting("PIPEDAP_SEGMENT_BYTES", "int", "1048576", "reduce-scatter message segment in bytes (received "
            "segments are reduced while the next arrive)", "engine", minimum=8),
    Setting("PIPEDAP_MESSAGE_BYTES", "int", "2097152", "largest other ring message in bytes (kept under "
            "Open MPI's TCP eager limit)", "engine", minimum=8),
    Setting("PIPEDAP_POLL_SPIN_US", "int", "500", "the communication thread spins this long on a request "
            "before it starts to sleep", "engine"),
    Setting("PIPEDAP_POLL_MAX_SLEEP_US", "int", "200", "longest sleep between polls (0: busy-poll, which takes "
            "a core away from compute)", "engine"),
    Setting("PIPEDAP_POLL_PATIENCE", "float", "0.1", "while only other ranks are awaited (they have not "
            "submitted the operation yet, or a barrier), a sleep between polls may grow to this fraction of the "
            "time waited, up to 2 ms (0: never beyond `PIPEDAP_POLL_MAX_SLEEP_US`)", "engine"),
    Setting("PIPEDAP_STALL_SECONDS", "float", "60", "report an operation unfinished after this long (which, "
            "since when, likely causes); 0 disables", "engine"),
    Setting("PIPEDAP_TIMEOUT_SECONDS", "float", "600", "abort the whole job with a message when an operation "
            "is unfinished after this long, like PyTorch's collectives; 0 disables", "engine"),
    Setting("PIPEDAP_ABORT_ON_EXCEPTION", "flag", "1", "an unhandled Python exception on one rank aborts "
            "every rank (0: leave the others running)", "engine"),
    Setting("PIPEDAP_ONE_RANK_THROUGH_ENGINE", "flag", "0", "1: a process set of one rank still runs its "
            "collectives (and DistributedOptimizer its buckets) through the engine instead of copying, so one "
            "GPU can test the NCCL path (scripts/gpu_check.sh)", "engine"),
    # optimizer: DistributedOptimizer and its online planner
    Setting("PIPEDAP_SCHEDULE", "choice", None, "the default `schedule=` of DistributedOptimizer (unset: "
            "pipedap with `model=`, else wfbp)", "optimizer", choices=("pipedap", "dear", "wfbp", "bytescheduler")),
    Setting("PIPEDAP_PLAN", "file", None, "a plan JSON for `schedule=\"pipedap\"` (skips online planning)",
            "optimizer"),
    Setting("PIPEDAP_PROFILE_STEPS", "int", "5", "`pipedap` without a plan: steps measured (after a "
            "warm-up: PIPEDAP_PROFILE_WARMUP_MAX) before planning", "optimizer", minimum=1),
    Setting("PIPEDAP_PROFILE_WARMUP_MAX", "int", "10", "`pipedap` without a plan: the most warm-up steps "
            "before profiling; the warm-up ends at the first step in which no rank faulted in more than 16 MB of "
            "new memory (1: one step, no check)", "optimizer", minimum=1),
    Setting("PIPEDAP_PLANNER", "choice", "optimal", "`optimal` (exact search) or `greedy` (the paper's "
            "heuristic) for online planning", "optimizer", choices=("optimal", "greedy")),
    Setting("PIPEDAP_INTERFERENCE", "choice", "measure", "`measure`: time how much compute slows while the "
            "link moves bytes (with every cost model, and before online planning) and plan for it; `off`: "
            "plan as if communication cost compute nothing", "optimizer", choices=("measure", "off")),
    Setting("PIPEDAP_TIED_SPLIT", "flag", "1", "1: the planner may reduce a word embedding tied to an output "
            "layer (BERT, GPT-2) in two parts, the output layer's gradient early in backward (an `nn.Linear`'s in 8 "
            "pieces, each sent as soon as it is made) and the lookup's rows at its end, where its timeline is "
            "faster (pipedap/tied_split.py); 0: always whole", "optimizer"),
    Setting("PIPEDAP_TIED_DEFER", "flag", "1", "1: where the planner finds it faster, a split tied embedding's "
            "all-gather waits for its output layer and the next forward's lookup fetches just its batch's rows from "
            "the reduce-scattered shards (element-wise optimizers, plain nn.Embedding; pipedap/tied_lookup.py); "
            "0: never", "optimizer"),
    Setting("PIPEDAP_FUSION_BYTES", "int", "4194304", "without a plan: fuse consecutive modules into buckets "
            "of about this many bytes (0: one per module)", "optimizer"),
    Setting("PIPEDAP_CACHE_DIR", "path", "~/.cache/pipedap", "where measured cost models are cached",
            "optimizer"),
    # import: read when pipedap is imported
    Setting("PIPEDAP_RETAIN_HEAP", "flag", "1", "keep the memory the process frees for reuse (glibc's mallopt: "
            "no mmap, no trim below 2 GiB) instead of unmapping it, which made VGG-16's classifier step 5x "
            "faster; 0: glibc's defaults (pipedap/heap.py)", "import"),
    # logging: pipedap/log.py
    Setting("PIPEDAP_LOG_RANKS", "ranks", "0", "the ranks whose INFO and DEBUG messages are logged; "
            "warnings and errors are logged from every rank, each line starting `[rank R]`", "logging"),
    # launch: set by python -m pipedap.tools.launch for the job it runs (docs/restart.md)
    Setting("PIPEDAP_RESTART_COUNT", "int", None, "set by `python -m pipedap.tools.launch`: 0 on the first "
            "attempt, k on the k-th restart", "launch"),
    Setting("PIPEDAP_CHECKPOINT_DIR", "path", None, "set by `python -m pipedap.tools.launch --checkpoint-dir`: "
            "the job's checkpoint folder, for the script to pass to `pipedap.load_checkpoint`", "launch"),
    # build and internal
    Setting("PIPEDAP_WITH_NCCL", "choice", "auto", "build time: compile the NCCL backend "
            "(read by comm_core/buildconfig.py)", "build", choices=("auto", "0", "1")),
    Setting("PIPEDAP_BUILD_JOBS", "int", "0", "build time: compile the core's sources in this many parallel jobs "
            "(0: one per core; read by setup.py)", "build"),
    Setting("PIPEDAP_TESTBED_CORE", "int", None, "set by `python -m pipedap.tools.testbed.pin`: the core this rank "
            "is pinned to (benchmarks record it)", "internal"),
]
SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}

# name -> why it is gone: still an error when set, with the reason
RETIRED = {"PIPEDAP_CHECK_ORDER": "no longer needed: every operation is checked across ranks"}

# configs/envs.conf, sourced by dist.sh; the environment overrides the file
ENVS_CONF: dict[str, Setting] = {s.name: s for s in [
    Setting("PY", "text", "python3", "Python interpreter with pipedap installed, the same path on every host",
            "dist.sh"),
    Setting("MPIPATH", "text", None, "MPI installation folder (runs $MPIPATH/bin/mpirun); unset: mpirun on "
            "PATH, else next to $PY", "dist.sh"),
    Setting("ETH_INTERFACE", "text", None, "network interface for the job's traffic between hosts", "dist.sh"),
    Setting("MPIRUN_FLAGS", "text", None, "extra mpirun flags, split on spaces", "dist.sh"),
    Setting("TESTBED", "flag", "0", "1: run on nworkers emulated rate-limited hosts on this machine (root)",
            "dist.sh"),
    Setting("TESTBED_RATE", "rate", "500mbit", "with TESTBED=1: each emulated host's link rate each way",
            "dist.sh"),
]}

# engine_config() keys: the name without PIPEDAP_, in lower case
ENGINE_CONFIG = ("PIPEDAP_ALGORITHM", "PIPEDAP_RING_MIN_BYTES", "PIPEDAP_SEGMENT_BYTES", "PIPEDAP_MESSAGE_BYTES",
                 "PIPEDAP_POLL_SPIN_US", "PIPEDAP_POLL_MAX_SLEEP_US", "PIPEDAP_POLL_PATIENCE", "PIPEDAP_STALL_SECONDS",
                 "PIPEDAP_TIMEOUT_SECONDS")

# set by MPI launchers (Open MPI, MPICH, PMIx): the rank before MPI is initialised
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def get(name: str, environ: Mapping[str, str] | None = None):
    """The parsed value of the declared setting ``name`` (its default when unset or empty)."""
    setting = SETTINGS.get(name) or ENVS_CONF[name]
    text = (os.environ if environ is None else environ).get(name) or setting.default
    return None if text is None else setting.parse(text)


def engine_config(environ: Mapping[str, str] | None = None) -> dict:
    """The communication core's configuration, for ``core.init()``."""
    return {name.removeprefix("PIPEDAP_").lower(): get(name, environ) for name in ENGINE_CONFIG}


def launch_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank according to the MPI launcher (0 when not launched by one)."""
    environ = os.environ if environ is None else environ
    for var in RANK_VARIABLES:
        if var in environ:
            text = environ[var]
            if not text.strip().isdigit():
                raise SettingsError(f"{var}={text!r}: expected an integer >= 0 (set by the MPI launcher)")
            return int(text)
    return 0


def environment_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per bad or unknown ``PIPEDAP_*`` variable in ``environ``."""
    environ = os.environ if environ is None else environ
    problems = []
    for name in sorted(n for n in environ if n.startswith("PIPEDAP_")):
        text = environ[name]
        if name in SETTINGS:
            try:
                get(name, environ)
            except SettingsError as err:
                problems.append(str(err))
        else:
            problems.append(_unknown(name, text, SETTINGS, "not a PipeDAP setting"))
    return problems


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise SettingsError listing every bad or unknown ``PIPEDAP_*`` variable."""
    _raise(environment_problems(environ))


def envs_file_problems(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per problem in dist.sh's envs.conf ``path`` (with ``environ`` overriding it, as in dist.sh).

    Every line must assign a dist.sh key or a ``PIPEDAP_*`` setting. The values are
    those bash gets when it sources the file, so ``KEY=${KEY:-default}`` is checked
    with the environment's value when it has one.
    """
    environ = dict(os.environ if environ is None else environ)
    not_a_key = f"not a key of envs.conf ({', '.join(ENVS_CONF)} or PIPEDAP_*)"
    problems = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not match:
            problems.append(f"{path}:{number}: expected KEY=value, got {line!r}")
        elif not (match[1] in ENVS_CONF or match[1].startswith("PIPEDAP_")):  # PIPEDAP_*: checked below
            problems.append(f"{path}:{number}: {_unknown(match[1], match[2], {**ENVS_CONF, **SETTINGS}, not_a_key)}")
    sourced = subprocess.run(["bash", "-c", 'set -a; source "$1" >&2 && env -0', "bash", str(path)],
                             env=environ, capture_output=True, text=True)
    if sourced.returncode != 0:
        return [*problems, f"{path}: bash cannot source it: {sourced.stderr.strip()}"]
    values = dict(item.split("=", 1) for item in sourced.stdout.split("\0") if "=" in item)
    for name in ENVS_CONF:
        try:
            get(name, values)
        except SettingsError as err:
            problems.append(str(err))
    return problems + environment_problems(values)


def check_envs_file(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> None:
    """Raise SettingsError listing every problem in dist.sh's envs.conf ``path``."""
    _raise(envs_file_problems(path, environ))


def _raise(problems: list[str]) -> None:
    if problems:
        raise SettingsError("\n".join(problems))


def _unknown(name: str, text: str, known: Mapping[str, Setting], what: str) -> str:
    """The message for a variable that is not a setting: why, or the closest declared name."""
    if name in RETIRED:
        return f"{name}={text!r}: {RETIRED[name]}; unset it"
    short = {n.removeprefix("PIPEDAP_"): n for n in known}  # the common prefix would make every name look close
    close = difflib.get_close_matches(name.removeprefix("PIPEDAP_"), short, n=1)
    hint = f"; did you mean {short[close[0]]}?" if close else ""
    return f"{name}={text!r}: {what}{hint} (python -m pipedap.settings lists them all)"


def table(settings: Mapping[str, Setting]) -> str:
    """A plain-text table: name, default, accepted values, reader, help."""
    rows = [("variable", "default", "accepted", "read by", "meaning")]
    rows += [(s.name, s.shown_default, s.accepted, s.reader, s.help) for s in settings.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows)


def markdown_rows() -> list[str]:
    """The rows of README.md's settings table, one per ``PIPEDAP_*`` setting."""
    return [f"| `{s.name}` | {s.shown_default} | {s.accepted} | {s.reader} | {s.help} |" for s in SETTINGS.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedap.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="validate the PIPEDAP_* variables of the environment")
    parser.add_argument("--check-envs", metavar="FILE",
                        help="validate dist.sh's envs.conf FILE, with the environment overriding it")
    parser.add_argument("--markdown", action="store_true", help="print the README's settings table rows")
    args = parser.parse_args(argv)
    try:
        if args.check_envs:
            check_envs_file(args.check_envs)
        elif args.check:
            check_environment()
    except (SettingsError, OSError) as err:
        for line in str(err).splitlines():
            print(f"pipedap.settings: error: {line}", file=sys.stderr)
        return 2
    if args.markdown:
        print("\n".join(markdown_rows()))
    elif not (args.check or args.check_envs):
        print("Environment variables (an empty value counts as unset):\n")
        print(table(SETTINGS))
        print("\ndist.sh (configs/envs.conf; an environment variable of the same name overrides the file):\n")
        print(table(ENVS_CONF))
    return 0


if __name__ == "__main__":
    sys.exit(main())
