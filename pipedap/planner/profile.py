"""Per-layer timings of one training iteration: the planner's compute input.

A :class:`Profile` lists layers in forward order (layer 0 runs first in forward, last in
backward). Each layer is the unit the runtime can bucket: a module that owns parameters.
For each it records the backward time `tb`, forward time `tf`, optimizer-update time `u`
(seconds), the gradient bytes and the parameter names. Fusion (:mod:`.fusion`) turns a
layer profile into a group profile of the same type, so schedules only ever see groups.

JSON form::

    {"version": 1, "meta": {...free-form...},
     "layers": [{"name": "conv1", "params": ["conv1.weight"], "nbytes": 37632,
                 "tf": 0.0012, "tb": 0.0025, "u": 0.0001}, ...]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

FILE_VERSION = 1


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
class Profile:
    """Layers in forward order, plus free-form metadata (model, batch size, device...)."""

    layers: tuple[Layer, ...]
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a profile needs at least one layer")
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
        return {"version": FILE_VERSION, "meta": dict(self.meta), "layers": layers}

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
        return cls(tuple(parsed), dict(doc.get("meta", {})))

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
    return Profile(layers, {**first.meta, "agreed": f"elementwise max over {len(profiles)} ranks"})
