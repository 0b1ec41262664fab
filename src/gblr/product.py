"""The trainable layer's product: masks and matrix product in one autograd function.

``y = x @ W.T + bias`` with ``W = sum_k (mask_out[k] * u[k]) @ (v[k] * mask_in[k])`` (docs/method.md
section 1), computed either by materialising ``W`` or as two thin products through the
``(tokens, K*r)`` hidden activations, whichever costs fewer MACs (:func:`materialise_is_cheaper`).
Nothing of the factors' size is kept for backward: the masked factors are rebuilt from ``u``,
``v`` and the supports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import compute_dtype
from .flops import low_rank_macs
from .masks import apply_masks, apply_masks_backward

__all__ = ["PRODUCTS", "GBLRProduct", "GBLRWeight", "ProductPlan", "materialise_is_cheaper"]

PRODUCTS = ("auto", "materialise", "factored")  # GBLRLinear(product=...): how the forward product runs


def materialise_is_cheaper(tokens: int, in_features: int, out_features: int, total_rank: int, *,
                           dense_term: bool = False) -> bool:
    """Whether building the ``(out, in)`` weight and one GEMM (``K r m n + T m n`` MACs) costs less
    than two thin products through the hidden activations (``T K r (m + n)``), plus, with
    ``dense_term`` (a layer with dense blocks), the dense product the thin way needs beside them."""
    m, n, kr = out_features, in_features, total_rank
    thin = tokens * low_rank_macs(kr, m, n) + (tokens * m * n if dense_term else 0)
    return kr * m * n + tokens * m * n < thin



class GBLRProduct(torch.autograd.Function):
    """``y = x @ W.T`` for ``W = left_t.T @ right``, where ``left_t`` and ``right`` are the factors
    ``u`` and ``v`` masked by the Gaudi masks of the structural parameters; gradients for ``x``,
    ``u``, ``v``, the bias (added inside the product, as ``nn.Linear``'s addmm does) and the
    four structural parameters.

    One function for masks and product so that nothing of the factors' size is kept for
    backward: the masked factors are rebuilt from ``u``, ``v`` and the supports (elementwise
    work, cheap next to the products). The product materialises the weight or runs as two thin
    products (``plan.materialise``). Under autocast the products run in the autocast dtype;
    gradients come back in each input's dtype.

    Revival (:meth:`gblr.GBLRLinear.revived_widths`): ``revived`` holds the in and out widths with every
    component whose two masks are both empty widened to one element. Wherever a masked factor
    only serves as the *partner* of the other factor's gradient, it is built with these widths,
    so an empty mask's gradient is the one it would get beside a one-element partner. Wherever
    a product reaches the output or the input gradient, one of its two factors is built with
    the true (empty) widths, so the output and every content gradient are exact.
    """

    @staticmethod
    def forward(ctx, x, u, v, bias, in_width, in_location, out_width, out_location, plan, supports, revived):
        dtype = compute_dtype(x)
        w_in, l_in, w_out, l_out = supports
        revived_in, revived_out = (w_in, w_out) if revived is None else revived
        with torch.autocast(x.device.type, enabled=False):
            xc, bc = x.to(dtype), None if bias is None else bias.to(dtype)
            lc = plan.left_t(u, w_out, l_out, dtype)  # true widths: the output is exact
            rc = plan.right(v, revived_in, l_in, dtype)
            if plan.materialise:
                saved = lc.T @ rc  # the weight
                y = F.linear(xc, saved, bc)
            else:
                saved = F.linear(xc, rc)  # the hidden activations (tokens, K*r)
                y = F.linear(saved, lc.T, bc)
        ctx.save_for_backward(xc, u, v, saved, w_in, l_in, w_out, l_out, revived_in, revived_out)
        ctx.plan, ctx.x_dtype = plan, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # Ordered so that few buffers of the factors' size are alive at once: each masked factor
        # is rebuilt just before its last use, and each factor gradient becomes the gradient of
        # u or v in place.
        x, u, v, saved, w_in, l_in, w_out, l_out, revived_in, revived_out = ctx.saved_tensors
        plan = ctx.plan
        want_x, want_u, want_v, want_bias = ctx.needs_input_grad[:4]
        want_in, want_out = any(ctx.needs_input_grad[4:6]), any(ctx.needs_input_grad[6:8])
        want_left, want_right = want_u or want_out, want_v or want_in
        grad_x = grad_left_t = grad_right = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad_y.to(x.dtype)
            flat_x, flat_g = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
            if want_bias:
                grad_bias = flat_g.sum(0).to(ctx.bias_dtype)
            if plan.materialise:
                grad_x = grad_y @ saved if want_x else None
                grad_left_t, grad_right = plan.factor_grads(flat_g.T @ flat_x, u, v, revived_in, l_in, revived_out,
                                                            l_out, want_left, want_right)
            else:
                flat_hidden = saved.reshape(-1, saved.shape[-1])  # made with the revived in-widths
                grad_hidden = flat_g @ plan.left_t(u, revived_out, l_out, x.dtype).T  # (tokens, K*r)
                if want_left:
                    grad_left_t = flat_hidden.T @ flat_g
                if want_x:  # true in-widths: the input gradient is exact
                    grad_x = (grad_hidden @ plan.right(v, w_in, l_in, x.dtype)).reshape(x.shape)
                if want_right:
                    grad_right = grad_hidden.T @ flat_x
        grad_u, grad_out_width, grad_out_location = plan.left_backward(grad_left_t, u, w_out, l_out, want_u, want_out)
        del grad_left_t
        grad_v, grad_in_width, grad_in_location = plan.right_backward(grad_right, v, w_in, l_in, want_v, want_in)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        return (grad_x, grad_u, grad_v, grad_bias, grad_in_width, grad_in_location, grad_out_width,
                grad_out_location, None, None, None)


class GBLRWeight(torch.autograd.Function):
    """The materialised weight ``W = left_t.T @ right`` (``(out, in)``) as an autograd function
    with the same gradients as :class:`GBLRProduct`'s materialising branch, revival included:
    for layers whose product is not a matrix product of the input (:class:`gblr.GBLRConv2d`
    convolves with ``W``). Nothing of the factors' size is kept for backward."""

    @staticmethod
    def forward(ctx, u, v, in_width, in_location, out_width, out_location, plan, supports, revived, dtype):
        w_in, l_in, w_out, l_out = supports
        revived_in, revived_out = (w_in, w_out) if revived is None else revived
        with torch.autocast(u.device.type, enabled=False):
            weight = plan.left_t(u, w_out, l_out, dtype).T @ plan.right(v, revived_in, l_in, dtype)
        ctx.save_for_backward(u, v, w_in, l_in, w_out, l_out, revived_in, revived_out)
        ctx.plan = plan
        return weight

    @staticmethod
    def backward(ctx, grad_weight):
        u, v, w_in, l_in, w_out, l_out, revived_in, revived_out = ctx.saved_tensors
        plan = ctx.plan
        want_u, want_v = ctx.needs_input_grad[:2]
        want_in, want_out = any(ctx.needs_input_grad[2:4]), any(ctx.needs_input_grad[4:6])
        with torch.autocast(u.device.type, enabled=False):
            grad_left_t, grad_right = plan.factor_grads(grad_weight.to(u.dtype), u, v, revived_in, l_in, revived_out,
                                                        l_out, want_u or want_out, want_v or want_in)
        grad_u, grad_out_width, grad_out_location = plan.left_backward(grad_left_t, u, w_out, l_out, want_u, want_out)
        del grad_left_t
        grad_v, grad_in_width, grad_in_location = plan.right_backward(grad_right, v, w_in, l_in, want_v, want_in)
        return (grad_u, grad_v, grad_in_width, grad_in_location, grad_out_width, grad_out_location, None, None, None,
                None)


class ProductPlan:
    """What :class:`GBLRProduct` needs to know about a layer besides its tensors: sizes, sigma,
    the precision of the mask math and whether to materialise the weight. Widths and locations
    are rounded supports in elements (:func:`gblr.masks.element_supports`)."""

    def __init__(self, in_features: int, out_features: int, sigma: float | None, table_dtype: torch.dtype,
                 materialise: bool) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.sigma, self.materialise, self.table_dtype = sigma, materialise, table_dtype

    def left_t(self, u, widths, locations, dtype):
        """``(K*r, out)``: ``u`` masked along its rows, no gradient, in ``dtype``."""
        left = apply_masks(u, self.out_features, self.sigma, widths, locations, 1, self.table_dtype)
        return left.transpose(1, 2).reshape(-1, self.out_features).to(dtype)

    def right(self, v, widths, locations, dtype):
        """``(K*r, in)``: ``v`` masked along its columns, no gradient, in ``dtype``."""
        right = apply_masks(v, self.in_features, self.sigma, widths, locations, 2, self.table_dtype)
        return right.reshape(-1, self.in_features).to(dtype)

    def factor_grads(self, grad_weight, u, v, revived_in, l_in, revived_out, l_out, want_left, want_right):
        """The gradients of the masked factors ``(K*r, out)`` and ``(K*r, in)`` from the weight's
        gradient ``(out, in)``; each partner factor is built with the revived widths."""
        grad_left_t = grad_right = None
        if want_left:
            grad_left_t = self.right(v, revived_in, l_in, grad_weight.dtype) @ grad_weight.T
        if want_right:
            grad_right = self.left_t(u, revived_out, l_out, grad_weight.dtype) @ grad_weight
        return grad_left_t, grad_right

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

