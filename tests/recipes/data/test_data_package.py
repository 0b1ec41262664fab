"""The package's own functions (gblr.recipes.data): loading by name and minibatching."""

import itertools

import pytest
import torch

from gblr.recipes.data import DATASETS, batches, load_dataset, load_fashion_mnist


def test_load_dataset_dispatch(tmp_path, write_fashion, write_cifar100, write_class_tree):
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


def test_public_names_are_importable():
    from gblr.recipes import data

    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "text")
    assert all(hasattr(data, name) for name in data.__all__)
    for name in ("FASHION_MNIST_FILES", "FASHION_MNIST_SYSTEM_DIR", "FASHION_MNIST_URL", "CIFAR_URL",
                 "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "CIFAR10_CLASSES"):
        assert hasattr(data, name), name


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
