import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gblr import gaudi_mask
from gblr.masks import boxcar, gaudi_mask_reference

SIGMAS = [None, 1.0, 10.0, 100.0]


def grid_params(n, count, generator, dtype=torch.float64):
    widths = torch.randint(0, n + 1, (count,), generator=generator)
    locations = torch.randint(0, n, (count,), generator=generator)
    return widths.to(dtype) / n, locations.to(dtype) / n


def closed_form_gradients(width, location, n, sigma, grad_mask):
    """docs/method.md section 3's gradient formulas, evaluated in the frequency domain."""
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    gauss = torch.ones_like(k) if sigma is None else torch.exp(-(k**2) / (2 * sigma**2))
    w, l = width[:, None], location[:, None]
    c = torch.exp(1j * math.pi * k / n - 2j * math.pi * k * l) * gauss / torch.sinc(k / n)
    d_width = torch.fft.irfft(torch.exp(-2j * math.pi * k * w) * c, n=n, norm="forward")
    spectrum = w * torch.sinc(k * w) / torch.sinc(k / n) * torch.exp(-1j * math.pi * k * (2 * l + w - 1 / n)) * gauss
    d_location = torch.fft.irfft(-2j * math.pi * k * spectrum, n=n, norm="forward")
    return (d_width * grad_mask).sum(1), (d_location * grad_mask).sum(1)


@pytest.mark.parametrize("n", [7, 8, 64, 768, 3072])
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_frequency_definition(n, sigma, dtype):
    generator = torch.Generator().manual_seed(n)
    width, location = grid_params(n, 40, generator)
    expected = gaudi_mask_reference(width, location, n, sigma)
    got = gaudi_mask(width.to(dtype), location.to(dtype), n, sigma)
    assert got.dtype == dtype and got.shape == (40, n)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-10)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    sigma=st.one_of(st.none(), st.floats(0.5, 300.0)),
    data=st.data(),
)
def test_matches_definition_property(n, sigma, data):
    widths = data.draw(st.lists(st.integers(0, n), min_size=1, max_size=6))
    locations = data.draw(st.lists(st.integers(0, n - 1), min_size=len(widths), max_size=len(widths)))
    width = torch.tensor(widths, dtype=torch.float64) / n
    location = torch.tensor(locations, dtype=torch.float64) / n
    torch.testing.assert_close(
        gaudi_mask(width, location, n, sigma), gaudi_mask_reference(width, location, n, sigma), rtol=0, atol=1e-10
    )


def test_spec_example_is_exact_boxcar():
    mask = gaudi_mask(torch.tensor([3 / 8]), torch.tensor([6 / 8]), 8)
    assert mask.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), data=st.data())
def test_sharp_mask_is_exactly_the_cyclic_boxcar(n, data):
    w = data.draw(st.integers(0, n))
    l = data.draw(st.integers(0, n - 1))
    mask = gaudi_mask(torch.tensor([w / n]), torch.tensor([l / n]), n)
    expected = [1.0 if (t - l) % n < w else 0.0 for t in range(n)]
    assert mask[0].tolist() == expected
    assert torch.equal(mask, boxcar(torch.tensor([w / n]), torch.tensor([l / n]), n))


@pytest.mark.parametrize("sigma", [1.0, 10.0, 100.0])
def test_smoothed_mask_keeps_its_area(sigma):
    n = 96
    width, location = grid_params(n, 30, torch.Generator().manual_seed(1))
    mask = gaudi_mask(width, location, n, sigma)
    torch.testing.assert_close(mask.sum(1), width * n)


def test_straight_through_rounding():
    n = 64
    exact_w, exact_l = torch.tensor([10 / n, 0.0, 1.0]), torch.tensor([3 / n, 63 / n, 0.5])
    offset_w = (exact_w + torch.tensor([0.4, 0.3, -0.45]) / n).requires_grad_()
    offset_l = (exact_l + torch.tensor([-0.3, 0.49, 0.2]) / n).requires_grad_()
    grid_w, grid_l = exact_w.clone().requires_grad_(), exact_l.clone().requires_grad_()
    seed = torch.randn(3, n)
    rounded = gaudi_mask(offset_w, offset_l, n, 20.0)
    on_grid = gaudi_mask(grid_w, grid_l, n, 20.0)
    assert torch.equal(rounded, on_grid)
    rounded.backward(seed)
    on_grid.backward(seed)
    assert torch.equal(offset_w.grad, grid_w.grad)
    assert torch.equal(offset_l.grad, grid_l.grad)


def test_width_is_clamped_and_location_wraps():
    n = 16
    over = gaudi_mask(torch.tensor([1.7, -0.3]), torch.tensor([0.25, 1.25]), n, 5.0)
    inside = gaudi_mask(torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.25]), n, 5.0)
    assert torch.equal(over, inside)
    assert over.max() <= 1.0 + 1e-6  # the reference code lets widths exceed 1 and masks reach 2
    shifted = gaudi_mask(torch.tensor([0.25]), torch.tensor([-0.25]), n)
    assert torch.equal(shifted, gaudi_mask(torch.tensor([0.25]), torch.tensor([0.75]), n))


@pytest.mark.parametrize("n", [7, 8, 64, 768])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_gradients_equal_closed_forms(n, sigma):
    generator = torch.Generator().manual_seed(7 + n)
    width, location = grid_params(n, 12, generator)
    width[:3] = torch.tensor([0.0, 1.0, 0.0])
    location[2] = 0.0
    seed = torch.randn(12, n, generator=generator, dtype=torch.float64)
    w, l = width.clone().requires_grad_(), location.clone().requires_grad_()
    gaudi_mask(w, l, n, sigma).backward(seed)
    expected_w, expected_l = closed_form_gradients(width, location, n, sigma, seed)
    torch.testing.assert_close(w.grad, expected_w, rtol=1e-9, atol=1e-9 * n)
    torch.testing.assert_close(l.grad, expected_l, rtol=1e-9, atol=1e-9 * n)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_gradients_match_finite_differences_of_definition(sigma):
    n, step = 48, 1e-6
    generator = torch.Generator().manual_seed(3)
    width, location = grid_params(n, 8, generator)
    width[0] = 0.0
    seed = torch.randn(8, n, generator=generator, dtype=torch.float64)
    w, l = width.clone().requires_grad_(), location.clone().requires_grad_()
    gaudi_mask(w, l, n, sigma).backward(seed)

    def loss(width_, location_):
        return (gaudi_mask_reference(width_, location_, n, sigma) * seed).sum(1)

    numeric_w = (loss(width + step, location) - loss(width - step, location)) / (2 * step)
    numeric_l = (loss(width, location + step) - loss(width, location - step)) / (2 * step)
    torch.testing.assert_close(w.grad, numeric_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(l.grad, numeric_l, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_width_gradient_survives_zero_width(sigma):
    # Every component empty: each still learns whether growing would help (Corollary 1).
    n = 32
    w = torch.zeros(5, requires_grad=True)
    l = torch.rand(5, requires_grad=True)
    mask = gaudi_mask(w, l, n, sigma)
    assert torch.equal(mask, torch.zeros(5, n))
    mask.backward(torch.ones(5, n))
    # d(sum of mask)/dw = n exactly: growing the block adds area.
    torch.testing.assert_close(w.grad, torch.full((5,), float(n)))


def test_finite_everywhere_on_the_box():
    n = 50
    values = torch.tensor([0.0, 1e-9, 0.5 / n, 0.5, 1 - 1e-9, 1.0], dtype=torch.float64)
    width, location = torch.meshgrid(values, values, indexing="ij")
    for sigma in SIGMAS:
        w, l = width.flatten().clone().requires_grad_(), location.flatten().clone().requires_grad_()
        mask = gaudi_mask(w, l, n, sigma)
        mask.backward(torch.randn_like(mask))
        assert torch.isfinite(mask).all() and torch.isfinite(w.grad).all() and torch.isfinite(l.grad).all()


def test_half_precision_inputs_compute_in_float32():
    mask = gaudi_mask(torch.tensor([0.5], dtype=torch.bfloat16), torch.tensor([0.25], dtype=torch.bfloat16), 8, 10.0)
    assert mask.dtype == torch.float32


@pytest.mark.parametrize(
    "width, location, n, sigma, match",
    [
        (torch.rand(2, 3), torch.rand(2, 3), 8, None, "width must have shape"),
        (torch.rand(3), torch.rand(4), 8, None, "location must have the same shape"),
        (torch.rand(3), torch.rand(3), 0, None, "n .* positive int"),
        (torch.rand(3), torch.rand(3), 8, 0.0, "sigma"),
        (torch.rand(3), torch.rand(3), 8, float("nan"), "sigma"),
        (torch.arange(3), torch.arange(3), 8, None, "floating point"),
    ],
)
def test_bad_arguments_raise(width, location, n, sigma, match):
    with pytest.raises(ValueError, match=match):
        gaudi_mask(width, location, n, sigma)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sigma", SIGMAS)
def test_cuda_matches_cpu(sigma):
    n = 768
    width, location = grid_params(n, 64, torch.Generator().manual_seed(5), dtype=torch.float32)
    seed = torch.randn(64, n)
    results = []
    for device in ("cpu", "cuda"):
        w = width.to(device).requires_grad_()
        l = location.to(device).requires_grad_()
        mask = gaudi_mask(w, l, n, sigma)
        mask.backward(seed.to(device))
        results.append((mask.cpu(), w.grad.cpu(), l.grad.cpu()))
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mask_dim", [1, 2])
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("n, sigma, dtype", [(40, None, torch.float64), (40, 7.0, torch.float64),
                                             (768, 10.0, torch.float32)])  # the last: narrow edge gradients
def test_masked_factor_equals_multiplying_by_the_mask(mask_dim, rank, n, sigma, dtype):
    from gblr.masks import element_supports, mask_from_supports, masked_factor

    K = 6
    generator = torch.Generator().manual_seed(0)
    shape = (K, n, rank) if mask_dim == 1 else (K, rank, n)
    values = torch.randn(shape, generator=generator, dtype=dtype)
    width, location = (t.to(dtype) for t in grid_params(n, K, generator))
    width[0] = 0.0
    seed = torch.randn(shape, generator=generator, dtype=dtype)
    results = []
    for fused in (True, False):
        v, w, l = (t.clone().requires_grad_() for t in (values, width, location))
        supports = element_supports(w, l, n)
        if fused:
            out = masked_factor(v, w, l, n, sigma, *supports, mask_dim)
        else:
            mask = mask_from_supports(w, l, n, sigma, *supports)
            out = v * (mask[:, :, None] if mask_dim == 1 else mask[:, None, :])
        out.backward(seed)
        results.append((out.detach(), v.grad, w.grad, l.grad))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("n, sigma", [(768, 10.0), (3072, 30.0)])
def test_narrow_edge_gradients_equal_closed_forms_in_float32(n, sigma):
    # Once sigma makes the smoothing narrow, float32 edge gradients read only a window around
    # each edge (masks.mask_tables' reach); they must equal the full float64 formulas.
    from gblr.masks import mask_tables

    tables = mask_tables(n, sigma, torch.device("cpu"), torch.float32)
    assert tables.window is not None and 4 * (2 * tables.reach + 1) <= n
    generator = torch.Generator().manual_seed(n)
    width, location = grid_params(n, 40, generator)
    width[:4] = torch.tensor([0.0, 1.0, 1.0 / n, (n - 1.0) / n])  # empty, full, one element, all but one
    location[:4] = torch.tensor([0.0, 0.5, (n - 1.0) / n, 0.25])  # edges that wrap around
    seed = torch.randn(40, n, generator=generator, dtype=torch.float64)
    w, l = width.float().requires_grad_(), location.float().requires_grad_()
    gaudi_mask(w, l, n, sigma).backward(seed.float())
    expected_w, expected_l = closed_form_gradients(width, location, n, sigma, seed)
    scale = seed.abs().sum(1).max().item() * 1e-6
    torch.testing.assert_close(w.grad.double(), expected_w, rtol=1e-5, atol=scale)
    torch.testing.assert_close(l.grad.double(), expected_l, rtol=1e-5, atol=scale)
