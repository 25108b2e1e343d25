"""Profiles: JSON round trip, validation, and the element-wise max agreement across ranks."""

from __future__ import annotations

import json

import pytest

from pipedap.planner.profile import Layer, Profile, elementwise_max


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
