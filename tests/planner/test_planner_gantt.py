"""The planner's Gantt chart: every block colour and marker line is named in a legend."""

from __future__ import annotations

import pytest

from pipedap.planner import gantt, schedules
from pipedap.planner.costmodel import from_link
from pipedap.planner.profile import Layer, Profile
from pipedap.planner.simulator import Problem


@pytest.mark.parametrize("kind, label", [("RS", "RS3"), ("AG", "AG12"), ("AR", "AR2[1/4]"), ("merged", "RS2+AG3"),
                                         ("B", "B0"), ("F", "F"), ("U", "U7"), ("other", "iteration")])
def test_kind_of_each_block_label(kind, label):
    assert gantt.kind(label) == kind


def test_every_schedule_panel_has_a_legend_of_its_colours(tmp_path, legend_of):
    layers = tuple(Layer(f"l{i}", (f"l{i}.w",), 4_000_000, 0.002, 0.004, 0.0005) for i in range(6))
    problem = Problem(Profile(layers), from_link(8, 125e6, 50e-6))
    timelines = {s.name: s.timeline for s in (schedules.wfbp(problem), schedules.dear(problem),
                                              schedules.pipedap(problem))}
    png = tmp_path / "gantt.png"
    labels = legend_of(lambda: gantt.draw(timelines, png))
    for kind in ("F", "B", "U", "RS", "AG", "AR"):
        assert gantt.NAMES[kind] in labels
    assert "iteration end (next forward done)" in labels and any(text.startswith("plan bound") for text in labels)
    assert png.read_bytes()[:4] == b"\x89PNG"
