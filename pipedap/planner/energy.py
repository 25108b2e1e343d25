"""Busy and idle time of each device in an iteration, and the energy they draw.

A worker has two devices here: the one that computes (GPU or CPU cores) and its link (NIC).
In an iteration of ``T`` seconds a device is busy ``B`` seconds and idle ``T - B``; with power
``P_busy`` and ``P_idle`` (watts) it draws ``P_busy * B + P_idle * (T - B)`` joules. The busy
times are the same under every schedule (the same compute, the same bytes), so a schedule
that finishes sooner saves the idle power of the time it saves: the energy argument of the
PipeDAP paper, made explicit. Powers are the user's: a device's busy and idle draw from its
data sheet or a power meter (``nvidia-smi``, RAPL).

    --power busy=300,idle=60                        the compute device; the link draws nothing
    --power busy=300,idle=60,link_busy=10,link_idle=5
    --power powers.json                             {"compute": {"busy": 300, "idle": 60},
                                                     "link": {"busy": 10, "idle": 5}}
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipedap.planner.simulator import Timeline

KEYS = ("busy", "idle", "link_busy", "link_idle")  # --power's key=W pairs (the compute device's, the link's)
ACCEPTED = ("busy=W,idle=W[,link_busy=W,link_idle=W] (watts, numbers >= 0), or a JSON file "
            '{"compute": {"busy": W, "idle": W}, "link": {"busy": W, "idle": W}}')


@dataclass(frozen=True)
class Power:
    """A device's draw in watts while busy and while idle."""

    busy_w: float
    idle_w: float


@dataclass(frozen=True)
class Powers:
    compute: Power
    link: Power = Power(0.0, 0.0)

    def describe(self) -> str:
        c, link = self.compute, self.link
        return f"compute {c.busy_w:g}/{c.idle_w:g} W, link {link.busy_w:g}/{link.idle_w:g} W (busy/idle)"

    @classmethod
    def from_dict(cls, data: dict) -> Powers:
        """The inverse of :meth:`to_dict` (a sweep's recorded powers)."""
        return cls(*(Power(float(data[d]["busy"]), float(data[d]["idle"])) for d in ("compute", "link")))

    def to_dict(self) -> dict:
        return {device: {"busy": p.busy_w, "idle": p.idle_w} for device, p in (("compute", self.compute),
                                                                             ("link", self.link))}


def parse_power(text: str) -> Powers:
    """``--power``'s value: key=watts pairs, or a JSON file (see the module docstring)."""
    where = f"--power {text!r}"
    if Path(text).suffix == ".json" or Path(text).is_file():
        try:
            data = json.loads(Path(text).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read it as JSON ({e}); expected {ACCEPTED}") from None
        if not isinstance(data, dict) or not set(data) <= {"compute", "link"} or "compute" not in data:
            raise ValueError(f"{where}: the JSON needs a 'compute' entry (and may have 'link'), got "
                             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}; expected {ACCEPTED}")
        pairs = {}
        for device, entry in data.items():
            if not isinstance(entry, dict) or set(entry) != {"busy", "idle"}:
                raise ValueError(f"{where}: {device!r} must be {{\"busy\": W, \"idle\": W}}, got {entry!r}")
            pairs.update({("" if device == "compute" else "link_") + k: v for k, v in entry.items()})
    else:
        pairs = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in KEYS:
                raise ValueError(f"{where}: {item!r} is not one of {', '.join(k + '=W' for k in KEYS)}; "
                                 f"expected {ACCEPTED}")
            pairs[key] = value
    watts = {}
    for key, value in pairs.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{where}: {key}={value!r} must be a number of watts >= 0")
        watts[key] = number
    for need in (("busy", "idle"), ("link_busy", "link_idle")):
        if len(set(need) & set(watts)) == 1:
            raise ValueError(f"{where}: give both {need[0]} and {need[1]} (got only one); expected {ACCEPTED}")
    if "busy" not in watts:
        raise ValueError(f"{where}: the compute device's busy= and idle= are needed; expected {ACCEPTED}")
    link = Power(watts["link_busy"], watts["link_idle"]) if "link_busy" in watts else Power(0.0, 0.0)
    return Powers(Power(watts["busy"], watts["idle"]), link)


def power_argument(text: str) -> Powers:
    """``parse_power`` for argparse's ``type=``: its message, not argparse's generic one."""
    try:
        return parse_power(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class Occupancy:
    """One worker's iteration: its length and how long each device is busy in it (None: not known)."""

    iteration_s: float
    compute_busy_s: float
    link_busy_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("iteration_s", "compute_busy_s", "link_busy_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Occupancy.{name} = {value}: must be a finite number of seconds >= 0")

    @classmethod
    def of_timeline(cls, timeline: Timeline) -> Occupancy:
        """From a simulated iteration: the compute stream's blocks, and the link's transfers."""
        compute = sum(end - start for _, start, end in timeline.compute_spans())
        return cls(timeline.iteration_time, compute, timeline.link_busy)

    def idle_s(self, busy_s: float) -> float:
        """Idle time of a device busy ``busy_s``; a busy time longer than the iteration (a measurement
        taken apart from it) counts the whole iteration as busy."""
        return max(0.0, self.iteration_s - busy_s)


def estimate(occupancy: Occupancy, powers: Powers | None, samples: int) -> dict:
    """One worker's iteration: ``seconds``, each device's ``busy_s`` and ``idle_s`` and, with ``powers``,
    its ``joules``, the total ``joules`` and ``joules_per_sample`` (``samples``: the worker's samples
    in the iteration)."""
    if samples < 1:
        raise ValueError(f"samples = {samples}: an iteration processes at least one sample")
    devices = {"compute": (occupancy.compute_busy_s, powers.compute if powers else None)}
    if occupancy.link_busy_s is not None:
        devices["link"] = (occupancy.link_busy_s, powers.link if powers else None)
    out: dict = {"seconds": occupancy.iteration_s}
    total = 0.0
    for device, (busy, power) in devices.items():
        busy = min(busy, occupancy.iteration_s)
        idle = occupancy.idle_s(busy)
        entry = {"busy_s": busy, "idle_s": idle}
        if power is not None:
            entry["joules"] = power.busy_w * busy + power.idle_w * idle
            total += entry["joules"]
        out[device] = entry
    if powers is not None:
        out.update(joules=total, joules_per_sample=total / samples, power=powers.to_dict())
    return out


def job_estimate(powers: Powers, ranks: int, samples_per_s: float, compute_per_sample_s: float,
                 link_per_sample_s: float) -> dict:
    """A whole job in steady state, from its throughput: the share of time its devices are busy,
    its draw in watts and the joules per sample.

    ``compute_per_sample_s``: one device's compute for one sample (forward, backward, update);
    ``link_per_sample_s``: one link's transfer time for one sample's bytes. Per second the job's
    ``ranks`` compute devices are busy ``samples_per_s * compute_per_sample_s`` device-seconds
    (at most ``ranks``) and idle the rest; the same for the links. This holds for data and
    pipeline parallelism alike, so their joules per sample compare.
    """
    if ranks < 1 or not samples_per_s > 0:
        raise ValueError(f"job_estimate: ranks = {ranks}, samples_per_s = {samples_per_s}: need >= 1 and > 0")
    out, watts = {}, 0.0
    for device, per_sample, power in (("compute", compute_per_sample_s, powers.compute),
                                      ("link", link_per_sample_s, powers.link)):
        busy = min(float(ranks), samples_per_s * per_sample)
        watts += power.busy_w * busy + power.idle_w * (ranks - busy)
        out[f"{device}_busy_share"] = busy / ranks
    return {**out, "watts": watts, "joules_per_sample": watts / samples_per_s}


def describe(estimate_: dict) -> str:
    """One line: each device's busy share, and the energy when powers were given."""
    parts = [f"{device} busy {e['busy_s'] * 1e3:.1f} ms / idle {e['idle_s'] * 1e3:.1f} ms"
             for device, e in estimate_.items() if isinstance(e, dict) and "busy_s" in e]
    line = ", ".join(parts)
    if "joules" in estimate_:
        line += f"; energy {estimate_['joules']:.4g} J, {estimate_['joules_per_sample']:.4g} J per sample"
    return line
