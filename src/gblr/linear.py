"""GBLRLinear: a linear layer whose weight is a sum of learned, overlapping low-rank blocks.

    W = sum_k (mask_out[k] * u[k]) @ (v[k] * mask_in[k])        (docs/method.md section 1)
      + B * sum_j mask_out[K + j] (x) mask_in[K + j]          (optional dense blocks, section 10)

``mask_in[k]`` and ``mask_out[k]`` are Gaudi masks (:mod:`gblr.masks`) of the structural
parameters ``in_width``, ``in_location``, ``out_width``, ``out_location``: one entry per
low-rank component, then one per dense block (``dense_blocks``, default none): a block whose
values are the entries of one full-size matrix ``B`` (``block_weight``) under its mask. The product runs in
one autograd function (:mod:`gblr.product`); :meth:`GBLRLinear.freeze` gives the deployed form
(:mod:`gblr.frozen`): exact boxcars, zero-width components dropped, factors cropped to their
supports, components of identical support merged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import (
    check_flops_ratio,
    check_input,
    check_input_dtype,
    check_positive_int,
    check_share,
    check_sigma,
    compute_dtype,
    layer_name,
)
from .compact import SEGMENT_OVERHEAD, CompactProduct, masked_cost, plan_compact
from .flops import Structure, cyclic_indices, cyclic_ranges, group_macs, square_block_fraction
from .frozen import FrozenGBLRLinear
from .kernels.choice import predicted_cost
from .masks import element_supports, mask_from_supports, masked_factor
from .product import PRODUCTS, GBLRProduct, GBLRWeight, ProductPlan, materialise_is_cheaper

__all__ = ["STRUCTURAL_NAMES", "GBLRLinear", "check_finite_structure", "nonfinite_layers", "spread_diagonals",
           "structure_of"]

STRUCTURAL_NAMES = ("in_width", "in_location", "out_width", "out_location")


def spread_diagonals(blocks: int, side: float) -> tuple[list[float], list[float]]:
    """Where ``blocks`` square-ish blocks of ``side`` (a fraction of both dimensions) start:
    ``(out_starts, in_starts)``, fractions in ``[0, 1)``. The blocks fill block diagonals of a
    ``g x g`` grid, ``g = round(1 / side)`` blocks to a diagonal (at most ``blocks``; at least
    ``ceil(sqrt(blocks))``, so that no two blocks share a cell), and the ``ceil(blocks / g)``
    diagonals sit at evenly spread offsets, block-sparse's pattern
    (:func:`gblr.baselines.diagonal_blocks`): ``g`` blocks make the main diagonal, ``2 g`` add the
    diagonal half a grid away. Fewer blocks than ``round(1 / side)`` (or ``side`` 0) start at
    ``j / blocks`` of both sides."""
    if blocks <= 0:
        return [], []
    per_diagonal = min(blocks, round(1.0 / side)) if side > 0 else blocks
    per_diagonal = max(per_diagonal, math.isqrt(blocks - 1) + 1)  # ceil(blocks / g) <= g: distinct offsets
    diagonals = -(-blocks // per_diagonal)
    offsets = [round(i * per_diagonal / diagonals) for i in range(diagonals)]
    out_starts, in_starts = [], []
    for j in range(blocks):
        row, offset = j % per_diagonal, offsets[j // per_diagonal]
        out_starts.append(row / per_diagonal)
        in_starts.append((row + offset) % per_diagonal / per_diagonal)
    return out_starts, in_starts


def _structure_dtype(dtype: torch.dtype | None) -> torch.dtype:
    # Widths and locations need ~1/n resolution: half precision cannot hold 1/3072.
    return torch.float64 if dtype == torch.float64 else torch.float32


class GBLRLinear(nn.Module):
    """Drop-in replacement for :class:`torch.nn.Linear` with a learnable GBLR weight.

    Args:
        in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
        components: number of components ``K``; default ``min(in_features, out_features)``.
        rank: rank ``r`` of each component (default 1).
        sigma: Gaussian smoothing of the masks; ``None`` (default) uses exact boxcars.
            Training from scratch raises it from about 1 to about 100 (docs/method.md section 4).
        init_flops_ratio: FLOPs ratio of the initial structure, in ``(0, 1]`` (default 0.5).
        init_full_width_share: share of that budget given to full-width components (the top
            singular directions of a standard dense init), in ``[0, 1]`` (default 0.5, the
            paper's); the rest goes to partial blocks at random locations.
        dense_blocks: number of dense blocks ``J`` (default 0): blocks of full rank whose
            positions and sizes are learned like the components' (docs/method.md section 10); a
            block ``a`` columns by ``b`` rows wide costs ``a * b`` MACs, the rank-``r`` component
            costs ``min(r * (a + b), a * b)``. They start on block diagonals, block-sparse's
            pattern (:func:`spread_diagonals`).
        init_dense_share: share of the initial budget in the dense blocks, in ``[0, 1]``
            (default 0.8, the best of 0.5, 0.8, 0.9 and 1 on a small GPT; ignored without dense
            blocks); ``init_full_width_share`` then splits the rest.
        product: how the forward product runs: ``"auto"`` (default) materialises the weight
            where that costs fewer MACs than two thin products (:func:`gblr.product.materialise_is_cheaper`),
            ``"materialise"`` or ``"factored"`` force one way. All give the same result.

    ``compact`` (attribute, default False): with the structure fixed and ``sigma=None``, the
    forward and backward passes run on the cropped blocks only (:mod:`gblr.compact`), at about
    the layer's FLOPs ratio of a dense layer's cost (where that is predicted cheaper than the
    masked product); widths and locations then get zero gradients.
    :class:`gblr.StructureLearner` turns it on for the content phase. The groups are planned from
    the supports at the first forward pass of each size after it is set (:meth:`compact_plan`):
    set it again after changing them.

    Structural parameters (``in_width``, ``in_location``, ``out_width``, ``out_location``, all
    normalised to ``[0, 1]``) are kept in float32 (float64 for a float64 layer), whatever the
    layer's dtype, also through module casts (``.half()``, ``.to(dtype)``, ...); use autocast for
    half precision. Inputs must have the layer's dtype (or run under autocast), as for
    ``nn.Linear``. Non-finite widths or locations are refused where they are used: always by
    ``supports()``, ``flops()`` and ``freeze()``, and by the forward pass on the CPU (on CUDA that
    check would cost a GPU->CPU synchronisation per call; there :class:`gblr.StructureLearner`
    checks after each step instead).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        components: int | None = None,
        rank: int = 1,
        sigma: float | None = None,
        device=None,
        dtype=None,
        *,
        init_flops_ratio: float = 0.5,
        init_full_width_share: float = 0.5,
        dense_blocks: int = 0,
        init_dense_share: float = 0.8,
        product: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if components is None:
            components = min(in_features, out_features)
        self.components = check_positive_int("components", components)
        self.rank = check_positive_int("rank", rank)
        if rank > min(in_features, out_features):  # a block of an (out, in) matrix has at most that rank
            raise ValueError(
                f"rank must be at most min(in_features, out_features) = {min(in_features, out_features)}, got {rank}"
            )
        self.sigma = sigma
        self.init_flops_ratio = check_flops_ratio(init_flops_ratio, "init_flops_ratio")
        self.init_full_width_share = check_share(init_full_width_share, "init_full_width_share")
        if isinstance(dense_blocks, bool) or not isinstance(dense_blocks, int) or dense_blocks < 0:
            raise ValueError(f"dense_blocks must be an int >= 0, got {dense_blocks!r}")
        self.dense_blocks = dense_blocks
        self.init_dense_share = check_share(init_dense_share, "init_dense_share")
        self.product = product
        self.compact = False
        factory = {"device": device, "dtype": dtype}
        structure = {"device": device, "dtype": _structure_dtype(dtype)}
        entries = components + dense_blocks
        self.in_width = nn.Parameter(torch.empty(entries, **structure))
        self.in_location = nn.Parameter(torch.empty(entries, **structure))
        self.out_width = nn.Parameter(torch.empty(entries, **structure))
        self.out_location = nn.Parameter(torch.empty(entries, **structure))
        self.u = nn.Parameter(torch.empty(components, out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(components, rank, in_features, **factory))
        block_weight = torch.empty(out_features, in_features, **factory) if dense_blocks else None
        self.block_weight = None if block_weight is None else nn.Parameter(block_weight)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    # -- parameters ---------------------------------------------------------------------------

    @property
    def product(self) -> str:
        return self._product

    @product.setter
    def product(self, value: str) -> None:
        if value not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, got {value!r}")
        self._product = value

    @property
    def compact(self) -> bool:
        return self._compact

    @compact.setter
    def compact(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"compact must be True or False, got {value!r}")
        self._compact = value
        self._compact_plans = {}  # (device, token bucket) -> plan or None; planned again from the supports

    @property
    def sigma(self) -> float | None:
        return self._sigma

    @sigma.setter
    def sigma(self, value: float | None) -> None:
        self._sigma = check_sigma(value)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise per docs/method.md section 4 at ``init_flops_ratio``.

        A dense ``nn.Linear`` init is split by SVD into ``K`` rank-``r`` components (top
        singular directions first). Dense blocks (if any) take ``init_dense_share`` of the MACs
        budget as ``J`` equal square-ish blocks on spread block diagonals (:func:`spread_diagonals`:
        ``J`` blocks of side ``1 / J`` make the diagonal), their values drawn as ``nn.Linear``'s.
        Of the rest, full-width components take ``init_full_width_share``; the other components
        share what remains as square-ish partial blocks (the same fraction of rows and columns) at
        uniformly random locations.
        """
        m, n, K, r, J = self.out_features, self.in_features, self.components, self.rank, self.dense_blocks
        left, right = _dense_init_factors(m, n, K * r, device=self.u.device, dtype=_structure_dtype(self.u.dtype))
        self.u.copy_(left.reshape(m, K, r).permute(1, 0, 2))
        self.v.copy_(right.reshape(K, r, n))

        budget = self.init_flops_ratio * m * n
        bound = 1.0 / math.sqrt(n)
        if J:
            side = min(1.0, math.sqrt(self.init_dense_share * budget / J / (m * n)))
            out_start, in_start = spread_diagonals(J, side)
            self.in_width[K:] = side
            self.out_width[K:] = side
            self.in_location[K:] = torch.tensor(in_start, dtype=self.in_location.dtype)
            self.out_location[K:] = torch.tensor(out_start, dtype=self.out_location.dtype)
            self.block_weight.uniform_(-bound, bound)
            budget -= J * side * side * m * n
        full_cost = group_macs(r, n, m)
        full = min(K, int(self.init_full_width_share * budget // full_cost))
        partial = K - full
        fraction = 0.0
        if partial:
            fraction = square_block_fraction((budget - full * full_cost) / partial, r, m, n)
        self.in_width[:K] = fraction
        self.out_width[:K] = fraction
        self.in_width[:full] = 1.0
        self.out_width[:full] = 1.0
        self.in_location[:K].uniform_(0.0, 1.0)
        self.out_location[:K].uniform_(0.0, 1.0)
        self.in_location[:full] = 0.0
        self.out_location[:full] = 0.0
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def structural_parameters(self) -> list[nn.Parameter]:
        """Widths and locations: the parameters of the structure (docs/method.md section 4)."""
        return [self.in_width, self.in_location, self.out_width, self.out_location]

    def content_parameters(self) -> list[nn.Parameter]:
        """``u``, ``v``, the dense blocks' ``block_weight`` and the bias: the parameters of the values."""
        return [p for p in (self.u, self.v, self.block_weight, self.bias) if p is not None]

    def entry_ranks(self) -> torch.Tensor:
        """The rank of each structural entry, ``(components + dense_blocks,)`` int64: ``rank`` for
        the components, ``min(in_features, out_features)`` for the dense blocks (a rank at which
        :func:`gblr.flops.group_macs` always charges a block its area)."""
        ranks = torch.full((self.components + self.dense_blocks,), self.rank, dtype=torch.long,
                           device=self.in_width.device)
        ranks[self.components:] = min(self.in_features, self.out_features)
        return ranks

    def _low_rank_part(self, supports):
        """The components' widths, locations and rounded supports: the structural parameters
        themselves, or their first ``components`` entries when there are dense blocks."""
        structure = self.structural_parameters()
        if not self.dense_blocks:
            return structure, supports
        K = self.components
        return [p[:K] for p in structure], None if supports is None else tuple(s[:K] for s in supports)

    def supports(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rounded supports in elements: ``(in_width, in_location, out_width, out_location)``."""
        return self._supports("supports()", always=True)

    def _supports(self, use: str, always: bool):
        """The rounded supports, after refusing non-finite widths or locations (which would round
        to garbage indices): ``always``, or only on the CPU outside ``torch.compile``, where the
        check costs no GPU->CPU synchronisation and no graph break (the forward pass)."""
        if always or (self.in_width.device.type == "cpu" and not torch.compiler.is_compiling()):
            check_finite_structure([self], f"in {use}")
        w_in, l_in = element_supports(self.in_width, self.in_location, self.in_features)
        w_out, l_out = element_supports(self.out_width, self.out_location, self.out_features)
        return w_in, l_in, w_out, l_out

    def structure(self) -> Structure:
        """The rounded structure as a :class:`gblr.flops.Structure` (one layer)."""
        return structure_of([self])

    # -- the computation ------------------------------------------------------------------------

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_in (K + J, in_features), mask_out (K + J, out_features))`` at the current sigma
        (components, then dense blocks)."""
        w_in, l_in, w_out, l_out = self._supports("masks()", always=False)
        mask_in = mask_from_supports(self.in_width, self.in_location, self.in_features, self.sigma, w_in, l_in)
        mask_out = mask_from_supports(self.out_width, self.out_location, self.out_features, self.sigma, w_out, l_out)
        return mask_in, mask_out

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, as ``nn.Linear.weight`` (:attr:`matrix`)."""
        return self.matrix

    @property
    def matrix(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix this layer applies (differentiable):
        ``left_t.T @ right`` with the masks applied to ``u`` and ``v`` on the fly
        (:func:`gblr.masks.masked_factor`: no mask tensors, nothing of their size kept for
        backward)."""
        supports = self._supports("weight", always=False)
        (in_width, in_location, out_width, out_location), (w_in, l_in, w_out, l_out) = self._low_rank_part(supports)
        left = masked_factor(self.u, out_width, out_location, self.out_features, self.sigma, w_out, l_out, 1)
        right = masked_factor(self.v, in_width, in_location, self.in_features, self.sigma, w_in, l_in, 2)
        matrix = left.transpose(1, 2).reshape(-1, self.out_features).T @ right.reshape(-1, self.in_features)
        if self.dense_blocks:
            matrix = matrix + self._dense_weight(supports)
        return matrix

    def _dense_weight(self, supports) -> torch.Tensor:
        """``B * sum_j mask_out[K + j] (x) mask_in[K + j]``: the dense blocks' ``(out, in)`` matrix
        (differentiable in ``B`` and in the blocks' widths and locations)."""
        K = self.components
        w_in, l_in, w_out, l_out = (s[K:] for s in supports)
        mask_in = mask_from_supports(self.in_width[K:], self.in_location[K:], self.in_features, self.sigma, w_in, l_in)
        mask_out = mask_from_supports(self.out_width[K:], self.out_location[K:], self.out_features, self.sigma,
                                      w_out, l_out)
        return self.block_weight * (mask_out.T @ mask_in).to(self.block_weight.dtype)

    def _dense_block_pieces(self, supports):
        """The dense blocks' contiguous pieces as ``(rows, cols)`` slices of the ``(out, in)``
        matrix (a block that wraps is two or four pieces; empty blocks have none)."""
        K = self.components
        for a, start_in, b, start_out in zip(*(s[K:].tolist() for s in supports)):
            if a == 0 or b == 0:
                continue
            for row, row_from, row_to in cyclic_ranges(start_out, b, self.out_features):
                for col, col_from, col_to in cyclic_ranges(start_in, a, self.in_features):
                    yield slice(row, row + row_to - row_from), slice(col, col + col_to - col_from)

    def _dense_blocks_cropped(self, x: torch.Tensor, supports) -> torch.Tensor:
        """The dense blocks' output for ``x (T, in)`` at ``sigma=None``, from the cropped blocks
        only: ``y[:, rows_j] += x[:, cols_j] @ B[rows_j, cols_j].T`` (``(T, out)``), on contiguous
        slices (:meth:`_dense_block_pieces`)."""
        y = x.new_zeros(x.shape[0], self.out_features)
        for rows, cols in self._dense_block_pieces(supports):
            y[:, rows] += x[:, cols] @ self.block_weight[rows, cols].T
        return y

    def materialises(self, tokens: int) -> bool:
        """Whether a forward pass over ``tokens`` rows builds the weight (see ``product``)."""
        if self.product != "auto":
            return self.product == "materialise"
        return materialise_is_cheaper(tokens, self.in_features, self.out_features, self.components * self.rank,
                                      dense_term=self.dense_blocks > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        check_input_dtype(x, self.u.dtype, self)
        tokens = x.numel() // self.in_features
        plan = self.compact_plan(tokens) if self.compact else None
        supports = None
        if plan is not None:
            structure, _ = self._low_rank_part(None)
            y = CompactProduct.apply(x.reshape(-1, self.in_features), self.u, self.v, self.bias, plan, *structure)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            supports = self._supports("forward", always=False)
            structure, low_rank = self._low_rank_part(supports)
            revived = None
            if torch.is_grad_enabled() and self.in_width.requires_grad:
                revived = self.revived_widths(low_rank)
            product = ProductPlan(self.in_features, self.out_features, self.sigma, self.in_width.dtype,
                                  self.materialises(tokens))
            if self.dense_blocks and product.materialise:
                # one GEMM for both terms: the components' weight plus the blocks' masked matrix (also
                # for a compact layer that keeps the masked product: the layer is small)
                dtype = compute_dtype(x)
                weight = GBLRWeight.apply(self.u, self.v, *structure, product, low_rank, revived, dtype)
                return F.linear(x, weight + self._dense_weight(supports).to(dtype), self.bias)
            y = GBLRProduct.apply(x, self.u, self.v, self.bias, *structure, product, low_rank, revived)
        if self.dense_blocks:
            supports = supports or self._supports("forward", always=False)
            if plan is not None:
                flat = x.reshape(-1, self.in_features)
                y = y + self._dense_blocks_cropped(flat, supports).reshape(*x.shape[:-1], self.out_features)
            else:
                y = y + F.linear(x, self._dense_weight(supports))
        return y

    def compact_plan(self, tokens: int):
        """The compact product's plan (:func:`gblr.compact.plan_compact`) for a forward pass over
        ``tokens`` rows, or None where the masked product is predicted cheaper (small layers, few
        blocks of little padding to save, many small dense blocks to crop): the same output and
        gradients. Planned from the supports once per device and power-of-two bucket of token
        counts after ``compact`` was set (training batches and evaluation batches each get the
        groups that suit them)."""
        if self.sigma is not None:
            raise ValueError(f"{layer_name(self)}: compact=True needs sigma=None (a fixed structure of exact boxcars), "
                             f"got sigma={self.sigma}; set compact=False while the structure is learned")
        bucket = 1 << max(0, tokens - 1).bit_length()  # the power of two at or above tokens
        key = (self.u.device, bucket)
        if key not in self._compact_plans:
            supports = self._supports("forward", always=False)
            _, low_rank = self._low_rank_part(supports)
            plan = plan_compact(low_rank, self.rank, self.in_features, self.out_features, tokens=bucket)
            device_type = self.u.device.type
            compact = plan.cost(bucket, device_type)
            masked = masked_cost(bucket, self.in_features, self.out_features, self.components * self.rank, device_type,
                                 dense_blocks=self.dense_blocks)
            if self.dense_blocks:
                compact += self._cropped_blocks_cost(supports, bucket, device_type)
            self._compact_plans[key] = plan if compact < masked else None
        return self._compact_plans[key]

    def _cropped_blocks_cost(self, supports, tokens: int, device_type: str) -> float:
        """Predicted cost of a training step of :meth:`_dense_blocks_cropped`, in the units of
        :meth:`gblr.compact.CompactPlan.cost`: per contiguous piece of a block, its MACs plus moving
        its operands (:data:`gblr.compact.SEGMENT_OVERHEAD` per row and column) and one call."""
        macs, calls = 0, 0
        for rows, cols in self._dense_block_pieces(supports):
            height, width = rows.stop - rows.start, cols.stop - cols.start
            macs += height * width + SEGMENT_OVERHEAD * (height + width)
            calls += 1
        return 3 * predicted_cost(macs, calls, tokens, device_type)

    @staticmethod
    def revived_widths(supports) -> tuple[torch.Tensor, torch.Tensor]:
        """In and out widths (elements) with every fully pruned component one element wide.

        For a component whose two widths are both zero the true gradient of either width is zero
        (the block is the product of two empty masks), so the proximal step could never let it
        grow back. The backward pass (:class:`gblr.product.GBLRProduct`) gives each empty mask the gradient
        it would get if its partner were one element wide at its location (docs/method.md section 3: a
        pruned block must be able to grow back). The output and the content gradients are
        unchanged.
        """
        w_in, _, w_out, _ = supports
        dead = (w_in == 0) & (w_out == 0)
        return w_in + dead, w_out + dead

    # -- cost and deployment ----------------------------------------------------------------------

    def flops(self) -> int:
        """MACs per input vector of the current (rounded) structure, docs/method.md section 2."""
        return int(structure_of([self], where="in flops()").layer_macs()[0])

    def flops_ratio(self) -> float:
        return self.flops() / (self.in_features * self.out_features)

    @torch.no_grad()
    def freeze(self) -> "FrozenGBLRLinear":
        """The deployed form: exact boxcars (``sigma=None``), zero-width components dropped,
        factors cropped to their supports, components with identical supports merged (into a
        dense block where a dense block shares their support). Its output
        equals this layer's output at ``sigma=None``, and so does its ``flops()``."""
        groups = structure_of([self], where="in freeze()").support_groups()
        blocks = []
        for support, members in sorted(groups.items()):
            rows = cyclic_indices(support.out_start, support.out_width, self.out_features, self.u.device)
            cols = cyclic_indices(support.in_start, support.in_width, self.in_features, self.v.device)
            low_rank = [index for index in members if index < self.components]
            index = torch.tensor(low_rank, dtype=torch.long, device=self.u.device)
            left = self.u[index][:, rows, :].permute(1, 0, 2).reshape(support.out_width, -1)
            right = self.v[index][:, :, cols].reshape(-1, support.in_width)
            dense = len(members) - len(low_rank)
            if dense:  # one dense block (the factors' product added): right is the identity
                left = dense * self.block_weight[rows][:, cols] + left @ right
                right = torch.eye(support.in_width, dtype=left.dtype, device=left.device)
            blocks.append((support, left.clone(), right.clone()))
        bias = None if self.bias is None else self.bias.detach().clone()
        return self._frozen_form(blocks, bias)

    def _frozen_form(self, blocks, bias) -> "FrozenGBLRLinear":
        """The frozen layer of these cropped blocks (a subclass with another product overrides it)."""
        return FrozenGBLRLinear(
            self.in_features, self.out_features, blocks, bias, dtype=self.u.dtype, device=self.u.device
        )

    def extra_repr(self) -> str:
        # a repr must not raise: a non-finite structure is shown, not counted
        ratio = "invalid (non-finite widths or locations)" if nonfinite_layers([self]) else f"{self.flops_ratio():.3f}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"components={self.components}, rank={self.rank}, "
            + (f"dense_blocks={self.dense_blocks}, " if self.dense_blocks else "")
            + f"sigma={self.sigma}, flops_ratio={ratio}"
        )

    def _apply(self, fn, recurse=True):
        """Module-wide conversions (``.to``, ``.half()``, ``.double()``, ``.cuda()``, ``to_empty``,
        ...) move the structural parameters with the content but keep their dtype rule
        (:func:`_structure_dtype` of the converted content dtype): a cast to half precision would
        move hundreds of locations of a 3072-wide layer. Where ``fn`` would give a structural
        tensor (or its gradient) another dtype, it is converted from the original instead, so no
        value is ever rounded through half precision. Everything else (new Parameter objects or
        not, ``torch.__future__`` flags, gradients) is nn.Module's own ``_apply``."""
        # Compared by identity with the tensors themselves (ids alone could be reused meanwhile, as
        # nn.Module._apply drops the old Parameter objects when it makes new ones).
        structural = self.structural_parameters()
        structural += [p.grad for p in structural if p.grad is not None]

        def keep_structure_dtype(tensor):
            applied = fn(tensor)
            if any(tensor is other for other in structural) and applied.is_floating_point():
                wanted = _structure_dtype(applied.dtype)
                if applied.dtype != wanted:
                    return tensor.to(device=applied.device, dtype=wanted)
            return applied

        return super()._apply(keep_structure_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Non-finite widths or locations from a checkpoint are refused on loading, before they are
        # copied in (the layer is left as it was), rather than failing later in the forward pass.
        bad = [name for name in STRUCTURAL_NAMES
               if isinstance(state_dict.get(prefix + name), torch.Tensor) and not state_dict[prefix + name].is_meta
               and not bool(torch.isfinite(state_dict[prefix + name]).all())]
        if bad:
            error_msgs.append(
                f"{layer_name(self)} at {prefix or '(the root)'!r}: {', '.join(bad)} in the state dict contain NaN or "
                "infinite values (the checkpoint was saved after a non-finite training step?); nothing was loaded "
                "into this layer"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # sigma is state: a checkpoint taken mid-schedule must restore it.
    def get_extra_state(self) -> dict:
        return {"sigma": self.sigma}

    def set_extra_state(self, state: dict) -> None:
        self.sigma = state["sigma"]


def nonfinite_layers(layers: list[GBLRLinear]) -> list[int]:
    """Indices of the layers with a NaN or infinite width or location (one GPU->CPU
    synchronisation where all layers share a device; layers on the meta device hold no values
    and count as finite)."""
    values = [torch.cat([p.detach().reshape(-1) for p in layer.structural_parameters()]) for layer in layers]
    checked = [(i, value) for i, value in enumerate(values) if not value.is_meta]
    if not checked:
        return []
    finite = [torch.isfinite(value).all() for _, value in checked]
    if len({flag.device for flag in finite}) == 1:
        flags = torch.stack(finite).tolist()
    else:
        flags = [bool(flag) for flag in finite]
    return [i for (i, _), ok in zip(checked, flags) if not ok]


def check_finite_structure(layers: list[GBLRLinear], where: str, names: list[str] | None = None,
                           cause: str | None = None) -> None:
    """Raise a ValueError if a width or location of one of ``layers`` is NaN or infinite.

    The message names the first such layer (by its name in ``names`` where known, else by its
    shape), the parameters affected and ``where`` (e.g. ``"in flops()"``, ``"after the optimizer
    step"``); ``cause`` says how they probably got there (default: a generic hint)."""
    bad = nonfinite_layers(layers)
    if not bad:
        return
    layer = layers[bad[0]]
    label = layer_name(layer) if names is None else f"layer {names[bad[0]]!r} ({layer_name(layer)})"
    which = [name for name, p in zip(STRUCTURAL_NAMES, layer.structural_parameters())
             if not bool(torch.isfinite(p.detach()).all())]
    more = f" ({len(bad) - 1} more layer(s) affected)" if len(bad) > 1 else ""
    if cause is None:
        cause = ("they usually come from an optimizer step with a non-finite loss or gradient, or from a loaded "
                 "checkpoint; the structure they describe is undefined")
    raise ValueError(f"{label}: {', '.join(which)} contain NaN or infinite values {where}{more}; {cause}")


def structure_of(layers: list[GBLRLinear], *, where: str = "in structure_of()") -> Structure:
    """The rounded structures of several layers in one flat :class:`gblr.flops.Structure`, so
    that their costs come from a handful of tensor operations instead of a loop over layers.
    Non-finite widths or locations are refused (a ValueError naming the layer and ``where``)."""
    if not layers:
        raise ValueError("structure_of needs at least one GBLRLinear")
    check_finite_structure(layers, where)
    device = layers[0].in_width.device

    def per_component(value):
        return torch.cat([torch.full((layer.in_width.numel(),), value(layer), dtype=torch.long, device=device)
                          for layer in layers])

    in_sizes, out_sizes = per_component(lambda l: l.in_features), per_component(lambda l: l.out_features)
    w_in, l_in = element_supports(torch.cat([l.in_width for l in layers]), torch.cat([l.in_location for l in layers]),
                                  in_sizes)
    w_out, l_out = element_supports(torch.cat([l.out_width for l in layers]),
                                    torch.cat([l.out_location for l in layers]), out_sizes)
    ranks = torch.cat([layer.entry_ranks().to(device) for layer in layers])
    indices = torch.cat([torch.full((layer.in_width.numel(),), i, dtype=torch.long, device=device)
                         for i, layer in enumerate(layers)])
    return Structure(w_in, l_in, w_out, l_out, in_sizes, out_sizes, ranks, indices, len(layers))


def _dense_init_factors(m: int, n: int, total_rank: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, R)`` and ``(R, n)`` factors, columns by decreasing singular value, of nn.Linear's
    default init (uniform in +-1/sqrt(n)). Beyond rank ``min(m, n)`` further independent draws
    are stacked, all scaled so the sum keeps the variance of one dense init."""
    draws = max(1, math.ceil(total_rank / min(m, n)))
    bound = 1.0 / math.sqrt(n) / math.sqrt(draws)
    lefts, rights = [], []
    for _ in range(draws):
        dense = torch.empty(m, n, dtype=dtype, device=device).uniform_(-bound, bound)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        root = S.sqrt()
        lefts.append(U * root)
        rights.append(root[:, None] * Vh)
    return torch.cat(lefts, 1)[:, :total_rank], torch.cat(rights, 0)[:total_rank]

