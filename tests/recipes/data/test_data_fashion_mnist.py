"""IDX files and Fashion-MNIST (gblr.recipes.data.fashion_mnist), on tiny files written here."""

import pytest
import torch

from gblr.recipes.data import cache_dir, fashion_mnist, load_fashion_mnist, read_idx

FASHION_STEMS = tuple(fashion_mnist.FASHION_MNIST_FILES.values())


@pytest.fixture
def no_default_dirs(tmp_path, monkeypatch):
    """Hide the machine's real Fashion-MNIST and cache: system dir and HOME point into tmp_path."""
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system" / "fashion-mnist")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name, write_idx):
    values = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4) * 7
    write_idx(tmp_path / name, values)
    out = read_idx(tmp_path / name, ndim=3)
    assert out.dtype == torch.uint8 and torch.equal(out, values)


@pytest.mark.parametrize("layout", ["gz", "plain", "mixed"])
def test_load_fashion_mnist_values(tmp_path, layout, write_fashion):
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
def test_bad_idx_raises_naming_the_file(tmp_path, corrupt, message, write_fashion):
    write_fashion(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(corrupt(bad.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_fashion_mnist(tmp_path)
    assert str(bad) in str(info.value)


def test_bad_gzip_raises_naming_the_file(tmp_path, write_fashion):
    write_fashion(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"<html>Not Found</html>")
    with pytest.raises(ValueError, match="gzip") as info:
        load_fashion_mnist(tmp_path)
    assert str(bad) in str(info.value)


def test_mismatched_label_count_raises(tmp_path, write_fashion, write_idx):
    write_fashion(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.tensor([1, 2], dtype=torch.uint8))
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


def test_fashion_mnist_search_order(no_default_dirs, write_fashion, write_idx):
    system, cache = fashion_mnist.FASHION_MNIST_SYSTEM_DIR, cache_dir("fashion-mnist")
    write_fashion(cache)
    first = load_fashion_mnist()
    write_fashion(system, gz=False)
    write_idx(system / "t10k-labels-idx1-ubyte", torch.tensor([5, 5, 5], dtype=torch.uint8))
    second = load_fashion_mnist()
    assert first.test_labels.tolist() == [1, 9, 2]  # only the cache existed
    assert second.test_labels.tolist() == [5, 5, 5]  # the system copy wins


@pytest.fixture
def fashion_mirror(tmp_path, monkeypatch, write_fashion):
    """A file:// mirror of the four .gz files, patched in as the download URL."""
    mirror = tmp_path / "mirror"
    arrays = write_fashion(mirror)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_URL", mirror.as_uri() + "/")
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
