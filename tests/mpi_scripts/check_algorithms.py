"""Ring or MPI per op (pipedap.algorithms, the engine's table), one mode per run (argv[1]).

Every expected value comes from rank and size; the test reads the "rank R: ... OK" lines.
"""

import json
import os
import sys

import torch

import pipedap
from pipedap import algorithms, comm, engine, measure

mode = sys.argv[1]
pipedap.init()
R, P = pipedap.rank(), pipedap.size()


def contribution(n: int, rank: int) -> torch.Tensor:
    """Distinct per rank and element, exact in float64."""
    return torch.arange(n, dtype=torch.float64) * (rank + 1) + 1000 * rank


def expected_sum(n: int) -> torch.Tensor:
    return sum(contribution(n, r) for r in range(P))


def run(kind: str, n: int, algorithm: str, name: str) -> torch.Tensor:
    """One rs / ag / ar of n elements per rank (ag: per rank's block) forced to `algorithm`; its result."""
    if kind == "rs":
        c = engine.reducescatter_collective(contribution(n * P, R), torch.empty(n, dtype=torch.float64), name,
                                            engine.Sum)
    elif kind == "ag":
        c = engine.allgather_collective(contribution(n, R), torch.empty(n * P, dtype=torch.float64), name)
    else:
        c = engine.allreduce_collective(contribution(n, R), torch.empty(n, dtype=torch.float64), name, engine.Sum)
    c.spec.algorithm = algorithm
    engine.submit([c]).wait()
    return c.result


def check(kind: str, n: int, result: torch.Tensor, what: str) -> None:
    if kind == "rs":
        want = expected_sum(n * P)[R * n:(R + 1) * n]
    elif kind == "ag":
        want = torch.cat([contribution(n, r) for r in range(P)])
    else:
        want = expected_sum(n)
    assert torch.equal(result, want), f"rank {R}: {what}: wrong result"


if mode == "forced":  # each algorithm alone, and both in one group
    for algorithm in ("ring", "mpi"):
        for kind in ("rs", "ag", "ar"):
            for n in (3, 70_000):
                check(kind, n, run(kind, n, algorithm, f"{kind}.{n}.{algorithm}"), f"{kind} {n} {algorithm}")
    for algorithm in ("ring", "mpi"):  # an input inside the output at another rank's block: copied before receives
        for n in (3, 70_000):
            out = torch.empty(n * P, dtype=torch.float64)
            out[:n] = contribution(n, R)
            c = engine.allgather_collective(out[:n], out, f"inside.{n}.{algorithm}")
            c.spec.algorithm = algorithm
            engine.submit([c]).wait()
            check("ag", n, out, f"ag {n} {algorithm} from inside the output")
    ring = engine.allreduce_collective(contribution(5, R), torch.empty(5, dtype=torch.float64), "g.ring", engine.Sum)
    ring.spec.algorithm = "ring"
    native = engine.allreduce_collective(contribution(9, R), torch.empty(9, dtype=torch.float64), "g.mpi", engine.Sum)
    native.spec.algorithm = "mpi"
    engine.submit([ring, native]).wait()
    check("ar", 5, ring.result, "grouped ring")
    check("ar", 9, native.result, "grouped mpi")
    try:
        bcast = engine.collective(engine.core.OpKind.BROADCAST, "b", torch.ones(2), torch.ones(2), [2])
        bcast.spec.algorithm = "ring"
        engine.submit([bcast])
        print(f"rank {R}: broadcast with an algorithm NOT REFUSED")
    except ValueError as e:
        print(f"rank {R}: refused: {e}")
    print(f"rank {R}: forced algorithms OK")

elif mode == "table":  # an installed table decides auto ops by kind and size; None restores the static rule
    table = {"reducescatter": [(0, "mpi"), (4096, "ring")], "allgather": [(0, "ring"), (4096, "mpi")],
             "allreduce": [(0, "mpi")]}
    engine.set_algorithm_table(table)
    assert engine.algorithm_table() == table, engine.algorithm_table()
    chosen = {(k, b): engine.algorithm_for(k, b) for k in table for b in (4095, 4096, 1 << 30)}
    assert chosen == {("reducescatter", 4095): "mpi", ("reducescatter", 4096): "ring",
                      ("reducescatter", 1 << 30): "ring", ("allgather", 4095): "ring", ("allgather", 4096): "mpi",
                      ("allgather", 1 << 30): "mpi", ("allreduce", 4095): "mpi", ("allreduce", 4096): "mpi",
                      ("allreduce", 1 << 30): "mpi"}, chosen
    for kind in ("rs", "ag", "ar"):
        for n in (3, 70_000):
            check(kind, n, run(kind, n, "auto", f"t.{kind}.{n}"), f"{kind} {n} by the table")
    for bad, words in [({"reducescatter": [(1, "ring")]}, "must start at 0 bytes"),
                       ({"allgather": [(0, "ring"), (0, "mpi")]}, "sizes must increase"),
                       ({"allreduce": [(0, "auto")]}, "every entry must name ring or mpi"),
                       ({"allreduce": [(0, "nccl")]}, "'nccl': use auto, ring or mpi"),
                       ({"broadcast": [(0, "ring")]}, "unknown kind 'broadcast'")]:
        try:
            engine.set_algorithm_table(bad)
            print(f"rank {R}: bad table {bad} NOT REFUSED")
        except ValueError as e:
            assert words in str(e), (words, str(e))
    assert engine.algorithm_table() == table, "a refused table must leave the installed one"
    engine.set_algorithm_table(None)
    assert engine.algorithm_for("allreduce", 100) == "mpi" and engine.algorithm_for("allreduce", 1 << 20) == "ring"
    print(f"rank {R}: table OK")

elif mode == "mismatch":  # ranks that run one op with different algorithms fail it, never hang or mix them
    try:
        run("ar", 1000, "ring" if R == 0 else "mpi", "differs")
        print(f"rank {R}: NOT DETECTED")
    except pipedap.CommError as e:
        print(f"rank {R}: DETECTED {e}")
    check("ar", 10, run("ar", 10, "auto", "after"), "the next op")
    print(f"rank {R}: still works")

elif mode == "join":  # the joined ranks run the leader's algorithm (the table says mpi even for large ops)
    engine.set_algorithm_table({"allreduce": [(0, "mpi")]})
    if R == P - 1:
        last = pipedap.join()
    else:
        result = comm.allreduce(torch.ones(50_000, dtype=torch.float64), op=pipedap.Sum, name="while.joined")
        assert torch.equal(result, torch.full((50_000,), float(P - 1), dtype=torch.float64)), result[:3]
        last = pipedap.join()
    print(f"rank {R}: join OK (last {last})")

elif mode == "cost_model":  # run with PIPEDAP_CACHE_DIR: measured, cached with the cost model, installed
    sizes = [4 << 10, 64 << 10, 1 << 20]
    model = measure.cost_model(sizes=sizes)
    mine = algorithms.installed()
    everyone = comm.allgather_object(mine, name="tables")
    assert all(t == everyone[0] for t in everyone), everyone
    if os.environ.get("PIPEDAP_ALGORITHM", "auto") == "auto":
        assert mine is not None and mine == dict(model.algorithms), (mine, model.algorithms)
        assert set(mine) == {"reducescatter", "allgather", "allreduce"}, mine
        engine.set_algorithm_table(None)
        again = pipedap.choose_algorithms()  # from the cache this time
        assert again == mine, (again, mine)
        with open(os.path.join(os.environ["PIPEDAP_CACHE_DIR"], "costmodel.json")) as f:
            saved = json.load(f)["entries"][0]["algorithms"]
        assert {k: tuple(map(tuple, v)) for k, v in saved.items()} == mine, saved
        print(f"rank {R}: measured {algorithms.describe(mine)}")
    else:
        assert mine is None, mine
    print(f"rank {R}: cost model and algorithms OK")

else:
    raise SystemExit(f"unknown mode {mode}")
