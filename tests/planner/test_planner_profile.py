"""Profiles: JSON round trip, validation, the element-wise max agreement across ranks, and hook times -> layer times."""

from __future__ import annotations

import json

import pytest

from pipedap.planner.costmodel import from_link
from pipedap.planner.profile import Layer, Profile, elementwise_max, layer_times
from pipedap.planner.simulator import Problem


def _profile(scale: float) -> Profile:
    return Profile(
        (Layer("a", ("a.w", "a.b"), 400, 1.0 * scale, 2.0, 0.1), Layer("b", ("b.w",), 800, 3.0, 4.0 * scale, 0.2)),
        {"model": "toy"},
    )


def test_round_trip(tmp_path):
    path = tmp_path / "p.json"
    _profile(1.0).save(path)
    assert Profile.load(path) == _profile(1.0)
    assert Profile.load(path).params == ["a.w", "a.b", "b.w"]


def test_elementwise_max():
    agreed = elementwise_max([_profile(1.0), _profile(2.0), _profile(0.5)])
    assert [(x.tf, x.tb, x.u) for x in agreed.layers] == [(2.0, 2.0, 0.1), (3.0, 8.0, 0.2)]
    assert agreed.layers[0].params == ("a.w", "a.b")


def test_elementwise_max_rejects_different_models():
    other = Profile((Layer("a", ("a.w", "a.b"), 400, 1, 1), Layer("b", ("b.w",), 999, 1, 1)))
    with pytest.raises(ValueError, match=r"layers\[1\] differs between rank 0 .* and rank 1"):
        elementwise_max([_profile(1.0), other])


def test_invalid_profiles_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"layers\[0\].tb = -1"):
        Profile((Layer("a", ("a.w",), 4, 1.0, -1.0),))
    doc = _profile(1.0).to_dict()
    del doc["layers"][1]["nbytes"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"layers\[1\] has a missing or malformed key \('nbytes'\)"):
        Profile.load(path)


def test_backward_time_goes_to_the_layer_that_completes_the_prefix():
    """Layer 0's gradients finish before layer 1's: the simulator's readiness must still be the measured one.

    Completion-order attribution (1 s each here) would give ready = [3, 2, 1]: RS(1) could
    start at 2 s although layer 1's gradients exist only at 3 s.
    """
    ready = {0: 12.0, 1: 13.0, 2: 11.0}  # backward starts at 10
    _, tb = layer_times(3, {}, 10.0, ready)
    assert tb == [0.0, 2.0, 1.0]
    profile = Profile(tuple(Layer(f"l{g}", (f"l{g}.w",), 8, 0.0, tb[g]) for g in range(3)))
    simulated = Problem(profile, from_link(2, 1e9, 0.0)).ready
    plan_can_start = [max(ready[h] for h in range(g, 3)) - 10.0 for g in range(3)]  # RS(g) waits for RS(g+1)
    assert simulated == plan_can_start == [3.0, 3.0, 1.0]


def test_forward_time_runs_from_a_layer_s_compute_to_the_next_layer_reached():
    """Spans exclude what the pre-hook did (waiting, the update); layers reached out of index order."""
    spans = {0: (0.0, 0.5), 2: (1.0, 1.25), 1: (2.0, 2.125)}
    tf, _ = layer_times(4, spans, 3.0, {})
    assert tf == [0.5, 0.875, 0.75, 0.0]  # layer 3 never ran: no time


def test_layer_times_in_order_are_plain_differences():
    tf, tb = layer_times(2, {0: (0.0, 0.0), 1: (1.0, 1.0)}, 3.0, {1: 4.0, 0: 6.0})
    assert (tf, tb) == ([1.0, 2.0], [2.0, 1.0])


def test_bucket_cost_round_trips_is_agreed_and_checked(tmp_path):
    path = tmp_path / "p.json"
    costly = Profile(_profile(1.0).layers, {"model": "toy"}, bucket_cost=3e-4)
    costly.save(path)
    assert Profile.load(path) == costly
    assert "bucket_cost" not in _profile(1.0).to_dict()  # a profile without it hashes as before it existed
    assert elementwise_max([costly, _profile(2.0)]).bucket_cost == 3e-4
    with pytest.raises(ValueError, match="bucket_cost = -1"):
        Profile(_profile(1.0).layers, bucket_cost=-1)
    doc = costly.to_dict()
    doc["bucket_cost"] = "slow"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'bucket_cost' must be a number of seconds, got 'slow'"):
        Profile.load(path)
