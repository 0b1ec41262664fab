"""The training recipes' datasets, held in memory as tensors: image classification, and text
for a language model (:mod:`.text`: ``load_text``, ``TextData``).

The recipes train small models on small datasets (Fashion-MNIST, CIFAR-10/100, a modest
ImageFolder tree), so every split is decoded once into a ``(N, C, H, W)`` float32 tensor in
``[0, 1]`` (:class:`ImageData`) and minibatches are slices of it (:func:`batches`): no worker
processes, no per-step decoding, and a shuffle that is a pure function of a ``torch.Generator``
(reproducible and resumable, identical on every rank of a distributed run).

One module per source: :mod:`.fashion_mnist` (IDX files), :mod:`.cifar` (the python batches),
:mod:`.image_folder` (Pillow); :mod:`.images` holds :class:`ImageData` and the pixel helpers,
:mod:`.download` the cache folder, downloads and archive extraction. This package picks a
source by name (:func:`load_dataset`) and cuts minibatches (:func:`batches`). Nothing needs
torchvision; numpy only for CIFAR, Pillow only for an ImageFolder. Text (``--dataset text``)
is split by file into training and held-out token streams; see :mod:`.text`.

The sources' constants (URLs, folders, class names) are re-exported here for reading; a loader
reads them from its own module, so that is where a test or a mirror setup changes one (e.g.
``gblr.recipes.data.fashion_mnist.FASHION_MNIST_URL``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import torch

from .cifar import load_cifar
from .download import cache_dir, download_file
from .fashion_mnist import load_fashion_mnist, read_idx
from .image_folder import load_image_folder
from .images import ImageData, channel_mean_std, resize
from .text import ByteTokenizer, HuggingFaceTokenizer, TextData, load_text

# Re-exported for reading (see the module docstring).
from .cifar import CIFAR10_CLASSES, CIFAR_URL  # noqa: F401
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES  # noqa: F401
from .fashion_mnist import FASHION_MNIST_SYSTEM_DIR, FASHION_MNIST_URL  # noqa: F401
from .image_folder import IMAGE_EXTENSIONS  # noqa: F401

__all__ = [
    "ImageData",
    "TextData",
    "ByteTokenizer",
    "HuggingFaceTokenizer",
    "DATASETS",
    "IMAGE_DATASETS",
    "load_dataset",
    "load_text",
    "load_fashion_mnist",
    "load_cifar",
    "load_image_folder",
    "read_idx",
    "download_file",
    "batches",
    "cache_dir",
    "channel_mean_std",
]

IMAGE_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")
DATASETS = (*IMAGE_DATASETS, "text")  # text: load_text


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> ImageData:
    """Load one of :data:`IMAGE_DATASETS` by name (the recipes' ``--dataset`` choices but
    ``"text"``, which :func:`load_text` reads).

    ``image_size`` is required for ``"imagefolder"`` (which needs ``data_dir``, its root). For
    the built-in datasets it is optional: when it differs from the native size (28 or 32) the
    images are resized (bilinear, antialiased) and the statistics recomputed.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {', '.join(IMAGE_DATASETS)} (text: "
                         "load_text)")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise ValueError(f"image_size must be None or a positive int, got {image_size!r}")
    if name == "imagefolder":
        if data_dir is None:
            raise ValueError("the imagefolder dataset needs data_dir (--data-dir DIR): the root of the image tree")
        if image_size is None:
            raise ValueError("the imagefolder dataset needs image_size (--image-size N): images are resized to N x N")
        if download:
            raise ValueError("the imagefolder dataset cannot be downloaded; point data_dir at an existing tree")
        return load_image_folder(data_dir, image_size)
    if name == "fashion-mnist":
        data = load_fashion_mnist(data_dir, download=download)
    else:
        data = load_cifar(data_dir, num_classes=10 if name == "cifar10" else 100, download=download)
    if image_size is not None and image_size != data.train_images.shape[-1]:
        data = dataclasses.replace(
            data,
            train_images=resize(data.train_images, image_size),
            test_images=resize(data.test_images, image_size),
            mean=None,
            std=None,
        )
    return data


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)`` minibatches; ``batch_size`` is the *global* batch size.

    The order is ``torch.randperm(N, generator=generator)`` when ``shuffle`` (torch's global RNG
    when ``generator`` is None), else ``0..N-1``. The permutation is drawn when this function is
    called, not at the first ``next()``: the generator's state before the call fully determines
    the epoch, so a run resumes exactly by restoring that state and skipping the steps already
    done (``itertools.islice``). Every rank must pass a generator in the same state.

    With ``world_size > 1`` each global batch is cut into ``world_size`` contiguous slices and
    rank ``r`` takes slice ``r``, ``[r * batch_size / world_size, (r + 1) * batch_size /
    world_size)``: the ranks of one step together see exactly the single-process batch. A
    final partial batch (kept unless ``drop_last``) is cut into near-equal slices instead, so
    that no rank idles while others have extra; if it has fewer samples than ranks, some ranks
    get an empty slice, but every rank yields the same number of steps (collectives stay in
    lock-step). Use ``drop_last=True`` for training when per-rank mean losses must weight
    samples exactly as one process would.
    """
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("images and labels must be tensors")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images has {images.shape[0]} samples but labels has {labels.shape[0]}")
    for arg, value in (("batch_size", batch_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    if batch_size % world_size:
        raise ValueError(
            f"batch_size (the global batch) must be divisible by world_size: {batch_size} is not divisible by "
            f"{world_size}; use a multiple of {world_size}"
        )
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    per_rank = batch_size // world_size

    def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, n, batch_size):
            step = order[start : start + batch_size]
            if step.numel() < batch_size:
                if drop_last:
                    return
                local = step.tensor_split(world_size)[rank]
            else:
                local = step[rank * per_rank : (rank + 1) * per_rank]
            yield images[local.to(images.device)], labels[local.to(labels.device)]

    return generate()
