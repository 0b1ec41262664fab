"""Fixed-structure linear layers used as baselines against GBLR at matched FLOPs.

Each layer behaves like :class:`torch.nn.Linear` (any leading dimensions, optional bias,
``device``/``dtype`` factory arguments) and reports its cost the way :mod:`gblr.flops` does:
multiply-accumulates (MACs) per input vector, bias not counted.

* :class:`LowRankLinear`: ``W = U @ V`` of rank ``r``, ``r * (in + out)`` MACs;
* :class:`MonarchLinear`: two block-diagonal factors with the Monarch permutation between them,
  ``inner * (in + out) / nblocks`` MACs;
* :class:`BlockSparseLinear`: a fixed pattern of dense blocks on a ``grid x grid`` block grid,
  ``len(blocks) * (out / grid) * (in / grid)`` MACs; :func:`diagonal_blocks` makes the default
  pattern (evenly spaced block diagonals).

``Layer.at_flops_ratio(in_features, out_features, flops_ratio)`` picks the structure whose cost
is the largest one not above ``flops_ratio * in * out``, so that a baseline never gets more
compute than the GBLR layer it is compared to. When even the smallest structure costs more, it
takes the smallest and ``.flops_ratio()`` reports what was achieved.

Every layer initialises its dense equivalent ``.weight`` to about the entry variance of
``nn.Linear``'s default init (uniform in ``+-1/sqrt(in)``, variance ``1/(3 in)``), so that
swapping a baseline in does not change activation scales.

Convolutions (:mod:`.conv`) have two baselines against :class:`gblr.conv.GBLRConv2d`, costed in
MACs per output pixel of the kernel's ``(out_channels, in_channels * kh * kw)`` matrix view
(``in_features`` and ``out_features`` are that view's, so :func:`gblr.flops_report` counts them),
initialised to the scale of ``nn.Conv2d``'s default init:

* :class:`LowRankConv2d`: a ``kh x kw`` convolution into ``rank`` channels and a 1x1 convolution
  out, ``rank * (in_channels * kh * kw + out_channels)`` MACs;
* :class:`BlockSparseConv2d`: a fixed pattern of dense blocks on a ``grid x grid`` grid of
  channel groups (all taps), ``len(blocks) * (out/grid) * (in/grid) * kh * kw`` MACs.

Their ``at_flops_ratio(in_channels, out_channels, kernel_size, flops_ratio, **conv_kwargs)``
chooses the structure as the linear layers' does.

One module per layer (:mod:`.low_rank`, :mod:`.monarch`, :mod:`.block_sparse`) and one for the
convolutions (:mod:`.conv`); the plumbing they share (the base class, the MAC budget, the
structure search) is in :mod:`.common`.
"""

from .block_sparse import SMALL_BLOCK as SMALL_BLOCK  # importable here as before the split, not in __all__
from .block_sparse import BlockSparseLinear, diagonal_blocks
from .conv import BlockSparseConv2d, LowRankConv2d
from .low_rank import LowRankLinear
from .monarch import MonarchLinear

__all__ = ["LowRankLinear", "MonarchLinear", "BlockSparseLinear", "diagonal_blocks", "LowRankConv2d",
           "BlockSparseConv2d"]
