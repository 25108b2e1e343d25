"""Ring or MPI per collective (pipedap.algorithms and the engine's table): the choice, its file, the runs."""

import json
import re
from pathlib import Path

import pytest
from mpi_launch import assert_ok, run_mpi

from pipedap import algorithms
from pipedap.planner import costmodel
from pipedap.tools import bench_comm


def samples(kind, rows):
    """{(kind, bytes): {algorithm: seconds}} from (bytes, ring s, mpi s or None) rows."""
    return {(kind, n): {"ring": ring, **({"mpi": mpi} if mpi is not None else {})} for n, ring, mpi in rows}


def test_choose_takes_the_faster_and_switches_between_measured_sizes():
    table = algorithms.choose(samples("ag", [(4096, 3e-5, 1e-5), (65536, 5e-5, 2e-5), (1 << 20, 1e-4, 5e-4),
                                             (4 << 20, 4e-4, None)]))
    # the switch lies at the geometric mean of 64 KiB and 1 MiB (256 KiB), plus one
    assert table == {"allgather": ((0, "mpi"), (262145, "ring"))}


def test_choose_keeps_the_static_default_within_the_tie_margin(monkeypatch):
    monkeypatch.setenv("PIPEDAP_RING_MIN_BYTES", "65536")
    close = 1 - algorithms.TIE / 2
    table = algorithms.choose({**samples("rs", [(4096, 1e-5 * close, 1e-5), (1 << 20, 1e-4, 1e-4 * close)]),
                               **samples("ar", [(4096, 1e-5 * 0.5, 1e-5), (1 << 20, 1e-4, 1e-4 * 0.5)])})
    assert table["reducescatter"] == ((0, "mpi"), (64 * 1024 + 1, "ring"))  # the static rule, not noise
    assert table["allreduce"] == ((0, "ring"), (64 * 1024 + 1, "mpi"))  # clear wins flip it both ways


def test_describe_words_the_table():
    assert (algorithms.describe({"allgather": ((0, "mpi"), (262145, "ring")), "allreduce": ((0, "ring"),)})
            == "allgather: mpi < 256 KiB <= ring; allreduce: ring")


def test_cost_model_file_round_trip_keeps_the_table(tmp_path):
    line = costmodel.AlphaBeta(1e-5, 1e-9)
    table = {"allgather": ((0, "mpi"), (262145, "ring"))}
    model = costmodel.CostModel(2, rs=line, ag=line, ar=line, hosts=("h0", "h1"), algorithms=table)
    path = tmp_path / "costmodel.json"
    costmodel.save(model, path)
    assert costmodel.load(path, 2, ["h1", "h0"]).algorithms == table
    old = costmodel.CostModel(3, rs=line, ag=line, ar=line)  # files from before the choice load without one
    costmodel.save(old, path)
    assert costmodel.load(path, 3).algorithms is None


def test_cost_model_file_with_a_malformed_table_names_the_key(tmp_path):
    entry = {"world_size": 2, **{k: {"a": 0, "b": 1e-9} for k in costmodel.KINDS}, "algorithms": {"allgather": [7]}}
    with pytest.raises(ValueError, match="algorithms"):
        costmodel.CostModel.from_dict(entry)


@pytest.mark.mpi
@pytest.mark.parametrize("np", [2, 3])
def test_each_algorithm_is_correct_alone_and_in_one_group(np):
    result = run_mpi("check_algorithms.py", np, "forced", timeout=120)
    assert_ok(result)
    for r in range(np):
        assert f"rank {r}: forced algorithms OK" in result.output
        assert (f"rank {r}: refused: broadcast 'b' (2 float32 from rank 0) (rank {r}): algorithm='ring' applies "
                "to host reducescatter, allgather and allreduce only") in result.output


@pytest.mark.mpi
def test_an_installed_table_decides_by_kind_and_size_and_bad_tables_are_refused():
    result = run_mpi("check_algorithms.py", 3, "table", timeout=120)
    assert_ok(result)
    assert result.output.count(": table OK") == 3, result.output
    assert "NOT REFUSED" not in result.output


@pytest.mark.mpi
def test_ranks_that_disagree_on_the_algorithm_fail_the_op_and_go_on():
    result = run_mpi("check_algorithms.py", 2, "mismatch", timeout=120)
    assert_ok(result)
    detected = re.findall(r"rank (\d): DETECTED (.*)", result.output)
    assert sorted(r for r, _ in detected) == ["0", "1"], result.output
    for _, message in detected:
        assert "operations differ between ranks" in message and "the algorithm, ring or MPI" in message, message
    assert result.output.count("still works") == 2


@pytest.mark.mpi
def test_joined_ranks_run_the_leaders_algorithm():
    result = run_mpi("check_algorithms.py", 3, "join", timeout=120)
    assert_ok(result)
    last = re.findall(r"rank \d: join OK \(last (\d)\)", result.output)
    assert len(last) == 3 and len(set(last)) == 1 and last[0] in "01", result.output  # rank 2 joined first


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["auto", "ring"])
def test_cost_model_measures_caches_and_installs_the_choice(tmp_path, algorithm):
    env = {"PIPEDAP_CACHE_DIR": str(tmp_path), "PIPEDAP_ALGORITHM": algorithm}
    result = run_mpi("check_algorithms.py", 2, "cost_model", env=env, timeout=180)
    assert_ok(result)
    assert result.output.count("cost model and algorithms OK") == 2, result.output
    assert ("rank 0: measured reducescatter: " in result.output) == (algorithm == "auto")


@pytest.mark.mpi
def test_bench_comm_shows_each_algorithm_and_auto_choice(tmp_path):
    out = tmp_path / "comm.json"
    result = run_mpi(str(Path(bench_comm.__file__)), 2, "--sizes", "4k,256k", "--ops", "allgather,allreduce",
                     "--min-time", "0.01", "--repeats", "1", "--choose", "--each-algorithm", "--json", str(out),
                     env={"PIPEDAP_CACHE_DIR": str(tmp_path / "cache")}, timeout=240)
    assert_ok(result)
    assert "# auto: reducescatter: " in result.output
    doc = json.loads(out.read_text())
    assert set(doc["algorithm_table"]) == {"reducescatter", "allgather", "allreduce"}
    for row in doc["rows"]:
        assert row["auto_runs"] in ("ring", "mpi")
        assert {"pipedap", "pipedap_ring", "pipedap_mpi", "mpi4py"} <= set(row)
        # the figure compares auto's choice with the faster of the two, timed in the same run
        assert 0 < row["choice_over_faster"] <= 1.0
