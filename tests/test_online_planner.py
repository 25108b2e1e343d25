"""The online planner's cost-model samples: only operations every rank started together count."""

import pytest

from pipedap.online_planner import QUEUED_S, skew_free_samples
from pipedap.planner import costmodel

RATE = 62.5e6  # bytes per second: 500 Mbit/s
QUEUED = 10 * QUEUED_S


def transfer_s(nbytes: float) -> float:
    """A 2-rank ring reduce-scatter moves half the buffer over the link."""
    return 0.01 + nbytes / 2 / RATE


def test_a_late_rank_fast_sample_is_dropped_and_the_fit_keeps_the_true_bandwidth():
    """The VGG-16 case: rank 1 started a 4.6 MB reduce-scatter late and saw it end in 1.9 ms."""
    sizes = [4.6e6, 7.1e6, 9.4e6, 67.1e6, 411.1e6]
    rank0 = {f"rs.{i}": [(m, transfer_s(m), QUEUED)] for i, m in enumerate(sizes)}
    rank1 = {f"rs.{i}": [(m, transfer_s(m), QUEUED)] for i, m in enumerate(sizes)}
    rank0["rs.0"] = [(4.6e6, 0.132, 0.0)]  # started first: includes the wait for rank 1
    rank1["rs.0"] = [(4.6e6, 0.0019, 0.0)]  # started last: the data was already in its buffers
    rs = skew_free_samples([rank0, rank1])["rs"]
    assert sorted(m for m, _ in rs) == sizes[1:]
    line, _ = costmodel.fit_line(rs)
    assert line.b == pytest.approx(1 / 2 / RATE, rel=1e-6)
    # the samples as one rank saw them, unfiltered, are what misled the planner
    naive, _ = costmodel.fit_line([(m, t) for ops in rank1.values() for m, t, _ in ops])
    assert naive.b < 0.2 * line.b


def test_a_run_counts_only_if_queued_on_every_rank_and_takes_the_slowest_time():
    rank0 = {"ag.3": [(8e6, 0.10, QUEUED), (8e6, 0.30, QUEUED)], "rs.3": [(8e6, 0.1, QUEUED)]}
    rank1 = {"ag.3": [(8e6, 0.12, QUEUED), (8e6, 0.05, 0.0)]}  # rs.3 never finished alone here
    assert skew_free_samples([rank0, rank1]) == {"rs": [], "ag": [(8e6, 0.12)]}


def test_no_ranks_no_samples():
    assert skew_free_samples([]) == {"rs": [], "ag": []}
