"""CIFAR-10/100 (gblr.recipes.data.cifar), on tiny python batches written here."""

import tarfile

import pytest
import torch

from gblr.recipes.data import cifar, load_cifar

np = pytest.importorskip("numpy")  # the CIFAR python files hold numpy arrays


def chw(rows):
    return torch.as_tensor(rows).reshape(-1, 3, 32, 32).float() / 255


def test_load_cifar10_values(tmp_path, write_cifar10):
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


def test_load_cifar100_values(tmp_path, write_cifar100):
    train_rows, train_labels, test_rows, test_labels = write_cifar100(tmp_path)
    d = load_cifar(tmp_path, num_classes=100)
    assert d.name == "cifar100" and d.num_classes == 100 and len(d.classes) == 100
    assert torch.equal(d.train_images, chw(train_rows)) and torch.equal(d.test_images, chw(test_rows))
    assert d.train_labels.tolist() == train_labels and d.test_labels.tolist() == test_labels  # fine labels


def test_cifar_errors(tmp_path, monkeypatch, write_cifar10, write_pickle):
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
    rows = np.zeros((2, 3072), dtype=np.uint8)
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {b"data": rows, b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match="labels"):
        load_cifar(tmp_path)


def test_cifar_download_and_extract(tmp_path, monkeypatch, write_cifar10):
    source = tmp_path / "source"
    expected = write_cifar10(source)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar, "CIFAR_URL", mirror.as_uri())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = load_cifar(download=True)
    root = tmp_path / "home" / ".cache" / "gblr" / "cifar"
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # archive removed after extraction
    assert torch.equal(d.train_images, chw(expected[0])) and d.test_labels.tolist() == expected[3]
