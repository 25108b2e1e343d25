"""pipedap.pipeline.trace: a stage's time per minibatch split by hand."""

from __future__ import annotations

import json

import pytest

from pipedap.pipeline import trace


def _rank(rank: int, units: int, forward: float, backward: float, waited: float, gap: float) -> dict:
    """A rank running forward, backward, step per unit back to back, with `gap` seconds between units;
    each forward waits `waited` of its `forward` seconds."""
    events, t = [], 0.0
    for u in range(units):
        events.append(["forward", u, t, t + forward, waited])
        t += forward
        events.append(["backward", u, t, t + backward, 0.0])
        t += backward
        events.append(["step", -1, t, t + 0.1, 0.0])
        t += 0.1 + gap
    return {"rank": rank, "stage": rank, "replica": 0, "alone": {"forward": 0.5, "backward": 1.0}, "events": events}


def test_the_split_by_hand(tmp_path, capsys):
    doc = {"schedule": "1f1b", "warmup": 2, "ranks": [_rank(0, 12, 1.0, 2.0, 0.25, 0.05),
                                                      _rank(1, 12, 0.5, 1.0, 0.0, 0.0)]}
    rows = trace.summarize(doc)
    # units 2 .. 8 (the forwards of 9, 10, 11 are the drain): 6 units in the window
    assert rows[0]["units"] == 6 and rows[0]["wall"] == pytest.approx(3.15)
    assert rows[0]["forward"] == pytest.approx(0.75) and rows[0]["waiting"] == pytest.approx(0.25)
    assert rows[0]["backward"] == pytest.approx(2.0) and rows[0]["step"] == pytest.approx(0.1)
    assert rows[0]["other"] == pytest.approx(0.05)
    assert rows[0]["compute_slowdown"] == pytest.approx(2.75 / 1.5 - 1)
    assert rows[1]["compute_slowdown"] == pytest.approx(0.0)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    assert trace.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "slowest stage alone: rank 0 (stage 0), 1.500 s; it took 3.150 s per minibatch (+110.0%): slower " \
           "compute +1.250 s, waiting 0.250 s, step 0.100 s, other 0.050 s" in printed


def test_too_short_a_run_is_refused(tmp_path, capsys):
    doc = {"schedule": "1f1b", "warmup": 3, "ranks": [_rank(0, 5, 1.0, 2.0, 0.0, 0.0)]}
    with pytest.raises(ValueError, match="rank 0: .* run more minibatches"):
        trace.summarize(doc)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    assert trace.main([str(path)]) == 2
    assert "run more minibatches" in capsys.readouterr().err
