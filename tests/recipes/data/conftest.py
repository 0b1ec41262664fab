"""Writers of tiny datasets in the real on-disk formats, shared by the data tests.

They are fixtures (each returns the writer function) rather than an importable helper module,
so these tests need nothing on the import path.
"""

import gzip
import pickle
import struct

import pytest
import torch


def idx_bytes(values: torch.Tensor) -> bytes:
    """An IDX file of unsigned bytes: 0, 0, type 0x08, ndim, big-endian int32 sizes, data."""
    header = bytes([0, 0, 0x08, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    return header + bytes(values.flatten().tolist())


def write_bytes(path, payload: bytes) -> None:
    """``payload`` into ``path``, gzipped when the name ends in .gz."""
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)


def fashion_arrays(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "train-images-idx3-ubyte": torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.tensor([3, 0, 9, 3, 7], dtype=torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.tensor([1, 9, 2], dtype=torch.uint8),
    }


def fashion_files(directory, gz=True, plain=()):
    """The four IDX files in ``directory``: gzipped (or plain), except stems in ``plain`` written plain."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = fashion_arrays()
    for stem, values in arrays.items():
        name = stem if (not gz or stem in plain) else f"{stem}.gz"
        write_bytes(directory / name, idx_bytes(values))
    return arrays


def cifar_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar10_files(root):
    np = pytest.importorskip("numpy")  # the CIFAR python files hold numpy arrays
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows, labels = cifar_rows(2, seed=i), [i - 1, 9 - i]
        dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": rows, b"labels": labels})
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = cifar_rows(3, seed=99), [8, 0, 4]
    dump(folder / "test_batch", {b"data": test_rows, b"labels": test_labels})
    names = [f"class{i}".encode() for i in range(10)]
    dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(train_rows), train_labels, test_rows, test_labels


def cifar100_files(root):
    pytest.importorskip("numpy")
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_rows, train_labels = cifar_rows(4, seed=1), [0, 99, 50, 7]
    test_rows, test_labels = cifar_rows(2, seed=2), [42, 98]
    dump(folder / "train", {b"data": train_rows, b"fine_labels": train_labels, b"coarse_labels": [0, 19, 5, 1]})
    dump(folder / "test", {b"data": test_rows, b"fine_labels": test_labels, b"coarse_labels": [3, 4]})
    return train_rows, train_labels, test_rows, test_labels


def solid_color(label, index):
    return (40 * label + 10, 30 * index + 5, 200 - label)


def class_tree(directory, counts, size=(4, 4), ext=".png"):
    """``directory/<class>/<i>.png``: solid images whose colour (:func:`solid_color`) encodes (class, index)."""
    Image = pytest.importorskip("PIL.Image")
    for label, (name, count) in enumerate(counts.items()):
        (directory / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, solid_color(label, i)).save(directory / name / f"{i:03d}{ext}")


@pytest.fixture
def write_idx():
    """``write_idx(path, values)``: an IDX file of ``values``, gzipped when the name ends in .gz."""
    return lambda path, values: write_bytes(path, idx_bytes(values))


@pytest.fixture
def write_fashion():
    """``write_fashion(directory, gz=True, plain=())``: the four Fashion-MNIST files; returns their arrays."""
    return fashion_files


@pytest.fixture
def write_pickle():
    """``write_pickle(path, obj)``: ``obj`` pickled the way the CIFAR python files are."""
    return dump


@pytest.fixture
def write_cifar10():
    """``write_cifar10(root)``: ``root/cifar-10-batches-py``; returns train rows, labels, test rows, labels."""
    return cifar10_files


@pytest.fixture
def write_cifar100():
    """``write_cifar100(root)``: ``root/cifar-100-python``; returns train rows, labels, test rows, labels."""
    return cifar100_files


@pytest.fixture
def write_class_tree():
    """``write_class_tree(directory, {class: count}, size=(4, 4), ext=".png")``: solid images, see ``color``."""
    return class_tree


@pytest.fixture
def color():
    """``color(label, index)``: the RGB colour :func:`write_class_tree` gives image ``index`` of class ``label``."""
    return solid_color
