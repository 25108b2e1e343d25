"""What communication costs the core that computes, on the emulated cluster.

    python benchmarks/comm_cpu_cost.py --rate 500mbit --json out/comm_cpu_cost.json

Each emulated host has one core (TESTBED.md), shared by the training thread, the
comm core's engine thread and the kernel's TCP work for that host. This benchmark
times a fixed compute step (forward + backward of a small model) on every rank in
three phases of one job:

* idle:   nothing in flight;
* poll:   one all-reduce in flight that cannot finish (the peer joins only after its
          own compute), so the engine does nothing but wait: the cost of polling;
* stream: after every step each rank submits the all-reduces the link can carry during
          the next one (and waits for the oldest beyond a queue depth, untimed), so the
          link stays busy: the cost of moving bytes (TCP stack, copies, reductions,
          polling), per 100 MB. The link rate reached is printed next to it.

It runs the job once per mode, modes alternating round by round, each mode set
through environment variables. Polling (the comm core's):

* default:    spin 500 us, then sleep with back-off up to 200 us; while only other ranks
              are awaited, up to 10% of the time waited (at most 2 ms; the shipped setting);
* impatient:  the same without the patient sleeps (``PIPEDAP_POLL_PATIENCE=0``: the
              default before [Note: patient waits] in comm_core/src/mpi_util.h);
* busy:       never sleep (``PIPEDAP_POLL_MAX_SLEEP_US=0``), like ``MPI_Waitall``;
* lazy:       no spin, sleep up to 1 ms.

Message sizes (fewer, larger sends: issue 16, item 2). Ring messages stay under Open
MPI's TCP eager limit ([Note: Open MPI's TCP eager limit] in pipedap/engine.py), so
each goes as one eager fragment, without a rendezvous:

* seg2m:      reduce-scatter segments of 2 MiB (``PIPEDAP_SEGMENT_BYTES``; default 1 MiB);
* seg4m:      every ring message 4 MiB, under an 8 MiB eager limit;
* sockbuf:    4 MiB socket buffers each way (``btl_tcp_sndbuf`` / ``rcvbuf``; default:
              the kernel's autotuning).

It prints, per mode, the slowdown of compute in each phase and the CPU time per
100 MB moved each way, and writes everything as JSON. ``--worker`` is the MPI
job itself (the driver starts it under ``python -m pipedap.tools.testbed run``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipedap.units import parse_rate_bps

MODES = {
    "default": {},
    "impatient": {"PIPEDAP_POLL_PATIENCE": "0"},
    "busy": {"PIPEDAP_POLL_MAX_SLEEP_US": "0"},
    "lazy": {"PIPEDAP_POLL_SPIN_US": "0", "PIPEDAP_POLL_MAX_SLEEP_US": "1000"},
    "seg2m": {"PIPEDAP_SEGMENT_BYTES": str(2 << 20)},
    "seg4m": {"PIPEDAP_SEGMENT_BYTES": str(4 << 20), "PIPEDAP_MESSAGE_BYTES": str(4 << 20),
              "OMPI_MCA_btl_tcp_eager_limit": str(8 << 20), "OMPI_MCA_btl_tcp_rndv_eager_limit": str(8 << 20)},
    "sockbuf": {"OMPI_MCA_btl_tcp_sndbuf": str(4 << 20), "OMPI_MCA_btl_tcp_rcvbuf": str(4 << 20)},
}
MODE_VARS = sorted({var for settings in MODES.values() for var in settings})  # cleared before each mode's own
REPO = Path(__file__).resolve().parent.parent


# -- the MPI job ---------------------------------------------------------------------------------

def make_step(args: argparse.Namespace):
    """One compute step: forward and backward of an image model on a fixed batch."""
    import torch

    import models

    if models.info(args.model).kind != "image":
        raise SystemExit(f"comm_cpu_cost: --model {args.model} is not an image model; use e.g. resnet50")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one core per emulated host
    model = models.get(args.model)
    x, y = models.synthetic_batch(args.model, args.batch_size, image_size=args.image_size,
                                  generator=torch.Generator().manual_seed(0))
    loss_fn = models.loss_fn(args.model)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    return step


def timed(step, reps: int, between=None) -> list[float]:
    """Seconds of each of ``reps`` steps; ``between`` runs untimed after each."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if between is not None:
            between()
    return times


class Stream:
    """All-reduces of ``nbytes``: ``per_step`` more after every step, at most ``depth`` left in flight.

    Every rank submits the same sequence whatever its timing (what is submitted never
    depends on what a rank sees finished), so the collectives match across ranks.
    """

    def __init__(self, nbytes: int, per_step: int, depth: int):
        import torch

        import pipedap

        self.pipedap = pipedap
        self.buffers = [torch.ones(nbytes // 4) for _ in range(depth + per_step)]  # none shared in flight
        self.per_step, self.depth = per_step, depth
        self.pending: collections.deque[int] = collections.deque()
        self.waited = self.count = 0

    def after_step(self) -> None:
        for _ in range(self.per_step):
            buffer = self.buffers[self.count % len(self.buffers)]
            self.pending.append(self.pipedap.allreduce_async_(buffer, name=f"stream.{self.count}"))
            self.count += 1
        while len(self.pending) > self.depth:
            self.pipedap.synchronize(self.pending.popleft())
            self.waited += 1

    def finished(self) -> int:
        """All-reduces finished by now (those still pending polled, not waited for)."""
        return self.waited + sum(self.pipedap.poll(h) for h in self.pending)

    def drain(self) -> None:
        while self.pending:
            self.pipedap.synchronize(self.pending.popleft())


def worker(args: argparse.Namespace) -> None:
    import torch

    import pipedap

    pipedap.init()
    rank, world = pipedap.rank(), pipedap.size()
    if world != 2:
        raise SystemExit(f"comm_cpu_cost: run with 2 ranks (one per emulated host), got {world}")
    step = make_step(args)
    warm = timed(step, 3)
    reps = pipedap.broadcast_object(max(3, round(args.seconds / statistics.median(warm))), root_rank=0)
    pipedap.barrier()

    idle = timed(step, reps)

    # poll: on turn r, rank r's (4-byte) all-reduce waits for the peer, which joins after its compute
    poll, idle_beside = [], []
    stuck = torch.ones(1)
    for turn in range(world):
        pipedap.barrier()
        if rank == turn:
            handle = pipedap.allreduce_async_(stuck, name=f"poll.{turn}")
            poll = timed(step, reps)
        else:
            idle_beside = timed(step, reps)
            handle = pipedap.allreduce_async_(stuck, name=f"poll.{turn}")
        pipedap.synchronize(handle)

    # stream: enough all-reduces per step to keep the link busy through the next step
    per_op = args.message_bytes * 2 * (world - 1) / world  # bytes a ring all-reduce moves each way per link
    per_step = pipedap.broadcast_object(
        math.ceil(1.5 * args.rate_bps / 8 * statistics.median(warm) / per_op), root_rank=0)
    pipedap.barrier()
    stream = Stream(args.message_bytes, per_step, depth=2 * per_step)
    stream.after_step()
    start = time.perf_counter()
    streamed = timed(step, reps, between=stream.after_step)
    stream_seconds = time.perf_counter() - start
    finished = stream.finished()
    stream.drain()

    moved_each_way = finished * per_op
    result = {
        "rank": rank, "core": os.environ.get("PIPEDAP_TESTBED_CORE"), "reps": reps,
        "mode_settings": {k: os.environ.get(k) for k in MODE_VARS},
        "step_s": {"idle": statistics.median(idle + idle_beside), "poll": statistics.median(poll),
                   "stream": statistics.median(streamed)},
        "samples": {"idle": idle, "idle_beside_peer_polling": idle_beside, "poll": poll, "stream": streamed},
        "stream": {"seconds": stream_seconds, "bytes_each_way": moved_each_way, "per_step": per_step,
                   "link_bps": 8 * moved_each_way / stream_seconds},
    }
    results = pipedap.allgather_object(result)
    if rank == 0:
        Path(args.worker_json).write_text(json.dumps(results))
    pipedap.shutdown()


# -- the driver ----------------------------------------------------------------------------------

def run_job(args: argparse.Namespace, mode: str, folder: Path, round_: int) -> list[dict]:
    """One testbed job with ``mode``'s settings; the per-rank results."""
    out = folder / f"{mode}-round{round_}.json"
    worker_cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-json", str(out),
                  "--rate-bps", str(parse_rate_bps(args.rate)), "--model", args.model,
                  "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                  "--seconds", str(args.seconds), "--message-bytes", str(args.message_bytes)]
    command = [sys.executable, "-m", "pipedap.tools.testbed", "run", "--hosts", "2", "--rate", args.rate,
               "--timeout", str(args.timeout), "--", *worker_cmd]
    env = {k: v for k, v in os.environ.items() if k not in MODE_VARS}
    env.update(MODES[mode])
    log = folder / f"{mode}-round{round_}.log"
    with open(log, "w") as f:
        proc = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0 or not out.exists():
        raise JobFailed(f"the {mode} job (round {round_ + 1}) failed with exit code {proc.returncode}; "
                        f"its log {log} ends with:\n{log.read_text()[-2000:]}")
    return json.loads(out.read_text())


class JobFailed(RuntimeError):
    """One job did not produce results (the others still count)."""


def summarize(jobs: dict[str, list[list[dict]]]) -> dict[str, dict]:
    """Per mode: median step times over ranks and rounds, slowdowns, CPU seconds per 100 MB moved."""
    summary = {}
    for mode, rounds in jobs.items():
        ranks = [r for job in rounds for r in job]
        if not ranks:
            continue  # every job of this mode failed
        step = {phase: statistics.median(r["step_s"][phase] for r in ranks) for phase in ("idle", "poll", "stream")}
        extra_s = statistics.median((r["step_s"]["stream"] - r["step_s"]["idle"]) * r["reps"] for r in ranks)
        moved = statistics.median(r["stream"]["bytes_each_way"] for r in ranks)
        summary[mode] = {
            "step_s": step,
            "poll_slowdown": step["poll"] / step["idle"] - 1,
            "stream_slowdown": step["stream"] / step["idle"] - 1,
            "link_bps": statistics.median(r["stream"]["link_bps"] for r in ranks),
            "cpu_s_per_100MB": extra_s / (moved / 1e8) if moved else None,
        }
    return summary


def driver(args: argparse.Namespace) -> None:
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"comm_cpu_cost: unknown mode(s) {unknown}; choose from {sorted(MODES)}")
    folder = Path(tempfile.mkdtemp(prefix="pipedap-cpucost-"))
    per_job = 30 + 5 * args.seconds
    print(f"comm_cpu_cost: {args.model} {args.image_size}px batch {args.batch_size}, 2 emulated hosts at "
          f"{args.rate}; modes {', '.join(modes)} x {args.rounds} rounds; about "
          f"{len(modes) * args.rounds * per_job / 60:.0f} min; logs in {folder}", flush=True)
    jobs: dict[str, list[list[dict]]] = {m: [] for m in modes}
    failures = []
    for round_ in range(args.rounds):
        for mode in modes:
            start = time.perf_counter()
            try:
                jobs[mode].append(run_job(args, mode, folder, round_))
                print(f"  round {round_ + 1}/{args.rounds} {mode}: {time.perf_counter() - start:.0f} s", flush=True)
            except JobFailed as err:
                failures.append(str(err))
                print(f"  FAILED: {err}", flush=True)
    summary = summarize(jobs)
    print(f"\n{'mode':9s} {'idle ms':>8s} {'poll ms':>8s} {'(+%)':>6s} {'stream ms':>9s} {'(+%)':>6s} "
          f"{'link Mbit/s':>11s} {'CPU ms per 100 MB':>17s}")
    for mode, s in summary.items():
        st = s["step_s"]
        cpu = f"{1e3 * s['cpu_s_per_100MB']:17.0f}" if s["cpu_s_per_100MB"] is not None else f"{'-':>17s}"
        print(f"{mode:9s} {1e3 * st['idle']:8.1f} {1e3 * st['poll']:8.1f} {100 * s['poll_slowdown']:+6.1f} "
              f"{1e3 * st['stream']:9.1f} {100 * s['stream_slowdown']:+6.1f} {s['link_bps'] / 1e6:11.0f} {cpu}")
    print("CPU ms per 100 MB: extra compute time in the stream phase per 100 MB moved each way by the ring")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "modes": {m: MODES[m] for m in modes},
                                               "summary": summary, "jobs": jobs, "failures": failures}, indent=1))
        print(f"wrote {args.json}")
    if failures:
        raise SystemExit(f"comm_cpu_cost: {len(failures)} of {args.rounds * len(modes)} jobs failed (above)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default="500mbit", help="link rate each way (default 500mbit)")
    parser.add_argument("--modes", default=",".join(MODES), help="modes, comma-separated (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="jobs per mode, modes alternating (default 2)")
    parser.add_argument("--model", default="resnet50", help="the compute step's model (default resnet50)")
    parser.add_argument("--image-size", type=int, default=64, help="its image side (default 64)")
    parser.add_argument("--batch-size", type=int, default=4, help="its batch (default 4)")
    parser.add_argument("--seconds", type=float, default=4.0, help="compute per phase (default 4 s)")
    parser.add_argument("--message-bytes", type=int, default=8 << 20, help="all-reduce size in the stream phase")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per job before it is stopped")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-json", help=argparse.SUPPRESS)
    parser.add_argument("--rate-bps", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker and (args.worker_json is None or args.rate_bps is None):
        parser.error("--worker is started by the driver, with --worker-json and --rate-bps")
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
