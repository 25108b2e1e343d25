"""Train a small CNN on CIFAR-like 32x32 images with PipeDAP: the two-line integration.

    mpirun -np 2 python examples/train_cifar_like.py --epochs 5 --checkpoint-dir /tmp/cnn
    mpirun -np 2 python examples/train_cifar_like.py --epochs 8 --checkpoint-dir /tmp/cnn   # continues at epoch 6

    # restarted from the last checkpoint (up to 3 times) when a rank or host fails:
    python -m pipedap.tools.launch -np 2 --max-restarts 3 --checkpoint-dir /tmp/cnn -- \
        python examples/train_cifar_like.py --epochs 8

A plain PyTorch training loop (data loader with a distributed sampler, SGD with momentum,
an LR scheduler, evaluation, checkpoints) plus the two PipeDAP lines marked below. The
checkpoints are pipedap.save_checkpoint's (after every epoch): complete on every rank or
not at all, and loaded at start when there is one, so a restarted job goes on where the
last one stopped. The
data are synthetic so the example runs anywhere in seconds: each of 10 classes is a fixed
random 32x32 "template" image, and a sample is its class's template plus noise, so a
CNN can learn them and the loss visibly falls. To use real CIFAR-10, swap
``synthetic_cifar`` for ``torchvision.datasets.CIFAR10``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pipedap


def synthetic_cifar(samples: int, seed: int, noise: float = 1.0) -> TensorDataset:
    """`samples` images (3x32x32) of 10 classes: a class template plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, 10, (samples,), generator=g)
    images = templates[labels] + noise * torch.randn(samples, 3, 32, 32, generator=g)
    return TensorDataset(images, labels)


class SmallCNN(nn.Module):
    """Two conv blocks and a classifier: about 0.1 M parameters."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Loss and accuracy over the whole evaluation set (every rank's shard, summed over ranks)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            totals += torch.tensor([F.cross_entropy(logits, labels, reduction="sum").item(),
                                    (logits.argmax(1) == labels).sum().item(), len(labels)], dtype=torch.float64)
    totals = pipedap.allreduce(totals, op=pipedap.Sum, name="eval")
    model.train()
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a small CNN on synthetic CIFAR-like data with PipeDAP.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05, help="for the global batch (batch-size x workers)")
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--checkpoint-dir", default=os.environ.get("PIPEDAP_CHECKPOINT_DIR"),
                        help="save a checkpoint here after every epoch and continue from the last one at start "
                             "(default: $PIPEDAP_CHECKPOINT_DIR, set by pipedap.tools.launch --checkpoint-dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipedap.init()  # PipeDAP line 1: start MPI and the communication engine
    rank, world = pipedap.rank(), pipedap.size()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # several ranks share this machine's cores

    train_set = synthetic_cifar(args.train_samples, seed=args.seed)
    eval_set = synthetic_cifar(args.eval_samples, seed=args.seed + 1)
    train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler, drop_last=True)
    eval_loader = DataLoader(eval_set, batch_size=256,
                             sampler=DistributedSampler(eval_set, num_replicas=world, rank=rank, shuffle=False))

    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    optimizer = pipedap.DistributedOptimizer(optimizer, model=model)  # PipeDAP line 2
    # halve the learning rate every 3 epochs (resuming with more --epochs continues the same rule)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    # every rank starts from rank 0's weights and optimizer state (Horovod's idiom)
    pipedap.broadcast_parameters(model.state_dict(), root_rank=0)
    pipedap.broadcast_optimizer_state(optimizer, root_rank=0)
    start_epoch = 0
    found = pipedap.load_checkpoint(args.checkpoint_dir, model, optimizer) if args.checkpoint_dir else None
    if found is not None:  # every rank loads the same checkpoint (None on every rank when there is none)
        scheduler.load_state_dict(found.extra["scheduler"])
        start_epoch = found.step
        if rank == 0:
            print(f"resumed from {found.folder} at epoch {start_epoch}", flush=True)

    if rank == 0:
        print(f"training {sum(p.numel() for p in model.parameters())} parameters on {world} worker(s), "
              f"{len(train_loader)} steps per epoch, epochs {start_epoch + 1}..{args.epochs}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        began = time.perf_counter()
        train_sampler.set_epoch(epoch)
        total, batches = 0.0, 0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        train_loss = pipedap.allreduce(torch.tensor(total / batches), name="train_loss").item()
        eval_loss, accuracy = evaluate(model, eval_loader)  # the forward applies the last pending update
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, eval loss {eval_loss:.4f}, "
                  f"accuracy {accuracy:.1%}, lr {lr:.4f}, {time.perf_counter() - began:.1f} s", flush=True)
        if args.checkpoint_dir:  # on every rank; the step is the number of epochs done
            pipedap.save_checkpoint(args.checkpoint_dir, epoch + 1, model, optimizer,
                                    extra={"scheduler": scheduler.state_dict()})
    if rank == 0:
        print(f"plan after training: {optimizer.plan.schedule if world > 1 else 'none (one worker)'}")


if __name__ == "__main__":
    main()
