"""Measured timelines: a Chrome trace of compute phases and collectives, and its Gantt chart.

A :class:`Recorder` on each rank notes the compute phases of every training batch
(forward, backward, step) and, through ``engine.add_completion_listener``, every collective
with its enqueue, start and end times, all on the ``time.monotonic_ns`` clock. Rank 0
gathers the ranks' events and writes one Chrome-trace JSON file (open it in
https://ui.perfetto.dev or chrome://tracing) with

* one process per rank: a ``compute`` thread (forward, backward, step slices) and a
  ``communication`` thread (one slice per collective, from start to end; its enqueue time
  and queueing delay in ``args``);
* one ``predicted`` process when the plan came from the planner: the simulated link
  submissions of every measured batch, placed from that batch's backward start on rank 0.

Times are microseconds from an origin each rank takes right after a common barrier, so
ranks on different hosts line up to within the barrier's skew.

``python -m pipedap.tools.timeline TRACE --out chart.png`` draws one batch of a trace: every
rank's compute and communication lanes above the predicted link lane. ``--link`` prints instead
how busy each rank's link was in each batch and its longest idle stretch, with the collectives
around it: where a schedule leaves the link waiting for compute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPUTE_TID, COMM_TID = 0, 1
PHASES = ("forward", "backward", "step")
COMM_KINDS = {"reducescatter": "RS", "allgather": "AG", "allreduce": "AR"}


class Recorder:
    """One rank's compute phases and collectives while ``recording`` is on.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called at each phase boundary so that a
    phase's end is when its GPU work ended, not when it was queued.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.recording = False
        self.origin_ns = 0
        self.batch = -1
        self.phases: list[tuple[str, int, int, int]] = []  # (name, batch, start_ns, end_ns)
        self.ops: list[Any] = []  # engine.CompletedOp (or anything with the same fields)

    def start(self) -> None:
        """Record from now on; now is the origin of this rank's times (take it after a barrier)."""
        self.origin_ns = time.monotonic_ns()
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def next_batch(self) -> None:
        self.batch += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as compute phase ``name`` of the current batch."""
        if not self.recording:
            yield
            return
        if self.sync:
            self.sync()
        start = time.monotonic_ns()
        yield
        if self.sync:
            self.sync()
        self.phases.append((name, self.batch, start, time.monotonic_ns()))

    def on_ops(self, ops: Sequence[Any]) -> None:
        """Completion listener: keep the collectives enqueued since :meth:`start`.

        (Earlier ones, e.g. the forward all-gathers of an untimed batch, may finish later.)
        """
        if self.recording:
            self.ops.extend(op for op in ops if op.enqueue_ns >= self.origin_ns)

    def phase_means_ms(self) -> dict[str, float]:
        """Mean duration of each phase, in milliseconds."""
        out = {}
        for name in PHASES:
            spans = [end - start for n, _, start, end in self.phases if n == name]
            if spans:
                out[name] = sum(spans) / len(spans) / 1e6
        return out

    def events(self, rank: int) -> list[dict]:
        """This rank's Chrome-trace events, times in microseconds from the origin."""
        def us(ns: int) -> float:
            return (ns - self.origin_ns) / 1e3

        events = [
            {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}},
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": COMPUTE_TID, "args": {"name": "compute"}},
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": COMM_TID, "args": {"name": "communication"}},
        ]
        for name, batch, start, end in self.phases:
            events.append({"name": name, "cat": "compute", "ph": "X", "pid": rank, "tid": COMPUTE_TID,
                           "ts": us(start), "dur": (end - start) / 1e3, "args": {"batch": batch}})
        for op in self.ops:
            events.append({
                "name": op.name, "cat": "comm", "ph": "X", "pid": rank, "tid": COMM_TID,
                "ts": us(op.start_ns), "dur": (op.end_ns - op.start_ns) / 1e3,
                "args": {"kind": op.kind, "nbytes": op.nbytes, "group_size": op.group_size,
                         "enqueue_us": us(op.enqueue_ns), "queued_us": (op.start_ns - op.enqueue_ns) / 1e3},
            })
        return events


def predicted_events(plan: Any, backward_starts_us: Sequence[float], pid: int) -> list[dict]:
    """The plan's simulated link submissions, repeated from each batch's backward start.

    ``plan`` is a :class:`pipedap.planner.Plan` with ``predicted.times`` (one (start, end)
    per submission, seconds from the start of backward); without them, nothing.
    """
    predicted = getattr(plan, "predicted", None)
    if predicted is None or not predicted.times:
        return []
    events = [
        {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"predicted ({plan.schedule} plan)"}},
        {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": COMPUTE_TID, "args": {"name": "iteration"}},
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": COMM_TID, "args": {"name": "link"}},
    ]
    submissions = (*plan.backward, *plan.forward)
    for batch, origin in enumerate(backward_starts_us):
        events.append({"name": "iteration (predicted)", "cat": "predicted", "ph": "X", "pid": pid,
                       "tid": COMPUTE_TID, "ts": origin, "dur": predicted.iteration_time * 1e6,
                       "args": {"batch": batch, "note": "backward start to the end of the next forward"}})
        for sub, (start, end) in zip(submissions, predicted.times):
            label = "+".join(f"{kind.upper()}{g}" for kind, g in sub)
            events.append({"name": label, "cat": "predicted", "ph": "X", "pid": pid, "tid": COMM_TID,
                           "ts": origin + start * 1e6, "dur": (end - start) * 1e6,
                           "args": {"batch": batch, "ops": [list(op) for op in sub]}})
    return events


def write_trace(path: str | Path, events: list[dict], meta: Mapping[str, Any]) -> None:
    """Write a Chrome-trace JSON file (``traceEvents`` plus ``otherData`` = ``meta``)."""
    doc = {"traceEvents": events, "displayTimeUnit": "ms", "otherData": dict(meta)}
    Path(path).write_text(json.dumps(doc))


def load_trace(path: str | Path) -> dict:
    """Read a trace written by :func:`write_trace`; raise ValueError naming what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a Chrome-trace JSON file: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise ValueError(f"{path}: no 'traceEvents' list; write one with python -m pipedap.tools.bench --timeline FILE")
    return doc


# --- Gantt chart ------------------------------------------------------------------

def _label(event: dict) -> str:
    """Short label of a slice: F/B/U for compute phases, RS3 / AG3+RS2 / AR3.1 (a piece) for collectives."""
    if event.get("cat") == "compute":
        return {"forward": "F", "backward": "B", "step": "U"}.get(event["name"], event["name"])
    if event.get("cat") == "comm":
        kind = COMM_KINDS.get(event["args"].get("kind"), "")
        index = event["name"].partition(".")[2]  # "3", or "3.1" for piece 1 of a chunked all-reduce
        return f"{kind}{index}" if kind and index.replace(".", "", 1).isdigit() else event["name"]
    return event["name"]


def _blocks(events: list[dict]) -> list[tuple[dict, str]]:
    """One (event, label) per block to draw: the collectives of one submission share their span and
    make one block, labelled by those that carry data ("RS2+AG3"; a side collective of under 1% of
    the largest's bytes, such as a bucket's used flags, is left out of the label)."""
    spans: dict[tuple, list[dict]] = {}
    for e in events:
        key = (e["ts"], e["dur"]) if e.get("cat") == "comm" else (id(e),)
        spans.setdefault(key, []).append(e)
    blocks = []
    for group in spans.values():
        largest = max(e.get("args", {}).get("nbytes", 0) for e in group)
        shown = [e for e in group if e.get("args", {}).get("nbytes", 0) >= largest / 100] or group
        blocks.append((shown[0], "+".join(_label(e) for e in shown)))
    return blocks


def window(doc: dict, batch: int | None = None) -> tuple[int, float, float]:
    """(batch, start, end) in µs: rank 0's backward of ``batch`` to the end of the next forward.

    Default batch: the second to last recorded one (its next forward was recorded too).
    """
    backward = sorted((e["args"]["batch"], e["ts"], e["ts"] + e["dur"]) for e in doc["traceEvents"]
                      if e.get("cat") == "compute" and e["name"] == "backward" and e["pid"] == 0)
    if not backward:
        raise ValueError("the trace has no backward phase on rank 0: nothing to draw")
    batches = [b for b, _, _ in backward]
    if batch is None:
        batch = batches[-2] if len(batches) > 1 else batches[-1]
    if batch not in batches:
        raise ValueError(f"batch {batch} is not in the trace (it has batches {batches[0]}..{batches[-1]})")
    start = next(s for b, s, _ in backward if b == batch)
    forward_ends = [e["ts"] + e["dur"] for e in doc["traceEvents"] if e.get("cat") == "compute"
                    and e["name"] == "forward" and e["pid"] == 0 and e["args"]["batch"] == batch + 1]
    end = forward_ends[0] if forward_ends else max(e for b, _, e in backward if b == batch)
    predicted = doc.get("otherData", {}).get("predicted_iteration_s")
    if predicted:
        end = max(end, start + predicted * 1e6)
    return batch, start, end


def draw(doc: dict, path: str | Path, batch: int | None = None) -> int:
    """Write a PNG Gantt chart of one batch of the trace ``doc``; returns the batch drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the chart needs matplotlib: pip install matplotlib") from None
    from pipedap.planner import gantt

    batch, start, end = window(doc, batch)
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    lanes: dict[tuple[int, int], list[dict]] = {}
    for e in doc["traceEvents"]:
        if e.get("ph") == "X" and e["ts"] < end and e["ts"] + e["dur"] > start:
            lanes.setdefault((e["pid"], e["tid"]), []).append(e)
    keys = sorted(lanes)
    fig, ax = plt.subplots(figsize=(14, 0.55 * len(keys) + 1.4))
    kinds: set[str] = set()
    for row, key in enumerate(reversed(keys)):
        for e, label in _blocks(lanes[key]):
            kind = "iteration" if e.get("cat") == "predicted" and e["tid"] == COMPUTE_TID else gantt.kind(label)
            kinds.add(kind)
            left = (e["ts"] - start) / 1e3
            ax.broken_barh([(left, e["dur"] / 1e3)], (row - 0.4, 0.8), facecolors=gantt.COLOURS[kind],
                           edgecolor="white", linewidth=0.3)
            if e["dur"] > (end - start) * gantt.MIN_LABEL_WIDTH:  # label the blocks wide enough to read
                ax.text(left + e["dur"] / 2e3, row, label, ha="center", va="center", fontsize=6, clip_on=True)
    ax.set_yticks(range(len(keys)), [f"{names.get(pid, pid)}: {threads.get((pid, tid), tid)}"
                                     for pid, tid in reversed(keys)])
    ax.set_xlim(0, (end - start) / 1e3)
    ax.set_xlabel(f"ms from rank 0's backward of batch {batch}")
    meta = doc.get("otherData", {})
    measured = meta.get("measured_iteration_s")
    predicted = meta.get("predicted_iteration_s")
    title = f"{meta.get('model', '?')} / {meta.get('baseline', '?')} on {meta.get('world_size', '?')} workers"
    if measured:
        title += f": measured {measured * 1e3:.1f} ms per batch"
    lines = []
    if predicted:
        title += f", predicted {predicted * 1e3:.1f} ms"
        ax.axvline(predicted * 1e3, color="black", linestyle="--", linewidth=1)
        lines.append(("black", "--", "predicted end of the batch"))
    ax.set_title(title, fontsize=9, loc="left")
    gantt.legend(ax, kinds, lines)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return batch


# --- link use --------------------------------------------------------------------

@dataclass(frozen=True)
class LinkUse:
    """One rank's link in one batch: from its forward's start to the next forward's start."""

    rank: int
    batch: int
    seconds: float
    phases: dict[str, float]  # compute phase -> seconds
    busy: float  # seconds in which at least one of the rank's collectives was in flight (a wait for a peer counts)
    idle: float  # the longest stretch without one
    idle_from: float  # seconds into the batch
    idle_after: str  # the collective that ended it began ("" when the batch began idle)
    idle_before: str  # the collective that ended it ("" when the batch ended idle)

    def line(self) -> str:
        phases = ", ".join(f"{name} {seconds:.2f}" for name, seconds in self.phases.items())
        return (f"rank {self.rank} batch {self.batch}: {self.seconds:.2f} s ({phases}); link busy {self.busy:.2f} s "
                f"({self.busy / self.seconds:.0%}); longest idle {self.idle:.2f} s from {self.idle_from:.2f} s, "
                f"after {self.idle_after or 'the batch began'}, before {self.idle_before or 'the batch ended'}")


def link_use(doc: dict) -> list[LinkUse]:
    """Every rank's link use in each batch that the trace has the next forward of (complete cycles)."""
    out = []
    for rank in sorted({e["pid"] for e in doc["traceEvents"] if e.get("cat") == "compute"}):
        mine = [e for e in doc["traceEvents"] if e.get("pid") == rank and e.get("ph") == "X"]
        comm = sorted((e for e in mine if e.get("cat") == "comm"), key=lambda e: e["ts"])
        forwards = sorted((e["ts"], e["args"]["batch"]) for e in mine if e.get("cat") == "compute"
                          and e["name"] == "forward")
        for (start, batch), (end, _) in zip(forwards, forwards[1:]):
            phases = {e["name"]: e["dur"] / 1e6 for e in mine if e.get("cat") == "compute" and start <= e["ts"] < end}
            busy, at, idle = 0.0, start, (0.0, start, "", "")
            before = ""
            for e in comm:
                lo, hi = max(e["ts"], start), min(e["ts"] + e["dur"], end)
                if hi <= lo:
                    continue
                if lo - at > idle[0]:
                    idle = (lo - at, at, before, _label(e))
                if hi > at:
                    busy += hi - max(lo, at)
                    at = hi
                    before = _label(e)
            if end - at > idle[0]:
                idle = (end - at, at, before, "")
            out.append(LinkUse(rank, batch, (end - start) / 1e6, phases, busy / 1e6, idle[0] / 1e6,
                               (idle[1] - start) / 1e6, idle[2], idle[3]))
    return out


def link_report(uses: Sequence[LinkUse]) -> str:
    """One line per rank and batch, then the mean over the steady batches: the bench drains the
    warm-up's collectives before timing, so each rank's first batch starts with an idle link."""
    first = {u.rank: min(v.batch for v in uses if v.rank == u.rank) for u in uses}
    steady = [u for u in uses if u.batch != first[u.rank]] or list(uses)
    which = "the batches after each rank's first" if len(steady) < len(uses) else "all batches"
    busy = sum(u.busy for u in steady) / sum(u.seconds for u in steady)
    return "\n".join([u.line() for u in uses] + [
        f"mean of {which}: link busy {busy:.0%} of the time, "
        f"longest idle {sum(u.idle for u in steady) / len(steady):.2f} s per batch"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipedap.tools.timeline",
        description="Draw a Gantt chart (PNG) of one batch of a trace written by "
                    "python -m pipedap.tools.bench --timeline FILE: every rank's compute and communication "
                    "lanes, and the planner's predicted link lane when the plan had one.",
    )
    parser.add_argument("trace", help="Chrome-trace JSON from python -m pipedap.tools.bench --timeline")
    parser.add_argument("--out", help="PNG to write (default: the trace's name with .png)")
    parser.add_argument("--batch", type=int, help="which measured batch (default: the second to last)")
    parser.add_argument("--link", action="store_true",
                        help="print each rank's link use per batch (seconds with a collective in flight, which "
                             "counts waits for peers; the longest stretch without one and the collectives around "
                             "it) instead of drawing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or str(Path(args.trace).with_suffix(".png"))
    try:
        doc = load_trace(args.trace)
        if args.link:
            uses = link_use(doc)
            if not uses:
                raise ValueError(f"{args.trace}: no rank has two forwards recorded: no complete batch to report")
            print(link_report(uses))
            return 0
        print(f"drawing {args.trace} ({len(doc['traceEvents'])} events) to {out} ...", flush=True)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        batch = draw(doc, out, args.batch)
    except (ValueError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (batch {batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
