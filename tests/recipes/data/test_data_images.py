"""The in-memory dataset and its statistics (gblr.recipes.data.images)."""

import pytest
import torch

from gblr.recipes.data import ImageData, channel_mean_std, load_cifar
from gblr.recipes.data.images import resize, to_unit_float


def test_normalized(tmp_path, write_cifar10):
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


def test_pixel_helpers():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    unit = to_unit_float(pixels)
    assert unit.dtype == torch.float32 and unit.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    images = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_mean_std(images)
    assert mean == pytest.approx(tuple(images.double().mean(dim=(0, 2, 3)).tolist()), abs=1e-12)
    assert std == pytest.approx(tuple(images.double().std(dim=(0, 2, 3), correction=0).tolist()), abs=1e-12)
    small = resize(images, 4)
    assert small.shape == (3, 2, 4, 4) and 0 <= small.min() and small.max() <= 1
    assert resize(images[:0], 4).shape == (0, 2, 4, 4)
