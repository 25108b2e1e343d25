"""Calibrate the emulated links: nominal rate against what TCP and two MPI systems achieve.

For each nominal rate, the qdisc settings are tried in order (smallest burst
first: the least bursty link). Each setting is measured with

* a plain TCP stream from every host to the next, all at once (both directions
  of a link with 2 hosts, as a ring uses it), and
* ``pipedap.tools.bench_comm`` under mpirun on the hosts: reduce-scatter, all-gather and
  all-reduce with PipeDAP's comm core and with mpi4py (Open MPI's own algorithms),
  on the same buffers.

Achieved link rate of a collective = its bus bandwidth (bytes each rank sends
per second: algbw * (n-1)/n for RS/AG, 2(n-1)/n for AR) in bits per second.

[Note: what "calibrated" means] Tuning stops at the first setting where the TCP
stream and, for every primitive, at least one of the two MPI systems reach
``target`` of nominal at the largest size: then the link can deliver its rate,
and a system that stays below it does so by its own algorithms or transport.
Every setting tried is reported for both systems, so no choice is hidden. When
no setting passes, the one with the highest worst-case ratio is chosen and the
report says that nominal was not reached.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from pipedap.tools.progress import step
from pipedap.tools.testbed import network, tcpstream
from pipedap.tools.testbed.network import Shaping, TestbedError
from pipedap.tools.testbed.testbed import Testbed

SYSTEMS = ("pipedap", "mpi4py")
OPS = ("reducescatter", "allgather", "allreduce")
SHORT = {"reducescatter": "RS", "allgather": "AG", "allreduce": "AR"}


def measure_tcp(tb: Testbed, seconds: float) -> list[float]:
    """Rates (bit/s) of streams host k -> host k+1, all at once."""
    n = tb.hosts
    streams = [(tb.names[k], tb.names[(k + 1) % n], tb.address((k + 1) % n)) for k in range(n)]
    return tcpstream.measure(streams, seconds=seconds)


def measure_mpi(tb: Testbed, sizes: str, min_time: float, timeout: float) -> list[dict]:
    """bench_comm's rows (both systems, every op and size) on the testbed's hosts."""
    out = tb.folder / "bench_comm.json"
    command = tb.mpirun([sys.executable, "-m", "pipedap.tools.bench_comm", "--sizes", sizes,
                         "--ops", ",".join(OPS), "--min-time", str(min_time), "--repeats", "1",
                         "--json", str(out)])
    try:
        done = subprocess.run(command, env=tb.env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TestbedError(f"bench_comm on the testbed did not finish in {timeout} s: `{' '.join(command)}`; "
                           "lower --sizes or raise the rate") from None
    if done.returncode != 0:
        raise TestbedError(f"bench_comm on the testbed failed (exit {done.returncode}): `{' '.join(command)}`\n"
                           f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(out.read_text())["rows"]


def link_ratios(rows: list[dict], nominal_bps: float) -> dict[str, dict[str, float]]:
    """system -> op -> achieved link rate / nominal, at the largest size measured."""
    largest = max(r["bytes"] for r in rows)
    return {system: {r["op"]: r[system]["busbw_GBps"] * 8e9 / nominal_bps
                     for r in rows if r["bytes"] == largest} for system in SYSTEMS}


def worst_ratio(tcp: float, mpi: dict[str, dict[str, float]]) -> float:
    """The calibration criterion: min of the TCP ratio and, per op, the better system's ratio."""
    return min([tcp] + [max(mpi[s][op] for s in SYSTEMS) for op in OPS])


def calibrate_rate(hosts: int, rate: str, settings: list[Shaping], *, sizes: str, target: float,
                   tcp_seconds: float, min_time: float) -> dict:
    """Try ``settings`` at ``rate`` until one passes; every trial's measurements and the choice."""
    trials = []
    first = settings[0]
    with Testbed(hosts=hosts, rate=rate, qdisc=first.qdisc, burst=first.burst, latency=first.latency) as tb:
        print(f"testbed: {tb.describe()}", flush=True)
        for shaping in settings:
            tb.reshape(shaping)
            with step(f"{shaping.describe()}: TCP stream and bench_comm (sizes {sizes})"):
                tcp = measure_tcp(tb, tcp_seconds)
                rows = measure_mpi(tb, sizes, min_time, timeout=300)
            tcp_ratio = min(tcp) / shaping.rate_bps
            mpi = link_ratios(rows, shaping.rate_bps)
            trial = {"shaping": asdict(shaping), "tcp_bps": tcp, "tcp_ratio": tcp_ratio,
                     "mpi_ratio": mpi, "worst_ratio": worst_ratio(tcp_ratio, mpi), "bench_rows": rows}
            trials.append(trial)
            print("  " + format_trial(trial), flush=True)
            if trial["worst_ratio"] >= target:
                break
        affinity = tb.affinity()
        congestion_control = network.run(["ip", "netns", "exec", tb.names[0], "sysctl", "-n",
                                           "net.ipv4.tcp_congestion_control"]).strip()
    chosen = max(trials, key=lambda t: t["worst_ratio"]) if trials[-1]["worst_ratio"] < target else trials[-1]
    return {"rate": rate, "nominal_bps": settings[0].rate_bps, "trials": trials,
            "chosen": chosen["shaping"], "reached_target": chosen["worst_ratio"] >= target,
            "affinity": {str(k): v for k, v in affinity.items()}, "tcp_congestion_control": congestion_control}


def format_trial(trial: dict) -> str:
    """TCP and per-system, per-op ratios of one trial as one line."""
    parts = [f"TCP {trial['tcp_ratio']:.0%}"]
    for system in SYSTEMS:
        parts.append(f"{system} " + " ".join(f"{SHORT[op]} {trial['mpi_ratio'][system][op]:.0%}" for op in OPS))
    return " | ".join(parts)


def _cell(ratio: float, nominal_bps: float) -> str:
    return f"{ratio * nominal_bps / 1e6:4.0f} ({ratio:3.0%})"


def report(results: list[dict], target: float) -> str:
    """The table: nominal rate against achieved per primitive and system, for the chosen settings."""
    head = (f"{'nominal':>9} {'setting':<34} {'TCP':>10} | "
            + " | ".join(f"{s:<7} " + " ".join(f"{SHORT[op]:>10}" for op in OPS) for s in SYSTEMS))
    lines = [f"achieved rate per link at the largest size, Mbit/s (% of nominal); hosts' TCP congestion "
             f"control: {results[0]['tcp_congestion_control']}", head]
    for result in results:
        trial = next(t for t in result["trials"] if t["shaping"] == result["chosen"])
        nominal = result["nominal_bps"]
        cells = " | ".join(f"{'':<7} " + " ".join(f"{_cell(trial['mpi_ratio'][s][op], nominal):>10}" for op in OPS)
                           for s in SYSTEMS)
        lines.append(f"{result['rate']:>9} {Shaping(**trial['shaping']).describe():<34} "
                     f"{_cell(trial['tcp_ratio'], nominal):>10} | {cells}")
        below = [f"{s} {SHORT[op]}" for s in SYSTEMS for op in OPS if trial["mpi_ratio"][s][op] < target]
        if trial["tcp_ratio"] < target:
            below.insert(0, "TCP")
        if below:
            lines.append(f"{'':>9} below {target:.0%} of nominal: {', '.join(below)}"
                         + ("" if result["reached_target"] else "; no setting tried reached the target"))
    return "\n".join(lines)


def calibrate(hosts: int, rates: list[str], settings: list[dict], *, sizes: str = "4m,16m",
              target: float = 0.9, tcp_seconds: float = 2.0, min_time: float = 0.25,
              json_path: Path | None = None) -> list[dict]:
    """Calibrate every rate; print the table; write everything to ``json_path`` if given.

    ``settings`` are keyword arguments of :class:`Shaping` without the rate, tried in order.
    """
    results = [calibrate_rate(hosts, rate, [Shaping(rate=rate, **s) for s in settings], sizes=sizes,
                              target=target, tcp_seconds=tcp_seconds, min_time=min_time)
               for rate in rates]
    print(report(results, target), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps({"hosts": hosts, "target": target, "sizes": sizes,
                                         "results": results}, indent=2))
        print(f"wrote {json_path}")
    return results
