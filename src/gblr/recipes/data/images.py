"""The in-memory dataset every source loads into, and the pixel helpers the sources share.

:class:`ImageData` holds both splits as ``(N, C, H, W)`` float tensors in ``[0, 1]`` with the
train split's per-channel statistics; :func:`to_unit_float` turns decoded uint8 pixels into that
range and :func:`resize` changes the image size of a loaded split.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = ["ImageData", "channel_mean_std", "to_unit_float", "resize"]

# Statistics and resizing walk the images in chunks so that no full float64 copy is ever made.
_CHUNK = 4096


@dataclasses.dataclass
class ImageData:
    """Both splits of an image-classification dataset, as tensors.

    Attributes:
        train_images, test_images: ``(N, C, H, W)`` float tensors, in ``[0, 1]`` as loaded.
        train_labels, test_labels: ``(N,)`` int64 class indices in ``[0, num_classes)``.
        num_classes: number of classes (the classifier's output size).
        name: the dataset's name as accepted by :func:`~gblr.recipes.data.load_dataset`.
        mean, std: per-channel mean and (population) standard deviation of the *unnormalized*
            train images; computed here when left ``None``. They are kept unchanged by
            :meth:`normalized`, because they are what an inference pipeline must apply to a
            new ``[0, 1]`` image to match the training inputs. The test split never enters
            them, so no test information leaks into preprocessing.
        classes: class names, index-aligned with the labels (may be empty when unknown).
        standardized: True when the images have been standardized by :meth:`normalized`.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    name: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: tuple[str, ...] = ()
    standardized: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
                got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
                raise ValueError(f"{split}_images must be a float tensor of shape (N, C, H, W), got {got}")
            if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
                got = (tuple(labels.shape), labels.dtype) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"{split}_labels must be an int64 tensor of shape (N,), got {got}")
            if labels.shape[0] != images.shape[0]:
                raise ValueError(
                    f"{split}_labels has {labels.shape[0]} entries but {split}_images has {images.shape[0]} images"
                )
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"{split}_labels must lie in [0, num_classes={self.num_classes}), "
                    f"got values in [{int(labels.min())}, {int(labels.max())}]"
                )
        if self.train_images.shape[0] == 0:
            raise ValueError("train_images is empty: a dataset needs at least one training image")
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise ValueError(
                f"test images have shape (C, H, W) = {tuple(self.test_images.shape[1:])} but train images "
                f"have {tuple(self.train_images.shape[1:])}: both splits must share channels and size"
            )
        self.classes = tuple(self.classes)
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"classes has {len(self.classes)} names but num_classes is {self.num_classes}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither (then they are computed from train_images)")
        if self.mean is None:
            self.mean, self.std = channel_mean_std(self.train_images)
        channels = self.train_images.shape[1]
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need one value per channel ({channels}), got {self.mean} and {self.std}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train_images.shape[1:])

    def normalized(self) -> "ImageData":
        """A copy whose images are standardized per channel: ``(x - mean) / std``.

        Uses the train-split statistics for both splits. A channel with zero spread (a constant
        channel) is only centred, not divided by zero. Calling it on already standardized data
        returns a shallow copy rather than standardizing twice.
        """
        if self.standardized:
            return dataclasses.replace(self)
        shape = (1, -1, 1, 1)
        dtype, device = self.train_images.dtype, self.train_images.device
        mean = torch.tensor(self.mean, dtype=dtype, device=device).view(shape)
        std = torch.tensor(self.std, dtype=dtype, device=device).view(shape)
        std = torch.where(std > 0, std, torch.ones_like(std))
        return dataclasses.replace(
            self,
            train_images=(self.train_images - mean) / std,
            test_images=(self.test_images - mean.to(self.test_images)) / std.to(self.test_images),
            standardized=True,
        )


def channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``(N, C, H, W)`` images.

    Two passes over chunks, accumulated in float64: exact enough for 50k CIFAR images without
    the cancellation of a one-pass ``E[x^2] - E[x]^2`` and without a float64 copy of the data.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    count = images.shape[0] * images.shape[2] * images.shape[3]
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    for chunk in images.split(_CHUNK):
        total += chunk.to(torch.float64).sum(dim=(0, 2, 3))
    mean = total / count
    squares = torch.zeros_like(total)
    for chunk in images.split(_CHUNK):
        squares += (chunk.to(torch.float64) - mean.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    std = (squares / count).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (``pixel / 255``)."""
    return images.to(torch.float32).div_(255.0)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize to ``size`` square, in chunks to bound the scratch memory.

    Bilinear weights are non-negative, so values stay in ``[0, 1]`` (bicubic would overshoot).
    """
    if images.shape[0] == 0:
        return images.new_empty((0, images.shape[1], size, size))
    chunks = images.split(_CHUNK)
    return torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", antialias=True) for c in chunks])
