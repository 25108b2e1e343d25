"""Does the pipeline train like one process? Loss curves of a small CNN on a generated image folder.

    python benchmarks/pipeline_accuracy.py --json out/pipeline_accuracy.json --plot out/pipeline_accuracy.png

Generates a learnable JPEG folder (4 classes: a colour and a stripe direction each, plus
noise, a fifth of them mislabelled so that the loss cannot reach 0), then trains the same CNN (two conv blocks | a classifier: two stages) on the same
minibatches in the same order for ``--minibatches`` steps:

* ``single``: one process, plain ``torch.optim.SGD``;
* ``flush``: 2 stages under ``mpirun -np 2``, 4 micro-batches per minibatch (PipeDream-Flush):
  the same updates as one process, so the curves should agree within float32 noise;
* ``1f1b``: 2 stages, 1F1B with weight stashing: stage 0's gradients are one minibatch stale,
  so the curve differs; the target is a final loss within 5% (measured: within 1% at the
  default rate 0.005, +38% and unstable at 0.01 with momentum 0.9).

The model has no BatchNorm: with it, flush's micro-batch statistics differ from the whole
minibatch's by design. Prints and writes, per schedule, the mean loss of the last 20
minibatches against ``single``'s, and the largest difference of the 10-minibatch moving average
from ``single``'s as a share of the starting loss; draws the curves. About 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import data as model_data  # noqa: E402

CLASSES, PER_CLASS, SIDE, BATCH = 4, 64, 32, 16


def make_folder(root: Path) -> Path:
    """CLASSES classes of PER_CLASS JPEGs: class c has a colour and horizontal or vertical stripes, plus noise;
    a fifth of each class looks like the next class, so the loss stays well above 0."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[200, 60, 60], [60, 200, 60], [60, 60, 200], [180, 180, 60]], dtype=torch.float32)
    for c in range(CLASSES):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            look = c if i % 5 else (c + 1) % CLASSES  # every fifth image looks like the next class: label noise
            stripes = (torch.arange(40) // 4 % 2).float() * 60
            pattern = stripes.view(40, 1).expand(40, 40) if look % 2 else stripes.view(1, 40).expand(40, 40)
            pixels = colours[look].view(1, 1, 3) + pattern.unsqueeze(-1) + 40 * torch.randn(40, 40, 3, generator=g)
            Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(folder / f"{i}.jpg")
    return root / "train"


def make_modules() -> list[nn.Module]:
    torch.manual_seed(7)
    return [nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(1), nn.Linear(32 * (SIDE // 4) ** 2, CLASSES)),
            nn.CrossEntropyLoss()]


def minibatches(folder: Path, count: int):
    """``count`` minibatches of the folder, reshuffled every epoch (seeded): the same on every run."""
    loader = model_data.image_folder_loader(folder, BATCH, SIDE, seed=0, drop_last=True)
    produced, epoch = 0, 0
    while produced < count:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if produced == count:
                return
            yield batch
            produced += 1
        epoch += 1


LR = 0.005  # --lr sets it (in every rank's process: the rank jobs get the flag too)


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def train_single(folder: Path, count: int) -> list[float]:
    modules = make_modules()
    body, loss_fn = nn.Sequential(*modules[:-1]), modules[-1]
    opt = sgd(body.parameters())
    losses = []
    for x, y in minibatches(folder, count):
        opt.zero_grad()
        loss = loss_fn(body(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_pipeline(folder: Path, count: int, schedule: str, out: Path) -> None:
    """One rank of the 2-stage job (under mpirun); the last stage writes its losses per minibatch."""
    from pipedap.pipeline import StageRuntime

    micro = 4 if schedule == "flush" else 1
    config = {"module_to_stage_map": [0, 0, 1, 1], "stage_to_rank_map": {"0": [0], "1": [1]}}
    sample = (torch.zeros(BATCH, 3, SIDE, SIDE), torch.zeros(BATCH, dtype=torch.int64))
    runtime = StageRuntime(make_modules(), config, optimizer=sgd, sample=sample, schedule=schedule,
                           micro_batches=micro)
    losses = runtime.train(minibatches(folder, count) if runtime.is_first else None, count)
    if runtime.is_last:
        per_minibatch = [sum(losses[i:i + micro]) / micro for i in range(0, len(losses), micro)]
        out.write_text(json.dumps(per_minibatch))
    runtime.close()
    runtime.transport.close()


def moving(values: list[float], width: int = 10) -> list[float]:
    return [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1])
            for i in range(len(values))]


def main() -> int:
    global LR
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minibatches", type=int, default=200)
    parser.add_argument("--lr", type=float, default=LR, help=f"SGD's learning rate, momentum 0.9 (default {LR}; "
                        "1F1B's stale gradients make it less stable as the rate grows)")
    parser.add_argument("--json", help="write the curves and figures here")
    parser.add_argument("--plot", help="draw the curves here (PNG)")
    parser.add_argument("--rank-job", nargs=3, metavar=("FOLDER", "SCHEDULE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    LR = args.lr
    torch.set_num_threads(1)
    if args.rank_job:
        folder, schedule, out = args.rank_job
        train_pipeline(Path(folder), args.minibatches, schedule, Path(out))
        return 0
    with tempfile.TemporaryDirectory(prefix="pipeline-accuracy-") as tmp:
        print(f"generating {CLASSES} x {PER_CLASS} JPEGs in {tmp} ...", flush=True)
        folder = make_folder(Path(tmp))
        curves = {}
        started = time.perf_counter()
        curves["single"] = train_single(folder, args.minibatches)
        print(f"single: {args.minibatches} minibatches in {time.perf_counter() - started:.0f} s", flush=True)
        mpirun = Path(sys.executable).parent / "mpirun"
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        for schedule in ("flush", "1f1b"):
            out = Path(tmp) / f"{schedule}.json"
            started = time.perf_counter()
            print(f"{schedule}: 2 stages under mpirun, {args.minibatches} minibatches ...", flush=True)
            subprocess.run([str(mpirun if mpirun.exists() else "mpirun"), "-np", "2", "--oversubscribe",
                            "--bind-to", "none", sys.executable, __file__, "--minibatches", str(args.minibatches), "--lr", str(args.lr),
                            "--rank-job", str(folder), schedule, str(out)], env=env, check=True, timeout=900)
            curves[schedule] = json.loads(out.read_text())
            print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    reference = moving(curves["single"])
    figures = {}
    for name, losses in curves.items():
        smooth = moving(losses)
        figures[name] = {"first_10": sum(losses[:10]) / 10, "last_20": sum(losses[-20:]) / 20,
                         # relative to the starting loss: a curve near 0 would make a relative difference explode
                         "worst_difference_of_moving_average": max(
                             abs(a - b) for a, b in zip(smooth, reference)) / reference[0],
                         "last_20_vs_single": sum(losses[-20:]) / sum(curves["single"][-20:]) - 1}
        print(f"{name:>7}: loss {figures[name]['first_10']:.3f} -> {figures[name]['last_20']:.3f} (mean of the last "
              f"20), {100 * figures[name]['last_20_vs_single']:+.2f}% vs single; moving average at most "
              f"{100 * figures[name]['worst_difference_of_moving_average']:.3f}% of the starting loss from single's", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": {"minibatches": args.minibatches, "batch": BATCH,
                                                            "side": SIDE, "classes": CLASSES, "lr": LR},
                                               "figures": figures, "curves": curves}, indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, losses in curves.items():
            ax.plot(moving(losses), label=name)
        ax.set_xlabel("minibatch")
        ax.set_ylabel("loss (moving average of 10)")
        ax.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
