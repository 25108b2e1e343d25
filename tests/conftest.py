"""Shared by every test: tests/ on sys.path (for mpi_launch and friends), no interference measurement unless a
test asks for one, and the legend_of fixture."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Measuring interference takes about 3 s per cost model and per online plan; the tests of other features
# plan without it (PIPEDAP_INTERFERENCE=off reaches every mpirun job through the environment). The tests of
# interference set it themselves (tests/test_interference.py, tests/mpi_scripts/check_interference.py).
os.environ.setdefault("PIPEDAP_INTERFERENCE", "off")
# Online planning switches plans at a step the tests can count on: one warm-up step, not "until memory is warm"
# (tests/mpi_scripts/check_planning.py checks that one).
os.environ.setdefault("PIPEDAP_PROFILE_WARMUP_MAX", "1")


@pytest.fixture
def legend_of(monkeypatch):
    """``legend_of(draw)``: run ``draw`` and return the legend texts of the figure it closes."""
    plt = pytest.importorskip("matplotlib.pyplot")

    def legend_texts(draw) -> list[str]:
        figures = []
        real_close = plt.close
        monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
        draw()
        (fig,) = figures
        return [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]

    return legend_texts
