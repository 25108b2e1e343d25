"""Checkpoints that every rank completed, for resuming a data-parallel job after a failure.

    step = 0
    found = pipedap.load_checkpoint(directory, model, optimizer)     # every rank; None: start fresh
    if found:
        step = found.step
    ...
    if step % 100 == 0:
        pipedap.save_checkpoint(directory, step, model, optimizer, extra={"scheduler": ...})

[Note: a complete checkpoint]
A save writes ``DIR/step-<step>/``: ``state.pt`` (rank 0: the model, the optimizer state
in torch's rank-independent format, the caller's ``extra``) and ``rank-<r>.pt`` (every
rank: its random-number generators and the model's buffers, which can differ between
ranks, e.g. BatchNorm statistics). Each file is written to a temporary name, flushed to
disk and renamed, so a file that exists is whole. The ranks then agree that every file was
written (one small all-gather); only then does rank 0 replace ``DIR/latest.json``, the
manifest naming the step and the world size, in the same way (after a copy of it,
``complete.json``, in the step folder). A rank that dies while
saving therefore leaves the previous manifest in place: ``load_checkpoint`` always finds
the last checkpoint that every rank completed. Older step folders are removed once the manifest moved on,
except the ``keep - 1`` newest complete ones.

Loading at the world size of the save continues bit for bit (same parameters, optimizer
state, generators and buffers on each rank). At another world size the parameters and
the optimizer state load whole; ranks the save did not have keep their own generators and
take rank 0's buffers, and rank 0 says so. The directory must be visible at the same path
to every rank (a shared filesystem across hosts); a rank that cannot see it is named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipedap import comm
from pipedap.optimizer import flush
from pipedap.process_sets import ProcessSet, global_process_set

FORMAT = "pipedap-checkpoint-1"
MANIFEST = "latest.json"
COMPLETE = "complete.json"  # in a step folder: every rank wrote its part


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the ranks and files."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What ``load_checkpoint`` found: the step it was saved at, its world size, its folder, ``extra``."""

    step: int
    world_size: int
    folder: Path
    extra: dict[str, Any]


def step_folder(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The manifest of the last complete checkpoint in ``directory`` (no communication); None if none."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint manifest ({e}); remove it to start afresh") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} "
                              "(written by another program or version)")
    return manifest


def save_checkpoint(directory: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *, extra: dict[str, Any] | None = None,
                    keep: int = 2, process_set: ProcessSet = global_process_set) -> Path:
    """Save a checkpoint of ``step`` into ``directory``; call it on every rank at the same step.

    Pending updates are applied first. The optimizer's ``state_dict()`` is taken on every
    rank (it is collective with ``shard_update``). Returns the step's folder once every rank wrote its
    part and the manifest names it ([Note: a complete checkpoint]). ``keep`` complete
    checkpoints are kept (at least 1). A rank that fails to write raises
    :class:`CheckpointError` on every rank, and the previous checkpoint stays the latest.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_checkpoint: keep must be an int >= 1 (checkpoints kept), got {keep!r}")
    rank, world = process_set.rank(), process_set.size()
    flush(model)  # pending updates of the DistributedOptimizers wrapping it
    optimizer_state = optimizer.state_dict() if optimizer is not None else None  # (collective when sharded)
    folder = step_folder(directory, step)
    error = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            _write_atomic(folder / "state.pt", {"format": FORMAT, "step": step, "world_size": world,
                                                "model": model.state_dict(), "optimizer": optimizer_state,
                                                "extra": extra or {}})
        _write_atomic(folder / f"rank-{rank:05d}.pt", {"generators": _generator_states(),
                                                       "buffers": dict(model.named_buffers())})
    except Exception as e:  # every rank must learn of it, or the others would wait in the all-gather below
        error = f"{type(e).__name__}: {e}"
    errors = comm.allgather_object(error, name="checkpoint.save", process_set=process_set)
    failed = {r: e for r, e in enumerate(errors) if e is not None}
    if failed:
        raise CheckpointError(f"checkpoint of step {step} in {folder} not complete: "
                              + "; ".join(f"rank {r}: {e}" for r, e in failed.items())
                              + f" (the latest complete checkpoint is unchanged: {Path(directory) / MANIFEST})")
    if rank == 0:
        manifest = {"format": FORMAT, "step": step, "world_size": world, "folder": folder.name,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_atomic(folder / COMPLETE, manifest)
        _write_atomic(Path(directory) / MANIFEST, manifest)
        _remove_older(Path(directory), keep)
    return folder


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    process_set: ProcessSet = global_process_set) -> Checkpoint | None:
    """Load the last complete checkpoint in ``directory`` on every rank; None (on every rank) if there is none.

    Call it on every rank after wrapping the optimizer and before training. Every rank
    reads the manifest itself, and the ranks check that they saw the same one.
    """
    rank, world = process_set.rank(), process_set.size()
    error, manifest = None, None
    try:
        manifest = read_manifest(directory)
        if manifest is not None:
            folder = Path(directory) / manifest["folder"]
            saved_ranks = manifest["world_size"]
            needed = [folder / "state.pt"] + ([folder / f"rank-{rank:05d}.pt"] if rank < saved_ranks else [])
            for path in needed:
                if not path.is_file():
                    raise CheckpointError(f"{path} not found (the directory must be visible at the same path on "
                                          "every host, e.g. a shared filesystem)")
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    seen = comm.allgather_object((error, manifest and manifest["step"]), name="checkpoint.load",
                                 process_set=process_set)
    failed = {r: e for r, (e, _) in enumerate(seen) if e is not None}
    if failed:
        raise CheckpointError(f"cannot load the checkpoint in {directory}: "
                              + "; ".join(f"rank {r}: {e}" for r, e in failed.items()))
    steps = {r: s for r, (_, s) in enumerate(seen)}
    if len(set(steps.values())) > 1:
        raise CheckpointError(f"the ranks see different checkpoints in {directory} (rank: step, None = none) "
                              f"{steps}: the directory must be the same shared folder on every host")
    if manifest is None:
        return None
    folder = Path(directory) / manifest["folder"]
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    flush(model)  # a pending update applied after the load would overwrite loaded parameters
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])  # (applies this optimizer's pending updates first)
    model.load_state_dict(state["model"])
    saved_ranks = manifest["world_size"]
    if rank < saved_ranks:
        mine = torch.load(folder / f"rank-{rank:05d}.pt", map_location="cpu", weights_only=False)
        _restore_generators(mine["generators"])
        with torch.no_grad():
            buffers = dict(model.named_buffers())
            for name, value in mine["buffers"].items():
                buffers[name].copy_(value)
    if rank == 0 and saved_ranks != world:
        ranks = (f"ranks {world}..{saved_ranks - 1}'s random generators and buffers are not used" if world < saved_ranks
                 else f"ranks {saved_ranks}..{world - 1} keep their own random generators and take rank 0's buffers")
        print(f"pipedap: checkpoint step {manifest['step']} was saved at {saved_ranks} rank(s), loading at {world}: "
              f"parameters and optimizer state load whole; {ranks}; training continues, not bit for bit as "
              "at the saved world size", flush=True)
    return Checkpoint(step=manifest["step"], world_size=saved_ranks, folder=folder, extra=state["extra"])


# --- files ------------------------------------------------------------------------------------

def _write_atomic(path: Path, obj: Any) -> None:
    """``obj`` (torch.save; JSON for a ``.json`` path) to a temporary name in the same folder, flushed
    to disk, then renamed: the file is whole or absent."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            if path.suffix == ".json":
                f.write(json.dumps(obj, indent=1).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (its directory entry reaches the disk)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_older(directory: Path, keep: int) -> None:
    """Of the step folders before the manifest's, keep the ``keep - 1`` newest complete ones and remove
    the others (older ones, leftovers of saves that did not complete). Newer folders are left alone:
    another rank may already be writing the next save."""
    current = read_manifest(directory)["folder"]
    older = sorted(p.name for p in directory.glob("step-*") if p.is_dir() and p.name[5:].isdigit() and p.name < current)
    complete = [name for name in older if (directory / name / COMPLETE).is_file()]
    kept = complete[max(0, len(complete) - (keep - 1)):]
    for name in older:
        if name not in kept:
            shutil.rmtree(directory / name, ignore_errors=True)


# --- random-number generators -----------------------------------------------------------------

def _generator_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
        states["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return states


def _restore_generators(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy
        numpy.random.set_state(states["numpy"])
