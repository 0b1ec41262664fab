"""Small synthetic datasets written to disk in the real formats, for recipe and CLI tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + b"".join(struct.pack(">i", size) for size in array.shape)
    data = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(data)


def write_fashion_mnist(directory: Path, train: int = 256, test: int = 128, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files whose classes are learnable: class k lights up band k."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = torch.randint(0, 10, (count,), generator=generator)
        images = torch.randint(0, 60, (count, 28, 28), generator=generator)
        for index, label in enumerate(labels.tolist()):
            row = 2 + 2 * label
            images[index, row : row + 3, 4:24] += 180
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images.clamp(0, 255))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory
