"""An ImageFolder tree (``root/<class>/<image>``, or ``train/`` plus ``val/`` or ``test/``), decoded with Pillow.

Pillow is imported only when images are decoded, so the other datasets never need it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .images import ImageData, to_unit_float

__all__ = ["load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _class_folders(directory: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for ``directory/<class>/<image>``; hidden entries skipped."""
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{directory} has no class subfolders: expected {directory}/<class name>/<image files>")
    found = {}
    for name in classes:
        images = sorted(
            p
            for p in (directory / name).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise ValueError(
                f"class folder {directory / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"remove it or add images"
            )
        found[name] = images
    return found


def _decode_images(paths: list[Path], image_size: int) -> torch.Tensor:
    """Decode, convert to RGB and resize to ``image_size`` square; uint8 ``(N, 3, S, S)``."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "loading an image folder needs Pillow to decode images: pip install 'gblr[train]' (or pip install pillow)"
        ) from exc
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), resample=bilinear)
                pixels = bytearray(image.tobytes())
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
            raise ValueError(f"cannot decode image {path}: {exc}") from exc
        out[i] = torch.frombuffer(pixels, dtype=torch.uint8).view(image_size, image_size, 3).permute(2, 0, 1)
    return out


def _labelled(files: dict[str, list[Path]], classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    paths = [p for name in classes for p in files[name]]
    labels = torch.tensor([i for i, name in enumerate(classes) for _ in files[name]], dtype=torch.int64)
    return paths, labels


def load_image_folder(
    root: str | os.PathLike, image_size: int, test_fraction: float = 0.2, seed: int = 0
) -> ImageData:
    """An ImageFolder tree, decoded into memory as ``(N, 3, image_size, image_size)`` RGB.

    Two layouts:

    * ``root/train/<class>/*`` with ``root/val/<class>/*`` (or ``root/test/<class>/*``; ``val``
      wins when both exist): the given splits are used, and must have the same classes.
    * ``root/<class>/*``: each class is split on its own (stratified), ``round(n *
      test_fraction)`` images to the test split (at least one image stays in train), by a
      permutation drawn from a generator seeded with ``seed``. Files are sorted first, so the
      split depends only on the file names and ``seed``, not on the filesystem's listing order.

    Classes are the sorted subfolder names; images are files ending in .png, .jpg, .jpeg,
    .bmp or .webp (any case). Images are resized to a square without keeping the aspect ratio.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int (pixels per side), got {image_size!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    held_out = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        train_files, test_files = _class_folders(root / "train"), _class_folders(held_out)
        if list(train_files) != list(test_files):
            only_train = sorted(set(train_files) - set(test_files))
            only_test = sorted(set(test_files) - set(train_files))
            raise ValueError(
                f"{root / 'train'} and {held_out} must have the same class folders; "
                f"only in train: {only_train}, only in {held_out.name}: {only_test}"
            )
        classes = list(train_files)
        train_paths, train_labels = _labelled(train_files, classes)
        test_paths, test_labels = _labelled(test_files, classes)
    elif (root / "train").is_dir():
        raise ValueError(
            f"{root} has a train/ folder but neither val/ nor test/: add one, or pass {root / 'train'} "
            f"itself to split it by test_fraction"
        )
    else:
        files = _class_folders(root)
        classes = list(files)
        generator = torch.Generator().manual_seed(seed)
        train_split: dict[str, list[Path]] = {}
        test_split: dict[str, list[Path]] = {}
        for name in classes:
            paths = files[name]
            n_test = min(len(paths) - 1, int(len(paths) * test_fraction + 0.5))
            chosen = set(torch.randperm(len(paths), generator=generator)[:n_test].tolist())
            test_split[name] = [p for i, p in enumerate(paths) if i in chosen]
            train_split[name] = [p for i, p in enumerate(paths) if i not in chosen]
        train_paths, train_labels = _labelled(train_split, classes)
        test_paths, test_labels = _labelled(test_split, classes)
    return ImageData(
        to_unit_float(_decode_images(train_paths, image_size)),
        train_labels,
        to_unit_float(_decode_images(test_paths, image_size)),
        test_labels,
        num_classes=len(classes),
        name="imagefolder",
        classes=tuple(classes),
    )
