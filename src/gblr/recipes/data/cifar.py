"""CIFAR-10 and CIFAR-100, read from the official "python version" batches.

Those files are pickled dicts holding numpy arrays, so reading them needs numpy (pickle imports
it); with ``download=True`` the official archive is fetched and safely extracted.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .download import cache_dir, download_file, join_url, safe_extract
from .images import ImageData, to_unit_float

__all__ = ["load_cifar"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# num_classes -> (folder in the archive, archive name, train files, test file, label key, meta file, names key)
_CIFAR_LAYOUTS = {
    10: (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        b"labels",
        "batches.meta",
        b"label_names",
    ),
    100: (
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        "test",
        b"fine_labels",
        "meta",
        b"fine_label_names",
    ),
}


def _cifar_folder(data_dir: Path | None, folder: str, test_file: str) -> Path | None:
    candidates = [cache_dir("cifar") / folder] if data_dir is None else [data_dir, data_dir / folder]
    return next((c for c in candidates if (c / test_file).is_file()), None)


def _unpickle(path: Path) -> dict:
    # pickle can run code from the file it reads. It is used only because it is the official
    # format of the CIFAR "python version" files, read from the official archive or from a
    # folder the user pointed at; nothing else in gblr unpickles data.
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"{path} stores numpy arrays, so reading CIFAR needs numpy: pip install numpy ({exc})"
        ) from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path} is not a CIFAR python batch ({exc}); delete it and extract the archive again"
        ) from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR python batch: it holds a {type(batch).__name__}, not a dict")
    return batch


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        keys = sorted(k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in batch)
        raise ValueError(f"{path} lacks b'data' or {label_key!r} (keys: {keys}); is it the right CIFAR variant?")
    data = torch.as_tensor(batch[b"data"])
    if data.dim() != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != torch.uint8:
        raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {tuple(data.shape)}")
    labels = torch.as_tensor(batch[label_key], dtype=torch.int64)
    if labels.dim() != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {labels.numel()} labels for {data.shape[0]} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got values in [{low}, {high}]")
    # Rows are the red, then green, then blue plane of a 32x32 image: already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(folder: Path, meta_file: str, names_key: bytes, num_classes: int) -> tuple[str, ...]:
    path = folder / meta_file
    if path.is_file():
        try:
            names = _unpickle(path).get(names_key)
        except ValueError:
            names = None
        if isinstance(names, (list, tuple)) and len(names) == num_classes:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return CIFAR10_CLASSES if num_classes == 10 else tuple(str(i) for i in range(num_classes))


def load_cifar(
    data_dir: str | os.PathLike | None = None, num_classes: int = 10, download: bool = False
) -> ImageData:
    """CIFAR-10 or CIFAR-100 (``num_classes`` 10 or 100; fine labels): 50k/10k 32x32 RGB images.

    Reads the official "python version": ``cifar-10-batches-py/`` (``data_batch_1..5``,
    ``test_batch``) or ``cifar-100-python/`` (``train``, ``test``). ``data_dir`` may be that
    folder or the folder containing it; default ``~/.cache/gblr/cifar``. With
    ``download=True`` a missing dataset is fetched from the official site and extracted there.
    """
    if num_classes not in _CIFAR_LAYOUTS:
        raise ValueError(f"num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes!r}")
    folder_name, archive_name, train_files, test_file, label_key, meta_file, names_key = _CIFAR_LAYOUTS[num_classes]
    data_path = None if data_dir is None else Path(data_dir).expanduser()
    folder = _cifar_folder(data_path, folder_name, test_file)
    if folder is None:
        if data_path is None:
            root = cache_dir("cifar")
        else:
            root = data_path.parent if data_path.name == folder_name else data_path
        url = join_url(CIFAR_URL, archive_name)
        if not download:
            looked = "~/.cache/gblr/cifar" if data_path is None else f"{data_path} and {data_path / folder_name}"
            raise FileNotFoundError(
                f"CIFAR-{num_classes} not found (looked for {folder_name}/{test_file} in {looked}). "
                f"Get it with one of:\n"
                f"  --download (download=True)      (downloads {url} and extracts it into {root})\n"
                f"  --data-dir DIR (data_dir=DIR)   (DIR holds {folder_name}/, e.g. from extracting {archive_name})"
            )
        archive = root / archive_name
        hint = f"fetch {url} elsewhere, extract it into a folder DIR and pass --data-dir DIR"
        download_file(url, archive, offline_hint=hint)
        safe_extract(archive, root)
        archive.unlink()
        folder = _cifar_folder(root, folder_name, test_file)
        if folder is None:
            raise ValueError(f"{url} did not contain {folder_name}/{test_file}; was the archive replaced upstream?")

    def load_split(names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {folder} is an incomplete copy of {archive_name}")
            parts.append(_cifar_batch(path, label_key, num_classes))
        return to_unit_float(torch.cat([p[0] for p in parts])), torch.cat([p[1] for p in parts])

    return ImageData(
        *load_split(train_files),
        *load_split((test_file,)),
        num_classes=num_classes,
        name=f"cifar{num_classes}",
        classes=_cifar_classes(folder, meta_file, names_key, num_classes),
    )
