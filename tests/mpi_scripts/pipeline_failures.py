"""Bad pipeline inputs and a stage that dies (tests/test_pipeline_failures_mpi.py).

Usage, under mpirun with 3 ranks (or 3 processes over gloo, tests/test_pipeline_gloo.py):
  pipeline_failures.py bad-inputs     each bad input must raise on every rank before training;
                                      prints ``BAD <case> rank <r>: <message>``
  pipeline_failures.py kill RANK      RANK kills itself (SIGKILL) in its 5th forward
  pipeline_failures.py raise RANK     RANK raises in its 5th forward (an unhandled exception)
Either prints ``DIES <time.time()>`` first.
"""

import os
import signal
import sys
import time

import torch
from torch import nn

from pipedap.pipeline import PipelineConfigError, StageRuntime, transport

T = transport.connect(timeout=15)  # gloo: a peer that stops answering fails a wait after 15 s
R, P = T.rank, T.size
MP3 = {"module_to_stage_map": [0, 1, 2, 2], "stage_to_rank_map": {"0": [0], "1": [1], "2": [2]}}


def modules(second_width: int = 16) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(second_width, 12), nn.Linear(12, 4),
            nn.CrossEntropyLoss()]


def minibatch(t: int = 0):
    g = torch.Generator().manual_seed(t)
    return torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def with_map(stage_map, ranks) -> dict:
    return {"module_to_stage_map": stage_map, "stage_to_rank_map": ranks}


BAD = {
    "length": lambda: (modules(), with_map([0, 1, 2], MP3["stage_to_rank_map"]), minibatch()),
    "rank-without-stage": lambda: (modules(), with_map([0, 1, 2, 2], {"0": [0], "1": [1], "2": [3]}), minibatch()),
    "stage-without-rank": lambda: (modules(), with_map([0, 1, 2, 2], {"0": [0, 1, 2], "1": []}), minibatch()),
    "world-size": lambda: (modules(), with_map([0, 0, 1, 1], {"0": [0], "1": [1]}), minibatch()),
    "shapes": lambda: (modules(second_width=32), MP3, minibatch()),
    "no-sample-on-rank-0": lambda: (modules(), MP3, None if R == 0 else minibatch()),
    "config-differs-on-rank-2": lambda: (modules(), with_map([0, 1, 2, 2], {"0": [0], "1": [2], "2": [1]})
                                         if R == 2 else MP3, minibatch()),
}


def bad_inputs() -> None:
    for case, make in BAD.items():
        mods, config, sample = make()
        try:
            StageRuntime(mods, config, optimizer=sgd, sample=sample)
        except PipelineConfigError as err:
            print(f"BAD {case} rank {R}: {err}", flush=True)
        else:
            sys.exit(f"rank {R}: {case}: no error")
    T.all_gather_object(None, "done")
    print(f"BAD done rank {R}", flush=True)
    T.close()  # a gloo process group left to the interpreter's exit may abort it ("terminate called ...")


class Failing(nn.Module):
    """Calls ``fail`` in its 5th training forward (not in the start-up probe, which runs in eval mode)."""

    def __init__(self, fail):
        super().__init__()
        self.calls, self.fail = 0, fail

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 5:
                self.fail()
        return x


def dies(how: str, victim: int) -> None:
    def fail():
        print(f"DIES {time.time():.3f}", flush=True)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("this stage failed on purpose")

    mods = modules()
    if R == victim:  # its stage's first module fails
        first = MP3["module_to_stage_map"].index(victim)
        mods[first] = nn.Sequential(Failing(fail), mods[first])
    runtime = StageRuntime(mods, MP3, optimizer=sgd, sample=minibatch(), schedule="1f1b")
    runtime.train((minibatch(t) for t in range(1000)), 1000)
    sys.exit(f"rank {R}: trained to the end although rank {victim} died")


assert P == 3, "run with 3 ranks"
if sys.argv[1] == "bad-inputs":
    bad_inputs()
else:
    dies(sys.argv[1], int(sys.argv[2]))
