"""A 2-stage pipeline (1F1B, PipeDAP's engine) that tests/test_faults.py disturbs (mpirun on the testbed).

argv: MODE MINIBATCHES. Each rank prints ``rank R: minibatch K`` as its stage takes minibatch K,
and ``rank R: done`` at the end. MODE ``train`` runs undisturbed from inside (the test takes a
link down); ``kill``: stage 1 SIGKILLs itself in its 5th forward (the process just vanishes).
"""

import os
import signal
import sys

import torch
from torch import nn

from pipedap.pipeline import StageRuntime, transport

mode, minibatches = sys.argv[1], int(sys.argv[2])
T = transport.connect()
R = T.rank
CONFIG = {"module_to_stage_map": [0, 1, 1], "stage_to_rank_map": {"0": [0], "1": [1]}}


class Vanish(nn.Module):
    """SIGKILLs this process in its 5th training forward (not in the start-up probe, in eval mode)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 5:
                print(f"rank {R}: vanishing", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return x


def data():
    for t in range(minibatches):
        print(f"rank {R}: minibatch {t}", flush=True)
        g = torch.Generator().manual_seed(t)
        yield torch.randn(32, 512, generator=g), torch.randint(0, 10, (32,), generator=g)


torch.manual_seed(0)
second = nn.Sequential(nn.Linear(1024, 10))
if mode == "kill" and R == 1:
    second = nn.Sequential(Vanish(), second)
modules = [nn.Sequential(nn.Linear(512, 1024), nn.Tanh()), second, nn.CrossEntropyLoss()]
sample = torch.randn(32, 512), torch.randint(0, 10, (32,))
runtime = StageRuntime(modules, CONFIG, optimizer=lambda p: torch.optim.SGD(p, lr=0.01), sample=sample,
                       schedule="1f1b")
runtime.train(data(), minibatches)
print(f"rank {R}: done", flush=True)
