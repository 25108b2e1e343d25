"""The pipeline runtime against single-process training, fp64 (tests/test_pipeline_mpi.py).

Usage: pipeline_training.py CASE [CASE ...], under mpirun at the case's size, or
as one process per rank with torch.distributed's environment (gloo; tests/test_pipeline_gloo.py).
Each case trains a small MLP (4 blocks and a loss) with StageRuntime and
prints, on every rank, ``CASE <name> rank <r> worst <d>``: the worst relative
difference of this rank's stage parameters from the reference. The test
decides what passes; ``wrong-stash`` is expected to differ. At exit each rank
prints whether a torch.distributed process group is still left for the
interpreter's teardown and how many of gloo's and the TCP store's threads
still run (``EXIT rank <r> process group left: <bool>, gloo threads: <n>``).
"""

import atexit
import os
import sys

import torch
import torch.distributed as dist
from pipeline_reference import replay_1f1b, worst_relative_difference
from torch import nn

import pipedap
from pipedap.pipeline import StageRuntime, stashing, transport

torch.set_default_dtype(torch.float64)


def gloo_threads() -> int:
    """This process's threads named by gloo or torch's TCP store (Linux names threads in /proc)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sum(name.startswith(("gloo", "pt_gloo", "pt_tcpstore")) for name in names)


# registered before connect, so it runs after the transport's own exit hook (atexit runs last-in, first-out)
atexit.register(lambda: print(f"EXIT rank {R} process group left: {dist.is_initialized()}, gloo threads: "
                              f"{gloo_threads()}", flush=True))
T = transport.connect(timeout=60)
R, P = T.rank, T.size
BATCH, LR, MOMENTUM = 8, 0.1, 0.9


def make_modules() -> list[nn.Module]:
    torch.manual_seed(7)
    return [nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
            nn.Sequential(nn.Linear(16, 12), nn.Tanh()), nn.Linear(12, 4), nn.CrossEntropyLoss()]


def minibatch(t: int):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(BATCH, 8, generator=g), torch.randint(0, 4, (BATCH,), generator=g)


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def config(stage_map: str, ranks: dict[int, list[int]] | None = None) -> dict:
    stages = [int(c) for c in stage_map]
    ranks = ranks or {s: [s] for s in range(max(stages) + 1)}
    return {"module_to_stage_map": stages, "stage_to_rank_map": {str(s): r for s, r in ranks.items()}}


def single_process(batches_per_step: list[list[int]]) -> list[nn.Module]:
    """Plain training: each step on the concatenation of its minibatches (mean loss)."""
    modules = make_modules()
    body, loss = nn.Sequential(*modules[:-1]), modules[-1]
    opt = sgd(body.parameters())
    for step in batches_per_step:
        x, y = (torch.cat(parts) for parts in zip(*(minibatch(t) for t in step)))
        opt.zero_grad()
        loss(body(x), y).backward()
        opt.step()
    return modules


def my_share(t: int, replica: int, replicas: int):
    """What replica ``replica`` of stage 0 reads for minibatch ``t`` with flush: its rows (any equal split works)."""
    x, y = minibatch(t)
    rows = BATCH // replicas
    return x[replica * rows:(replica + 1) * rows], y[replica * rows:(replica + 1) * rows]


def run(stage_map: str, num: int, ranks=None, **options) -> tuple[StageRuntime, list[nn.Module]]:
    """Train with StageRuntime on ``num`` minibatches; the runtime and this rank's copy of every module.

    A replica of stage 0 reads its own share: every n-th minibatch, or with flush its rows of each.
    """
    modules = make_modules()
    conf = config(stage_map, ranks)
    first = conf["stage_to_rank_map"]["0"]
    replica, n = (first.index(R) if R in first else 0), len(first)
    if options.get("schedule") == "flush":
        data, sample = (my_share(t, replica, n) for t in range(num)), my_share(0, replica, n)
    else:
        data, sample = (minibatch(t) for t in range(replica, num, n)), minibatch(replica)
    runtime = StageRuntime(modules, conf, optimizer=sgd, sample=sample, **options)
    runtime.train(data, num)
    return runtime, modules


def report(name: str, runtime: StageRuntime, modules: list[nn.Module], reference: list[nn.Module]) -> None:
    mine = runtime.config.modules_of(runtime.stage)
    ours = [p for i in mine for p in modules[i].parameters()]
    theirs = [p for i in mine for p in reference[i].parameters()]
    print(f"CASE {name} rank {R} worst {worst_relative_difference(ours, theirs):.3e}", flush=True)
    runtime.close()


def case_no_pipelining(name: str) -> None:
    stage_map = {2: "00111", 3: "01122"}[P]
    report(name, *run(stage_map, 12, schedule="no_pipelining"), single_process([[t] for t in range(12)]))


def case_flush(name: str, dp_schedule: str = "wfbp") -> None:
    ranks = {0: [0, 1], 1: [2]} if P == 3 else None  # np 3: stage 0 replicated on ranks 0 and 1
    report(name, *run("00111", 6, ranks, schedule="flush", micro_batches=4, dp_schedule=dp_schedule),
           single_process([[t] for t in range(6)]))


def case_data_parallel(name: str, dp_schedule: str) -> None:
    """dp_conf: one stage on every rank equals DistributedOptimizer's data parallelism (and one process)."""
    num = 4 * P
    runtime, modules = run("00000", num, {0: list(range(P))}, schedule="no_pipelining", dp_schedule=dp_schedule)
    dp = make_modules()
    body = nn.Sequential(*dp[:-1])
    opt = pipedap.DistributedOptimizer(sgd(body.parameters()), model=body, schedule=dp_schedule)
    for k in range(num // P):
        x, y = minibatch(k * P + R)
        opt.zero_grad()
        dp[-1](body(x), y).backward()
        opt.step()
    pipedap.flush(body)
    report(name, runtime, modules, dp)
    reference = single_process([list(range(k * P, (k + 1) * P)) for k in range(num // P)])
    ours = [p for m in modules for p in m.parameters()]
    print(f"CASE {name}-single rank {R} worst "
          f"{worst_relative_difference(ours, [p for m in reference for p in m.parameters()]):.3e}", flush=True)


def case_1f1b(name: str, extra: int = 0) -> None:
    """1F1B against the replay; ``extra`` more minibatches admitted per later stage (that many updates staler)."""
    stage_map = {2: "00111", 3: "01122"}[P]
    runtime, modules = run(stage_map, 20, schedule="1f1b", extra_in_flight=extra)
    reference = make_modules()
    stages = [nn.Sequential(*(reference[i] for i in range(4) if int(stage_map[i]) == s)) for s in range(P)]
    used = replay_1f1b(stages, reference[-1], [minibatch(t) for t in range(20)], sgd, extra)
    lag = [(P - 1 - s) * (1 + extra) for s in range(P)]  # updates a forward's weights are behind
    assert all(v == max(0, j - lag[s]) for (s, j), v in used.items()), "the reference's versions are off"
    report(name, runtime, modules, reference)


def case_wrong_stash(name: str) -> None:
    """1F1B whose stash keeps the live weights: its backward uses the latest weights, which must not pass."""
    real = stashing.snapshot
    stashing.snapshot = lambda tensor: tensor
    try:
        case_1f1b(name)
    finally:
        stashing.snapshot = real


def case_1f1b_hybrid(name: str) -> None:
    """Replicated stage 0 under 1F1B: runs to the end (no reference: staleness differs between stages)."""
    runtime, modules = run("00111", 8, {0: [0, 1], 1: [2]}, schedule="1f1b", dp_schedule="dear")
    finite = all(torch.isfinite(p).all() for p in runtime.parameters())
    print(f"CASE {name} rank {R} finite {finite}", flush=True)
    runtime.close()


def case_dear_refused(name: str) -> None:
    """Over gloo a replicated stage cannot use dear: every rank must raise the explicit error."""
    try:
        run("00111", 4, {0: [0, 1], 1: [2]}, schedule="flush", micro_batches=4, dp_schedule="dear")
    except ValueError as err:
        print(f"CASE {name} rank {R} refused: {err}", flush=True)
    else:
        sys.exit(f"rank {R}: dear over {T.name} was not refused")


CASES = {
    "no-pipelining": case_no_pipelining,
    "flush": case_flush,
    "flush-dear": lambda n: case_flush(n, "dear"),
    "flush-pipedap": lambda n: case_flush(n, "pipedap"),
    "dp-wfbp": lambda n: case_data_parallel(n, "wfbp"),
    "dp-dear": lambda n: case_data_parallel(n, "dear"),
    "dp-pipedap": lambda n: case_data_parallel(n, "pipedap"),
    "1f1b": case_1f1b,
    "1f1b-extra": lambda n: case_1f1b(n, extra=1),
    "wrong-stash": case_wrong_stash,
    "1f1b-hybrid": case_1f1b_hybrid,
    "dear-refused": case_dear_refused,
}

for case in sys.argv[1:]:
    CASES[case](case)
