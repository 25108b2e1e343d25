"""The torch profiler on tiny models: one layer per parameter-owning module, forward order,
positive times, exact byte counts, and the agreement hook."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from pipedap.planner.profile import elementwise_max  # noqa: E402
from pipedap.profiler import profile_model  # noqa: E402


class Tiny(nn.Module):
    """Declared out of call order, with a parameter-owning parent and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 4)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.LayerNorm(32))
        self.stem = nn.Linear(8, 16, bias=False)
        self.scale = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.head(self.body(self.stem(x))) * self.scale)


def test_profile_of_tiny_model():
    torch.manual_seed(0)
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    profile = profile_model(model, torch.randn(64, 8), warmup=1, iterations=3)
    # The root owns `scale` and is called first; then stem, body.0, body.2 (LayerNorm), head.
    assert [layer.name for layer in profile.layers] == ["", "stem", "body.0", "body.2", "head"]
    assert [layer.params for layer in profile.layers] == [
        ("scale",), ("stem.weight",), ("body.0.weight", "body.0.bias"),
        ("body.2.weight", "body.2.bias"), ("head.weight", "head.bias"),
    ]
    assert [layer.nbytes for layer in profile.layers] == [4 * 4, 8 * 16 * 4, (16 * 32 + 32) * 4, 64 * 4, (32 * 4 + 4) * 4]
    for layer in profile.layers:
        assert layer.tf > 0 and layer.u >= 0
    # The optimizer's per-call part is the bucket's fixed cost, not the layers' (each u is less it).
    assert profile.bucket_cost > 0 and profile.bucket_cost == profile.meta["update_call_s"]
    # Backward spans are >= 0 by construction and sum to the backward; the head's is the
    # first and always positive.
    assert all(layer.tb >= 0 for layer in profile.layers) and profile.layers[-1].tb > 0
    assert sum(layer.tb for layer in profile.layers) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert profile.meta["iterations"] == 3


def test_agree_hook_and_loss():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    seen = []

    def agree(profile):
        seen.append(profile)
        return elementwise_max([profile, profile])

    profile = profile_model(model, x, y, nn.functional.cross_entropy, warmup=0, iterations=1, agree=agree)
    assert len(seen) == 1 and profile.meta["agreed"] == "elementwise max over 2 ranks"
    assert [layer.name for layer in profile.layers] == ["0", "1"]


def test_unused_layer_is_an_error():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['spare'\] own trainable parameters but never ran"):
        profile_model(Unused(), torch.randn(3, 2), warmup=0, iterations=1)


def test_min_seconds_extends_each_phase_of_a_fast_model_up_to_the_cap(monkeypatch):
    """A batch of microseconds gets tens of warm-up and measured iterations, as a GPU's would;
    the counts are in the meta, and the cap bounds a phase whatever its time budget."""
    from pipedap import profiler

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    profile = profile_model(model, torch.randn(8, 4), warmup=1, iterations=3, min_seconds=0.1)
    assert profile.meta["warmup"] > 1 and profile.meta["iterations"] > 3
    monkeypatch.setattr(profiler, "MAX_ITERATIONS", 6)
    capped = profile_model(model, torch.randn(8, 4), warmup=2, iterations=3, min_seconds=1e3)
    assert (capped.meta["warmup"], capped.meta["iterations"]) == (6, 6)
    unwarmed = profile_model(model, torch.randn(8, 4), warmup=0, iterations=1, min_seconds=0.05)
    assert unwarmed.meta["warmup"] == 0 and unwarmed.meta["iterations"] > 1
    with pytest.raises(ValueError, match="min_seconds >= 0"):
        profile_model(model, torch.randn(8, 4), min_seconds=-1)


class TiedLM(nn.Module):
    """A lookup and a decoder sharing its weight (BERT's masked-LM head in small)."""

    def __init__(self, decoder=nn.Linear) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.hidden = nn.Linear(16, 16)
        self.decoder = decoder(16, 50)
        self.decoder.weight = self.emb.weight

    def forward(self, ids):
        return self.decoder(torch.tanh(self.hidden(self.emb(ids))))


class OwnLinear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class NormSGD(torch.optim.SGD):
    """Each gradient divided by its norm: not element-wise."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.div_(p.grad.norm() + 1)
        return super().step(closure)


def test_a_tied_output_layer_is_timed_in_pieces_and_its_lookup_found_servable(monkeypatch):
    from pipedap.output_layer import DENSE_PIECES

    torch.manual_seed(0)
    model, ids = TiedLM(), torch.randint(0, 50, (4, 8))
    before = [p.detach().clone() for p in model.parameters()]
    (tie,) = profile_model(model, ids, warmup=1, iterations=3).ties
    assert (tie.param, tie.user, tie.pieces, tie.deferrable) == ("emb.weight", "decoder.bias", DENSE_PIECES, True)
    assert 0 < tie.span <= tie.early and tie.output_forward > 0  # the bias is ready after the last piece
    assert "forward" not in vars(model.decoder)  # its own forward back
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the rule not element-wise, or deferral off: not servable; an output layer with its own forward: whole
    (tie,) = profile_model(model, ids, warmup=0, iterations=1, optimizer_factory=lambda ps: NormSGD(ps, lr=0.1)).ties
    assert tie.pieces == DENSE_PIECES and not tie.deferrable
    monkeypatch.setenv("PIPEDAP_TIED_DEFER", "0")
    assert not profile_model(model, ids, warmup=0, iterations=1).ties[0].deferrable
    monkeypatch.delenv("PIPEDAP_TIED_DEFER")
    (tie,) = profile_model(TiedLM(OwnLinear), ids, warmup=0, iterations=1).ties
    assert (tie.pieces, tie.early, tie.span, tie.deferrable) == (1, 0.0, 0.0, True)
