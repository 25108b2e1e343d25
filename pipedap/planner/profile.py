"""Per-layer timings of one training iteration: the planner's compute input.

A :class:`Profile` lists layers in forward order (layer 0 runs first in forward, last in
backward). Each layer is the unit the runtime can bucket: a module that owns parameters.
For each it records the backward time `tb`, forward time `tf`, optimizer-update time `u`
(seconds), the gradient bytes and the parameter names. Fusion (:mod:`.fusion`) turns a
layer profile into a group profile of the same type, so schedules only ever see groups.

[Note: a bucket's fixed cost]
Besides its layers' work, every bucket costs the training thread a fixed amount per
step, whatever its size: one optimizer call (the per-call part of its update), building
and submitting its collectives and waiting for them. ``bucket_cost`` is that time; each
layer's ``u`` is its update without the per-call part. The simulator charges
``bucket_cost`` once per group, with the group's update, so fusing k layers saves k-1
of them. On CPU hosts it is a fraction of a millisecond beside seconds of compute; on a
GPU it can be most of a step (0.4-0.5 ms per bucket on one H200, benchmarks/results/gpu_h200).

[Note: ties in a profile]
A word embedding tied to an output layer is reduced in two parts (pipedap/tied_split.py): the
output layer's gradient as soon as backward has made it, then the lookup's non-zero rows.
A :class:`Tie` tells the planner so: the parameter, a parameter of the output layer (its
group's readiness is when the dense part is ready; "" when the output layer has no other
parameter: then the first group ready in backward) and the bytes of rows each rank sends.
Where the runtime computes the output layer's gradient itself (an ``nn.Linear``: see
[Note: the dense part in pieces] in pipedap/tied_split.py) the dense part leaves in
``pieces`` reduce-scatters while that layer's backward still runs: the first is ready
``early`` seconds before the output layer's group is, the last ``span`` seconds after the
first (the online planner measures both; 0, 0 and 1 say: whole, when the group is ready).
``deferrable`` says the runtime can serve the lookup's rows from the reduce-scattered shards, so
that the parameter's all-gather may wait for the output layer ([Note: the lookup served from the
shards] in pipedap/tied_lookup.py; the online planner sets it where the runtime can).
The simulator uses it where the runtime splits: the parameter alone in its group, reduce-
scattered and all-gathered (not all-reduced), the update not sharded. A profile of a job
that will not split (``PIPEDAP_TIED_SPLIT=0``, compression) has no ties.

JSON form::

    {"version": 1, "meta": {...free-form...}, "bucket_cost": 0.0002,
     "layers": [{"name": "conv1", "params": ["conv1.weight"], "nbytes": 37632,
                 "tf": 0.0012, "tb": 0.0025, "u": 0.0001}, ...],
     "ties": [{"param": "emb.weight", "user": "decoder.bias", "rows_bytes": 3153920,
               "early": 0.41, "span": 0.35, "pieces": 8, "deferrable": true}]}   (the last four optional)
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

FILE_VERSION = 1
# The output layer of a deferred tie computes the rows of each other rank's block in this many pieces, each
# as soon as the all-gather has delivered it ([Note: the output layer's own rows first] in
# pipedap/tied_lookup.py; the planner's ``output_rest``).
OUTPUT_PIECES = 8


@dataclass(frozen=True)
class Layer:
    """One layer (or fused group): times in seconds, gradient size in bytes."""

    name: str
    params: tuple[str, ...]
    nbytes: int
    tf: float
    tb: float
    u: float = 0.0


@dataclass(frozen=True)
class Tie:
    """A parameter reduced in two parts ([Note: ties in a profile])."""

    param: str
    user: str  # a parameter of the output layer; "" for the first group ready in backward
    rows_bytes: int  # what each rank all-gathers at the end of backward (rows and their indices)
    early: float = 0.0  # s: the dense part's first piece is ready this long before the user's group
    span: float = 0.0  # s: from the first piece ready to the last
    pieces: int = 1  # reduce-scatters the dense part is sent in
    deferrable: bool = False  # the lookup can be served from the shards, the all-gather deferred

    @property
    def output_forward(self) -> float:
        """Seconds of the output layer's forward product, estimated from its weight gradient's pieces (a product
        of the same size): ``span`` covers all but the first of them; 0 (unknown) for a gradient made whole."""
        return self.span * self.pieces / (self.pieces - 1) if self.pieces > 1 else 0.0

    def timed(self, runs: Sequence[tuple[float, float]], pieces: int) -> Tie:
        """This tie sent in ``pieces``, with the median ``early`` and ``span`` of the measured ``runs`` (each an
        (early, span) pair; a negative early counts as 0); itself where nothing was measured."""
        if not runs:
            return self
        return replace(self, early=max(0.0, statistics.median(e for e, _ in runs)),
                       span=statistics.median(s for _, s in runs), pieces=pieces)

    def user_group(self, groups: Sequence[Sequence[str]]) -> int | None:
        """Which of ``groups`` (parameter names, forward order) makes the dense part: the one holding ``user``,
        or, for "", the last (the first ready in backward); None if none holds it."""
        if not self.user:
            return len(groups) - 1
        return next((i for i, params in enumerate(groups) if self.user in params), None)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.early) and math.isfinite(self.span) and self.early >= 0 and self.span >= 0):
            raise ValueError(f"tie {self.param}: early = {self.early}, span = {self.span}; both must be finite "
                             "and >= 0 s")
        if self.pieces < 1:
            raise ValueError(f"tie {self.param}: pieces = {self.pieces}; the dense part needs at least one")


@dataclass(frozen=True)
class Profile:
    """Layers in forward order, free-form metadata (model, batch size, device...) and the
    seconds each bucket costs the training thread per step ([Note: a bucket's fixed cost])."""

    layers: tuple[Layer, ...]
    meta: Mapping[str, object] = field(default_factory=dict)
    bucket_cost: float = 0.0
    ties: tuple[Tie, ...] = ()  # [Note: ties in a profile]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a profile needs at least one layer")
        if not math.isfinite(self.bucket_cost) or self.bucket_cost < 0:
            raise ValueError(f"bucket_cost = {self.bucket_cost}: a bucket's fixed cost must be finite and >= 0 s")
        for i, layer in enumerate(self.layers):
            for key in ("tf", "tb", "u"):
                value = getattr(layer, key)
                if not math.isfinite(value) or value < 0:
                    raise ValueError(f"layers[{i}].{key} = {value}: times must be finite and >= 0")
            if layer.nbytes < 0:
                raise ValueError(f"layers[{i}].nbytes = {layer.nbytes}: must be >= 0")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> list[str]:
        """All parameter names, in layer order."""
        return [p for layer in self.layers for p in layer.params]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        layers = [{**asdict(layer), "params": list(layer.params)} for layer in self.layers]
        doc = {"version": FILE_VERSION, "meta": dict(self.meta), "layers": layers}
        if self.bucket_cost:  # (absent when 0: the hashes of plans from such profiles stay what they were)
            doc["bucket_cost"] = self.bucket_cost
        if self.ties:  # (likewise)
            whole = Tie("", "", 0)  # (a whole dense part's keys are left out, likewise)
            doc["ties"] = [{k: v for k, v in asdict(tie).items() if k in ("param", "user", "rows_bytes")
                            or v != getattr(whole, k)} for tie in self.ties]
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping, where: str = "profile") -> Profile:
        """Inverse of :meth:`to_dict`; errors name the offending key."""
        if not isinstance(doc, Mapping) or doc.get("version") != FILE_VERSION:
            raise ValueError(f"{where}: expected a profile object with 'version': {FILE_VERSION}")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ValueError(f"{where}: 'layers' must be a list of layer objects")
        parsed = []
        for i, entry in enumerate(layers):
            try:
                parsed.append(
                    Layer(
                        name=str(entry["name"]),
                        params=tuple(str(p) for p in entry["params"]),
                        nbytes=int(entry["nbytes"]),
                        tf=float(entry["tf"]),
                        tb=float(entry["tb"]),
                        u=float(entry.get("u", 0.0)),
                    )
                )
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{where}: layers[{i}] has a missing or malformed key ({err}); each layer "
                    f"needs name, params (list of str), nbytes (int), tf, tb and optionally u"
                ) from None
        try:
            bucket_cost = float(doc.get("bucket_cost", 0.0))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'bucket_cost' must be a number of seconds, got {doc['bucket_cost']!r}") from None
        try:
            ties = tuple(Tie(str(t["param"]), str(t["user"]), int(t["rows_bytes"]), float(t.get("early", 0.0)),
                             float(t.get("span", 0.0)), int(t.get("pieces", 1)), _flag(t.get("deferrable", False)))
                         for t in doc.get("ties", ()))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where}: 'ties' must be a list of {{param, user, rows_bytes[, early, span, pieces, "
                             f"deferrable]}} objects ({err})") from None
        return cls(tuple(parsed), dict(doc.get("meta", {})), bucket_cost, ties)

    def save(self, path: str | Path) -> None:
        """Write the JSON form to `path`."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save`."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read profile JSON: {err}") from None
        return cls.from_dict(doc, where=str(path))


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"deferrable = {value!r}: expected true or false")
    return value


def layer_times(size: int, spans: Mapping[int, tuple[float, float]], forward_end: float,
                ready: Mapping[int, float]) -> tuple[list[float], list[float]]:
    """Forward and backward time of each of `size` layers (forward order) in one iteration, from hook times.

    ``spans[g] = (enter, leave)``: when the forward reached layer g and when g's own compute
    began (after its pre-hook waited for an all-gather and applied the update; the same time
    where the hook only records it). ``forward_end``: when the forward ended and backward
    began. ``ready[g]``: when g's gradients were all complete. The profiler and the online
    planner both turn their hook times into layer times here. A layer missing from `spans`
    (or `ready`) gets no forward (or backward) time.

    Forward: the compute from a layer's `leave` until the forward reaches the next layer (in
    time order; `forward_end` after the last) is that layer's, parameter-free modules included.

    [Note: backward attribution]
    Backward runs from `forward_end`; in backward order (g = size-1 .. 0) layer g's time is
    the span from the latest readiness among layers g+1 .. size-1 to its own, or 0 if it was
    ready earlier. This is the only rule under which the simulator's
    ``ready[g] = tb[size-1] + ... + tb[g]`` equals the measured max over h >= g of ready[h]:
    when the runtime can actually start RS(g), since every plan issues the backward
    collectives in order size-1 .. 0 and RS(g) waits for those before it. Charging the spans
    in completion order instead (the span before each readiness to the layer that became
    ready) gives the same total, but when a layer finishes before a later one (shared
    inputs, reuse) its prefix sum falls before its actual readiness: the simulator would
    start a reduce-scatter before its gradients exist and predict too short an iteration.
    """
    tf, tb = [0.0] * size, [0.0] * size
    order = sorted(spans, key=lambda g: spans[g][0])
    for g, after in zip(order, [*(spans[h][0] for h in order[1:]), forward_end]):
        tf[g] = max(0.0, after - spans[g][1])
    previous = forward_end
    for g in reversed(range(size)):
        if g in ready:
            finished = max(ready[g], previous)
            tb[g], previous = finished - previous, finished
    return tf, tb


def elementwise_max(profiles: Sequence[Profile]) -> Profile:
    """The profile whose every time is the maximum over `profiles` (one per rank).

    All ranks must plan from the same numbers; the maximum is a conservative agreement.
    The profiles must describe the same layers (names, parameters, bytes) in the same order.
    """
    if not profiles:
        raise ValueError("elementwise_max needs at least one profile")
    first = profiles[0]
    for rank, other in enumerate(profiles[1:], start=1):
        if len(other) != len(first):
            raise ValueError(f"rank {rank} profiled {len(other)} layers, rank 0 {len(first)}")
        for i, (a, b) in enumerate(zip(first.layers, other.layers)):
            if (a.name, a.params, a.nbytes) != (b.name, b.params, b.nbytes):
                raise ValueError(
                    f"layers[{i}] differs between rank 0 ({a.name}, {a.nbytes} B) and rank {rank} "
                    f"({b.name}, {b.nbytes} B); all ranks must wrap the same model"
                )
    layers = tuple(
        replace(
            layer,
            tf=max(p.layers[i].tf for p in profiles),
            tb=max(p.layers[i].tb for p in profiles),
            u=max(p.layers[i].u for p in profiles),
        )
        for i, layer in enumerate(first.layers)
    )
    def agreed(tie: Tie) -> Tie:  # the latest any rank has its parts ready
        same = [t for p in profiles for t in p.ties if t.param == tie.param]
        return replace(tie, rows_bytes=max(t.rows_bytes for t in same), early=min(t.early for t in same),
                       span=max(t.span for t in same), deferrable=all(t.deferrable for t in same))

    ties = tuple(agreed(tie) for tie in first.ties)
    return Profile(layers, {**first.meta, "agreed": f"elementwise max over {len(profiles)} ranks"},
                   max(p.bucket_cost for p in profiles), ties)
