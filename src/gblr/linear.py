"""GBLRLinear: a linear layer whose weight is a sum of learned, overlapping low-rank blocks.

    W = sum_k (mask_out[k] * u[k]) @ (v[k] * mask_in[k])        (docs/method.md section 1)

``mask_in[k]`` and ``mask_out[k]`` are Gaudi masks (:mod:`gblr.masks`) of the structural
parameters ``in_width``, ``in_location``, ``out_width``, ``out_location``. The product runs in
one autograd function (:mod:`gblr.product`); :meth:`GBLRLinear.freeze` gives the deployed form
(:mod:`gblr.frozen`): exact boxcars, zero-width components dropped, factors cropped to their
supports, components of identical support merged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._validation import check_flops_ratio, check_input, check_positive_int, check_share, check_sigma
from .flops import Structure, cyclic_indices, group_macs, square_block_fraction
from .frozen import FrozenGBLRLinear
from .masks import element_supports, mask_from_supports, masked_factor
from .product import PRODUCTS, GBLRProduct, ProductPlan, materialise_is_cheaper

__all__ = ["GBLRLinear", "structure_of"]


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
        product: how the forward product runs: ``"auto"`` (default) materialises the weight
            where that costs fewer MACs than two thin products (:func:`gblr.product.materialise_is_cheaper`),
            ``"materialise"`` or ``"factored"`` force one way. All give the same result.

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
        product: str = "auto",
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
        self.product = product
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
    def product(self) -> str:
        return self._product

    @product.setter
    def product(self, value: str) -> None:
        if value not in PRODUCTS:
            raise ValueError(f"product must be one of {PRODUCTS}, got {value!r}")
        self._product = value

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
        singular directions first). Full-width components take ``init_full_width_share`` of the
        MACs budget; the other components share the rest as square-ish partial blocks (the same
        fraction of rows and columns) at uniformly random locations.
        """
        m, n, K, r = self.out_features, self.in_features, self.components, self.rank
        left, right = _dense_init_factors(m, n, K * r, device=self.u.device, dtype=_structure_dtype(self.u.dtype))
        self.u.copy_(left.reshape(m, K, r).permute(1, 0, 2))
        self.v.copy_(right.reshape(K, r, n))

        budget = self.init_flops_ratio * m * n
        full_cost = group_macs(r, n, m)
        full = min(K, int(self.init_full_width_share * budget // full_cost))
        partial = K - full
        fraction = 0.0
        if partial:
            fraction = square_block_fraction((budget - full * full_cost) / partial, r, m, n)
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
        """Widths and locations: the parameters of the structure (docs/method.md section 4)."""
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

    def materialises(self, tokens: int) -> bool:
        """Whether a forward pass over ``tokens`` rows builds the weight (see ``product``)."""
        if self.product != "auto":
            return self.product == "materialise"
        return materialise_is_cheaper(tokens, self.in_features, self.out_features, self.components * self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        supports = self.supports()
        revived = None
        if torch.is_grad_enabled() and self.in_width.requires_grad:
            revived = self.revived_widths(supports)
        plan = ProductPlan(self.in_features, self.out_features, self.sigma, self.in_width.dtype,
                           self.materialises(x.numel() // self.in_features))
        return GBLRProduct.apply(x, self.u, self.v, self.bias, self.in_width, self.in_location, self.out_width,
                                 self.out_location, plan, supports, revived)

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

