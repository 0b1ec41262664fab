"""Fixed-structure convolution baselines: the low-rank and block-sparse structures applied to a
convolution kernel, to compare against :class:`gblr.conv.GBLRConv2d` at equal FLOPs.

As for GBLR convolutions, an ``(out, in, kh, kw)`` kernel is viewed as the ``(out_channels,
in_channels * kh * kw)`` matrix (input channels outermost, ``weight.reshape(out, -1)``), and the
layers report ``in_features = in_channels * kh * kw``, ``out_features = out_channels`` and
``flops()`` in MACs *per output pixel* (bias not counted), so that :func:`gblr.flops_report`
counts them like the linear layers. ``output_pixels`` is the output height times width of the
last forward pass (None before the first).

* :class:`LowRankConv2d`: a ``kh x kw`` convolution into ``rank`` channels, then a 1x1
  convolution into the outputs; ``rank * (in_channels * kh * kw + out_channels)`` MACs.
* :class:`BlockSparseConv2d`: the matrix view restricted to a fixed pattern of dense blocks on a
  ``grid x grid`` grid of channel groups (block ``(i, j)``: output group ``i`` from input group
  ``j`` with all ``kh * kw`` taps); ``len(blocks) * (out/grid) * (in/grid) * kh * kw`` MACs.

Both accept ``(N, C, H, W)`` and ``(C, H, W)`` inputs, ``stride``, ``padding`` (ints, pairs,
``"valid"``, ``"same"``) and ``dilation`` as :class:`torch.nn.Conv2d` (``groups=1``, zero
padding), and initialise their effective kernel to the scale of ``nn.Conv2d``'s default init
(entries uniform in ``+-1/sqrt(in_channels * kh * kw)``, variance ``1 / (3 fan_in)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_flops_ratio, check_input_dtype, check_positive_int
from ..conv import ConvGeometry
from ..flops import low_rank_macs, max_low_rank
from .block_sparse import check_blocks, diagonal_blocks, diagonal_grid
from .common import FACTOR_GAIN, StructuredLinear, check_divides, init_bias_, macs_budget

__all__ = ["StructuredConv2d", "LowRankConv2d", "BlockSparseConv2d", "kernel_taps"]


def kernel_taps(kernel_size, in_channels: int = 1, out_channels: int = 1) -> int:
    """``kh * kw`` of ``kernel_size`` (an int or a pair), checked as the convolutions check it
    (with the channel counts, if given)."""
    return ConvGeometry.of(in_channels, out_channels, kernel_size).taps


class StructuredConv2d(ConvGeometry, StructuredLinear):
    """Shared plumbing of the convolution baselines: the linear baselines' (matrix-view shape,
    bias, cost ratio) plus the geometry, forward bookkeeping (input checks, ``output_pixels``)
    and a repr that shows the geometry.

    Subclasses call :meth:`_init_conv` first in ``__init__`` and implement ``weight`` (the
    effective ``(out, in, kh, kw)`` kernel), ``_convolve(batch)`` (a 4-D batch, bias included),
    ``flops()`` (MACs per output pixel) and ``_structure_repr()``.
    """

    def _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation, bias: bool,
                   factory: dict) -> None:
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, "zeros")
        self._init_shape_and_bias(self.in_channels * self.taps, self.out_channels, bias, factory)

    @property
    def weight(self) -> torch.Tensor:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    @property
    def matrix(self) -> torch.Tensor:
        """The ``(out_channels, in_channels * kh * kw)`` matrix view of :attr:`weight` (differentiable)."""
        return self.weight.reshape(self.out_channels, -1)

    def _convolve(self, batch: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.check_image(x)
        check_input_dtype(x, self.dtype, self)
        y = self._convolve(batch)
        self.output_pixels = int(y.shape[-2] * y.shape[-1])
        return y if x.dim() == 4 else y.squeeze(0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return (f"{self.geometry_repr()}, bias={self.bias is not None}, {self._structure_repr()}, "
                f"flops_ratio={self.flops_ratio():.3f}")


class LowRankConv2d(StructuredConv2d):
    """A ``kh x kw`` convolution from ``in_channels`` into ``rank`` channels (kernel ``v``,
    ``(rank, in_channels, kh, kw)``, no bias), then a 1x1 convolution into ``out_channels``
    (``u``, ``(out_channels, rank)``, and the bias): the kernel's matrix view is ``u @ v`` of
    rank ``rank``. ``stride``, ``padding`` and ``dilation`` belong to the first convolution.

    Costs ``rank * (in_channels * kh * kw + out_channels)`` MACs per output pixel. Both factors
    are initialised uniform in ``+-3**(1/4) / sqrt(fan_in)`` (``in_channels * kh * kw`` for
    ``v``, ``rank`` for ``u``), so that every kernel entry has ``nn.Conv2d``'s variance
    ``1 / (3 in_channels kh kw)`` (see :data:`gblr.baselines.common.FACTOR_GAIN`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, factory)
        self.rank = check_positive_int("rank", rank)
        self.v = nn.Parameter(torch.empty(rank, self.in_channels, *self.kernel_size, **factory))
        self.u = nn.Parameter(torch.empty(self.out_channels, rank, **factory))
        self.reset_parameters()

    @classmethod
    def at_flops_ratio(cls, in_channels: int, out_channels: int, kernel_size, flops_ratio: float,
                       **conv_kwargs) -> "LowRankConv2d":
        """The largest rank whose cost does not exceed ``flops_ratio`` times the dense
        convolution's ``in_channels * kh * kw * out_channels`` MACs per output pixel (at least
        1, whose cost :meth:`flops_ratio` then reports). ``conv_kwargs`` go to the constructor."""
        taps = kernel_taps(kernel_size, in_channels, out_channels)
        budget = macs_budget(in_channels * taps, out_channels, check_flops_ratio(flops_ratio))
        rank = max(1, max_low_rank(budget, out_channels, in_channels * taps))
        return cls(in_channels, out_channels, kernel_size, rank, **conv_kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound_v, bound_u = FACTOR_GAIN / math.sqrt(self.in_features), FACTOR_GAIN / math.sqrt(self.rank)
        nn.init.uniform_(self.v, -bound_v, bound_v)
        nn.init.uniform_(self.u, -bound_u, bound_u)
        init_bias_(self.bias, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The effective ``(out_channels, in_channels, kh, kw)`` kernel (differentiable)."""
        return (self.u @ self.v.reshape(self.rank, -1)).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def _convolve(self, batch: torch.Tensor) -> torch.Tensor:
        hidden = self.convolve(batch, self.v, None)
        return F.conv2d(hidden, self.u[:, :, None, None], self.bias)

    def flops(self) -> int:
        return low_rank_macs(self.rank, self.out_features, self.in_features)

    def _structure_repr(self) -> str:
        return f"rank={self.rank}"


class BlockSparseConv2d(StructuredConv2d):
    """A convolution whose kernel is nonzero only in a fixed pattern of blocks on a ``grid x
    grid`` grid of channel groups: block ``(i, j)`` connects output channels ``i * out/grid ..``
    to input channels ``j * in/grid ..`` with all ``kh * kw`` taps (in the matrix view, a
    ``(out/grid, in/grid * kh * kw)`` block). ``blocks`` lists the active blocks as ``(i, j)``
    pairs (:func:`gblr.baselines.diagonal_blocks` makes the pattern :meth:`at_flops_ratio`
    uses); their values are one parameter ``block_weight (len(blocks), out/grid, in/grid, kh, kw)``.

    Costs ``len(blocks) * (out/grid) * (in/grid) * kh * kw`` MACs per output pixel. The forward
    pass convolves with the masked dense kernel (simple and exact; :meth:`flops` counts the
    blocks). Active blocks are initialised like the same entries of a dense ``nn.Conv2d``
    (uniform in ``+-1/sqrt(in_channels * kh * kw)``), as :class:`gblr.baselines.BlockSparseLinear`
    does: a dense init with the inactive blocks pruned.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        grid: int,
        blocks: Sequence[tuple[int, int]],
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, factory)
        self.grid = check_positive_int("grid", grid)
        check_divides("grid", grid, in_channels=self.in_channels, out_channels=self.out_channels)
        self.blocks = check_blocks(blocks, grid)
        rows, cols = zip(*self.blocks)
        # The pattern is a constructor argument, not state (as in BlockSparseLinear).
        self.register_buffer("block_rows", torch.tensor(rows, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("block_cols", torch.tensor(cols, dtype=torch.long, device=device), persistent=False)
        self.block_weight = nn.Parameter(torch.empty(len(self.blocks), *self.block_shape, *self.kernel_size, **factory))
        self.reset_parameters()

    @classmethod
    def at_flops_ratio(cls, in_channels: int, out_channels: int, kernel_size, flops_ratio: float, *,
                       grid: int | None = None, **conv_kwargs) -> "BlockSparseConv2d":
        """``k`` evenly spread block diagonals (:func:`gblr.baselines.diagonal_blocks`) on the
        grid whose cost, ``k / grid`` of the dense convolution's, is the largest not above
        ``flops_ratio`` of it.

        ``grid`` ranges over the common divisors of the channel counts up to 16 (or is the given
        one), excluding 1 unless it is the only one (a 1x1 grid is the dense convolution);
        ``k = max(1, floor(flops_ratio * grid))``; larger grids win ties, as in
        :meth:`gblr.baselines.BlockSparseLinear.at_flops_ratio`. ``conv_kwargs`` go to the
        constructor."""
        taps = kernel_taps(kernel_size, in_channels, out_channels)
        g, k = diagonal_grid(in_channels, out_channels, in_channels * taps * out_channels, flops_ratio, grid,
                             ("in_channels", "out_channels"))
        return cls(in_channels, out_channels, kernel_size, g, diagonal_blocks(g, k), **conv_kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.block_weight, -bound, bound)
        init_bias_(self.bias, self.in_features)

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(out_channels / grid, in_channels / grid)``: the channels of one block."""
        return self.out_channels // self.grid, self.in_channels // self.grid

    @property
    def weight(self) -> torch.Tensor:
        """The effective ``(out_channels, in_channels, kh, kw)`` kernel, zero outside the active
        blocks (differentiable)."""
        g = self.grid
        grid_of_blocks = self.block_weight.new_zeros(g, g, *self.block_weight.shape[1:])
        grid_of_blocks = grid_of_blocks.index_put((self.block_rows, self.block_cols), self.block_weight)
        # (g_out, g_in, b_out, b_in, kh, kw) -> (g_out, b_out, g_in, b_in, kh, kw)
        return grid_of_blocks.transpose(1, 2).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def _convolve(self, batch: torch.Tensor) -> torch.Tensor:
        return self.convolve(batch, self.weight, self.bias)

    def flops(self) -> int:
        b_out, b_in = self.block_shape
        return len(self.blocks) * b_out * b_in * self.taps

    def _structure_repr(self) -> str:
        return f"grid={self.grid}, blocks={len(self.blocks)}"
