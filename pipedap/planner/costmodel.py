"""α-β cost model of the three collectives: ``T(M) = a + b * M`` seconds for M bytes.

One model holds a fit for reduce-scatter (``rs``), all-gather (``ag``) and all-reduce
(``ar``) for one world size on one set of hosts: a fit from another cluster or world size
predicts nothing useful, so files are keyed by both (see :func:`save` / :func:`load`).

Models come from least-squares fits of measured (bytes, seconds) samples (:func:`fit`), or
from assumed link parameters for what-if planning (:func:`from_link`, ring algorithms).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("rs", "ag", "ar")
FILE_VERSION = 1


@dataclass(frozen=True)
class AlphaBeta:
    """``T(M) = a + b * M``: start-up `a` in seconds, `b` in seconds per byte."""

    a: float
    b: float

    def time(self, nbytes: float) -> float:
        """Predicted seconds to move `nbytes` bytes."""
        return self.a + self.b * nbytes


@dataclass(frozen=True)
class FitReport:
    """How well one primitive's α-β line fits its samples (residual = measured - predicted)."""

    samples: int
    rms_residual: float  # seconds
    max_abs_residual: float  # seconds
    rms_relative: float  # rms of residual / measured


@dataclass(frozen=True)
class CostModel:
    """α-β fits of rs, ag and ar for `world_size` workers on `hosts` (empty: unspecified).

    `algorithms`, where measured, is the comm core's choice of ring or MPI per kind and size that the fits
    describe (pipedap.algorithms): ``{"allgather": ((0, "mpi"), (65537, "ring")), ...}``.

    `interference` (σ) is how much compute slows while the link is busy: beside a transfer, compute
    takes ``1 + σ`` times as long (pipedap.interference measures it; the simulator charges it,
    [Note: interference] in pipedap.planner.simulator).
    """

    world_size: int
    rs: AlphaBeta
    ag: AlphaBeta
    ar: AlphaBeta
    hosts: tuple[str, ...] = ()
    algorithms: Mapping[str, tuple[tuple[int, str], ...]] | None = field(default=None, compare=False)
    interference: float = 0.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.interference) or self.interference < 0:
            raise ValueError(f"cost model interference = {self.interference}: must be finite and >= 0 "
                             "(compute's fractional slow-down while the link is busy; 0 = none)")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        for kind in KINDS:
            line = self.of(kind)
            if not (math.isfinite(line.a) and math.isfinite(line.b)) or line.a < 0 or line.b < 0:
                raise ValueError(
                    f"cost model {kind}: a={line.a}, b={line.b}; both must be finite and >= 0"
                )

    def of(self, kind: str) -> AlphaBeta:
        """The line of primitive `kind` ("rs", "ag" or "ar")."""
        if kind not in KINDS:
            raise ValueError(f"unknown primitive {kind!r}; expected one of {KINDS}")
        return getattr(self, kind)

    def to_dict(self) -> dict:
        """JSON-ready form (one entry of a cost-model file)."""
        return {
            "world_size": self.world_size,
            "hosts": list(self.hosts),
            **{kind: {"a": self.of(kind).a, "b": self.of(kind).b} for kind in KINDS},
            **({"algorithms": {k: [list(e) for e in v] for k, v in self.algorithms.items()}}
               if self.algorithms is not None else {}),
            **({"interference": self.interference} if self.interference else {}),
        }

    @classmethod
    def from_dict(cls, entry: Mapping, where: str = "cost model") -> CostModel:
        """Inverse of :meth:`to_dict`; errors name the missing or malformed key."""
        try:
            lines = {kind: AlphaBeta(float(entry[kind]["a"]), float(entry[kind]["b"])) for kind in KINDS}
            algorithms = entry.get("algorithms")
            if algorithms is not None:
                algorithms = {str(k): tuple((int(n), str(a)) for n, a in v) for k, v in algorithms.items()}
            return cls(int(entry["world_size"]), hosts=tuple(entry.get("hosts", ())), algorithms=algorithms,
                       interference=float(entry.get("interference", 0.0)), **lines)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: missing or malformed key {err}; each entry needs world_size and "
                f"rs/ag/ar objects with numeric 'a' and 'b' (and optionally 'algorithms': "
                f"{{kind: [[min_bytes, 'ring' or 'mpi'], ...]}} and a number 'interference')"
            ) from None


def planning_facts(cost: CostModel, source: str, profile_layers: int, interference: float | None = None) -> dict:
    """How a plan was made, as ``DistributedOptimizer.planning`` and the bench's JSON report it: the
    cost model it simulated (:meth:`CostModel.to_dict`), where that model came from, the profile's
    layer (or bucket) count, and the interference σ measured for it (None when not measured)."""
    return {"cost_model": cost.to_dict(), "cost_source": source, "profile_layers": profile_layers,
            "interference": interference}


def from_link(workers: int, bandwidth: float, latency: float) -> CostModel:
    """Ring-algorithm model for `workers` on links of `bandwidth` bytes/s and `latency` s.

    RS and AG take p-1 steps each moving M/p bytes; AR is an RS followed by an AG:
    ``T_rs = T_ag = (p-1) L + (p-1)/p M/B``, ``T_ar = 2 (p-1) L + 2 (p-1)/p M/B``.
    """
    if workers < 1 or bandwidth <= 0 or latency < 0:
        raise ValueError(
            f"need workers >= 1, bandwidth > 0, latency >= 0; got {workers}, {bandwidth}, {latency}"
        )
    p = workers
    half = AlphaBeta((p - 1) * latency, (p - 1) / p / bandwidth)
    return CostModel(p, rs=half, ag=half, ar=AlphaBeta(2 * half.a, 2 * half.b))


def fit_line(samples: Sequence[tuple[float, float]]) -> tuple[AlphaBeta, FitReport]:
    """Least-squares α-β line through (bytes, seconds) samples, constrained to a, b >= 0.

    [Note: relative residuals]
    Message sizes span orders of magnitude; plain least squares would fit the large messages
    and leave the start-up `a` to noise. Each sample is weighted by 1/seconds, so the fit
    minimises relative error and small messages pin down `a`.

    [Note: non-negative fit]
    Noise can still make the intercept negative, which would reward splitting messages.
    If a (or b) comes out negative it is fixed at 0 and the other coefficient refitted
    alone (the constrained weighted least-squares optimum).

    [Note: links that are not a line]
    A rate-limited link with a burst allowance (a token bucket, as the emulated cluster's
    tbf, or a switch with deep buffers) passes small messages at line rate and large ones at
    the limit: at 125 Mbit/s, a 16 KiB reduce-scatter took 0.15 ms (110 MB/s) and 64 MiB
    took 2.37 s (28 MB/s). No line fits both; the relative fit then comes out with a < 0,
    and with a fixed at 0 its b is dominated by the fastest bytes per second: it predicted
    half the measured time for large messages (rms relative residual 51%), so a 102 MB
    iteration's all-reduce was predicted at 0.65x. So when the fit over all sizes leaves an
    rms relative residual above POOR_FIT, the line is refitted on the larger half of the
    distinct sizes, those that carry a training step's buckets: small messages are then
    overestimated, which costs little, instead of large ones underestimated. The report
    is of the fit kept, over the samples it used.
    """
    data = np.asarray(samples, dtype=float)
    if data.ndim != 2 or data.shape[1] != 2 or len(np.unique(data[:, 0])) < 2:
        raise ValueError(
            "fit needs (bytes, seconds) pairs at two or more distinct sizes; "
            "run the microbenchmark over a range of message sizes"
        )
    if np.any(data[:, 1] <= 0):
        raise ValueError("fit needs positive times; drop samples that measured 0 seconds")
    line, report = _relative_fit(data)
    sizes = np.unique(data[:, 0])
    if report.rms_relative > POOR_FIT and len(sizes) >= 4:  # [Note: links that are not a line]
        large = data[data[:, 0] >= sizes[len(sizes) // 2]]
        refit = _relative_fit(large)
        if refit[1].rms_relative < report.rms_relative:
            return refit
    return line, report


POOR_FIT = 0.2  # rms relative residual above which the larger sizes are fitted alone


def _relative_fit(data: np.ndarray) -> tuple[AlphaBeta, FitReport]:
    """The non-negative, relative-error α-β fit of (bytes, seconds) rows, with its residuals."""
    m, t = data[:, 0], data[:, 1]
    weight = 1.0 / t
    (a, b), *_ = np.linalg.lstsq(np.column_stack([weight, m * weight]), np.ones_like(t), rcond=None)
    if a < 0:
        a, b = 0.0, float(np.sum(m / t) / np.sum((m / t) ** 2))
    if b < 0:
        a, b = float(np.sum(1 / t) / np.sum(1 / t**2)), 0.0
    line = AlphaBeta(float(a), float(b))
    residual = t - (line.a + line.b * m)
    report = FitReport(
        samples=len(t),
        rms_residual=float(np.sqrt(np.mean(residual**2))),
        max_abs_residual=float(np.max(np.abs(residual))),
        rms_relative=float(np.sqrt(np.mean((residual / t) ** 2))),
    )
    return line, report


def fit(
    samples: Mapping[str, Sequence[tuple[float, float]]],
    world_size: int,
    hosts: Iterable[str] = (),
    algorithms: Mapping[str, tuple[tuple[int, str], ...]] | None = None,
) -> tuple[CostModel, dict[str, FitReport]]:
    """Fit rs, ag and ar from per-primitive (bytes, seconds) samples; also returns residuals."""
    missing = [kind for kind in KINDS if kind not in samples]
    if missing:
        raise ValueError(f"no samples for {missing}; need samples for each of {KINDS}")
    fitted = {kind: fit_line(samples[kind]) for kind in KINDS}
    model = CostModel(world_size, hosts=tuple(sorted(hosts)), algorithms=algorithms,
                      **{k: v[0] for k, v in fitted.items()})
    return model, {kind: fitted[kind][1] for kind in KINDS}


def save(model: CostModel, path: str | Path) -> None:
    """Add `model` to the file at `path`, replacing an entry with the same world size and hosts."""
    path = Path(path)
    entries = _read_entries(path) if path.exists() else []
    key = (model.world_size, tuple(model.hosts))
    entries = [e for e in entries if (e["world_size"], tuple(e.get("hosts", ()))) != key]
    entries.append(model.to_dict())
    entries.sort(key=lambda e: (e["world_size"], e.get("hosts", [])))
    path.write_text(json.dumps({"version": FILE_VERSION, "entries": entries}, indent=2) + "\n")


def load(path: str | Path, world_size: int, hosts: Iterable[str] | None = None) -> CostModel:
    """The model for `world_size` (and `hosts`, if given) from the file at `path`.

    With `hosts` None the file must hold exactly one entry for that world size.
    """
    entries = _read_entries(Path(path))
    matches = [e for e in entries if e["world_size"] == world_size]
    if hosts is not None:
        wanted = sorted(hosts)
        matches = [e for e in matches if sorted(e.get("hosts", [])) == wanted]
    available = ", ".join(f"{e['world_size']} workers on {e.get('hosts') or 'unnamed hosts'}" for e in entries)
    if not matches:
        raise ValueError(
            f"{path}: no cost model for {world_size} workers"
            + (f" on hosts {sorted(hosts)}" if hosts is not None else "")
            + f" (file has: {available or 'nothing'}); fit one on this cluster at this world size"
        )
    if len(matches) > 1:
        raise ValueError(f"{path}: several cost models for {world_size} workers ({available}); pass hosts")
    return CostModel.from_dict(matches[0], where=str(path))


def _read_entries(path: Path) -> list[dict]:
    """The validated list of entries of a cost-model file."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read cost-model JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{path}: expected {{'version': {FILE_VERSION}, 'entries': [...]}}")
    for i, entry in enumerate(doc["entries"]):
        CostModel.from_dict(entry, where=f"{path}: entries[{i}]")
    return doc["entries"]
