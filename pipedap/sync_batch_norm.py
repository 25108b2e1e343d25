"""Horovod's ``SyncBatchNorm``: batch normalization with statistics over every rank's batch.

In training, the mean and variance of each channel come from the union of the ranks' batches
(two all-reduces per forward: the sums and counts, then the squared deviations, which is
numerically stable where E[x^2] - E[x]^2 is not). The statistics are computed with the
differentiable ``allreduce``, so autograd carries each rank's gradient through them: with the
optimizer averaging parameter gradients, training equals one large batch normalized as a whole.
The running statistics (unbiased variance) match on every rank. In evaluation, or alone, it is
``BatchNorm``. CPU and CUDA tensors alike.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from pipedap import comm, engine
from pipedap.engine import Sum
from pipedap.process_sets import global_process_set


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.BatchNorm{1,2,3}d`` with statistics over all ranks of ``process_set`` in training."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_set=global_process_set):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2D input (batch, channels, ...), got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or engine.alone(self.process_set):
            return super().forward(input)
        x = input if input.element_size() >= 4 else input.float()  # statistics of 16-bit inputs in float32
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // channels], dtype=x.dtype, device=x.device)
        sums = comm.allreduce(torch.cat([x.sum(dims), count]), op=Sum, process_set=self.process_set)
        total = sums[channels]
        mean = sums[:channels] / total
        centered = x - mean.view(shape)
        var = comm.allreduce(centered.square().sum(dims), op=Sum, process_set=self.process_set) / total
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.detach())
        normalized = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            normalized = normalized * self.weight.view(shape) + self.bias.view(shape)
        return normalized.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
