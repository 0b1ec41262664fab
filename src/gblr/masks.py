"""Gaudi (Gaussian-Dirichlet) masks: differentiable boxcars for block widths and locations.

The definition (docs/method.md section 3) lives in the frequency domain: for frequencies ``k = 0 .. n//2``

    M[k] = w sinc(k w) / sinc(k/n) * exp(-i pi k (2 l + w - 1/n)) * exp(-k^2 / (2 sigma^2))
    mask = irfft(M, n, norm="forward")

:func:`gaudi_mask_reference` evaluates exactly that. :func:`gaudi_mask` computes the same
values in the time domain, much faster, from two observations:

* The forward pass rounds ``w`` and ``l`` to the ``1/n`` grid (straight-through), so the mask is
  an integer cyclic boxcar circularly convolved with one kernel ``h = irfft(g)`` that depends
  only on ``n`` and ``sigma``. A boxcar convolution is a difference of two samples of the
  cumulative sum of ``h``: two contiguous windows of a precomputed table per component.
* Both gradients are cross-correlations with one more kernel ``q`` (``dM/dw = exp(-2 pi i k w)
  C[k]`` and ``dM/dl = dM/dw - C[k]`` in the notation of docs/method.md section 3): ``dmask/dw`` is ``q``
  placed at the block's right edge and ``dmask/dl`` is the same minus ``q`` at its left edge.
  Neither vanishes at ``w = 0``, so a pruned block keeps a width gradient and can grow back.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ._validation import check_sigma

__all__ = [
    "gaudi_mask", "gaudi_mask_reference", "boxcar", "element_supports", "mask_from_supports", "masked_factor",
    "apply_masks", "apply_masks_backward", "MaskTables", "mask_tables",
]


def _check_mask_args(width: torch.Tensor, location: torch.Tensor, n: int, sigma: float | None) -> None:
    if not isinstance(width, torch.Tensor) or not isinstance(location, torch.Tensor):
        raise TypeError("width and location must be tensors of shape (K,)")
    if width.dim() != 1:
        raise ValueError(f"width must have shape (K,), got {tuple(width.shape)}")
    if location.shape != width.shape:
        raise ValueError(
            f"location must have the same shape as width {tuple(width.shape)}, got {tuple(location.shape)}"
        )
    if not width.is_floating_point() or not location.is_floating_point():
        raise ValueError(f"width and location must be floating point, got {width.dtype} and {location.dtype}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n (the mask length) must be a positive int, got {n!r}")
    check_sigma(sigma)
    # Non-finite values would round to garbage indices. Checked on the CPU only: on CUDA the check
    # would cost a GPU->CPU synchronisation per call (and a graph break under torch.compile).
    if width.device.type == "cpu" and not torch.compiler.is_compiling():
        for name, value in (("width", width), ("location", location)):
            if not bool(torch.isfinite(value.detach()).all()):
                raise ValueError(f"{name} contains NaN or infinite values")


def element_supports(
    width: torch.Tensor, location: torch.Tensor, n: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounded supports in elements: ``(W, L)`` as int64 with ``0 <= W <= n`` and ``0 <= L < n``.

    Widths are clamped to ``[0, 1]`` and locations wrap modulo 1, then both are rounded to the
    ``1/n`` grid. This is the rounding the forward pass of :func:`gaudi_mask` applies. ``n`` may
    be a tensor of per-component sizes (components of several layers at once).
    """
    with torch.no_grad():
        w = torch.round(width.detach().to(torch.float64).clamp(0.0, 1.0) * n).long()
        l = torch.remainder(torch.round(location.detach().to(torch.float64) * n).long(), n)
    return w, l


def boxcar(width: torch.Tensor, location: torch.Tensor, n: int) -> torch.Tensor:
    """Exact cyclic boxcars (no gradient): ``box[k, t] = 1 if (t - L_k) mod n < W_k else 0``."""
    w, l = element_supports(width, location, n)
    t = torch.arange(n, device=width.device)
    return (torch.remainder(t[None, :] - l[:, None], n) < w[:, None]).to(width.dtype)


# ----------------------------------------------------------------------------------------------
# The definition, kept as the ground truth for tests and benchmarks.


def _sinc(x: torch.Tensor) -> torch.Tensor:
    return torch.sinc(x)  # sin(pi x) / (pi x), 1 at 0


def gaudi_mask_reference(
    width: torch.Tensor, location: torch.Tensor, n: int, sigma: float | None = None
) -> torch.Tensor:
    """The Gaudi mask straight from its frequency-domain definition (no rounding).

    Differentiable by autograd through complex exponentials and ``irfft``. It is slow; it exists
    so that :func:`gaudi_mask` can be checked against it. ``width`` and ``location`` are used
    as given: pass grid-aligned values to compare with the rounded forward of :func:`gaudi_mask`.
    """
    _check_mask_args(width, location, n, sigma)
    k = torch.arange(n // 2 + 1, device=width.device, dtype=width.dtype)
    w = width[:, None]
    l = location[:, None]
    amplitude = w * _sinc(k * w) / _sinc(k / n)
    if sigma is not None:
        amplitude = amplitude * torch.exp(-(k**2) / (2.0 * sigma**2))
    phase = -math.pi * k * (2.0 * l + w - 1.0 / n)
    spectrum = amplitude * torch.exp(1j * phase)
    return torch.fft.irfft(spectrum, n=n, norm="forward")


# ----------------------------------------------------------------------------------------------
# The fast form.


def _gaussian(n: int, sigma: float | None, device: torch.device) -> torch.Tensor:
    k = torch.arange(n // 2 + 1, device=device, dtype=torch.float64)
    if sigma is None:
        return torch.ones_like(k)
    return torch.exp(-(k**2) / (2.0 * sigma**2))


class MaskTables(NamedTuple):
    """Precomputed tables for one ``(n, sigma)`` (see :func:`mask_tables`)."""

    cumulative: torch.Tensor  # C(j - 2n) for j = 0 .. 3n
    gradient: torch.Tensor  # q((j - 2n) mod n) for j = 0 .. 3n - 1
    window: torch.Tensor | None  # q(j mod n) for j = -reach .. reach, or None: q is not narrow
    reach: int

    @property
    def pad(self) -> int:
        """Columns :func:`_edge_gradients` needs after a row's ``n`` gradient entries."""
        return 0 if self.window is None else self.window.numel()


@functools.lru_cache(maxsize=64)
def mask_tables(n: int, sigma: float | None, device: torch.device, dtype: torch.dtype) -> MaskTables:
    """Tables for one (n, sigma), cached (layers of one width share them; read-only).

    ``cumulative[j]`` holds ``C(j - 2n)`` for ``j = 0 .. 3n``, where ``C(i) = sum_{t < i} h[t]``
    extended to all integers by ``C(i + n) = C(i) + sum(h)``; a mask row is
    ``C(t - L + 1) - C(t - L - W + 1)``, two contiguous windows of this table.

    ``gradient[j]`` holds ``q((j - 2n) mod n)`` for ``j = 0 .. 3n - 1``, with
    ``q = irfft(g[k] / sinc(k/n) * exp(i pi k / n), n, norm="forward")``; the width gradient
    of a mask is ``q`` shifted to ``L + W``.

    Once sigma is large enough for the smoothing to be narrow, ``q`` is negligible (below a tenth
    of ``dtype``'s epsilon relative to its peak) beyond ``reach`` elements of 0; then ``window``
    holds its ``2 reach + 1`` significant values and the edge gradients read only that many
    elements around each edge instead of whole rows (not under ``torch.compile``, which traces
    this function instead of calling it).
    """
    g = _gaussian(n, sigma, device)
    k = torch.arange(n // 2 + 1, device=device, dtype=torch.float64)
    if sigma is None:
        h = torch.zeros(n, device=device, dtype=torch.float64)
        h[0] = 1.0  # exact: the masks come out as exact 0/1 boxcars
    else:
        h = torch.fft.irfft(g.to(torch.complex128), n=n)
    steps = torch.cat([torch.zeros(1, device=device, dtype=torch.float64), torch.cumsum(h, 0)])  # C(0..n)
    total = steps[-1]
    # C(i) for i = -2n .. n: shift the one-period table down by 2 and 1 periods.
    cumulative = torch.cat([steps[:-1] - 2 * total, steps[:-1] - total, steps])
    spectrum = g / _sinc(k / n) * torch.exp(1j * math.pi * k / n)
    q = torch.fft.irfft(spectrum, n=n, norm="forward")
    gradient = q.repeat(3)
    if torch.compiler.is_compiling():  # finding the reach depends on the data: a graph break per call
        return MaskTables(cumulative.to(dtype), gradient.to(dtype), None, n // 2)
    offsets = torch.arange(n, device=device)
    distance = torch.minimum(offsets, n - offsets)  # cyclic distance from 0
    significant = q.abs() > 0.1 * torch.finfo(dtype).eps * q.abs().max()
    reach = int(distance[significant].max()) if significant.any() else 0
    window = None
    if 4 * (2 * reach + 1) <= n:  # worth it: a quarter of a row or less
        window = q[torch.remainder(torch.arange(-reach, reach + 1, device=device), n)].to(dtype)
    return MaskTables(cumulative.to(dtype), gradient.to(dtype), window, reach)


_CHUNK_ELEMENTS = 1 << 18  # rows of scratch work per step


def _windows(table: torch.Tensor, starts: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``table[s : s + n]`` for every ``s`` in ``starts`` (a strided view, then one copy)."""
    return torch.index_select(table.unfold(0, n, 1), 0, starts, out=out)


def _chunks(rows: int, n: int, like: torch.Tensor):
    """Row slices of at most ``_CHUNK_ELEMENTS`` elements, and one scratch buffer they share.

    Large fresh buffers cost more in page faults than the arithmetic done in them, so the
    scratch work of a whole mask goes through one small buffer that stays hot in cache.
    """
    step = max(1, min(rows, _CHUNK_ELEMENTS // n))
    scratch = like.new_empty(step, n)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        yield slice(start, stop), scratch[: stop - start]


def _mask_rows(cumulative, w, l, n, out, scratch):
    """Mask rows of components ``(w, l)`` into ``out``: ``C(t - L + 1) - C(t - L - W + 1)``,
    where the cumulative table's index ``j`` holds ``C(j - 2n)``."""
    _windows(cumulative, 2 * n + 1 - l, n, out=out)
    return out.sub_(_windows(cumulative, 2 * n + 1 - l - w, n, out=scratch))


def _edge_gradients(tables: MaskTables, w, l, n, padded, scratch, width_out, location_out) -> None:
    """Width and location gradients of mask rows from their gradient, which fills the first ``n``
    columns of ``padded`` (``(rows, n + tables.pad)``; the pad is scratch space).

    ``d mask[t] / dw = q((t - L - W) mod n)`` and ``d mask[t] / dl = d mask[t] / dw - q((t - L) mod n)``.
    With a narrow ``q`` (``tables.window``) only the ``2 reach + 1`` elements around each edge
    are read: the row's start is repeated in the pad, so each edge's elements are one contiguous
    run. Otherwise whole rows of the gradient table are read, whose index ``j`` holds
    ``q((j - 2n) mod n)``, so the row for shift ``s`` starts at ``2n - s``.
    """
    if tables.window is not None:
        span = tables.pad
        padded[:, n:].copy_(padded[:, :span])
        starts = torch.remainder(torch.stack((l + w, l), 1) - tables.reach, n)  # right edge, left edge
        near = (starts[:, :, None] + torch.arange(span, device=w.device)).reshape(w.shape[0], -1)
        sums = torch.gather(padded, 1, near).reshape(w.shape[0], 2, span) @ tables.window
        width_out.copy_(sums[:, 0])
        torch.sub(sums[:, 0], sums[:, 1], out=location_out)
        return
    torch.sum(_windows(tables.gradient, 2 * n - l - w, n, out=scratch).mul_(padded), 1, out=width_out)
    left_edge = torch.sum(_windows(tables.gradient, 2 * n - l, n, out=scratch).mul_(padded), 1)
    torch.sub(width_out, left_edge, out=location_out)


class _GaudiMask(torch.autograd.Function):
    """Masks by table lookups (see the module docstring)."""

    @staticmethod
    def forward(ctx, width, location, n, sigma, w, l):  # noqa: D401 - autograd signature
        tables = mask_tables(n, sigma, width.device, width.dtype)
        mask = tables.cumulative.new_empty(w.shape[0], n)
        for rows, scratch in _chunks(mask.shape[0], n, mask):
            _mask_rows(tables.cumulative, w[rows], l[rows], n, mask[rows], scratch)
        ctx.save_for_backward(w, l)
        ctx.n, ctx.tables = n, tables
        return mask

    @staticmethod
    def backward(ctx, grad_mask):
        w, l = ctx.saved_tensors
        n, tables = ctx.n, ctx.tables
        grad_mask = grad_mask.to(tables.gradient.dtype)
        grad_width = grad_mask.new_empty(grad_mask.shape[0])
        grad_location = grad_mask.new_empty(grad_mask.shape[0])
        padded_rows = None
        for rows, scratch in _chunks(grad_mask.shape[0], n, grad_mask):
            padded = grad_mask[rows]
            if tables.pad:  # one padded buffer for all chunks, as in apply_masks_backward
                if padded_rows is None:
                    padded_rows = grad_mask.new_empty(scratch.shape[0], n + tables.pad)
                padded = padded_rows[: scratch.shape[0]]
                padded[:, :n] = grad_mask[rows]
            _edge_gradients(tables, w[rows], l[rows], n, padded, scratch, grad_width[rows], grad_location[rows])
        return grad_width, grad_location, None, None, None, None


def apply_masks(values, n, sigma, w, l, mask_dim, table_dtype):
    """``values * mask`` for ``values`` of shape ``(K, a, b)`` and the Gaudi masks of the rounded
    supports ``(w, l)`` along dimension ``mask_dim`` (1 or 2); no gradient. The masks are built
    chunk by chunk in a small buffer and never stored (``table_dtype``: float32 or float64, the
    precision of the mask math)."""
    cumulative = mask_tables(n, sigma, values.device, table_dtype).cumulative
    out = torch.empty_like(values)
    for rows, mask, scratch in _factor_chunks(values, n, cumulative):
        _mask_rows(cumulative, w[rows], l[rows], n, mask, scratch)
        torch.mul(values[rows], _along(mask, mask_dim).to(values.dtype), out=out[rows])
    return out


def apply_masks_backward(grad_out, values, n, sigma, w, l, mask_dim, table_dtype, want_values, want_structure,
                         reuse_grad_out=False):
    """Gradients ``(values, width, location)`` of :func:`apply_masks` given ``grad_out``; the
    masks are rebuilt from the tables. Entries not wanted are None. ``reuse_grad_out``: the
    values' gradient overwrites ``grad_out`` (one buffer of the factor's size fewer)."""
    tables = mask_tables(n, sigma, values.device, table_dtype)
    grad_values = None
    if want_values:
        grad_values = grad_out if reuse_grad_out else torch.empty_like(values)
    grad_width = grad_location = None
    if want_structure:
        grad_width = tables.cumulative.new_empty(values.shape[0])
        grad_location = tables.cumulative.new_empty(values.shape[0])
    if not (want_values or want_structure):
        return grad_values, grad_width, grad_location
    other = 3 - mask_dim  # the dimension the mask does not vary along
    padded_rows = None
    for rows, mask, scratch in _factor_chunks(values, n, tables.cumulative):
        if want_structure:  # before grad_out[rows] may be overwritten
            if padded_rows is None:
                padded_rows = mask.new_empty(mask.shape[0], n + tables.pad)
            padded = padded_rows[: mask.shape[0]]
            grad_mask = padded[:, :n].unsqueeze(other)
            if values.shape[other] == 1:  # rank 1: nothing to sum over
                torch.mul(grad_out[rows], values[rows], out=grad_mask)
            else:
                torch.sum(grad_out[rows] * values[rows], other, keepdim=True, out=grad_mask)
            _edge_gradients(tables, w[rows], l[rows], n, padded, scratch, grad_width[rows], grad_location[rows])
        if want_values:
            _mask_rows(tables.cumulative, w[rows], l[rows], n, mask, scratch)
            mask = _along(mask, mask_dim).to(grad_out.dtype)
            if reuse_grad_out:
                grad_values[rows].mul_(mask)
            else:
                torch.mul(grad_out[rows], mask, out=grad_values[rows])
    return grad_values, grad_width, grad_location


class _MaskedFactor(torch.autograd.Function):
    """:func:`apply_masks` with gradients: compared with a mask tensor followed by a
    multiplication this saves two passes over ``K x n`` memory each way and keeps nothing of
    that size for backward."""

    @staticmethod
    def forward(ctx, values, width, location, n, sigma, w, l, mask_dim):  # noqa: D401 - autograd signature
        ctx.save_for_backward(values, w, l)
        ctx.n, ctx.sigma, ctx.mask_dim, ctx.table_dtype = n, sigma, mask_dim, width.dtype
        return apply_masks(values, n, sigma, w, l, mask_dim, width.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        values, w, l = ctx.saved_tensors
        want_structure = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grads = apply_masks_backward(grad_out, values, ctx.n, ctx.sigma, w, l, ctx.mask_dim, ctx.table_dtype,
                                     ctx.needs_input_grad[0], want_structure)
        return (*grads, None, None, None, None, None)


def _along(mask: torch.Tensor, mask_dim: int) -> torch.Tensor:
    return mask[:, :, None] if mask_dim == 1 else mask[:, None, :]


def _factor_chunks(values: torch.Tensor, n: int, like: torch.Tensor):
    """Row slices of ``values`` of about ``_CHUNK_ELEMENTS`` elements, with a mask buffer and a
    scratch buffer (both ``(rows, n)``) that every chunk reuses."""
    rows_total = values.shape[0]
    step = max(1, min(rows_total, _CHUNK_ELEMENTS // max(1, values[0].numel())))
    mask, scratch = like.new_empty(step, n), like.new_empty(step, n)
    for start in range(0, rows_total, step):
        stop = min(start + step, rows_total)
        yield slice(start, stop), mask[: stop - start], scratch[: stop - start]


def gaudi_mask(width: torch.Tensor, location: torch.Tensor, n: int, sigma: float | None = None) -> torch.Tensor:
    """Differentiable Gaudi masks, one row per component.

    Args:
        width: ``(K,)`` normalised widths. Clamped to ``[0, 1]`` and rounded to the ``1/n`` grid
            in the forward pass (straight-through: the gradient, taken at the rounded point,
            reaches the real-valued parameter unchanged).
        location: ``(K,)`` normalised first index of each block; wraps modulo 1, rounded likewise.
        n: mask length.
        sigma: Gaussian smoothing in units of the integer frequency index. ``None`` gives the
            exact cyclic boxcar (values exactly 0 or 1); ``1`` is almost flat, ``100`` almost a
            boxcar.

    Returns:
        ``(K, n)`` tensor, same dtype and device as ``width``, equal to the frequency-domain
        definition (:func:`gaudi_mask_reference`) at the rounded ``width`` and ``location``.
    """
    _check_mask_args(width, location, n, sigma)
    if width.device != location.device:
        raise ValueError(f"width and location must be on one device, got {width.device} and {location.device}")
    return mask_from_supports(width, location, n, sigma, *element_supports(width, location, n))


def mask_from_supports(
    width: torch.Tensor, location: torch.Tensor, n: int, sigma: float | None, w: torch.Tensor, l: torch.Tensor
) -> torch.Tensor:
    """:func:`gaudi_mask` for callers that already hold the rounded supports ``(w, l)`` of
    :func:`element_supports` (the layer needs them anyway); arguments are not checked again."""
    dtype = torch.promote_types(width.dtype, location.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # half-precision mask math is not accurate enough; see docs/method.md section 3
    return _GaudiMask.apply(width.to(dtype), location.to(dtype), n, sigma, w, l)


def masked_factor(
    values: torch.Tensor,
    width: torch.Tensor,
    location: torch.Tensor,
    n: int,
    sigma: float | None,
    w: torch.Tensor,
    l: torch.Tensor,
    mask_dim: int,
) -> torch.Tensor:
    """``values * mask`` (mask along dimension ``mask_dim`` of the ``(K, a, b)`` values) without
    materialising the masks; differentiable in ``values``, ``width`` and ``location``. Equal to
    multiplying by :func:`mask_from_supports`, which the tests check."""
    dtype = torch.promote_types(width.dtype, location.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    return _MaskedFactor.apply(values, width.to(dtype), location.to(dtype), n, sigma, w, l, mask_dim)
