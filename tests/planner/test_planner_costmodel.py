"""Cost model: least-squares fits, ring formulas, files keyed by world size and hosts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipedap.planner import costmodel
from pipedap.planner.costmodel import AlphaBeta, CostModel


def _samples(a: float, b: float, rng: np.random.Generator, noise: float) -> list[tuple[float, float]]:
    sizes = np.repeat(np.logspace(3, 8, 12), 5)
    return [(m, (a + b * m) * (1 + noise * rng.standard_normal())) for m in sizes]


def test_fit_recovers_known_line_from_noisy_samples():
    rng = np.random.default_rng(0)
    truth = {"rs": (3e-4, 1.1e-9), "ag": (2e-4, 0.9e-9), "ar": (6e-4, 2.0e-9)}
    samples = {kind: _samples(a, b, rng, noise=0.02) for kind, (a, b) in truth.items()}
    model, reports = costmodel.fit(samples, world_size=4, hosts=["h1", "h0"])
    for kind, (a, b) in truth.items():
        assert model.of(kind).a == pytest.approx(a, rel=0.05)
        assert model.of(kind).b == pytest.approx(b, rel=0.02)
        assert reports[kind].samples == 60
        assert 0.005 < reports[kind].rms_relative < 0.05  # about the 2% noise put in
    assert model.hosts == ("h0", "h1")


def test_fit_is_exact_without_noise_and_clamps_negative_intercept():
    line, report = costmodel.fit_line([(0, 1.0), (10, 6.0), (20, 11.0)])
    assert (line.a, line.b) == pytest.approx((1.0, 0.5))
    assert report.max_abs_residual == pytest.approx(0.0, abs=1e-12)
    # These points fit t = -1 + 1 * M exactly; with a >= 0 the (relative) fit is through 0:
    # b minimises (1 - 10 b / 9)^2 + (1 - 20 b / 19)^2.
    line, _ = costmodel.fit_line([(10, 9.0), (20, 19.0)])
    x, y = 10 / 9, 20 / 19
    assert line.a == 0.0 and line.b == pytest.approx((x + y) / (x * x + y * y))


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two or more distinct sizes"):
        costmodel.fit_line([(10, 1.0), (10, 1.1)])
    with pytest.raises(ValueError, match="positive times"):
        costmodel.fit_line([(10, 1.0), (20, 0.0)])
    with pytest.raises(ValueError, match=r"no samples for \['ar'\]"):
        costmodel.fit({"rs": [(1, 1), (2, 2)], "ag": [(1, 1), (2, 2)]}, world_size=2)


def test_ring_model_from_link():
    model = costmodel.from_link(workers=4, bandwidth=1e9, latency=1e-5)
    assert model.rs.a == pytest.approx(3e-5) and model.rs.b == pytest.approx(0.75e-9)
    assert model.ag == model.rs
    assert model.ar.a == pytest.approx(6e-5) and model.ar.b == pytest.approx(1.5e-9)
    assert model.rs.time(4e6) == pytest.approx(3e-5 + 3e-3)
    assert costmodel.from_link(1, 1e9, 1e-5).ar.time(1e9) == 0.0


def test_save_and_load_keyed_by_world_size_and_hosts(tmp_path):
    path = tmp_path / "cost.json"
    four = costmodel.from_link(4, 1.25e8, 5e-5)
    eight_a = CostModel(8, four.rs, four.ag, four.ar, hosts=("a", "b"))
    eight_c = CostModel(8, four.ar, four.ar, four.ar, hosts=("c", "d"))
    for model in (four, eight_a, eight_c, eight_a):  # saving again replaces
        costmodel.save(model, path)
    assert len(json.loads(path.read_text())["entries"]) == 3
    assert costmodel.load(path, 4) == four
    assert costmodel.load(path, 8, hosts=["d", "c"]) == eight_c
    with pytest.raises(ValueError, match="several cost models for 8 workers"):
        costmodel.load(path, 8)
    with pytest.raises(ValueError, match="no cost model for 16 workers"):
        costmodel.load(path, 16)


def test_bad_cost_file_names_the_key(tmp_path):
    path = tmp_path / "cost.json"
    path.write_text(json.dumps({"version": 1, "entries": [{"world_size": 2, "rs": {"a": 1, "b": 1}}]}))
    with pytest.raises(ValueError, match=r"entries\[0\]: missing or malformed key 'ag'"):
        costmodel.load(path, 2)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        CostModel(2, AlphaBeta(-1, 0), AlphaBeta(0, 0), AlphaBeta(0, 0))


def test_a_burst_link_is_fitted_on_its_large_sizes():
    """[Note: links that are not a line]: the reduce-scatter times measured at 125 Mbit/s on the emulated cluster
    (tbf with a 256 kbit burst). Over all sizes the best non-negative line halves the large messages' time."""
    measured = [(4096, 124.4e-6), (16384, 154.1e-6), (65536, 1374.1e-6), (262144, 7900.2e-6), (1 << 20, 35131.2e-6),
                (4 << 20, 140549.2e-6), (16 << 20, 565985.4e-6), (64 << 20, 2366903.7e-6)]
    everything = np.asarray(measured)
    naive, naive_report = costmodel._relative_fit(everything)
    assert naive_report.rms_relative > costmodel.POOR_FIT and naive.time(64 << 20) < 0.6 * 2.3669
    line, report = costmodel.fit_line(measured)
    for nbytes, seconds in measured[4:]:  # 1 MiB and up: within 10%
        assert line.time(nbytes) == pytest.approx(seconds, rel=0.1)
    assert report.samples == 4 and report.rms_relative < 0.1
    # a line that fits stays fitted on every size
    _, exact = costmodel.fit_line([(m, 1e-4 + 3e-8 * m) for m, _ in measured])
    assert exact.samples == len(measured)
