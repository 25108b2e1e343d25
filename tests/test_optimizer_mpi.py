"""DistributedOptimizer under mpirun: parameters equal single-process training (see check_optimizer.py)."""

import pytest
from mpi_launch import assert_ok, run_mpi

pytestmark = pytest.mark.mpi


def run_part(part: str, np: int, *options: str):
    result = run_mpi("check_optimizer.py", np, part, *options, timeout=300)
    assert_ok(result)
    return result.output


@pytest.mark.parametrize("np", [1, 2, 4])  # 3 ranks (uneven shards): the features part
def test_every_schedule_optimizer_and_model_matches_single_process(np):
    out = run_part("matrix", np)
    assert out.count("matrix OK: 4 schedules x 4 optimizers x 6 models") == np


@pytest.mark.parametrize("np", [1, 3])
def test_scheduler_checkpoint_eval_accumulation_clipping_match_single_process(np):
    assert run_part("features", np).count("features OK") == np


@pytest.mark.parametrize("part", ["curve", "wire"])
def test_fp16_and_bf16_compression_halve_the_bytes_and_keep_the_loss_curve(part):
    """Issue 16: compression=Compression.fp16/bf16 in DistributedOptimizer, every schedule (check_compression.py)."""
    result = run_mpi("check_compression.py", 2, part, timeout=300)
    assert_ok(result)
    assert result.output.count(f"{part} OK") == 2, result.output


@pytest.mark.parametrize("np", [2, 4])  # (one rank: the plain optimizer, as unsharded)
def test_shard_update_matches_single_process_in_float64_for_every_schedule_optimizer_and_model(np):
    """Issue 17: the matrix again with shard_update=True (no ByteScheduler: refused), to 1e-9 in float64."""
    out = run_part("matrix", np, "--shard-update")
    assert out.count("matrix OK: 3 schedules x 4 optimizers x 6 models") == np, out


def test_shard_update_with_scheduler_checkpoint_eval_accumulation_clipping_and_horovod_idioms():
    """Issue 17: every feature of the unsharded optimizer, sharded over 3 ranks (uneven shards); the
    gathered state_dict() equals the reference optimizer's."""
    assert run_part("features", 3, "--shard-update").count("features OK") == 3


@pytest.mark.parametrize("part", ["memory", "compression"])
def test_shard_update_keeps_1_over_n_of_the_state_and_composes_with_compression(part):
    result = run_mpi("check_shard_update.py", 2, part, timeout=300)
    assert_ok(result)
    assert result.output.count(f"{part} OK") == 2, result.output


def test_a_sharded_checkpoint_saved_at_3_ranks_resumes_at_2_exactly(tmp_path):
    """Issue 17: state_dict() (whole), sharded_state_dict() (a file per rank) and a plain torch optimizer
    loaded before wrapping; float64, equal to uninterrupted single-process training."""
    saved = run_mpi("check_shard_update.py", 3, "save", str(tmp_path), timeout=300)
    assert_ok(saved)
    assert saved.output.count("save OK at 3 ranks") == 3, saved.output
    resumed = run_mpi("check_shard_update.py", 2, "resume", str(tmp_path), timeout=300)
    assert_ok(resumed)
    assert resumed.output.count("resume OK at 2 ranks") == 2, resumed.output
    assert resumed.output.count("saved at 3 ranks, resumed at 2 from sharded_state_dict: ") == 2 * 3
    assert resumed.output.count("saved at 3 ranks, resumed at 2 from sharded_state_dict, unsharded: ") == 2 * 3


def test_broadcast_parameters_buffers_and_optimizer_state():
    assert run_part("broadcasts", 3).count("broadcasts OK") == 3


def test_a_model_that_differs_on_one_rank_raises_on_every_rank():
    out = run_part("mismatch", 3)
    assert "NOT DETECTED" not in out
    assert out.count("DETECTED DistributedOptimizer: the model differs between ranks: parameter #0 is "
                     "'fc1.weight' (16, 8) float32 on rank 0 but 'fc1.weight' (12, 8) float32 on rank 1") == 3


def test_a_given_dear_plan_is_kept_with_schedule_pipedap():
    """Issue 12: a DeAR plan (object, file or $PIPEDAP_PLAN) was replaced by online planning."""
    out = run_part("given_plan", 2)
    for how in ("Plan", "file", "PIPEDAP_PLAN"):
        assert out.count(f"given dear plan kept ({how})") == 2, out
    assert out.count("given plan OK") == 2


def test_a_plan_that_differs_on_one_rank_raises_on_every_rank():
    """Issue 12: every rank compares the plan's digest at wrap time (as the parameters')."""
    out = run_part("plan_mismatch", 2)
    assert "NOT DETECTED" not in out, out
    for how in ("Plan", "PIPEDAP_PLAN"):
        assert out.count(f"DETECTED ({how}) with both digests: DistributedOptimizer: the plan differs between "
                         "ranks: plan ") == 2, out
    assert out.count("DETECTED (missing file)") == 2, out
    assert "rank 1 could not resolve its plan: FileNotFoundError" in out, out
    assert out.count("same plan OK") == 2, out


@pytest.mark.parametrize("schedules", [("dear", "wfbp"), ("pipedap", "dear")])
def test_two_overlapping_process_sets_train_two_models_like_single_process(schedules):
    """Issue 12: model A on ranks {0, 1} and model B on ranks {1, 2}; rank 1 trains both at once."""
    result = run_mpi("process_set_training.py", 3, *schedules, timeout=300)
    assert_ok(result)
    assert result.output.count("process-set training OK (1 model(s))") == 2, result.output
    assert result.output.count("process-set training OK (2 model(s))") == 1, result.output
