"""Dataset loaders and minibatching, on tiny files written here (never the real datasets or the network)."""

import gzip
import io
import itertools
import pickle
import struct
import sys
import tarfile

import pytest
import torch

from gblr.recipes import data
from gblr.recipes.data import ImageData, batches, download_file, load_cifar, load_dataset, load_fashion_mnist
from gblr.recipes.data import load_image_folder, read_idx

np = pytest.importorskip("numpy")  # the CIFAR python files hold numpy arrays
Image = pytest.importorskip("PIL.Image")

FASHION_STEMS = tuple(data.FASHION_MNIST_FILES.values())


# -- writers --------------------------------------------------------------------------------------


def idx_bytes(values: torch.Tensor) -> bytes:
    """An IDX file of unsigned bytes: 0, 0, type 0x08, ndim, big-endian int32 sizes, data."""
    header = bytes([0, 0, 0x08, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    return header + bytes(values.flatten().tolist())


def write_file(path, payload: bytes) -> None:
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)


def fashion_arrays(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "train-images-idx3-ubyte": torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8),
        "train-labels-idx1-ubyte": torch.tensor([3, 0, 9, 3, 7], dtype=torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": torch.tensor([1, 9, 2], dtype=torch.uint8),
    }


def write_fashion(directory, gz=True, plain=()):
    """The four IDX files in ``directory``: gzipped (or plain), except stems in ``plain`` written plain."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = fashion_arrays()
    for stem, values in arrays.items():
        name = stem if (not gz or stem in plain) else f"{stem}.gz"
        write_file(directory / name, idx_bytes(values))
    return arrays


def cifar_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root):
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


def write_cifar100(root):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_rows, train_labels = cifar_rows(4, seed=1), [0, 99, 50, 7]
    test_rows, test_labels = cifar_rows(2, seed=2), [42, 98]
    dump(folder / "train", {b"data": train_rows, b"fine_labels": train_labels, b"coarse_labels": [0, 19, 5, 1]})
    dump(folder / "test", {b"data": test_rows, b"fine_labels": test_labels, b"coarse_labels": [3, 4]})
    return train_rows, train_labels, test_rows, test_labels


def color(label, index):
    return (40 * label + 10, 30 * index + 5, 200 - label)


def write_class_tree(directory, counts, size=(4, 4), ext=".png"):
    """``directory/<class>/<i>.png``: solid images whose colour encodes (class, index)."""
    for label, (name, count) in enumerate(counts.items()):
        (directory / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, color(label, i)).save(directory / name / f"{i:03d}{ext}")


def colours(images):
    """The colour of each solid image as a tuple of 0..255 ints."""
    return [tuple(int(round(v * 255)) for v in image[:, 0, 0].tolist()) for image in images]


@pytest.fixture
def no_default_dirs(tmp_path, monkeypatch):
    """Hide the machine's real Fashion-MNIST and cache: system dir and HOME point into tmp_path."""
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system" / "fashion-mnist")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


# -- IDX / Fashion-MNIST ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    values = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4) * 7
    write_file(tmp_path / name, idx_bytes(values))
    out = read_idx(tmp_path / name, ndim=3)
    assert out.dtype == torch.uint8 and torch.equal(out, values)


@pytest.mark.parametrize("layout", ["gz", "plain", "mixed"])
def test_load_fashion_mnist_values(tmp_path, layout):
    arrays = write_fashion(tmp_path, gz=layout != "plain", plain=FASHION_STEMS[::2] if layout == "mixed" else ())
    d = load_fashion_mnist(tmp_path)
    assert d.name == "fashion-mnist" and d.num_classes == 10 and len(d.classes) == 10
    assert d.train_images.shape == (5, 1, 28, 28) and d.test_images.shape == (3, 1, 28, 28)
    assert d.train_images.dtype == torch.float32 and d.train_labels.dtype == torch.int64
    assert torch.equal(d.train_images[:, 0], arrays["train-images-idx3-ubyte"].float() / 255)
    assert torch.equal(d.test_images[:, 0], arrays["t10k-images-idx3-ubyte"].float() / 255)
    assert d.train_labels.tolist() == [3, 0, 9, 3, 7] and d.test_labels.tolist() == [1, 9, 2]
    pixels = (arrays["train-images-idx3-ubyte"].float() / 255).double()  # statistics of the float32 images
    assert d.mean == pytest.approx((pixels.mean().item(),), abs=1e-12)
    assert d.std == pytest.approx((pixels.std(correction=0).item(),), abs=1e-12)
    assert 0 <= d.train_images.min() and d.train_images.max() <= 1


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "0x0d"),
        (lambda b: b[:3] + b"\x02" + b[4:], "dimensions"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b + b"extra", "corrupt"),
        (lambda b: b"", "empty"),
    ],
)
def test_bad_idx_raises_naming_the_file(tmp_path, corrupt, message):
    write_fashion(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(corrupt(bad.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_fashion_mnist(tmp_path)
    assert str(bad) in str(info.value)


def test_bad_gzip_raises_naming_the_file(tmp_path):
    write_fashion(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"<html>Not Found</html>")
    with pytest.raises(ValueError, match="gzip") as info:
        load_fashion_mnist(tmp_path)
    assert str(bad) in str(info.value)


def test_mismatched_label_count_raises(tmp_path):
    write_fashion(tmp_path, gz=False)
    write_file(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(torch.tensor([1, 2], dtype=torch.uint8)))
    with pytest.raises(ValueError, match="2 labels"):
        load_fashion_mnist(tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(no_default_dirs):
    for data_dir in (no_default_dirs / "does-not-exist", None):
        with pytest.raises(FileNotFoundError) as info:
            load_fashion_mnist(data_dir)
        message = str(info.value)
        assert "apt-get install dataset-fashion-mnist" in message
        assert "--download" in message and "--data-dir" in message
    assert str(no_default_dirs / "home" / ".cache" / "gblr" / "fashion-mnist") in message


def test_fashion_mnist_search_order(no_default_dirs):
    system, cache = data.FASHION_MNIST_SYSTEM_DIR, data.cache_dir("fashion-mnist")
    write_fashion(cache)
    first = load_fashion_mnist()
    write_fashion(system, gz=False)
    write_file(system / "t10k-labels-idx1-ubyte", idx_bytes(torch.tensor([5, 5, 5], dtype=torch.uint8)))
    second = load_fashion_mnist()
    assert first.test_labels.tolist() == [1, 9, 2]  # only the cache existed
    assert second.test_labels.tolist() == [5, 5, 5]  # the system copy wins


@pytest.fixture
def fashion_mirror(tmp_path, monkeypatch):
    """A file:// mirror of the four .gz files, patched in as the download URL."""
    mirror = tmp_path / "mirror"
    arrays = write_fashion(mirror)
    monkeypatch.setattr(data, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    return arrays


def test_fashion_mnist_download_into_data_dir(tmp_path, fashion_mirror, no_default_dirs):
    target = tmp_path / "downloaded"
    d = load_fashion_mnist(target, download=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in FASHION_STEMS)
    assert torch.equal(d.train_images[:, 0], fashion_mirror["train-images-idx3-ubyte"].float() / 255)
    assert d.test_labels.tolist() == [1, 9, 2]
    assert not (tmp_path / "home").exists()  # data_dir given: the cache is not touched


def test_fashion_mnist_download_into_cache(tmp_path, fashion_mirror, no_default_dirs):
    d = load_fashion_mnist(download=True)
    cache = tmp_path / "home" / ".cache" / "gblr" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s}.gz" for s in FASHION_STEMS)
    assert d.train_labels.tolist() == [3, 0, 9, 3, 7]
    assert torch.equal(load_fashion_mnist().train_images, d.train_images)  # found offline afterwards


# -- downloads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_download_file_is_atomic_and_exact(tmp_path, monkeypatch, with_tqdm):
    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # no progress bar, silently
    payload = bytes(range(256)) * 5000  # over one read chunk
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    target = tmp_path / "out" / "copy.bin"
    assert download_file(source.as_uri(), target) == target
    assert target.read_bytes() == payload
    assert [p.name for p in target.parent.iterdir()] == ["copy.bin"]


def test_download_file_network_failure(tmp_path):
    url = (tmp_path / "missing.bin").as_uri()
    with pytest.raises(RuntimeError) as info:
        download_file(url, tmp_path / "out" / "missing.bin", offline_hint="copy it by hand")
    assert url in str(info.value) and "copy it by hand" in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


# -- CIFAR ------------------------------------------------------------------------------------------


def chw(rows):
    return torch.as_tensor(rows).reshape(-1, 3, 32, 32).float() / 255


def test_load_cifar10_values(tmp_path):
    train_rows, train_labels, test_rows, test_labels = write_cifar10(tmp_path)
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = load_cifar(data_dir)
        assert d.name == "cifar10" and d.num_classes == 10
        assert d.train_images.shape == (10, 3, 32, 32) and d.test_images.shape == (3, 3, 32, 32)
        assert torch.equal(d.train_images, chw(train_rows)) and torch.equal(d.test_images, chw(test_rows))
        assert d.train_labels.tolist() == train_labels and d.test_labels.tolist() == test_labels
        assert d.classes == tuple(f"class{i}" for i in range(10))
    # CHW order: row element c*1024 + h*32 + w is pixel (c, h, w).
    assert d.train_images[3, 2, 5, 7] == torch.tensor(int(train_rows[3, 2 * 1024 + 5 * 32 + 7])) / 255
    expected = chw(train_rows).double()
    assert d.mean == pytest.approx(tuple(expected.mean(dim=(0, 2, 3)).tolist()), abs=1e-12)
    assert d.std == pytest.approx(tuple(expected.std(dim=(0, 2, 3), correction=0).tolist()), abs=1e-12)


def test_load_cifar100_values(tmp_path):
    train_rows, train_labels, test_rows, test_labels = write_cifar100(tmp_path)
    d = load_cifar(tmp_path, num_classes=100)
    assert d.name == "cifar100" and d.num_classes == 100 and len(d.classes) == 100
    assert torch.equal(d.train_images, chw(train_rows)) and torch.equal(d.test_images, chw(test_rows))
    assert d.train_labels.tolist() == train_labels and d.test_labels.tolist() == test_labels  # fine labels


def test_cifar_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="10 .* or 100"):
        load_cifar(tmp_path, num_classes=20)
    with pytest.raises(FileNotFoundError, match="--download"):
        load_cifar(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar(num_classes=100)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "data_batch_3", {b"data": cifar_rows(2, 0), b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match="labels"):
        load_cifar(tmp_path)


def test_cifar_download_and_extract(tmp_path, monkeypatch):
    source = tmp_path / "source"
    expected = write_cifar10(source)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(data, "CIFAR_URL", mirror.as_uri())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = load_cifar(download=True)
    root = tmp_path / "home" / ".cache" / "gblr" / "cifar"
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # archive removed after extraction
    assert torch.equal(d.train_images, chw(expected[0])) and d.test_labels.tolist() == expected[3]


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "cifar-10-batches-py/../../evil.txt"])
def test_safe_extract_rejects_escaping_members(tmp_path, member):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(ValueError, match="refusing"):
        data._safe_extract(archive, destination)
    assert list(destination.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_safe_extract_rejects_links(tmp_path):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="not a regular file"):
        data._safe_extract(archive, tmp_path)


# -- ImageFolder ------------------------------------------------------------------------------------


def test_image_folder_flat_split(tmp_path):
    write_class_tree(tmp_path, {"dog": 5, "cat": 5, "bird": 4})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    d = load_image_folder(tmp_path, image_size=4, test_fraction=0.2, seed=0)
    assert d.classes == ("bird", "cat", "dog") and d.num_classes == 3 and d.name == "imagefolder"
    assert d.train_images.shape == (11, 3, 4, 4) and d.test_images.shape == (3, 3, 4, 4)  # 1 test per class
    # Folder order was dog, cat, bird: label i is the i-th sorted name, i.e. folder label (2, 1, 0)[i].
    folder_label = {0: 2, 1: 1, 2: 0}
    seen = []
    for images, labels in ((d.train_images, d.train_labels), (d.test_images, d.test_labels)):
        assert torch.equal(images, images[:, :, :1, :1].expand_as(images))  # solid images decoded exactly
        for rgb, label in zip(colours(images), labels.tolist()):
            assert rgb[0] == color(folder_label[label], 0)[0]  # the colour's class part matches the label
            seen.append(rgb)
    everything = [color(label, i) for label, count in enumerate((5, 5, 4)) for i in range(count)]
    assert sorted(seen) == sorted(everything)  # the two splits partition the images


def test_image_folder_split_is_deterministic(tmp_path):
    write_class_tree(tmp_path, {"a": 6, "b": 6})
    first = load_image_folder(tmp_path, 4, test_fraction=0.5, seed=3)
    again = load_image_folder(tmp_path, 4, test_fraction=0.5, seed=3)
    assert torch.equal(first.test_images, again.test_images) and torch.equal(first.test_labels, again.test_labels)
    others = [load_image_folder(tmp_path, 4, test_fraction=0.5, seed=s).test_images for s in range(4, 8)]
    assert any(not torch.equal(first.test_images, other) for other in others)
    assert load_image_folder(tmp_path, 4, test_fraction=0.0).test_images.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_image_folder_given_splits(tmp_path, held_out):
    write_class_tree(tmp_path / "train", {"x": 3, "y": 2})
    write_class_tree(tmp_path / held_out, {"x": 1, "y": 2})
    d = load_image_folder(tmp_path, image_size=4)
    assert d.classes == ("x", "y")
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1] and d.test_labels.tolist() == [0, 1, 1]
    assert colours(d.test_images) == [color(0, 0), color(1, 0), color(1, 1)]


def test_image_folder_resizes_and_converts_to_rgb(tmp_path):
    (tmp_path / "gray").mkdir()
    (tmp_path / "rgba").mkdir()
    Image.new("L", (8, 6), 100).save(tmp_path / "gray" / "a.PNG")
    Image.new("RGBA", (3, 5), (10, 20, 30, 255)).save(tmp_path / "rgba" / "b.webp", lossless=True)
    Image.new("RGB", (16, 16), (0, 128, 255)).save(tmp_path / "rgba" / "c.bmp")
    d = load_image_folder(tmp_path, image_size=5, test_fraction=0.0)
    assert d.train_images.shape == (3, 3, 5, 5)
    assert colours(d.train_images) == [(100, 100, 100), (10, 20, 30), (0, 128, 255)]
    assert torch.equal(d.train_images, d.train_images[:, :, :1, :1].expand_as(d.train_images))


def test_image_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder(tmp_path / "nowhere", 4)
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(tmp_path, 0)
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path, 4)
    write_class_tree(tmp_path / "flat", {"a": 2})
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty") as info:
        load_image_folder(tmp_path / "flat", 4)
    assert str(tmp_path / "flat" / "empty") in str(info.value)
    write_class_tree(tmp_path / "split" / "train", {"a": 1, "b": 1})
    write_class_tree(tmp_path / "split" / "val", {"a": 1, "c": 1})
    with pytest.raises(ValueError, match="same class folders"):
        load_image_folder(tmp_path / "split", 4)
    (tmp_path / "flat" / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path / "flat", 4)
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `from PIL import Image` raise ImportError
    with pytest.raises(ImportError, match="pillow"):
        load_image_folder(tmp_path / "split" / "train", 4)


# -- dispatch and ImageData -------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path):
    with pytest.raises(ValueError, match="fashion-mnist, cifar10, cifar100, imagefolder"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("imagefolder", image_size=4)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", data_dir=tmp_path)
    write_fashion(tmp_path / "fm")
    direct = load_fashion_mnist(tmp_path / "fm")
    assert torch.equal(load_dataset("fashion-mnist", tmp_path / "fm").train_images, direct.train_images)
    small = load_dataset("fashion-mnist", tmp_path / "fm", image_size=14)
    assert small.train_images.shape == (5, 1, 14, 14) and small.test_images.shape == (3, 1, 14, 14)
    assert small.mean == pytest.approx((small.train_images.double().mean().item(),), abs=1e-9)
    write_cifar100(tmp_path / "c")
    assert load_dataset("cifar100", tmp_path / "c").num_classes == 100
    write_class_tree(tmp_path / "folder", {"a": 2, "b": 2})
    assert load_dataset("imagefolder", tmp_path / "folder", image_size=3).train_images.shape[1:] == (3, 3, 3)


def test_normalized(tmp_path):
    write_cifar10(tmp_path)
    d = load_cifar(tmp_path)
    n = d.normalized()
    assert n.standardized and not d.standardized
    assert n.mean == d.mean and n.std == d.std  # the statistics of the [0, 1] images, for inference
    per_channel = n.train_images.double()
    assert per_channel.mean(dim=(0, 2, 3)).abs().max() < 1e-6
    assert (per_channel.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-5
    mean, std = torch.tensor(d.mean).view(1, 3, 1, 1), torch.tensor(d.std).view(1, 3, 1, 1)
    assert torch.allclose(n.test_images, (d.test_images - mean) / std)
    assert torch.equal(n.normalized().train_images, n.train_images)  # never standardized twice
    assert d.train_images.min() >= 0  # the original is untouched


def test_image_data_validation():
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="train_labels has 3"):
        ImageData(x, y[:3], x, y, num_classes=2, name="t")
    with pytest.raises(ValueError, match="num_classes=2"):
        ImageData(x, y + 2, x, y, num_classes=2, name="t")
    with pytest.raises(ValueError, match="int64"):
        ImageData(x, y.int(), x, y, num_classes=2, name="t")
    constant = ImageData(x, y, x, y, num_classes=2, name="t")
    assert constant.mean == (0.0,) and constant.std == (0.0,)
    assert torch.equal(constant.normalized().train_images, x)  # zero spread: centred, no division by zero


# -- batches ----------------------------------------------------------------------------------------


def toy(n=10):
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) * 10


def test_batches_in_order():
    x, y = toy()
    steps = list(batches(x, y, 4, shuffle=False))
    assert [b[1].tolist() for b in steps] == [[0, 10, 20, 30], [40, 50, 60, 70], [80, 90]]
    assert len(list(batches(x, y, 4, shuffle=False, drop_last=True))) == 2
    assert torch.equal(steps[0][0].flatten(), torch.tensor([0.0, 1, 2, 3]))


def test_batches_shuffle_is_reproducible_and_resumable():
    x, y = toy(23)
    run = [b[1] for b in batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(7))]
    again = [b[1] for b in batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(7))]
    assert all(torch.equal(a, b) for a, b in zip(run, again)) and len(run) == 5
    assert sorted(torch.cat(run).tolist()) == [10 * i for i in range(23)]  # a permutation
    assert torch.cat(run).tolist() != sorted(torch.cat(run).tolist())
    # Resume: restore the generator state from before the epoch and skip the steps already done.
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    full = [b[1] for b in batches(x, y, 5, shuffle=True, generator=g)]
    second_epoch = [b[1] for b in batches(x, y, 5, shuffle=True, generator=g)]
    assert torch.cat(full).tolist() != torch.cat(second_epoch).tolist()  # the generator advanced
    resumed = batches(x, y, 5, shuffle=True, generator=torch.Generator().set_state(state))
    assert all(torch.equal(a[1], b) for a, b in zip(itertools.islice(resumed, 2, None), full[2:]))


@pytest.mark.parametrize("n, batch_size, world_size", [(20, 4, 2), (23, 6, 2), (21, 6, 3), (9, 8, 4), (5, 8, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_ranks_partition_the_global_batch(n, batch_size, world_size, drop_last):
    x, y = toy(n)
    single = list(batches(x, y, batch_size, True, torch.Generator().manual_seed(5), drop_last=drop_last))
    per_rank = [
        list(batches(x, y, batch_size, True, torch.Generator().manual_seed(5), r, world_size, drop_last))
        for r in range(world_size)
    ]
    assert all(len(steps) == len(single) for steps in per_rank)  # ranks stay in lock-step
    for step, (gx, gy) in enumerate(single):
        assert torch.equal(torch.cat([per_rank[r][step][1] for r in range(world_size)]), gy)
        assert torch.equal(torch.cat([per_rank[r][step][0] for r in range(world_size)]), gx)
        if gy.numel() == batch_size:  # a full batch: rank r takes slice [r*B/W, (r+1)*B/W)
            width = batch_size // world_size
            for r in range(world_size):
                assert torch.equal(per_rank[r][step][1], gy[r * width : (r + 1) * width])


def test_batches_argument_errors():
    x, y = toy()
    with pytest.raises(ValueError, match="divisible by world_size"):
        batches(x, y, 5, False, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        batches(x, y, 4, False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0, False)
    with pytest.raises(ValueError, match="labels has 9"):
        batches(x, y[:9], 4, False)
