"""The model zoo: published parameter counts, training at tiny inputs, forward order, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models

# The published counts (torchvision, Cadene/timm, Hugging Face), written out here rather than
# read from the registry so that a wrong registry entry fails too.
PUBLISHED = {
    "resnet50": 25_557_032,
    "vgg16": 138_357_544,
    "densenet201": 20_013_928,
    "inceptionv4": 42_679_816,
    "bert_base": 110_106_428,
    "bert_large": 336_226_108,
    "gpt2": 124_439_808,
}
TINY_SEQ_LEN = 8
BATCH = 2  # batch norm in training mode needs two values per channel at a 1x1 feature map


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny_batch(name: str) -> tuple:
    """A small seeded batch: image side max(32, minimum) or TINY_SEQ_LEN tokens."""
    info = models.info(name)
    generator = torch.Generator().manual_seed(0)
    if info.kind == "image":
        return models.synthetic_batch(
            name, BATCH, image_size=max(32, info.min_input_size), generator=generator
        )
    return models.synthetic_batch(name, BATCH, seq_len=TINY_SEQ_LEN, generator=generator)


@pytest.fixture(scope="module", params=list(PUBLISHED))
def named_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """Each full-size model, built once per module (pytest groups the tests by model)."""
    torch.manual_seed(0)
    return request.param, models.get(request.param)


def test_names_are_the_seven_models() -> None:
    assert models.names() == list(PUBLISHED)


def test_parameter_count_is_published(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    assert _count(model) == PUBLISHED[name]
    assert models.info(name).num_parameters == PUBLISHED[name]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_count_parameters_on_meta_device_is_published(name: str) -> None:
    assert models.count_parameters(name) == PUBLISHED[name]


def test_train_step_at_tiny_input(named_model: tuple[str, nn.Module]) -> None:
    """Forward + backward: finite loss near chance level, a finite non-zero gradient everywhere,
    and modules that own parameters run in the order they are declared."""
    name, model = named_model
    inputs, targets = _tiny_batch(name)
    declared = [m for m in model.modules() if list(m.parameters(recurse=False))]
    called: list[nn.Module] = []

    def record_first_call(module: nn.Module, _inputs: tuple) -> None:
        if not any(module is m for m in called):
            called.append(module)

    hooks = [m.register_forward_pre_hook(record_first_call) for m in declared]
    model.train()
    try:
        output = model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    loss = models.loss_fn(name)(output, targets)
    loss.backward()
    try:
        chance = math.log(models.info(name).num_classes)
        if name.startswith("bert"):
            chance += math.log(2)  # plus the next-sentence loss
        assert 0.5 * chance < loss.item() < 2 * chance, loss.item()
        assert len(called) == len(declared)
        assert all(c is d for c, d in zip(called, declared)), "modules run out of declared order"
        for pname, p in model.named_parameters():
            assert p.grad is not None, f"{name}: {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"
    finally:
        model.zero_grad(set_to_none=True)


def test_output_shapes(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    inputs, _ = _tiny_batch(name)
    info = models.info(name)
    model.eval()
    with torch.no_grad():
        output = model(inputs)
    if name.startswith("bert"):
        scores, nsp = output
        assert scores.shape == (BATCH, TINY_SEQ_LEN, info.num_classes)
        assert nsp.shape == (BATCH, 2)
    elif info.kind == "language":
        assert output.shape == (BATCH, TINY_SEQ_LEN, info.num_classes)
    else:
        assert output.shape == (BATCH, info.num_classes)


def test_min_input_size_is_the_smallest_that_runs(named_model: tuple[str, nn.Module]) -> None:
    name, model = named_model
    info = models.info(name)
    side = info.min_input_size
    model.eval()
    with torch.no_grad():
        if info.kind == "language":
            scores = model(torch.zeros(1, side, dtype=torch.long))
            assert (scores[0] if name.startswith("bert") else scores).shape[1] == side
            return
        assert model(torch.zeros(1, 3, side, side)).shape == (1, 1000)
        if side > 1:
            with pytest.raises(RuntimeError):
                model(torch.zeros(1, 3, side - 1, side - 1))


@pytest.mark.parametrize("name", ["resnet50", "vgg16", "densenet201", "inceptionv4"])
def test_image_models_take_num_classes(name: str) -> None:
    model = models.get(name, num_classes=10).eval()
    side = max(32, models.info(name).min_input_size)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, side, side)).shape == (1, 10)


TINY_BERT = dict(vocab_size=200, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.mark.parametrize("name", ["bert_base", "bert_large"])
def test_bert_config_overrides_and_tied_decoder(name: str) -> None:
    model = models.get(name, **TINY_BERT)
    assert len(model.bert.encoder.layer) == 2
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    inputs, targets = models.synthetic_batch(
        name, 3, seq_len=5, vocab_size=200, generator=torch.Generator().manual_seed(1)
    )
    scores, nsp = model(inputs)
    assert scores.shape == (3, 5, 200) and nsp.shape == (3, 2)
    assert torch.isfinite(models.loss_fn(name)(model(inputs), targets))


def test_gpt2_config_overrides_and_tied_head() -> None:
    model = models.get("gpt2", vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _count(model) == 100 * 32 + 16 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32
    inputs, targets = models.synthetic_batch("gpt2", 2, seq_len=16, vocab_size=100)
    assert model(inputs).shape == (2, 16, 100)
    with pytest.raises(ValueError, match="exceeds n_positions=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_is_causal() -> None:
    """Changing a later token must not change the logits at earlier positions."""
    model = models.get("gpt2", vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8).eval()
    ids = torch.arange(8).unsqueeze(0)
    changed = ids.clone()
    changed[0, 5] = 49
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_language_models_reject_bad_inputs() -> None:
    bert = models.get("bert_base", **TINY_BERT)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=512"):
        bert(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        bert(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        models.get("bert_base", **{**TINY_BERT, "num_heads": 5})


@pytest.mark.parametrize(
    "call",
    [
        lambda: models.get("resnet18"),
        lambda: models.info("bert"),
        lambda: models.loss_fn("GPT2"),
        lambda: models.synthetic_batch("vgg", 1),
        lambda: models.count_parameters("densenet"),
    ],
)
def test_unknown_name_lists_the_valid_ones(call) -> None:
    with pytest.raises(ValueError, match="unknown model .*valid names: resnet50, vgg16, .*gpt2"):
        call()


def test_synthetic_batch_rejects_sizes_of_the_other_kind() -> None:
    with pytest.raises(ValueError, match="resnet50 is an image model"):
        models.synthetic_batch("resnet50", 1, seq_len=8)
    with pytest.raises(ValueError, match="gpt2 is a language model"):
        models.synthetic_batch("gpt2", 1, image_size=32)


def test_command_line_lists_models(capsys: pytest.CaptureFixture[str]) -> None:
    from models.__main__ import main

    main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + len(PUBLISHED)
    for line, (name, count) in zip(lines[1:], PUBLISHED.items()):
        assert line.split()[0] == name and line.split()[-1] == f"{count:,}"
