"""Synthetic batches (shapes, ranges, determinism) and the image-folder loader on generated files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from models import data
from models.bert import IGNORE_INDEX, MASK_TOKEN_ID


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(batch: tuple) -> list[torch.Tensor]:
    """The tensors of an (inputs, targets) batch, nested tuples flattened."""
    out = []
    for item in batch:
        out += _flat(item) if isinstance(item, tuple) else [item]
    return out


@pytest.mark.parametrize("name", models.names())
def test_synthetic_batch_is_fixed_by_the_seed(name: str) -> None:
    small = {"image_size": 32} if models.info(name).kind == "image" else {"seq_len": 16}
    first = _flat(models.synthetic_batch(name, 4, generator=_seeded(7), **small))
    again = _flat(models.synthetic_batch(name, 4, generator=_seeded(7), **small))
    other = _flat(models.synthetic_batch(name, 4, generator=_seeded(8), **small))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("name", models.names())
def test_synthetic_batch_defaults_match_the_registry(name: str) -> None:
    info = models.info(name)
    inputs, targets = models.synthetic_batch(name, 2, generator=_seeded(0))
    assert inputs.shape == (2, *info.input_shape)
    assert inputs.dtype == (torch.float32 if info.kind == "image" else torch.int64)
    labels = targets[0] if isinstance(targets, tuple) else targets
    assert labels.dtype == torch.int64
    assert labels.max() < info.num_classes


def test_image_batch_looks_like_normalised_imagenet() -> None:
    images, labels = data.image_batch(64, 224, generator=_seeded(0))
    assert images.shape == (64, 3, 224, 224) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01
    assert labels.shape == (64,) and labels.min() >= 0 and labels.max() < 1000
    assert len(labels.unique()) > 50  # spread over the classes, not one repeated label


def test_bert_batch_masks_fifteen_percent_and_labels_them() -> None:
    input_ids, (mlm_labels, nsp_labels) = data.bert_batch(8, 128, generator=_seeded(0))
    assert input_ids.shape == mlm_labels.shape == (8, 128) and nsp_labels.shape == (8,)
    masked = mlm_labels != IGNORE_INDEX
    assert masked.sum(dim=1).tolist() == [19] * 8  # round(0.15 * 128)
    assert (input_ids[masked] == MASK_TOKEN_ID).all()
    assert mlm_labels[masked].min() >= 0 and mlm_labels[masked].max() < 30522
    assert set(nsp_labels.tolist()) == {0, 1}


def test_bert_batch_masks_at_least_one_token() -> None:
    _, (mlm_labels, _) = data.bert_batch(4, 2, generator=_seeded(0))
    assert ((mlm_labels != IGNORE_INDEX).sum(dim=1) == 1).all()


def test_bert_batch_needs_room_for_the_mask_token() -> None:
    with pytest.raises(ValueError, match="vocab_size must exceed the \\[MASK\\] id 103"):
        data.bert_batch(1, 8, vocab_size=100)


def test_gpt2_targets_are_the_next_tokens() -> None:
    inputs, targets = data.gpt2_batch(3, 10, generator=_seeded(0))
    assert inputs.shape == targets.shape == (3, 10)
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert inputs.max() < 50257 and inputs.min() >= 0


def test_synthetic_batch_moves_nested_targets_to_the_device() -> None:
    inputs, (mlm_labels, nsp_labels) = models.synthetic_batch("bert_base", 2, device="meta")
    assert inputs.is_meta and mlm_labels.is_meta and nsp_labels.is_meta


# ---- the image-folder path (needs Pillow) ----

SIDE = 32


@pytest.fixture
def pil_image():
    return pytest.importorskip("PIL.Image", reason="the image-folder loader needs Pillow")


@pytest.fixture
def folder(tmp_path: Path, pil_image) -> Path:
    """Two classes, five images: PNG and JPEG, RGB, greyscale and RGBA, odd sizes; plus a non-image."""
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    pil_image.new("RGB", (50, 40), (255, 0, 128)).save(root / "cat" / "a.png")
    pil_image.new("L", (40, 90), 200).save(root / "cat" / "b.PNG")
    pil_image.new("RGBA", (64, 64), (0, 255, 0, 10)).save(root / "dog" / "c.png")
    pil_image.new("RGB", (300, 100), (10, 20, 30)).save(root / "dog" / "d.jpg")
    pil_image.new("RGB", (33, 33), (1, 2, 3)).save(root / "dog" / "e.jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    mean = torch.tensor(data.IMAGENET_MEAN)
    std = torch.tensor(data.IMAGENET_STD)
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std


def test_image_folder_finds_classes_and_images(folder: Path) -> None:
    dataset = data.ImageFolder(folder, SIDE)
    assert dataset.classes == ["cat", "dog"]
    assert [(p.name, label) for p, label in dataset.samples] == [
        ("a.png", 0),
        ("b.PNG", 0),
        ("c.png", 1),
        ("d.jpg", 1),
        ("e.jpeg", 1),
    ]
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.shape == (3, SIDE, SIDE) and image.dtype == torch.float32
        assert label == dataset.samples[i][1]


def test_image_folder_normalises_pixels(folder: Path) -> None:
    dataset = data.ImageFolder(folder, SIDE)
    solid_png, _ = dataset[0]  # a lossless solid colour stays exact through resize and crop
    expected = _normalised((255, 0, 128)).view(3, 1, 1).expand(3, SIDE, SIDE)
    torch.testing.assert_close(solid_png, expected)
    grey, _ = dataset[1]  # greyscale is converted to three equal channels
    torch.testing.assert_close(grey, _normalised((200, 200, 200)).view(3, 1, 1).expand_as(grey))


def test_image_folder_crops_the_centre(tmp_path: Path, pil_image) -> None:
    """A 300x100 image in red | green | blue thirds: the centre crop must be all green."""
    root = tmp_path / "stripes"
    (root / "only").mkdir(parents=True)
    image = pil_image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    image.save(root / "only" / "stripes.png")
    crop, _ = data.ImageFolder(root, SIDE)[0]
    torch.testing.assert_close(crop, _normalised((0, 255, 0)).view(3, 1, 1).expand_as(crop))


def test_image_folder_loader_batches(folder: Path) -> None:
    loader = data.image_folder_loader(folder, batch_size=2, image_size=SIDE, seed=3)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [2, 2, 1]
    images = torch.cat([images for images, _ in batches])
    assert images.shape == (5, 3, SIDE, SIDE)
    labels = torch.cat([labels for _, labels in batches])
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 1]
    order = list(loader.sampler)
    assert order == list(data.image_folder_loader(folder, 2, SIDE, seed=3).sampler)
    assert sorted(order) == [0, 1, 2, 3, 4]


def test_image_folder_loader_shards_across_ranks(folder: Path) -> None:
    shards = [
        list(data.image_folder_loader(folder, 1, SIDE, rank=r, world_size=2).sampler)
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 3  # five images padded to six
    assert set(shards[0]) | set(shards[1]) == {0, 1, 2, 3, 4}


def test_image_folder_errors_say_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("")
    with pytest.raises(ValueError, match=r"no images in .*\.png, \.jpg, \.jpeg.*\['empty_class'\]"):
        data.ImageFolder(tmp_path)
