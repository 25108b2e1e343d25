"""Point-to-point transfers (engine.send / engine.recv; tests/mpi_scripts/p2p.py) at np 2 and 3.

Every dtype and shape, tags out of order, a 100 MiB tensor, an exchange, a receive
posted before a collective whose matching send comes after it on the peer (a
deadlock if receives blocked the engine), global peers on a process set, argument
errors, and mismatched receives that fail on the receiving rank naming both sides
while the transfers after them still arrive intact. A receive with no sender is
reported after PIPEDAP_STALL_SECONDS and ends the job at PIPEDAP_TIMEOUT_SECONDS.
Once also with comm_core built with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
import torch
from mpi_launch import assert_ok, run_mpi

sys.path.insert(0, str(Path(__file__).parent.parent / "comm_core"))
import sanitized_build  # noqa: E402

pytestmark = pytest.mark.mpi

MISMATCHES = {  # case: (tag, the receiver expects, the sender sent)
    "size": (5, "1000 float32", "500 float32"),
    "dtype": (6, "8 float32", "8 float64"),
    "segments": (7, "10 float32", "1310720 float32"),
}


def check_transfers(output: str, np: int) -> None:
    for r in range(np):
        prev = (r - 1) % np
        assert f"rank {r}: p2p OK" in output, output
        assert f"rank {r}: 54 dtype x shape transfers OK" in output  # 9 dtypes x 6 shapes
        assert re.search(rf"rank {r}: 100 MiB OK in [\d.]+ s", output)
        for case, (tag, expected, sent) in MISMATCHES.items():
            message = re.search(rf"rank {r}: mismatch {case} ERROR (.*)", output).group(1)
            assert message.startswith(f"pipedap: recv 'act.3' ({expected} from rank {prev}, tag {tag}) "
                                      f"(point-to-point #"), message
            assert (f"rank {r} expected 'act.3' {expected} from rank {prev} with tag {tag}; "
                    f"rank {prev} sent 'x' {sent}. Nothing was written into the receive buffer") in message
        assert f"rank {r}: mixed ERROR" in output and "cannot mix point-to-point operations" in output
    if np == 3:
        assert "rank 0: process set {0, 2} with global peers OK" in output
        assert "rank 2: process set {0, 2} with global peers OK" in output


@pytest.mark.parametrize("np", [2, 3])
def test_transfers_of_every_kind_arrive_exactly_and_mismatches_fail_naming_both_sides(np):
    result = run_mpi("p2p.py", np, "transfers", timeout=180)
    assert_ok(result)
    check_transfers(result.output, np)


def test_a_receive_with_no_sender_is_reported_naming_peer_and_tag_then_the_job_aborts():
    start = time.monotonic()
    result = run_mpi("p2p.py", 2, "stall", env={"PIPEDAP_STALL_SECONDS": "1", "PIPEDAP_TIMEOUT_SECONDS": "4"},
                     timeout=90)
    assert result.returncode != 0 and "NOT ABORTED" not in result.output, result.output
    out = result.output
    for r, tag, peer_tag in ((0, 7, 8), (1, 8, 7)):
        peer = 1 - r
        assert re.search(rf"pipedap: rank {r}: recv 'never.sent.{r}' \(4 float32 from rank {peer}, tag {tag}\) "
                         rf"\(point-to-point #0\) has not finished after \d+ s: no message with tag {tag} has come "
                         rf"from rank {peer} yet\.", out), out
        assert re.search(rf"rank {peer}: has 1 point-to-point submission\(s\) outstanding, the oldest recv "
                         rf"'never.sent.{peer}' \(4 float32 from rank {r}, tag {peer_tag}\) for \d+ s; its engine "
                         r"is idle", out), out
    assert "Past PIPEDAP_TIMEOUT_SECONDS=4: aborting the job." in out
    assert time.monotonic() - start < 60


@pytest.mark.gpu
def test_transfers_on_cuda_over_nccl():
    import pipedap._comm_core as core

    if torch.cuda.device_count() < 2 or not core.nccl_built():
        pytest.skip(f"needs 2 GPUs ({torch.cuda.device_count()} visible) and a build with NCCL "
                    f"(nccl_built: {core.nccl_built()}): NCCL refuses two ranks on one GPU")
    result = run_mpi("p2p.py", 2, "transfers", "cuda", timeout=300)
    assert_ok(result)
    check_transfers(result.output, 2)
    for r in range(2):
        assert f"rank {r} expected 'act.3' 10 float32 on CUDA from rank {1 - r} with tag 8; rank {1 - r} sent 'x' " \
               "10 float32." in result.output


@pytest.mark.slow
def test_transfers_under_address_sanitizer_and_ubsan():
    env = sanitized_build.environment(sanitized_build.build())
    result = run_mpi("p2p.py", 2, "transfers", env=env, timeout=240)
    assert "AddressSanitizer" not in result.output and "runtime error:" not in result.output, result.output
    assert_ok(result)
    check_transfers(result.output, 2)
