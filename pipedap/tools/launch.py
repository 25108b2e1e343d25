"""Run a training script under mpirun and restart it after a failure: ``python -m pipedap.tools.launch --help``.

    python -m pipedap.tools.launch -np 4 --hostfile configs/cluster4 --max-restarts 3 \\
        --checkpoint-dir /shared/ckpt -- python train.py --checkpoint-dir /shared/ckpt

What torchrun's ``--max-restarts`` gives. When the job ends with a non-zero status (a rank
killed, a host lost, a link down: PipeDAP's timeouts end the others), the launcher asks
every host whether it still answers (``mpirun -np 1 --host H:1 true``, bounded in time),
drops those that do not, and starts the job again, up to ``--max-restarts`` times. The
script resumes by itself: it calls :func:`pipedap.load_checkpoint` at start, which finds
the last checkpoint every rank completed (``pipedap.save_checkpoint``). At the same world
size the resumed run is bit for bit the uninterrupted one; with ``--min-np`` below ``-np``
the job may go on with fewer ranks when hosts are lost (the checkpoint loads at any world
size). Each attempt's environment has ``PIPEDAP_RESTART_COUNT`` (0, 1, ...) and, with
``--checkpoint-dir``, ``PIPEDAP_CHECKPOINT_DIR``. Ctrl-C or SIGTERM stops the job and does
not restart it. Exit status: the job's last status (0 when an attempt succeeded), 2 for
bad options.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipedap.checkpoint import CheckpointError, read_manifest
from pipedap.tools import options
from pipedap.tools.processes import mpirun_path, signals_as_exceptions, stop_process_group

PREFIX = "pipedap.launch:"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(path: Path) -> list[Host]:
    """Open MPI's hostfile: one ``HOST [slots=K]`` per line, ``#`` comments."""
    if not path.is_file():
        raise ValueError(f"--hostfile {path}: not found (one 'HOST slots=K' line per host)")
    hosts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = 1
        for word in words[1:]:
            match = re.fullmatch(r"slots=(\d+)", word)
            if match and int(match[1]) >= 1:
                slots = int(match[1])
            elif not word.startswith("max_slots="):
                raise ValueError(f"--hostfile {path} line {number}: {word!r} is not 'slots=K' (K >= 1)")
        hosts.append(Host(words[0], slots))
    if not hosts:
        raise ValueError(f"--hostfile {path}: no hosts in it")
    return hosts


def parse_hosts(text: str) -> list[Host]:
    """``-H a:2,b:1`` (slots default 1)."""
    hosts = []
    for item in text.split(","):
        match = re.fullmatch(r"([^:\s]+)(?::([1-9]\d*))?", item.strip())
        if not match:
            raise ValueError(f"-H {text!r}: {item!r} is not HOST or HOST:SLOTS (SLOTS >= 1)")
        hosts.append(Host(match[1], int(match[2] or 1)))
    return hosts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipedap.tools.launch", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The script resumes from the last complete checkpoint by calling pipedap.load_checkpoint "
               "at start (docs/restart.md).")
    parser.add_argument("-np", "--np", type=options.integer(1), required=True, help="number of ranks")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hostfile", type=Path, help="Open MPI hostfile ('HOST slots=K' lines)")
    where.add_argument("-H", "--hosts", help="HOST[:SLOTS],... (default: every rank on this machine)")
    parser.add_argument("--max-restarts", type=options.integer(0), default=0,
                        help="restart a failed job up to this many times (default 0: never)")
    parser.add_argument("--min-np", type=options.integer(1),
                        help="restart with fewer ranks (not below this) when hosts stop answering "
                             "(default: -np, i.e. never shrink)")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="the job's checkpoint folder: reported between attempts and exported as "
                             "PIPEDAP_CHECKPOINT_DIR")
    parser.add_argument("--probe-timeout", type=options.seconds, default=30.0,
                        help="seconds a host has to answer before a restart (default 30)")
    parser.add_argument("--mpirun-args", default="",
                        help="more mpirun flags, one shell-quoted string (e.g. \"--mca btl tcp,self\")")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each rank runs")
    return parser


@dataclass
class Launch:
    """The checked options."""

    np: int
    min_np: int
    hosts: list[Host] | None
    max_restarts: int
    checkpoint_dir: Path | None
    probe_timeout: float
    mpirun_args: list[str]
    command: list[str]


def check(args: argparse.Namespace) -> Launch:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("no command: put it after --, e.g. -- python train.py")
    min_np = args.np if args.min_np is None else args.min_np
    if min_np > args.np:
        raise ValueError(f"--min-np {min_np}: expected at most -np {args.np} (ranks to restart with at least)")
    mpirun_path()  # fails now, with the fix, when there is none
    hosts = parse_hostfile(args.hostfile) if args.hostfile else parse_hosts(args.hosts) if args.hosts else None
    if hosts is not None and sum(h.slots for h in hosts) < args.np:
        raise ValueError(f"-np {args.np} but the hosts have {sum(h.slots for h in hosts)} slot(s): "
                         "add hosts or slots, or lower -np")
    try:
        mpirun_args = shlex.split(args.mpirun_args)
    except ValueError as e:
        raise ValueError(f"--mpirun-args {args.mpirun_args!r}: {e}") from e
    return Launch(args.np, min_np, hosts, args.max_restarts, args.checkpoint_dir, args.probe_timeout,
                  mpirun_args, command)


def mpirun_command(launch: Launch, np: int, hosts: list[Host] | None, command: list[str],
                   exported: list[str]) -> list[str]:
    argv = [mpirun_path(), "-np", str(np), "--bind-to", "none"]
    if hosts is not None:
        argv += ["--host", ",".join(f"{h.name}:{h.slots}" for h in hosts)]
    elif np > (os.cpu_count() or 1):
        argv.append("--oversubscribe")
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    for name in exported:
        argv += ["-x", name]
    return argv + launch.mpirun_args + command


def answers(launch: Launch, host: Host) -> bool:
    """Whether mpirun can start a process on ``host`` within the probe timeout."""
    probe = mpirun_command(launch, 1, [Host(host.name, 1)], ["true"], [])
    proc = subprocess.Popen(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout=launch.probe_timeout) == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        stop_process_group(proc, grace_s=2)


def answering_hosts(launch: Launch, hosts: list[Host]) -> list[Host]:
    say(f"asking {len(hosts)} host(s) whether they answer (mpirun ... true, {launch.probe_timeout:g} s at most)")
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        alive = list(pool.map(lambda h: answers(launch, h), hosts))
    lost = [h.name for h, ok in zip(hosts, alive) if not ok]
    up = [h for h, ok in zip(hosts, alive) if ok]
    say(f"answering: {', '.join(f'{h.name} ({h.slots} slots)' for h in up) or 'none'}"
        + (f"; not answering: {', '.join(lost)}" if lost else ""))
    return up


def describe_checkpoint(directory: Path | None) -> str:
    if directory is None:
        return "no --checkpoint-dir given"
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return str(e)
    if manifest is None:
        return f"no complete checkpoint in {directory} yet: the job starts from the beginning"
    return f"last complete checkpoint: step {manifest['step']} at {manifest['world_size']} rank(s) in {directory}"


def run(launch: Launch) -> int:
    hosts, np = launch.hosts, launch.np
    began = time.monotonic()
    for attempt in range(launch.max_restarts + 1):
        env = dict(os.environ, PIPEDAP_RESTART_COUNT=str(attempt), PYTHONUNBUFFERED="1")
        exported = ["PIPEDAP_RESTART_COUNT", "PYTHONUNBUFFERED"]
        if launch.checkpoint_dir is not None:
            env["PIPEDAP_CHECKPOINT_DIR"] = str(launch.checkpoint_dir)
            exported.append("PIPEDAP_CHECKPOINT_DIR")
        argv = mpirun_command(launch, np, hosts, launch.command, exported)
        say(f"attempt {attempt + 1} of {launch.max_restarts + 1}: {shlex.join(argv)}")
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, start_new_session=True)
        try:
            status = proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: stop the job, no restart
            say("stopping the job (interrupted): no restart")
            stop_process_group(proc)
            raise
        seconds = time.monotonic() - started
        if status == 0:
            say(f"finished after {attempt + 1} attempt(s), {time.monotonic() - began:.1f} s")
            return 0
        say(f"attempt {attempt + 1} failed with exit status {status} after {seconds:.1f} s; "
            + describe_checkpoint(launch.checkpoint_dir))
        if attempt == launch.max_restarts:
            break
        if hosts is not None:
            hosts = answering_hosts(launch, hosts)
            slots = sum(h.slots for h in hosts)
            if slots < launch.min_np:
                say(f"the answering hosts have {slots} slot(s), fewer than --min-np {launch.min_np}: not restarting")
                return status
            np = min(launch.np, slots)
        say(f"restart {attempt + 1} of {launch.max_restarts} at {np} rank(s)")
    say(f"giving up: the job failed {launch.max_restarts + 1} time(s) (--max-restarts {launch.max_restarts})")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        launch = check(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        with signals_as_exceptions():
            return run(launch)
    except KeyboardInterrupt:
        return 130
    except SystemExit as e:  # SIGTERM / SIGHUP
        print(f"{PREFIX} {e}", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
