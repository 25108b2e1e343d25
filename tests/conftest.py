"""Shared by every test: tests/ on sys.path (for mpi_launch and friends), and the legend_of fixture."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
