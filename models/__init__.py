"""Model definitions and their training data, looked up by name.

``get(name, **kw)`` builds a model, ``info(name)`` describes it (kind, default input, classes or
vocabulary, published parameter count), ``synthetic_batch`` makes a matching (inputs, targets)
batch and ``loss_fn(name)`` the loss, so a benchmark can train any model with

    model = models.get(name)
    x, y = models.synthetic_batch(name, batch_size, generator=torch.Generator().manual_seed(0))
    models.loss_fn(name)(model(x), y).backward()

Language models take int64 token ids (batch, seq_len). Run ``python -m models --list`` for
the models and their parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from models import bert, data, densenet, gpt2, inception, resnet, vgg

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class ModelInfo:
    """What a benchmark needs to know about a model besides the module itself."""

    name: str
    # "image": float32 (batch, 3, H, W) in, class logits out; "language": int64 token ids in.
    kind: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample: (3, H, W) for images, (seq_len,) for language
    num_classes: int  # classes of an image model, vocabulary size of a language model
    min_input_size: int  # smallest image side (or sequence length) the forward accepts
    num_parameters: int  # the published count, for the default configuration
    loss: LossFn
    # (batch_size, image side or seq_len, classes or vocab, *, generator) -> (inputs, targets)
    make_batch: Callable[..., tuple[Any, Any]]


def _image_model(
    name: str, builder: Callable[..., nn.Module], side: int, min_side: int, count: int
) -> ModelInfo:
    """An ImageNet classifier: 1000 classes, cross-entropy on the logits."""
    return ModelInfo(
        name=name,
        kind="image",
        builder=builder,
        input_shape=(3, side, side),
        num_classes=1000,
        min_input_size=min_side,
        num_parameters=count,
        loss=F.cross_entropy,
        make_batch=data.image_batch,
    )


def _language_model(
    name: str,
    builder: Callable[..., nn.Module],
    seq_len: int,
    vocab: int,
    count: int,
    loss: LossFn,
    make_batch: Callable[..., tuple[Any, Any]],
) -> ModelInfo:
    """A language model taking token ids of any length from 1 up to its position table."""
    return ModelInfo(
        name=name,
        kind="language",
        builder=builder,
        input_shape=(seq_len,),
        num_classes=vocab,
        min_input_size=1,
        num_parameters=count,
        loss=loss,
        make_batch=make_batch,
    )


_MODELS = {
    m.name: m
    for m in (
        _image_model("resnet50", resnet.resnet50, 224, resnet.MIN_IMAGE_SIZE, 25_557_032),
        _image_model("vgg16", vgg.vgg16, 224, vgg.MIN_IMAGE_SIZE, 138_357_544),
        _image_model("densenet201", densenet.densenet201, 224, densenet.MIN_IMAGE_SIZE, 20_013_928),
        _image_model(
            "inceptionv4", inception.inceptionv4, 299, inception.MIN_IMAGE_SIZE, 42_679_816
        ),
        # BERT pre-training phase 1 uses sequences of 128; GPT-2 its full context of 1024.
        _language_model(
            "bert_base",
            bert.bert_base,
            128,
            30522,
            110_106_428,
            bert.pretraining_loss,
            data.bert_batch,
        ),
        _language_model(
            "bert_large",
            bert.bert_large,
            128,
            30522,
            336_226_108,
            bert.pretraining_loss,
            data.bert_batch,
        ),
        _language_model("gpt2", gpt2.gpt2, 1024, 50257, 124_439_808, gpt2.lm_loss, data.gpt2_batch),
    )
}


def names() -> list[str]:
    """The registered model names, CNNs first."""
    return list(_MODELS)


def info(name: str) -> ModelInfo:
    """The metadata of model `name`; raises ValueError listing the valid names if unknown."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_MODELS)}") from None


def get(name: str, **kwargs: Any) -> nn.Module:
    """Build model `name` with fresh weights.

    Keyword arguments go to the builder: ``num_classes`` for image models; BertConfig fields
    (``vocab_size``, ``num_layers``, ...) for BERT; GPT2Config fields (``vocab_size``,
    ``n_layer``, ...) for GPT-2.
    """
    return info(name).builder(**kwargs)


def count_parameters(name: str, **kwargs: Any) -> int:
    """Parameters of ``get(name, **kwargs)`` (tied ones once), built on the meta device: no memory, fast."""
    with torch.device("meta"):
        model = get(name, **kwargs)
    return sum(p.numel() for p in model.parameters())


def loss_fn(name: str) -> LossFn:
    """The training loss of model `name`, called as ``loss_fn(name)(model(inputs), targets)``."""
    return info(name).loss


def synthetic_batch(
    name: str,
    batch_size: int,
    *,
    image_size: int | None = None,
    num_classes: int | None = None,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Any, Any]:
    """A random (inputs, targets) batch for model `name`, fixed by `generator`'s seed.

    Image models take `image_size` and `num_classes`; language models `seq_len` and
    `vocab_size`. Unset sizes default to ``info(name)``; they must match how the model was
    built. Targets are labels (image models), (mlm_labels, nsp_labels) (BERT) or next-token
    ids (GPT-2); everything is generated on the CPU and then moved to `device`.
    """
    model = info(name)
    if model.kind == "image":
        if seq_len is not None or vocab_size is not None:
            raise ValueError(
                f"{name} is an image model: pass image_size/num_classes, not seq_len/vocab_size"
            )
        size, classes = image_size, num_classes
    else:
        if image_size is not None or num_classes is not None:
            raise ValueError(
                f"{name} is a language model: pass seq_len/vocab_size, not image_size/num_classes"
            )
        size, classes = seq_len, vocab_size
    batch = model.make_batch(
        batch_size,
        model.input_shape[-1] if size is None else size,
        model.num_classes if classes is None else classes,
        generator=generator,
    )
    return _to(batch, device)


def _to(batch: Any, device: torch.device | str | None) -> Any:
    """`batch` (a tensor or nested tuple of tensors) moved to `device`."""
    if isinstance(batch, tuple):
        return tuple(_to(b, device) for b in batch)
    return batch.to(device)
