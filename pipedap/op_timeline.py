"""Horovod's timeline (``start_timeline`` / ``stop_timeline``): every collective as a Chrome trace.

Rank 0 writes, as Horovod's coordinator does, one trace process per operation name
(``allreduce.grad.3``) with two slices per operation: ``NEGOTIATE_<KIND>`` from its submission to
the moment the engine took it up (waiting behind earlier operations), then ``<KIND>`` until it
finished (agreement across ranks and data). With ``mark_cycles`` each engine submission's start is
marked ``CYCLE_START``. The file is valid JSON after every write (the closing bracket is rewritten),
so it can be opened (https://ui.perfetto.dev, chrome://tracing) while training runs.

Operations are recorded when they are waited for (a collective nobody waits for is not shown).
For the training-step view (compute and communication lanes, the planner's prediction), use
``pipedap.tools.timeline`` instead.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from pipedap import engine

_lock = threading.Lock()
_writer: _TraceWriter | None = None


class _TraceWriter:
    """Appends Chrome-trace events to a JSON array file that stays closed (valid) between writes."""

    def __init__(self, path: str | Path, mark_cycles: bool):
        self.file = open(path, "wb")
        self.mark_cycles = mark_cycles
        self.origin_ns = time.monotonic_ns()
        self.pids: dict[str, int] = {}
        self.first = True
        self.write([{"name": "process_name", "ph": "M", "pid": 0,
                     "args": {"start_time_since_epoch_in_micros": time.time_ns() // 1000}}])

    def us(self, ns: int) -> float:
        return (ns - self.origin_ns) / 1000

    def write(self, events: list[dict]) -> None:
        text = ",\n".join(json.dumps(e) for e in events)
        if not self.first:
            self.file.seek(self.file.tell() - 2)  # back over "\n]"
            text = ",\n" + text
        self.file.write((("[\n" if self.first else "") + text + "\n]").encode())
        self.file.flush()
        self.first = False

    def completed(self, ops: list[engine.CompletedOp]) -> None:
        events = []
        if self.mark_cycles:
            events.append({"name": "CYCLE_START", "ph": "i", "s": "g", "pid": 0, "ts": self.us(ops[0].start_ns)})
        for op in ops:
            label = f"{op.kind}.{op.name}"
            if label not in self.pids:
                self.pids[label] = len(self.pids) + 1
                events.append({"name": "process_name", "ph": "M", "pid": self.pids[label], "args": {"name": label}})
            pid, kind = self.pids[label], op.kind.upper()
            events += [{"name": f"NEGOTIATE_{kind}", "ph": "B", "pid": pid, "ts": self.us(op.enqueue_ns)},
                       {"ph": "E", "pid": pid, "ts": self.us(op.start_ns)},
                       {"name": kind, "ph": "B", "pid": pid, "ts": self.us(op.start_ns),
                        "args": {"bytes": op.nbytes, "group_size": op.group_size}},
                       {"ph": "E", "pid": pid, "ts": self.us(op.end_ns)}]
        with _lock:
            if not self.file.closed:
                self.write(events)

    def close(self) -> None:
        with _lock:
            self.file.close()


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Start writing the timeline to ``file_path`` (rank 0; a no-op elsewhere). A running timeline
    is stopped first, so this also moves it to a new file."""
    global _writer
    stop_timeline()
    if engine.rank() != 0:
        return
    _writer = _TraceWriter(file_path, mark_cycles)
    engine.add_completion_listener(_writer.completed)


def stop_timeline() -> None:
    """Stop writing the timeline and close its file (nothing happens if none runs)."""
    global _writer
    if _writer is None:
        return
    engine.remove_completion_listener(_writer.completed)
    _writer.close()
    _writer = None
