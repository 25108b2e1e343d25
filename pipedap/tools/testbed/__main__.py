"""Emulated cluster CLI: ``python -m pipedap.tools.testbed {up,down,run,calibrate} --help``.

Examples::

    python -m pipedap.tools.testbed up --hosts 2 --rate 500mbit      # prints the hostfile and mpirun prefix
    python -m pipedap.tools.testbed down                             # removes every testbed, also crashed ones
    python -m pipedap.tools.testbed run --hosts 2 --rate 250mbit -- python -m pipedap.tools.bench_comm --sizes 16m
    python -m pipedap.tools.testbed calibrate --hosts 2 --rates 500mbit,250mbit --json calib.json
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipedap.tools.processes import signals_as_exceptions, stop_process_group
from pipedap.tools.progress import step
from pipedap.tools.testbed.calibrate import calibrate
from pipedap.tools.testbed.network import TestbedError
from pipedap.tools.testbed.testbed import Testbed, teardown


def add_testbed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=int, default=2, help="number of emulated hosts (default 2)")
    parser.add_argument("--rate", default="500mbit", help="link rate each way, e.g. 250mbit, 1gbit")
    parser.add_argument("--slots", type=int, default=1, help="MPI slots (ranks) per host (default 1)")
    parser.add_argument("--qdisc", default="tbf", choices=("tbf", "htb"), help="rate limiter (netem is absent)")
    parser.add_argument("--burst", default="256kb", help="token bucket size (default 256kb, see calibrate)")
    parser.add_argument("--latency", default="20ms", help="tbf: longest queueing delay, i.e. the buffer size")


def make_testbed(args: argparse.Namespace) -> Testbed:
    return Testbed(hosts=args.hosts, rate=args.rate, slots=args.slots, qdisc=args.qdisc,
                   burst=args.burst, latency=args.latency)


def cmd_up(args: argparse.Namespace) -> int:
    tb = make_testbed(args)
    with signals_as_exceptions(), step(f"creating {args.hosts} hosts (run id {tb.run_id})"):
        tb.start()
    mpirun = tb.mpirun([])
    bin_dir = shlex.quote(str(Path(mpirun[0]).parent))
    prefix = (f'OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PATH={bin_dir}:"$PATH" '
              + shlex.join(mpirun))
    print(f"{tb.describe()}\nhostfile: {tb.hostfile}\nmpirun prefix (append your command):\n{prefix}\n"
          f"the hosts stay up; remove them with: python -m pipedap.tools.testbed down --run {tb.run_id}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    which = f"run {args.run}" if args.run is not None else "every testbed run"
    with step(f"removing the namespaces, links and temporary folders of {which}"):
        removed = teardown(args.run)
    print("removed: " + (", ".join(removed) if removed else "nothing (none left)"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("run: give the command after --, e.g. run -- python train.py")
    with signals_as_exceptions():
        tb = make_testbed(args)
        with step(f"creating {args.hosts} hosts (run id {tb.run_id})"):
            tb.start()
        try:
            print(tb.describe(), flush=True)
            argv = tb.mpirun(command, np=args.np)
            print(f"running: {shlex.join(argv)}", flush=True)
            start = time.perf_counter()
            proc = subprocess.Popen(argv, env=tb.env(), start_new_session=True)
            try:
                returncode = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"the command did not finish in {args.timeout} s: stopping it", file=sys.stderr)
                returncode = 124
            finally:
                stop_process_group(proc)  # timeout, Ctrl-C or SIGTERM: stop the whole mpirun job
            print(f"command exited with {returncode} after {time.perf_counter() - start:.1f} s", flush=True)
        finally:
            with step("tearing down"):
                tb.stop()
    return returncode


def cmd_calibrate(args: argparse.Namespace) -> int:
    settings = [{"qdisc": args.qdisc, "burst": burst, "latency": args.latency}
                for burst in args.bursts.split(",")]
    start = time.perf_counter()
    with signals_as_exceptions():
        calibrate(args.hosts, args.rates.split(","), settings, sizes=args.sizes, target=args.target,
                  tcp_seconds=args.tcp_seconds, min_time=args.min_time,
                  json_path=Path(args.json) if args.json else None)
    print(f"calibration took {time.perf_counter() - start:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipedap.tools.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)

    p = sub.add_parser("up", help="create hosts and leave them up; print the hostfile and mpirun prefix")
    add_testbed_options(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="remove what testbeds created (found by name, also after crashes)")
    p.add_argument("--run", type=int, help="only this run id (printed by up); default: every run")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("run", help="create hosts, run a command under mpirun on them, tear down")
    add_testbed_options(p)
    p.add_argument("--np", type=int, help="ranks (default: hosts x slots)")
    p.add_argument("--timeout", type=float, default=3600, help="stop the command after this many seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("calibrate", help="measure TCP and MPI collectives against the nominal rate, tune burst")
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--rates", default="500mbit,250mbit", help="comma-separated nominal rates")
    p.add_argument("--qdisc", default="tbf", choices=("tbf", "htb"))
    p.add_argument("--bursts", default="32kb,256kb,1mb", help="burst sizes to try, in this order")
    p.add_argument("--latency", default="20ms", help="tbf queueing limit")
    p.add_argument("--sizes", default="4m,16m", help="bench_comm buffer sizes (the largest is reported)")
    p.add_argument("--target", type=float, default=0.9, help="fraction of nominal that counts as calibrated")
    p.add_argument("--tcp-seconds", type=float, default=2.0, help="duration of each TCP stream")
    p.add_argument("--min-time", type=float, default=0.25, help="bench_comm seconds per (size, op, system)")
    p.add_argument("--json", help="write every measurement to this file")
    p.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TestbedError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
