"""Image-classification datasets for the training recipes, held in memory as tensors.

The recipes train small models on small datasets (Fashion-MNIST, CIFAR-10/100, a modest
ImageFolder tree), so every split is decoded once into a ``(N, C, H, W)`` float32 tensor in
``[0, 1]`` and minibatches are slices of it (:func:`batches`): no worker processes, no per-step
decoding, and a shuffle that is a pure function of a ``torch.Generator`` (reproducible and
resumable, identical on every rank of a distributed run).

Nothing here needs torchvision or numpy: the IDX and CIFAR formats are parsed directly, and
Pillow is imported only when an ImageFolder is decoded. The CIFAR python files do contain
numpy arrays, so reading them needs numpy installed (pickle imports it).
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import math
import os
import pickle
import secrets
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F

__all__ = [
    "ImageData",
    "DATASETS",
    "load_dataset",
    "load_fashion_mnist",
    "load_cifar",
    "load_image_folder",
    "read_idx",
    "download_file",
    "batches",
    "cache_dir",
    "channel_mean_std",
]

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")

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

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Statistics and resizing walk the images in chunks so that no full float64 copy is ever made.
_CHUNK = 4096


def cache_dir(dataset: str) -> Path:
    """``~/.cache/gblr/<dataset>``: where downloads go when no ``data_dir`` is given.

    Resolved at call time (not import time) so a changed ``HOME`` is honoured.
    """
    return Path.home() / ".cache" / "gblr" / dataset


# -- the in-memory dataset ------------------------------------------------------------------------


@dataclasses.dataclass
class ImageData:
    """Both splits of an image-classification dataset, as tensors.

    Attributes:
        train_images, test_images: ``(N, C, H, W)`` float tensors, in ``[0, 1]`` as loaded.
        train_labels, test_labels: ``(N,)`` int64 class indices in ``[0, num_classes)``.
        num_classes: number of classes (the classifier's output size).
        name: the dataset's name as accepted by :func:`load_dataset`.
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


def _to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (``pixel / 255``)."""
    return images.to(torch.float32).div_(255.0)


# -- downloads ------------------------------------------------------------------------------------


class _NoProgress:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, description: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description)


def _network_error(url: str, exc: BaseException, offline_hint: str | None) -> RuntimeError:
    hint = offline_hint or "download it on a machine with network access and copy it here"
    return RuntimeError(f"could not download {url}: {exc}. Without network access: {hint}")


def download_file(url: str, path: str | os.PathLike, *, offline_hint: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``path`` atomically; return ``path``.

    The bytes stream into a temporary file in the destination directory (same filesystem) that
    is renamed over ``path`` with :func:`os.replace` only once complete, so an interrupted
    download never leaves a truncated file that a later run would take for the dataset. The
    temporary file is removed on any failure. A tqdm progress bar is shown when tqdm is
    installed. Network failures raise a RuntimeError naming the URL and ``offline_hint`` (how
    to get the file without network access).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name opened with "x" (not mkstemp) so the final file gets the usual umask-based
    # permissions instead of mkstemp's owner-only 0600, which would hide a shared cache.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with open(temporary, "xb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except (OSError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
                raise _network_error(url, exc, offline_hint) from exc
            with response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.strip().isdigit() else None
                progress = _progress_bar(total, path.name)
                received = 0
                try:
                    while True:
                        try:
                            chunk = response.read(1 << 20)
                        except (OSError, http.client.HTTPException) as exc:
                            raise _network_error(url, exc, offline_hint) from exc
                        if not chunk:
                            break
                        out.write(chunk)
                        received += len(chunk)
                        progress.update(len(chunk))
                finally:
                    progress.close()
            if total is not None and received != total:
                raise _network_error(url, OSError(f"connection closed after {received} of {total} bytes"), offline_hint)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _join_url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


# -- Fashion-MNIST (IDX files) ----------------------------------------------------------------------


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
                download_file(_join_url(FASHION_MNIST_URL, f"{stem}.gz"), target / f"{stem}.gz", offline_hint=hint)
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
        splits[split] = (_to_unit_float(images.unsqueeze(1)), labels.to(torch.int64))
    return ImageData(
        *splits["train"], *splits["test"], num_classes=10, name="fashion-mnist", classes=FASHION_MNIST_CLASSES
    )


# -- CIFAR (python pickle batches) ------------------------------------------------------------------


def _safe_extract(archive: Path, destination: Path) -> None:
    """Extract a tar archive, refusing members that could land outside ``destination``.

    Absolute names, ``..`` components, links and device files are rejected up front (a
    dataset archive has only files and folders); ``filter="data"`` adds the standard
    library's own checks where this Python has it (3.12, and 3.8.17+/3.9.17+/3.10.12+/3.11.4+).
    """
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            name = member.name.replace("\\", "/")
            if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
                raise ValueError(f"{archive}: refusing to extract {member.name!r}, an absolute path")
            if ".." in PurePosixPath(name).parts:
                raise ValueError(f"{archive}: refusing to extract {member.name!r}, it contains '..'")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing to extract {member.name!r}, not a regular file or folder")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(destination, members=members, filter="data")
        else:
            tar.extractall(destination, members=members)


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
        url = _join_url(CIFAR_URL, archive_name)
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
        _safe_extract(archive, root)
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
        return _to_unit_float(torch.cat([p[0] for p in parts])), torch.cat([p[1] for p in parts])

    return ImageData(
        *load_split(train_files),
        *load_split((test_file,)),
        num_classes=num_classes,
        name=f"cifar{num_classes}",
        classes=_cifar_classes(folder, meta_file, names_key, num_classes),
    )


# -- ImageFolder ------------------------------------------------------------------------------------


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
        _to_unit_float(_decode_images(train_paths, image_size)),
        train_labels,
        _to_unit_float(_decode_images(test_paths, image_size)),
        test_labels,
        num_classes=len(classes),
        name="imagefolder",
        classes=tuple(classes),
    )


# -- dispatch -------------------------------------------------------------------------------------


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize to ``size`` square, in chunks to bound the scratch memory.

    Bilinear weights are non-negative, so values stay in ``[0, 1]`` (bicubic would overshoot).
    """
    if images.shape[0] == 0:
        return images.new_empty((0, images.shape[1], size, size))
    chunks = images.split(_CHUNK)
    return torch.cat([F.interpolate(c, size=(size, size), mode="bilinear", antialias=True) for c in chunks])


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> ImageData:
    """Load one of :data:`DATASETS` by name (the recipes' ``--dataset`` choices).

    ``image_size`` is required for ``"imagefolder"`` (which needs ``data_dir``, its root). For
    the built-in datasets it is optional: when it differs from the native size (28 or 32) the
    images are resized (bilinear, antialiased) and the statistics recomputed.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
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
            train_images=_resize(data.train_images, image_size),
            test_images=_resize(data.test_images, image_size),
            mean=None,
            std=None,
        )
    return data


# -- minibatches ----------------------------------------------------------------------------------


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
