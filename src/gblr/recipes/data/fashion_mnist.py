"""Fashion-MNIST, read from its IDX files (plain or gzip) without torchvision or numpy.

The files are looked for in ``data_dir``, or else in the Debian package's folder and then the
cache; with ``download=True`` the missing ones are fetched from the official mirror.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import torch

from .download import cache_dir, download_file, join_url
from .images import ImageData, to_unit_float

__all__ = ["load_fashion_mnist", "read_idx"]

# Where the Debian package ``dataset-fashion-mnist`` installs the four .gz files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (plain, or gzip when the name ends in ``.gz``).

    Format: two zero bytes, the type byte ``0x08`` (uint8), a byte with the number of
    dimensions, one big-endian int32 size per dimension, then the row-major data. The magic
    number, type, dimension count (when ``ndim`` is given) and the data length are all checked:
    a wrong file (an HTML error page saved as a download, a truncated copy) fails here with a
    ValueError naming it instead of as a confusing reshape error later.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path} is not a valid gzip file ({exc}); delete it and download it again") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'}")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{raw[2]:02x} is not supported (only 0x08, unsigned byte)")
    dims = raw[3]
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path}: expected an IDX file with {ndim} dimensions, got {dims}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    sizes = struct.unpack(f">{dims}I", raw[4:header])
    expected = math.prod(sizes)
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header announces sizes {sizes} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt, delete it and download it again"
        )
    if expected == 0:
        return torch.empty(sizes, dtype=torch.uint8)
    # bytearray: torch.frombuffer wants a writable buffer, and the copy detaches the tensor from `raw`.
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header, count=expected).reshape(sizes)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_files(directory: Path) -> dict[str, Path] | None:
    found = {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
    return None if any(p is None for p in found.values()) else found


def _fashion_mnist_missing(searched: list[Path], target: Path) -> FileNotFoundError:
    names = ", ".join(FASHION_MNIST_FILES.values())
    looked = ", ".join(str(d) for d in searched)
    return FileNotFoundError(
        f"Fashion-MNIST not found (looked in {looked} for {names}, plain or .gz). Get it with one of:\n"
        f"  sudo apt-get install dataset-fashion-mnist   (installs the files to {FASHION_MNIST_SYSTEM_DIR}, "
        f"searched by default when no data dir is given)\n"
        f"  --download (download=True)                   (downloads about 30 MB into {target})\n"
        f"  --data-dir DIR (data_dir=DIR)                 (a folder that already holds the four files)"
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = False) -> ImageData:
    """Fashion-MNIST: 60k train and 10k test 28x28 grayscale images, 10 classes.

    Reads the four IDX files (each plain or ``.gz``) from ``data_dir`` when given; otherwise
    from ``/usr/share/datasets/fashion-mnist`` (the Debian package ``dataset-fashion-mnist``),
    then ``~/.cache/gblr/fashion-mnist``. With ``download=True``, missing files are fetched into
    ``data_dir`` (or the cache). Images are ``(N, 1, 28, 28)`` in ``[0, 1]``.
    """
    if data_dir is not None:
        searched = [Path(data_dir).expanduser()]
    else:
        searched = [Path(FASHION_MNIST_SYSTEM_DIR), cache_dir("fashion-mnist")]
    target = searched[-1]
    files = next((f for f in map(_fashion_mnist_files, searched) if f is not None), None)
    if files is None:
        if not download:
            raise _fashion_mnist_missing(searched, target)
        hint = f"sudo apt-get install dataset-fashion-mnist, or copy the four .gz files into {target}"
        for stem in FASHION_MNIST_FILES.values():
            if _find_idx(target, stem) is None:
                download_file(join_url(FASHION_MNIST_URL, f"{stem}.gz"), target / f"{stem}.gz", offline_hint=hint)
        files = _fashion_mnist_files(target)
        assert files is not None
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], ndim=3)
        labels = read_idx(files[f"{split}_labels"], ndim=1)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{files[f'{split}_images']}: expected 28x28 images, got {tuple(images.shape[1:])}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{files[f'{split}_labels']} has {labels.shape[0]} labels but "
                f"{files[f'{split}_images']} has {images.shape[0]} images"
            )
        if labels.numel() and int(labels.max()) >= 10:
            raise ValueError(f"{files[f'{split}_labels']}: label {int(labels.max())} is out of range for 10 classes")
        splits[split] = (to_unit_float(images.unsqueeze(1)), labels.to(torch.int64))
    return ImageData(
        *splits["train"], *splits["test"], num_classes=10, name="fashion-mnist", classes=FASHION_MNIST_CLASSES
    )
