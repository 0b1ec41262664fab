"""ImageFolder trees (gblr.recipes.data.image_folder), on tiny images written here."""

import sys

import pytest
import torch

from gblr.recipes.data import load_image_folder

Image = pytest.importorskip("PIL.Image")


def colours(images):
    """The colour of each solid image as a tuple of 0..255 ints."""
    return [tuple(int(round(v * 255)) for v in image[:, 0, 0].tolist()) for image in images]


def test_image_folder_flat_split(tmp_path, write_class_tree, color):
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


def test_image_folder_split_is_deterministic(tmp_path, write_class_tree):
    write_class_tree(tmp_path, {"a": 6, "b": 6})
    first = load_image_folder(tmp_path, 4, test_fraction=0.5, seed=3)
    again = load_image_folder(tmp_path, 4, test_fraction=0.5, seed=3)
    assert torch.equal(first.test_images, again.test_images) and torch.equal(first.test_labels, again.test_labels)
    others = [load_image_folder(tmp_path, 4, test_fraction=0.5, seed=s).test_images for s in range(4, 8)]
    assert any(not torch.equal(first.test_images, other) for other in others)
    assert load_image_folder(tmp_path, 4, test_fraction=0.0).test_images.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_image_folder_given_splits(tmp_path, held_out, write_class_tree, color):
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


def test_image_folder_errors(tmp_path, monkeypatch, write_class_tree):
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
