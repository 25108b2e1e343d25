"""Training data for the models: synthetic batches made locally, and a folder of real images.

Synthetic batches are drawn from a ``torch.Generator`` so that a seed fixes them exactly (the
benchmarks time training, not data, so contents only need the right shapes and ranges). Real
images come from an ImageFolder-style tree, ``root/<class>/<image>.png|.jpg|.jpeg``, decoded
with Pillow (``pip install pillow``), which is imported only when such a folder is opened.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models.bert import IGNORE_INDEX, MASK_TOKEN_ID

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# ImageNet evaluation crops the central 87.5% after resizing (256 -> 224).
CROP_FRACTION = 0.875


def image_batch(
    batch_size: int,
    image_size: int = 224,
    num_classes: int = 1000,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake ImageNet: float32 images (batch, 3, size, size) and int64 labels (batch,).

    Pixels are standard normal, the distribution of normalised images, so activations have
    realistic scale.
    """
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images, labels


def bert_batch(
    batch_size: int,
    seq_len: int = 128,
    vocab_size: int = 30522,
    *,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Random token ids with masked-LM and next-sentence targets, for BertForPreTraining.

    Returns (input_ids, (mlm_labels, nsp_labels)), all int64: input_ids and mlm_labels are
    (batch, seq_len), nsp_labels is (batch,) in {0, 1}. In each sequence round(mask_prob *
    seq_len) positions (at least one, so the loss is always defined) are replaced by [MASK]
    and labelled with the original token; the other labels are IGNORE_INDEX. (BERT replaces
    only 80% of them by [MASK]; for timing the difference does not matter.)
    """
    if vocab_size <= MASK_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed the [MASK] id {MASK_TOKEN_ID}, got {vocab_size}")
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    num_masked = max(1, round(mask_prob * seq_len))
    masked = torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :num_masked]
    mlm_labels = torch.full_like(tokens, IGNORE_INDEX)
    mlm_labels.scatter_(1, masked, tokens.gather(1, masked))
    input_ids = tokens.scatter(1, masked, MASK_TOKEN_ID)
    nsp_labels = torch.randint(0, 2, (batch_size,), generator=generator)
    return input_ids, (mlm_labels, nsp_labels)


def gpt2_batch(
    batch_size: int,
    seq_len: int = 1024,
    vocab_size: int = 50257,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (batch, seq_len) and their next tokens (batch, seq_len), both int64.

    Both come from one sequence of seq_len + 1 tokens, so targets[:, :-1] == input_ids[:, 1:].
    """
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def template_images(batch_size: int, image_size: int, num_classes: int, *, seed: int = 0):
    """Learnable synthetic images, forever: each class a fixed random image, each sample it plus noise.

    The templates are the same for every seed; ``seed`` fixes the draws, so replicas
    given different seeds read different samples of the same task.
    """
    templates = torch.randn(num_classes, 3, image_size, image_size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    while True:
        labels = torch.randint(0, num_classes, (batch_size,), generator=g)
        yield templates[labels] + torch.randn(batch_size, 3, image_size, image_size, generator=g), labels


class ImageFolder(Dataset):
    """Images in class subfolders of `root`, as (float32 (3, size, size), int label) pairs.

    Classes are the subfolder names in sorted order. Each image is converted to RGB, resized so
    its shorter side is image_size / 0.875, centre-cropped to image_size and normalised with the
    ImageNet mean and standard deviation.
    """

    def __init__(self, root: str | Path, image_size: int = 224) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(root)!r} does not exist or is not a directory"
            )
        self.image_size = image_size
        self.resize_to = round(image_size / CROP_FRACTION)
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(
                f"no images in {str(root)!r}: expected root/<class>/<image> with one of the "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}; found class folders {self.classes}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.load(path), label

    def load(self, path: Path) -> torch.Tensor:
        """Decode, resize, centre-crop and normalise one image file."""
        try:
            from PIL import Image
        except ImportError as err:
            raise ImportError("reading image folders needs Pillow: pip install pillow") from err
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = self.resize_to / min(img.size)
            width, height = (max(self.image_size, round(side * scale)) for side in img.size)
            img = img.resize((width, height), Image.Resampling.BILINEAR)
            left, top = (width - self.image_size) // 2, (height - self.image_size) // 2
            img = img.crop((left, top, left + self.image_size, top + self.image_size))
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        image = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float() / 255
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (image - mean) / std


def image_folder_loader(
    root: str | Path,
    batch_size: int,
    image_size: int = 224,
    *,
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over ImageFolder(root, image_size) giving this rank's shard of the images.

    With world_size > 1 each rank reads a disjoint 1/world_size of the images (padded to equal
    length by repeating some, as DistributedSampler does); the order depends only on `seed`.
    Call ``loader.sampler.set_epoch(epoch)`` to reshuffle between epochs. ``drop_last`` drops
    a last, smaller batch (a pipeline needs every minibatch of one shape).
    """
    dataset = ImageFolder(root, image_size)
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last)
