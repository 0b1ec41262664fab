"""GBLRLinear: a linear layer whose weight is a sum of learned, overlapping low-rank blocks.

    W = sum_k (mask_out[k] * u[k]) @ (v[k] * mask_in[k])        (SPEC section 1)

``mask_in[k]`` and ``mask_out[k]`` are Gaudi masks (:mod:`gblr.masks`) of the structural
parameters ``in_width``, ``in_location``, ``out_width``, ``out_location``. ``FrozenGBLRLinear``
is the deployed form: exact boxcars, zero-width components dropped, factors cropped to their
supports, components of identical support merged.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .flops import Structure, Support, cyclic_indices, group_macs
from ._validation import check_flops_ratio, check_input, check_positive_int, check_share, check_sigma
from .kernels import segmented
from .kernels.tiled import batch, batched_forward, pack, tiled_forward
from .masks import apply_masks, apply_masks_backward, element_supports, mask_from_supports, masked_factor

__all__ = ["GBLRLinear", "FrozenGBLRLinear", "freeze_"]



def _structure_dtype(dtype: torch.dtype | None) -> torch.dtype:
    # Widths and locations need ~1/n resolution: half precision cannot hold 1/3072.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _GBLRProduct(torch.autograd.Function):
    """``y = x @ W.T`` for ``W = left_t.T @ right``, where ``left_t`` and ``right`` are the factors
    ``u`` and ``v`` masked by the Gaudi masks of the structural parameters; gradients for ``x``,
    ``u``, ``v``, the bias (added inside the product, as ``nn.Linear``'s addmm does) and the
    four structural parameters.

    One function for masks and product so that nothing of the factors' size is kept for
    backward: the masked factors are rebuilt from ``u``, ``v`` and the supports (elementwise
    work, cheap next to the products). The product materialises the weight or runs as two thin
    products (``layout.materialise``). Under autocast the products run in the autocast dtype;
    gradients come back in each input's dtype.

    Revival (``GBLRLinear._revived_widths``): ``revived`` holds the in and out widths with every
    component whose two masks are both empty widened to one element. Wherever a masked factor
    only serves as the *partner* of the other factor's gradient, it is built with these widths,
    so an empty mask's gradient is the one it would get beside a one-element partner. Wherever
    a product reaches the output or the input gradient, one of its two factors is built with
    the true (empty) widths, so the output and every content gradient are exact.
    """

    @staticmethod
    def forward(ctx, x, u, v, bias, in_width, in_location, out_width, out_location, layout, supports, revived):
        dtype = _compute_dtype(x)
        w_in, l_in, w_out, l_out = supports
        revived_in, revived_out = (w_in, w_out) if revived is None else revived
        with torch.autocast(x.device.type, enabled=False):
            xc, bc = x.to(dtype), None if bias is None else bias.to(dtype)
            lc = layout.left_t(u, w_out, l_out, dtype)  # true widths: the output is exact
            rc = layout.right(v, revived_in, l_in, dtype)
            if layout.materialise:
                saved = lc.T @ rc  # the weight
                y = F.linear(xc, saved, bc)
            else:
                saved = F.linear(xc, rc)  # the hidden activations (tokens, K*r)
                y = F.linear(saved, lc.T, bc)
        ctx.save_for_backward(xc, u, v, saved, w_in, l_in, w_out, l_out, revived_in, revived_out)
        ctx.layout, ctx.x_dtype = layout, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # Ordered so that few buffers of the factors' size are alive at once: each masked factor
        # is rebuilt just before its last use, and each factor gradient becomes the gradient of
        # u or v in place.
        x, u, v, saved, w_in, l_in, w_out, l_out, revived_in, revived_out = ctx.saved_tensors
        layout = ctx.layout
        want_x, want_u, want_v, want_bias = ctx.needs_input_grad[:4]
        want_in, want_out = any(ctx.needs_input_grad[4:6]), any(ctx.needs_input_grad[6:8])
        want_left, want_right = want_u or want_out, want_v or want_in
        grad_x = grad_left_t = grad_right = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad_y.to(x.dtype)
            flat_x, flat_g = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
            if want_bias:
                grad_bias = flat_g.sum(0).to(ctx.bias_dtype)
            if layout.materialise:
                grad_x = grad_y @ saved if want_x else None
                grad_weight = flat_g.T @ flat_x  # (out, in)
                if want_left:
                    grad_left_t = layout.right(v, revived_in, l_in, x.dtype) @ grad_weight.T
                if want_right:
                    grad_right = layout.left_t(u, revived_out, l_out, x.dtype) @ grad_weight
                del grad_weight
            else:
                flat_hidden = saved.reshape(-1, saved.shape[-1])  # made with the revived in-widths
                grad_hidden = flat_g @ layout.left_t(u, revived_out, l_out, x.dtype).T  # (tokens, K*r)
                if want_left:
                    grad_left_t = flat_hidden.T @ flat_g
                if want_x:  # true in-widths: the input gradient is exact
                    grad_x = (grad_hidden @ layout.right(v, w_in, l_in, x.dtype)).reshape(x.shape)
                if want_right:
                    grad_right = grad_hidden.T @ flat_x
        grad_u, grad_out_width, grad_out_location = layout.left_backward(grad_left_t, u, w_out, l_out, want_u, want_out)
        del grad_left_t
        grad_v, grad_in_width, grad_in_location = layout.right_backward(grad_right, v, w_in, l_in, want_v, want_in)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        return (grad_x, grad_u, grad_v, grad_bias, grad_in_width, grad_in_location, grad_out_width,
                grad_out_location, None, None, None)


class _Layout:
    """What :class:`_GBLRProduct` needs to know about a layer besides its tensors: sizes, sigma,
    the precision of the mask math and whether to materialise the weight. Widths and locations
    are rounded supports in elements (:func:`gblr.masks.element_supports`)."""

    def __init__(self, layer: "GBLRLinear", materialise: bool) -> None:
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.sigma, self.materialise = layer.sigma, materialise
        self.table_dtype = layer.in_width.dtype

    def left_t(self, u, widths, locations, dtype):
        """``(K*r, out)``: ``u`` masked along its rows, no gradient, in ``dtype``."""
        left = apply_masks(u, self.out_features, self.sigma, widths, locations, 1, self.table_dtype)
        return left.transpose(1, 2).reshape(-1, self.out_features).to(dtype)

    def right(self, v, widths, locations, dtype):
        """``(K*r, in)``: ``v`` masked along its columns, no gradient, in ``dtype``."""
        right = apply_masks(v, self.in_features, self.sigma, widths, locations, 2, self.table_dtype)
        return right.reshape(-1, self.in_features).to(dtype)

    def left_backward(self, grad_left_t, u, widths, locations, want_u, want_structure):
        if grad_left_t is None:
            return None, None, None
        K, m, r = u.shape
        grad_left = grad_left_t.to(u.dtype).reshape(K, r, m).transpose(1, 2)
        return apply_masks_backward(grad_left, u, m, self.sigma, widths, locations, 1, self.table_dtype,
                                    want_u, want_structure, reuse_grad_out=True)

    def right_backward(self, grad_right, v, widths, locations, want_v, want_structure):
        if grad_right is None:
            return None, None, None
        grad_right = grad_right.to(v.dtype).reshape(v.shape)
        return apply_masks_backward(grad_right, v, self.in_features, self.sigma, widths, locations, 2,
                                    self.table_dtype, want_v, want_structure, reuse_grad_out=True)


class GBLRLinear(nn.Module):
    """Drop-in replacement for :class:`torch.nn.Linear` with a learnable GBLR weight.

    Args:
        in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
        components: number of components ``K``; default ``min(in_features, out_features)``.
        rank: rank ``r`` of each component (default 1).
        sigma: Gaussian smoothing of the masks; ``None`` (default) uses exact boxcars.
            Training from scratch raises it from about 1 to about 100 (SPEC section 4).
        init_flops_ratio: FLOPs ratio of the initial structure, in ``(0, 1]`` (default 0.5).
        init_full_width_share: share of that budget given to full-width components (the top
            singular directions of a standard dense init), in ``[0, 1]`` (default 0.5, the
            paper's); the rest goes to partial blocks at random locations.

    Structural parameters (``in_width``, ``in_location``, ``out_width``, ``out_location``, all
    normalised to ``[0, 1]``) are kept in float32 (float64 for a float64 layer), whatever the
    layer's dtype; use autocast for half precision.
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
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if components is None:
            components = min(in_features, out_features)
        self.components = check_positive_int("components", components)
        self.rank = check_positive_int("rank", rank)
        self.sigma = sigma
        self.init_flops_ratio = check_flops_ratio(init_flops_ratio, "init_flops_ratio")
        self.init_full_width_share = check_share(init_full_width_share, "init_full_width_share")
        factory = {"device": device, "dtype": dtype}
        structure = {"device": device, "dtype": _structure_dtype(dtype)}
        self.in_width = nn.Parameter(torch.empty(components, **structure))
        self.in_location = nn.Parameter(torch.empty(components, **structure))
        self.out_width = nn.Parameter(torch.empty(components, **structure))
        self.out_location = nn.Parameter(torch.empty(components, **structure))
        self.u = nn.Parameter(torch.empty(components, out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(components, rank, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    # -- parameters ---------------------------------------------------------------------------

    @property
    def sigma(self) -> float | None:
        return self._sigma

    @sigma.setter
    def sigma(self, value: float | None) -> None:
        self._sigma = check_sigma(value)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise per SPEC section 4 at ``init_flops_ratio``.

        A dense ``nn.Linear`` init is split by SVD into ``K`` rank-``r`` components (top
        singular directions first). Full-width components take ``init_full_width_share`` of the
        MACs budget; the other components share the rest as square-ish partial blocks (the same
        fraction of rows and columns) at uniformly random locations.
        """
        m, n, K, r = self.out_features, self.in_features, self.components, self.rank
        left, right = _dense_init_factors(m, n, K * r, device=self.u.device, dtype=_structure_dtype(self.u.dtype))
        self.u.copy_(left.reshape(m, K, r).permute(1, 0, 2))
        self.v.copy_(right.reshape(K, r, n))

        budget = self.init_flops_ratio * m * n
        full_cost = min(r * (m + n), m * n)
        full = min(K, int(self.init_full_width_share * budget // full_cost))
        partial = K - full
        fraction = 0.0
        if partial:
            per_component = (budget - full * full_cost) / partial
            # the fraction x whose block costs per_component: min(r(m+n)x, mn x^2) is the
            # smaller of two increasing functions, so x is the larger of their roots
            fraction = min(1.0, max(per_component / (r * (m + n)), math.sqrt(per_component / (m * n))))
        self.in_width.fill_(fraction)
        self.out_width.fill_(fraction)
        self.in_width[:full] = 1.0
        self.out_width[:full] = 1.0
        self.in_location.uniform_(0.0, 1.0)
        self.out_location.uniform_(0.0, 1.0)
        self.in_location[:full] = 0.0
        self.out_location[:full] = 0.0
        if self.bias is not None:
            bound = 1.0 / math.sqrt(n)
            self.bias.uniform_(-bound, bound)

    def structural_parameters(self) -> list[nn.Parameter]:
        """Widths and locations: the parameters of the structure (SPEC section 4)."""
        return [self.in_width, self.in_location, self.out_width, self.out_location]

    def content_parameters(self) -> list[nn.Parameter]:
        """``u``, ``v`` and the bias: the parameters of the values."""
        return [p for p in (self.u, self.v, self.bias) if p is not None]

    def supports(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rounded supports in elements: ``(in_width, in_location, out_width, out_location)``."""
        w_in, l_in = element_supports(self.in_width, self.in_location, self.in_features)
        w_out, l_out = element_supports(self.out_width, self.out_location, self.out_features)
        return w_in, l_in, w_out, l_out

    def structure(self) -> Structure:
        """The rounded structure as a :class:`gblr.flops.Structure` (one layer)."""
        return structure_of([self])

    # -- the computation ------------------------------------------------------------------------

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_in (K, in_features), mask_out (K, out_features))`` at the current sigma."""
        w_in, l_in, w_out, l_out = self.supports()
        mask_in = mask_from_supports(self.in_width, self.in_location, self.in_features, self.sigma, w_in, l_in)
        mask_out = mask_from_supports(self.out_width, self.out_location, self.out_features, self.sigma, w_out, l_out)
        return mask_in, mask_out

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix this layer applies (differentiable):
        ``left_t.T @ right`` with the masks applied to ``u`` and ``v`` on the fly
        (:func:`gblr.masks.masked_factor`: no mask tensors, nothing of their size kept for
        backward)."""
        w_in, l_in, w_out, l_out = self.supports()
        left = masked_factor(self.u, self.out_width, self.out_location, self.out_features, self.sigma, w_out, l_out, 1)
        right = masked_factor(self.v, self.in_width, self.in_location, self.in_features, self.sigma, w_in, l_in, 2)
        return left.transpose(1, 2).reshape(-1, self.out_features).T @ right.reshape(-1, self.in_features)

    def _materialise_is_cheaper(self, tokens: int) -> bool:
        m, n, kr = self.out_features, self.in_features, self.components * self.rank
        return kr * m * n + tokens * m * n < tokens * kr * (m + n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        supports = self.supports()
        revived = None
        if torch.is_grad_enabled() and self.in_width.requires_grad:
            revived = self._revived_widths(supports)
        tokens = x.numel() // self.in_features
        layout = _Layout(self, self._materialise_is_cheaper(tokens))
        return _GBLRProduct.apply(x, self.u, self.v, self.bias, self.in_width, self.in_location, self.out_width,
                                  self.out_location, layout, supports, revived)

    @staticmethod
    def _revived_widths(supports) -> tuple[torch.Tensor, torch.Tensor]:
        """In and out widths (elements) with every fully pruned component one element wide.

        For a component whose two widths are both zero the true gradient of either width is zero
        (the block is the product of two empty masks), so the proximal step could never let it
        grow back. The backward pass (:class:`_GBLRProduct`) gives each empty mask the gradient
        it would get if its partner were one element wide at its location (SPEC section 3: a
        pruned block must be able to grow back). The output and the content gradients are
        unchanged.
        """
        w_in, _, w_out, _ = supports
        dead = (w_in == 0) & (w_out == 0)
        return w_in + dead, w_out + dead

    # -- cost and deployment ----------------------------------------------------------------------

    def flops(self) -> int:
        """MACs per input vector of the current (rounded) structure, SPEC section 2."""
        return int(self.structure().layer_macs()[0])

    def flops_ratio(self) -> float:
        return self.flops() / (self.in_features * self.out_features)

    @torch.no_grad()
    def freeze(self) -> "FrozenGBLRLinear":
        """The deployed form: exact boxcars (``sigma=None``), zero-width components dropped,
        factors cropped to their supports, components with identical supports merged. Its output
        equals this layer's output at ``sigma=None``, and so does its ``flops()``."""
        groups = self.structure().support_groups()
        blocks = []
        for support, members in sorted(groups.items()):
            rows = cyclic_indices(support.out_start, support.out_width, self.out_features, self.u.device)
            cols = cyclic_indices(support.in_start, support.in_width, self.in_features, self.v.device)
            index = torch.tensor(members, device=self.u.device)
            left = self.u[index][:, rows, :].permute(1, 0, 2).reshape(support.out_width, -1)
            right = self.v[index][:, :, cols].reshape(-1, support.in_width)
            blocks.append((support, left.clone(), right.clone()))
        bias = None if self.bias is None else self.bias.detach().clone()
        return FrozenGBLRLinear(
            self.in_features, self.out_features, blocks, bias, dtype=self.u.dtype, device=self.u.device
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"components={self.components}, rank={self.rank}, sigma={self.sigma}, "
            f"flops_ratio={self.flops_ratio():.3f}"
        )

    # sigma is state: a checkpoint taken mid-schedule must restore it.
    def get_extra_state(self) -> dict:
        return {"sigma": self.sigma}

    def set_extra_state(self, state: dict) -> None:
        self.sigma = state["sigma"]


def structure_of(layers: list[GBLRLinear]) -> Structure:
    """The rounded structures of several layers in one flat :class:`gblr.flops.Structure`, so
    that their costs come from a handful of tensor operations instead of a loop over layers."""
    if not layers:
        raise ValueError("structure_of needs at least one GBLRLinear")
    device = layers[0].in_width.device

    def per_component(value):
        return torch.cat([torch.full((layer.components,), value(layer), dtype=torch.long, device=device)
                          for layer in layers])

    in_sizes, out_sizes = per_component(lambda l: l.in_features), per_component(lambda l: l.out_features)
    w_in, l_in = element_supports(torch.cat([l.in_width for l in layers]), torch.cat([l.in_location for l in layers]),
                                  in_sizes)
    w_out, l_out = element_supports(torch.cat([l.out_width for l in layers]),
                                    torch.cat([l.out_location for l in layers]), out_sizes)
    ranks = per_component(lambda l: l.rank)
    indices = torch.cat([torch.full((layer.components,), i, dtype=torch.long, device=device)
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


KERNELS = ("auto", "reference", "tiled", "tiled-coarse", "tiled-batched", "triton", "dense")
COARSE_TILE_FACTOR = 3  # "tiled-coarse": 3x wider tiles, fewer GEMMs (small token counts), more padding
MEASURED_PATHS = ("tiled", "tiled-coarse", "tiled-batched", "dense")  # what kernel="auto" chooses from


def measured_paths(x: torch.Tensor) -> tuple[str, ...]:
    """The paths ``kernel="auto"`` times for inputs like ``x``: :data:`MEASURED_PATHS`, and on
    CUDA with Triton installed the Triton kernel too."""
    return MEASURED_PATHS + (("triton",) if x.is_cuda and segmented.available() else ())


def _cyclic_ranges(start: int, width: int, size: int) -> list[tuple[int, int, int]]:
    """The cyclic range ``start .. start + width`` of ``0 .. size`` as contiguous pieces
    ``(position, offset_from, offset_to)``: elements ``offset_from:offset_to`` of the range sit
    at ``position ..`` (one piece, or two when it wraps)."""
    start %= size
    first = min(width, size - start)
    pieces = [(start, 0, first)]
    if width > first:
        pieces.append((0, first, width))
    return pieces


class FrozenGBLRLinear(nn.Module):
    """Inference form of a GBLR layer: a list of blocks, each with a cyclic support.

    A block with support ``s`` applies ``y[rows(s)] += left @ (right @ x[cols(s)])`` with
    ``left (out_width, R)`` and ``right (R, in_width)``, or one dense ``(out_width, in_width)``
    matrix when that is cheaper (``R * (a + b) >= a * b``). Build it with
    :meth:`GBLRLinear.freeze`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        blocks: list[tuple[Support, torch.Tensor, torch.Tensor]],
        bias: torch.Tensor | None,
        *,
        dtype: torch.dtype | None = None,
        device=None,
        kernel: str = "auto",
        tile: int = 128,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.kernel = kernel
        self.tile = check_positive_int("tile", tile)
        self._packed: dict = {}  # path -> ((device, dtype, tile), tiled product or dense weight)
        self.choices: dict[tuple, tuple[str, dict[str, float]]] = {}  # choice_key -> (path, seconds per path)
        # Remembers dtype and device (moved by .to()) even when there are no blocks and no bias.
        self.register_buffer("_empty", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.supports = [support for support, _, _ in blocks]
        for index, (support, left, right) in enumerate(blocks):
            rank = left.shape[1]
            if left.shape != (support.out_width, rank) or right.shape != (rank, support.in_width):
                raise ValueError(
                    f"block factors of shapes {tuple(left.shape)} and {tuple(right.shape)} do not match "
                    f"support {support}"
                )
            if group_macs(rank, support.in_width, support.out_width) == support.in_width * support.out_width:
                left, right = left @ right, None  # a dense block is cheaper than the two factors
            self.register_parameter(f"left{index}", nn.Parameter(left))
            self.register_parameter(f"right{index}", None if right is None else nn.Parameter(right))
        self.bias = None if bias is None else nn.Parameter(bias)

    def blocks(self):
        """``(support, left, right)`` per block; ``right`` is None where ``left`` is a dense block."""
        for index, support in enumerate(self.supports):
            yield support, getattr(self, f"left{index}"), getattr(self, f"right{index}")

    def block_macs(self):
        """``(support, MACs)`` per block."""
        for support, left, right in self.blocks():
            if right is None:
                yield support, support.in_width * support.out_width
            else:
                yield support, group_macs(left.shape[1], support.in_width, support.out_width)

    def flops(self) -> int:
        return sum(macs for _, macs in self.block_macs())

    def flops_ratio(self) -> float:
        return self.flops() / (self.in_features * self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix this layer applies."""
        weight = self._empty.new_zeros(self.out_features, self.in_features)
        for support, left, right in self.blocks():
            block = left if right is None else left @ right
            # a cyclic support is at most two contiguous ranges per side: add through views
            # (advanced indexing would keep a block-sized index tensor per block for autograd)
            for out_at, out_from, out_to in _cyclic_ranges(support.out_start, support.out_width, self.out_features):
                for in_at, in_from, in_to in _cyclic_ranges(support.in_start, support.in_width, self.in_features):
                    weight[out_at : out_at + out_to - out_from, in_at : in_at + in_to - in_from] += (
                        block[out_from:out_to, in_from:in_to]
                    )
        return weight

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {value!r}")
        if value == "triton" and not segmented.available():
            raise ValueError("kernel='triton' needs Triton (pip install triton) and a CUDA device; "
                             "kernel='auto' picks the fastest available path")
        self._kernel = value

    def _cached(self, what: str, x: torch.Tensor):
        """The tiled product (``what="tiled"`` / ``"tiled-coarse"``), its padded batched form
        (``"tiled-batched"``) or the dense weight for ``x``'s device and dtype. Built once;
        :meth:`refresh` drops it (done after every training step through the reference path and
        on ``load_state_dict``)."""
        key = (x.device, x.dtype, self.tile)
        cached = self._packed.get(what)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                if what == "dense":
                    value = self.weight.to(x.device, x.dtype)
                elif what == "tiled-batched":
                    value = batch(self._cached("tiled", x), x)
                elif what == "triton":
                    value = segmented.pack_triton(self.in_features, self.out_features, list(self.blocks()),
                                                  device=x.device, dtype=x.dtype)
                else:
                    tile = self.tile if what == "tiled" else COARSE_TILE_FACTOR * self.tile
                    value = pack(self.in_features, self.out_features, list(self.blocks()), tile,
                                 device=x.device, dtype=x.dtype)
            self._packed[what] = cached = (key, value)
        return cached[1]

    def refresh(self) -> None:
        """Forget the cached tiles and dense weight: call after editing parameters in place
        outside autograd (training steps and ``load_state_dict`` do it already)."""
        self._packed.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self.refresh()
        super()._load_from_state_dict(*args, **kwargs)

    def tiled_product(self, coarse: bool = False):
        """The precomputed tiles of the tiled path (:mod:`gblr.kernels.tiled`) for this layer's
        device and dtype (``coarse``: the ``tiled-coarse`` path's)."""
        return self._cached("tiled-coarse" if coarse else "tiled", self._empty)

    def _run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """``x (T, in) -> (T, out)`` without bias by one path."""
        if path == "tiled-batched":
            return batched_forward(x, self._cached(path, x))
        if path == "triton":
            return segmented.triton_forward(x, self._cached(path, x))
        if path.startswith("tiled"):
            return tiled_forward(x, self._cached(path, x))
        if path == "dense":
            return F.linear(x, self._cached("dense", x))
        return self._reference(x)

    def _measure(self, x: torch.Tensor, repeats: int = 5, budget: float = 0.02) -> tuple[str, dict[str, float]]:
        """Time the tiled paths (fine, coarse and batched tiles), the dense path and, on CUDA, the
        Triton kernel (:func:`measured_paths`) on ``x``: one
        warm-up each, then rounds in turn (so that drifting machine load hits all alike), at least
        ``repeats`` and until ``budget`` seconds have passed (at most 50: fast calls are noisy), the
        best time of each; the fastest path wins."""
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        paths = measured_paths(x)
        for path in paths:
            self._run(path, x)  # warm up (and pack)
        seconds = dict.fromkeys(paths, math.inf)
        began = time.perf_counter()
        for round_ in range(50):
            if round_ >= repeats and time.perf_counter() - began >= budget:
                break
            for path in paths:
                sync()
                start = time.perf_counter()
                self._run(path, x)
                sync()
                seconds[path] = min(seconds[path], time.perf_counter() - start)
        return min(seconds, key=seconds.get), seconds

    def path_for(self, tokens: int, x: torch.Tensor | None = None) -> str:
        """The path a forward pass over ``tokens`` rows takes. With ``kernel="auto"`` the tiled
        and dense paths are timed once per device, dtype and power-of-two bucket of token
        counts (on ``x``, or on random rows), and the faster one is kept in :attr:`choices`."""
        if self.kernel != "auto":
            return self.kernel
        if x is None:
            x = torch.randn(tokens, self.in_features, device=self._empty.device, dtype=self._empty.dtype)
        key = self.choice_key(tokens, x)
        if key not in self.choices:
            with torch.no_grad():
                self.choices[key] = self._measure(x)
        return self.choices[key][0]

    def choice_key(self, tokens: int, x: torch.Tensor | None = None) -> tuple:
        """The key of :attr:`choices` for ``tokens`` rows like ``x`` (default: this layer's
        device and dtype)."""
        like = self._empty if x is None else x
        return like.device.type, like.dtype, 1 << max(0, int(tokens) - 1).bit_length()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        flat = x.reshape(-1, self.in_features)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if needs_grad or torch.compiler.is_compiling():
            path = "reference"  # differentiable in the parameters; traceable
            if needs_grad:
                self.refresh()  # the parameters are about to change: the caches would go stale
        else:
            path = self.path_for(flat.shape[0], flat)
        bias = self.bias
        if path == "dense" and (bias is None or bias.dtype == flat.dtype):
            y = F.linear(flat, self._cached("dense", flat), bias)  # one call: at a few tokens calls are the cost
        else:
            y = self._run(path, flat)
            if bias is not None:
                y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain torch path, one gather and two products per block: the ground truth."""
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        for support, left, right in self.blocks():
            cols = cyclic_indices(support.in_start, support.in_width, self.in_features, x.device)
            rows = cyclic_indices(support.out_start, support.out_width, self.out_features, x.device)
            part = x.index_select(-1, cols)
            if right is not None:
                part = F.linear(part, right)
            y.index_add_(-1, rows, F.linear(part, left))
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocks={len(self.supports)}, flops_ratio={self.flops_ratio():.3f}"
        )


def freeze_(model: nn.Module) -> nn.Module:
    """Replace every :class:`GBLRLinear` in ``model`` by its frozen form, in place.

    Returns ``model`` (or the frozen layer, if ``model`` itself is a GBLRLinear, since a module
    cannot replace itself).
    """
    if isinstance(model, GBLRLinear):
        return model.freeze()
    for name, child in model.named_children():
        if isinstance(child, GBLRLinear):
            setattr(model, name, child.freeze())
        else:
            freeze_(child)
    return model
