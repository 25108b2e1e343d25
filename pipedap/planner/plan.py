"""The plan: which collectives the runtime issues, in which order, for which parameter groups.

Structure (what the runtime consumes)
-------------------------------------
* ``groups``: fused buckets in **forward order** (group 0 holds the first layers). Each has
  the parameter names it holds (in bucket order) and its gradient bytes.
* ``backward``: the submissions to issue during backward, **in issue order**. A submission
  is a tuple of ops, each ``(kind, group)`` with kind ``"rs"``, ``"ag"`` or ``"ar"``. One op
  is a plain collective; several ops form one *merged* (grouped) submission that pays one
  start-up, e.g. ``(("rs", 4), ("ag", 5))``. An ``ag`` in backward runs right behind the RS
  it follows in this list; its input is the finished RS of its own group, always earlier.
  An RS is issued once its group's gradients are all ready and every earlier submission
  has been issued (the engine keeps plan order).
* ``forward``: submissions handed to the engine at ``step()``, in order; ``ag`` ops only.
  The forward pre-hook of group g waits for AG(g) (wherever it was issued), applies the
  update of g, and lets the forward of g run.
* ``sync_before_forward``: True for WFBP: ``step()`` waits for all communication and
  updates every group before the forward (Horovod/DDP behaviour).
* ``chunks``: groups all-reduced in pieces (ByteScheduler): ``{group: n}`` with n >= 2. Such
  a group has n ``ar`` ops; the k-th covers the k-th of n equal, contiguous parts of the
  bucket, so the pieces of different groups can interleave (the earliest layers' first).
* ``split``: groups whose tied word embedding is reduced in two parts (pipedap/tied_split.py):
  the output layer's gradient reduce-scattered as soon as backward makes it, the lookup's
  rows all-gathered where the plan has the group's ``rs``. Each is decoupled. The planner
  splits where its timeline says it is faster; a plan that does not list a group reduces it
  whole.
* ``defer``: split groups whose lookup is served from the reduce-scattered shards
  (pipedap/tied_lookup.py): at the next forward the lookup fetches just its batch's rows, and
  the group's ``ag`` (in the forward list, usually merged with the output layer's group's) is
  waited for, and the group updated, only by the output layer. The runtime issues the fetch
  before the forward list. Each is also in ``split``.

Every group is either decoupled (exactly one ``rs`` and one later ``ag``) or all-reduced
(one ``ar``, or its ``chunks`` count of them). Examples with 3 groups: DeAR is backward ``[rs2], [rs1], [rs0]``,
forward ``[ag0], [ag1], [ag2]``; PipeDAP may give backward ``[rs2], [ag2], [rs1],
[rs0, ag1]``, forward ``[ag0]``; WFBP is backward ``[ar2], [ar1], [ar0]`` with
``sync_before_forward``.

JSON (``Plan.to_json``)::

    {"version": 1, "schedule": "optimal", "world_size": 4, "sync_before_forward": false,
     "inputs_hash": "<sha256 of profile+cost model+options>", "digest": "<Plan.digest()>",
     "groups": [{"index": 0, "name": "conv1+bn1", "nbytes": 37888,
                 "params": ["conv1.weight", "bn1.weight", "bn1.bias"]}, ...],
     "backward": [{"ops": [["rs", 2]], "merged": false, "start": 0.01, "end": 0.02}, ...],
     "forward": [{"ops": [["ag", 0]], "merged": false, "start": 0.05, "end": 0.06}, ...],
     "predicted": {"iteration_time": 0.31, "lower_bound": 0.29},
     "chunks": {"5": 4},                              (only when some group is chunked)
     "split": [0],                                    (only when some group is split)
     "defer": [0]}                                    (only when some group is deferred)

``start``/``end`` are the simulator's predicted times (seconds from the start of backward);
they are informative, the runtime ignores them. ``Plan.load`` validates everything and
names the offending key in its errors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

VERSION = 1
KINDS = ("rs", "ag", "ar")

Op = tuple[str, int]
Submission = tuple[Op, ...]


class PlanError(ValueError):
    """A plan that is malformed, corrupt, or does not belong to the model being wrapped."""


@dataclass(frozen=True)
class Group:
    """One bucket: its parameters (bucket order) and gradient bytes."""

    name: str
    params: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class Prediction:
    """Simulated timings: per submission (backward then forward order) and per iteration."""

    iteration_time: float
    lower_bound: float
    times: tuple[tuple[float, float], ...]  # empty, or one (start, end) per submission


@dataclass(frozen=True)
class Plan:
    """A schedule as data; see the module docstring for the semantics of each field."""

    schedule: str
    world_size: int
    groups: tuple[Group, ...]
    backward: tuple[Submission, ...]
    forward: tuple[Submission, ...]
    sync_before_forward: bool = False
    predicted: Prediction | None = None
    inputs_hash: str = ""
    version: int = VERSION
    chunks: tuple[tuple[int, int], ...] = ()  # (group, pieces) of the chunked groups, by group
    split: tuple[int, ...] = ()  # groups whose tied embedding is reduced in two parts, in order
    defer: tuple[int, ...] = ()  # split groups whose lookup is served from the shards, their ag deferred
    _digest: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", tuple(sorted((int(g), int(n)) for g, n in dict(self.chunks).items())))
        object.__setattr__(self, "split", tuple(sorted({int(g) for g in self.split})))
        check_schedule(len(self.groups), self.backward, self.forward, dict(self.chunks))
        reduced_whole = {g for sub in self.backward for kind, g in sub if kind == "ar"}
        for g in self.split:
            if not 0 <= g < len(self.groups) or g in reduced_whole:
                raise PlanError(f"split lists group {g}; only a reduce-scattered group (0..{len(self.groups) - 1}, "
                                "not all-reduced) can be split")
        object.__setattr__(self, "defer", tuple(sorted({int(g) for g in self.defer})))
        forward_ags = {g for sub in self.forward for kind, g in sub}
        for g in self.defer:
            if g not in self.split or g not in forward_ags:
                raise PlanError(f"defer lists group {g}; only a split group whose ag is in the forward list can "
                                f"be deferred (split: {list(self.split)})")
        count = len(self.backward) + len(self.forward)
        if self.predicted is not None and len(self.predicted.times) not in (0, count):
            raise PlanError(
                f"predicted.times has {len(self.predicted.times)} entries for {count} "
                f"submissions; re-simulate the plan"
            )

    def digest(self) -> str:
        """SHA-256 of what the runtime executes (groups and submissions, not predictions).

        Stable across processes and platforms: ranks compare digests to prove they agree.
        """
        if not self._digest:
            content = {
                "version": self.version,
                "groups": [[list(g.params), g.nbytes] for g in self.groups],
                "backward": [[list(op) for op in sub] for sub in self.backward],
                "forward": [[list(op) for op in sub] for sub in self.forward],
                "sync_before_forward": self.sync_before_forward,
            }
            if self.chunks:  # absent otherwise: the digests of unchunked plans stay what they were
                content["chunks"] = [list(c) for c in self.chunks]
            if self.split:  # (likewise)
                content["split"] = list(self.split)
            if self.defer:  # (likewise)
                content["defer"] = list(self.defer)
            object.__setattr__(self, "_digest", _sha256(content))
        return self._digest

    def sharded(self) -> Plan:
        """This plan as ``shard_update`` runs it: every all-reduce becomes a reduce-scatter in its
        place, and every all-gather (it carries updated parameters) moves to the forward phase,
        because a shard can only be updated once ``step()`` has the whole step (its clipping
        coefficient, its hyperparameters). Fusion and the backward order stay.

        The all-gathers go in group order, the order the next forward needs them, except with
        ``sync_before_forward`` (WFBP): there the forward waits for all of them anyway, so they
        go in the order of the reduce-scatters. ``step()`` then updates first the shards whose
        reduce-scatters ended first, while the last ones are still on the link, instead of
        waiting for the last reduce-scatter (the first layers') with an idle link."""
        if self.chunks:
            raise PlanError(f"plan {self.schedule!r} all-reduces groups in pieces (chunks); a sharded update "
                            "needs each group reduce-scattered whole: use schedule wfbp, dear or pipedap")
        backward = []
        for sub in self.backward:
            ops = tuple(("rs", g) if kind == "ar" else (kind, g) for kind, g in sub if kind != "ag")
            if ops:
                backward.append(ops)
        order = ([g for sub in backward for _, g in sub] if self.sync_before_forward
                 else range(len(self.groups)))
        forward = tuple((("ag", g),) for g in order)
        if tuple(backward) == self.backward and forward == self.forward and not self.split:
            return self
        return Plan(self.schedule, self.world_size, self.groups, tuple(backward), forward,
                    sync_before_forward=self.sync_before_forward, inputs_hash=self.inputs_hash)  # (never split)

    def pieces(self, group: int) -> int:
        """How many ``ar`` ops all-reduce ``group`` (1 unless it is chunked)."""
        return dict(self.chunks).get(group, 1)

    @property
    def params(self) -> list[str]:
        """All parameter names, in group order."""
        return [p for g in self.groups for p in g.params]

    def to_dict(self) -> dict:
        """JSON-ready form (see the module docstring)."""
        times = self.predicted.times if self.predicted else ()

        def submissions(subs: Sequence[Submission], offset: int) -> list[dict]:
            out = []
            for i, sub in enumerate(subs):
                entry: dict = {"ops": [list(op) for op in sub], "merged": len(sub) > 1}
                if times:
                    entry["start"], entry["end"] = times[offset + i]
                out.append(entry)
            return out

        doc = {
            "version": self.version,
            "schedule": self.schedule,
            "world_size": self.world_size,
            "sync_before_forward": self.sync_before_forward,
            "inputs_hash": self.inputs_hash,
            "digest": self.digest(),
            "groups": [
                {"index": i, "name": g.name, "nbytes": g.nbytes, "params": list(g.params)}
                for i, g in enumerate(self.groups)
            ],
            "backward": submissions(self.backward, 0),
            "forward": submissions(self.forward, len(self.backward)),
        }
        if self.predicted:
            doc["predicted"] = {
                "iteration_time": self.predicted.iteration_time,
                "lower_bound": self.predicted.lower_bound,
            }
        if self.chunks:
            doc["chunks"] = {str(g): n for g, n in self.chunks}
        if self.split:
            doc["split"] = list(self.split)
        if self.defer:
            doc["defer"] = list(self.defer)
        return doc

    def to_json(self) -> str:
        """The JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to `path`."""
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str | Mapping, params: Iterable[str] | None = None, where: str = "plan") -> Plan:
        """Parse and validate a plan (JSON text or its dict).

        With `params` (the wrapped model's parameter names) the plan must cover exactly
        those parameters, each once. Raises :class:`PlanError` naming the offending key.
        """
        if isinstance(text, str):
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as err:
                raise PlanError(f"{where}: not valid JSON ({err}); regenerate it with python -m pipedap.tools.plan") from None
        else:
            doc = text
        plan = _parse(doc, where)
        if "digest" in doc and doc["digest"] != plan.digest():
            raise PlanError(
                f"{where}: key 'digest' is {doc['digest']!r} but the groups and submissions hash "
                f"to {plan.digest()!r}: the file was edited or corrupted; regenerate it with "
                f"python -m pipedap.tools.plan"
            )
        if params is not None:
            plan.check_params(params, where)
        return plan

    @classmethod
    def load(cls, path: str | Path, params: Iterable[str] | None = None) -> Plan:
        """Read and validate the plan at `path` (see :meth:`from_json`)."""
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise PlanError(f"cannot read plan {path}: {err}") from None
        return cls.from_json(text, params, where=str(path))

    def check_params(self, params: Iterable[str], where: str = "plan") -> None:
        """Raise :class:`PlanError` unless the groups hold exactly `params`, each once."""
        wanted = list(params)
        known = set(wanted)
        seen: dict[str, str] = {}
        for i, group in enumerate(self.groups):
            for j, name in enumerate(group.params):
                key = f"groups[{i}].params[{j}]"
                if name not in known:
                    raise PlanError(
                        f"{where}: {key} = {name!r} is not a parameter of the model being wrapped; "
                        f"the plan was made for another model: re-plan for this model "
                        f"(python -m pipedap.tools.plan --model NAME ... --out FILE)"
                    )
                if name in seen:
                    raise PlanError(f"{where}: {key} = {name!r} is already in {seen[name]}; each parameter belongs to one group")
                seen[name] = key
        missing = [name for name in wanted if name not in seen]
        if missing:
            raise PlanError(
                f"{where}: key 'groups' lacks {len(missing)} parameter(s) of the model being wrapped, "
                f"first {missing[0]!r}; re-plan for this model (python -m pipedap.tools.plan --model NAME ...)"
            )


def check_schedule(num_groups: int, backward: Sequence[Submission], forward: Sequence[Submission],
                   chunks: Mapping[int, int] | None = None) -> None:
    """Raise :class:`PlanError` unless the submissions form a valid schedule of `num_groups`.

    Valid: every group has exactly one ``ar`` (``chunks[g]`` of them in separate backward
    submissions if it is chunked), or exactly one ``rs`` and one ``ag`` in a later
    submission; ``forward`` holds ``ag`` ops only; groups are in ``0 .. num_groups-1``.
    """
    chunks = dict(chunks or {})
    for g, n in chunks.items():
        if not 0 <= g < num_groups or n < 2:
            raise PlanError(f"chunks: group {g} in {n} pieces; chunked groups are 0..{num_groups - 1}, "
                            "in 2 or more pieces")
    pieces = dict.fromkeys(chunks, 0)
    seen: dict[Op, int] = {}
    for phase, subs, offset in (("backward", backward, 0), ("forward", forward, len(backward))):
        for i, sub in enumerate(subs):
            if not sub:
                raise PlanError(f"{phase}[{i}].ops is empty; a submission needs at least one op")
            for j, op in enumerate(sub):
                key = f"{phase}[{i}].ops[{j}]"
                if not (isinstance(op, tuple) and len(op) == 2 and op[0] in KINDS and isinstance(op[1], int)):
                    raise PlanError(f"{key} = {op!r}: expected [kind, group] with kind one of {KINDS}")
                kind, g = op
                if not 0 <= g < num_groups:
                    raise PlanError(f"{key} names group {g}; the plan has groups 0..{num_groups - 1}")
                if phase == "forward" and kind != "ag":
                    raise PlanError(f"{key} is {kind!r}; only 'ag' ops may be issued in the forward phase")
                if g in chunks and kind == "ar" and phase == "backward" and pieces[g] < chunks[g] and op not in sub[:j]:
                    pieces[g] += 1  # the next piece of a chunked all-reduce
                    seen[op] = offset + i
                    continue
                if op in seen:
                    raise PlanError(f"{key} repeats {kind} of group {g}; each op is issued once"
                                    + (f" (group {g} has {chunks[g]} pieces)" if g in chunks else ""))
                if kind == "ag" and seen.get(("rs", g), offset + i) >= offset + i:
                    raise PlanError(
                        f"{key}: ag of group {g} is not after the rs of group {g}; "
                        f"an all-gather needs its reduce-scatter finished in an earlier submission"
                    )
                seen[op] = offset + i
    for g in range(num_groups):
        has = {kind for kind in KINDS if (kind, g) in seen}
        if g in chunks and (has != {"ar"} or pieces[g] != chunks[g]):
            raise PlanError(f"group {g} is chunked in {chunks[g]} pieces but has {pieces[g]} backward 'ar' ops "
                            f"(and ops {sorted(has)}); a chunked group is all-reduced, one piece per submission")
        if has not in ({"ar"}, {"rs", "ag"}):
            raise PlanError(
                f"group {g} has ops {sorted(has) or 'none'}; each group needs exactly one 'ar', "
                f"or one 'rs' and one 'ag'"
            )


def hash_inputs(*parts: object) -> str:
    """SHA-256 of JSON-ready planner inputs (profile, cost model, options), for provenance."""
    return _sha256(list(parts))


def _sha256(content: object) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _parse(doc: object, where: str) -> Plan:
    """Build a Plan from its dict form; every error names the key to fix."""
    if not isinstance(doc, Mapping):
        raise PlanError(f"{where}: expected a JSON object at the top level")
    if doc.get("version") != VERSION:
        raise PlanError(
            f"{where}: key 'version' is {doc.get('version')!r}, this PipeDAP reads version {VERSION}; "
            f"regenerate the plan with this version's python -m pipedap.tools.plan"
        )
    for key, kind in (("schedule", str), ("world_size", int), ("groups", list), ("backward", list),
                      ("forward", list), ("sync_before_forward", bool)):
        if not isinstance(doc.get(key), kind) or (kind is int and isinstance(doc.get(key), bool)):
            raise PlanError(f"{where}: key {key!r} is missing or not a {kind.__name__}; regenerate the plan")
    groups = []
    for i, entry in enumerate(doc["groups"]):
        key = f"groups[{i}]"
        if not isinstance(entry, Mapping):
            raise PlanError(f"{where}: {key} must be an object with index, name, nbytes, params")
        if entry.get("index") != i:
            raise PlanError(f"{where}: {key}.index is {entry.get('index')!r}, expected {i}; groups are listed in forward order")
        params = entry.get("params")
        if not isinstance(params, list) or not params or not all(isinstance(p, str) for p in params):
            raise PlanError(f"{where}: {key}.params must be a non-empty list of parameter names")
        nbytes = entry.get("nbytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise PlanError(f"{where}: {key}.nbytes must be a non-negative integer, got {nbytes!r}")
        groups.append(Group(str(entry.get("name", f"group{i}")), tuple(params), nbytes))

    times: list[tuple[float, float]] = []
    phases = {}
    for phase in ("backward", "forward"):
        subs = []
        for i, entry in enumerate(doc[phase]):
            key = f"{phase}[{i}]"
            ops = entry.get("ops") if isinstance(entry, Mapping) else None
            if not isinstance(ops, list):
                raise PlanError(f"{where}: {key}.ops must be a list of [kind, group] pairs")
            subs.append(tuple(tuple(op) if isinstance(op, list) else op for op in ops))
            if isinstance(entry.get("start"), (int, float)) and isinstance(entry.get("end"), (int, float)):
                times.append((float(entry["start"]), float(entry["end"])))
        phases[phase] = tuple(subs)
    predicted = None
    if isinstance(doc.get("predicted"), Mapping):
        p = doc["predicted"]
        try:
            complete = len(times) == len(doc["backward"]) + len(doc["forward"])
            predicted = Prediction(float(p["iteration_time"]), float(p["lower_bound"]), tuple(times) if complete else ())
        except (KeyError, TypeError, ValueError):
            raise PlanError(f"{where}: key 'predicted' needs numeric iteration_time and lower_bound") from None
    chunks = doc.get("chunks", {})
    if not isinstance(chunks, Mapping) or not all(
            isinstance(g, str) and g.isdigit() and isinstance(n, int) and not isinstance(n, bool)
            for g, n in chunks.items()):
        raise PlanError(f"{where}: key 'chunks' must map group indices (strings) to piece counts, got {chunks!r}")
    split, defer = doc.get("split", []), doc.get("defer", [])
    for key, value in (("split", split), ("defer", defer)):
        if not isinstance(value, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in value):
            raise PlanError(f"{where}: key '{key}' must be a list of group indices, got {value!r}")
    try:
        return Plan(
            schedule=doc["schedule"],
            world_size=doc["world_size"],
            groups=tuple(groups),
            backward=phases["backward"],
            forward=phases["forward"],
            sync_before_forward=doc["sync_before_forward"],
            predicted=predicted,
            inputs_hash=str(doc.get("inputs_hash", "")),
            version=doc["version"],
            chunks=tuple((int(g), n) for g, n in chunks.items()),
            split=tuple(split),
            defer=tuple(defer),
        )
    except PlanError as err:
        raise PlanError(f"{where}: {err}") from None
