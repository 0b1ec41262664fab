"""Second moments of a layer's inputs, the metric of every output error.

    stats = gblr.InputStats(linear.in_features); stats.update(activations)
    layer = gblr.decompose(linear.weight, 0.5, calibration=stats)            # output error

:class:`InputStats` accumulates ``C = mean(x x^T)``; :class:`PairedStats` accumulates, for
sequential calibration (:mod:`gblr.sequential`), a layer's inputs in the compressed model paired
with its inputs in the original model, and gives the weight that maps the first to the original
outputs; :class:`SplitPairedStats` holds out half of the tokens to choose that weight's ridge.
All of them keep their sums scaled by a power of two, so that activations of any finite size
neither overflow nor underflow them. :mod:`gblr.calibration` collects them from a model.
"""

from __future__ import annotations

import math

import torch

__all__ = ["InputStats", "SplitInputStats", "PairedStats", "SplitPairedStats"]

# Sums of activation products are kept scaled by 4**-shift, shift in this range (so that 2.0**shift
# and 2.0**-shift are exact, normal Python floats).
_MIN_SHIFT, _MAX_SHIFT = -500, 1023


class _ScaledSum:
    """A float64 sum of products of activations, kept as ``scaled * 4**shift`` with ``shift``
    chosen from the largest activation seen, so that activations of any finite size (1e-150 or
    1e200) neither overflow nor underflow it."""

    def __init__(self, shape: tuple[int, ...], device=None) -> None:
        self.scaled = torch.zeros(shape, dtype=torch.float64, device=device)
        self.shift: int | None = None  # None until a nonzero activation is seen

    def factor(self, peak: float) -> float | None:
        """Make room for products of activations up to ``peak`` in size; returns the power of two
        to multiply each activation by before adding its products (None: all are 0, add nothing)."""
        if peak <= 0:
            return None
        shift = min(max(math.frexp(peak)[1], _MIN_SHIFT), _MAX_SHIFT)  # peak * 2**-shift <= 1
        if self.shift is None:
            self.shift = shift
        elif shift > self.shift:  # rescale what was summed (powers of two: exact, or negligible)
            self.scaled.mul_(2.0 ** (self.shift - shift) * 2.0 ** (self.shift - shift))
            self.shift = shift
        return 2.0**-self.shift

    def scaled_to(self, shift: int | None) -> torch.Tensor:
        """The sum times ``4**-shift`` (as ``scaled`` is for ``shift = self.shift``)."""
        if self.shift is None or shift is None:
            return self.scaled.clone()
        return self.scaled * 2.0 ** (self.shift - shift) * 2.0 ** (self.shift - shift)

    @property
    def value(self) -> torch.Tensor:
        """The sum itself (inf where it overflows float64)."""
        return self.scaled_to(0)

    def add(self, other: _ScaledSum) -> None:
        """Add ``other``'s sum to this one."""
        shift = max((s for s in (self.shift, other.shift) if s is not None), default=None)
        self.scaled = self.scaled_to(shift) + other.scaled_to(shift)
        self.shift = shift


def _finite_flat(x: torch.Tensor, features: int, device) -> torch.Tensor:
    """``x`` as float64 ``(tokens, features)`` on ``device``, after checking it."""
    if x.shape[-1] != features:
        raise ValueError(f"activations must have {features} features in the last dimension, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"activations must be a floating point tensor, got {x.dtype}")
    flat = x.detach().reshape(-1, features).to(device, torch.float64)
    if not bool(torch.isfinite(flat).all()):  # one NaN would poison C and every SVD built on it
        raise ValueError("activations contain NaN or infinite values")
    return flat


def _peak(*tensors: torch.Tensor) -> float:
    return max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)


class InputStats:
    """Running second moment ``C = mean(x x^T)`` of a layer's inputs (float64).

    ``update(x)`` takes activations of shape ``(..., features)``; :meth:`from_second_moment`
    wraps a precomputed ``(features, features)`` matrix.

    The sum is kept scaled by a power of two chosen from the largest activation seen, so that
    activations of any finite size (1e-150 or 1e200) neither overflow nor underflow it.
    :attr:`normalized_second_moment` (``C / max(diag C)``: the shape of ``C`` without its scale,
    all that relative errors depend on) is therefore always finite; :attr:`second_moment` and
    :attr:`sum` are ``C`` and the sum themselves, which overflow float64 only where they do
    (activations beyond about 1e154).
    """

    def __init__(self, features: int, device=None) -> None:
        self.features = int(features)
        self._sum = _ScaledSum((self.features, self.features), device)
        self.tokens = 0

    @classmethod
    def from_second_moment(cls, matrix: torch.Tensor, tokens: int = 1) -> InputStats:
        """Stats whose second moment is ``matrix`` (square, finite; made symmetric), as if from
        ``tokens`` activations."""
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a second-moment matrix must be square, got shape {tuple(getattr(matrix, 'shape', ()))}")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"tokens must be a positive int, got {tokens!r}")
        matrix = matrix.detach().to(torch.float64)
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("the second-moment matrix contains NaN or infinite values")
        stats = cls(matrix.shape[0], device=matrix.device)
        factor = stats._sum.factor(_peak(matrix) ** 0.5)  # a product's scale: the square of an activation's
        if factor is not None:
            scaled = matrix * factor * factor  # in two steps: each factor is a normal float
            stats._sum.scaled = (scaled + scaled.T) * (0.5 * tokens)
        stats.tokens = int(tokens)
        return stats

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        self._add(_finite_flat(x, self.features, self._sum.scaled.device))

    def _add(self, flat: torch.Tensor) -> None:
        factor = self._sum.factor(_peak(flat))
        if factor is not None:
            flat = flat * factor
            self._sum.scaled.addmm_(flat.T, flat)
        self.tokens += flat.shape[0]

    @property
    def sum(self) -> torch.Tensor:
        """``sum(x x^T)`` over the activations seen (float64; inf where it overflows)."""
        return self._sum.value

    @property
    def second_moment(self) -> torch.Tensor:
        """``C = sum(x x^T) / tokens`` (float64)."""
        if self.tokens == 0:
            raise ValueError("InputStats has seen no activations; call update() with some inputs first")
        return self.sum / self.tokens

    @property
    def normalized_second_moment(self) -> torch.Tensor:
        """``C / max(diag C)`` (float64, symmetric, always finite; all zeros when every activation
        was 0): the metric of every relative output error, which does not depend on ``C``'s scale."""
        if self.tokens == 0:
            raise ValueError("InputStats has seen no activations; call update() with some inputs first")
        scaled = self._sum.scaled
        top = float(scaled.diagonal().max()) if self.features else 0.0
        if top <= 0:
            return torch.zeros_like(scaled)
        return (scaled + scaled.T) * (0.5 / top)


class SplitInputStats(InputStats):
    """:class:`InputStats` of all the activations seen that also keeps, as :attr:`held`, those of
    the second half of every update's tokens (for a batch of several sequences, whole sequences):
    :func:`gblr.decompose` fits its structure variants on the first half and keeps the one that
    does best on the second, then fits that one on all of them. Everything else reads it as the
    plain :class:`InputStats` it is."""

    def __init__(self, features: int, device=None) -> None:
        super().__init__(features, device)
        self.held = InputStats(features, device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = _finite_flat(x, self.features, self._sum.scaled.device)
        self._add(flat)
        half = (flat.shape[0] + 1) // 2
        if half < flat.shape[0]:
            self.held._add(flat[half:])

    def fitted_second_moment(self) -> torch.Tensor | None:
        """``C / max(diag C)`` of the first halves alone (as :attr:`normalized_second_moment`),
        or None when either half saw no tokens or every first-half activation was 0."""
        if self.held.tokens == 0 or self.held.tokens == self.tokens:
            return None
        fitted = self.sum - self.held.sum
        fitted = (fitted + fitted.T) * 0.5
        top = float(fitted.diagonal().max()) if self.features else 0.0
        if not math.isfinite(top) or top <= 0:
            return None
        return fitted / top


# The default ridge of PairedStats.corrected, as a fraction of the mean eigenvalue of C. On a small
# trained Llama with 4096 calibration tokens (docs/compression.md) 1e-6 and 1e-3 gave the same
# held-out perplexity and 0.1 a slightly worse one (without the pull toward W, a ridge toward 0,
# 0.1 was far worse); with 512 tokens 1 was best. SplitPairedStats lets convert_ choose it on
# held-out tokens.
_RIDGE = 1e-3
# The ridges SplitPairedStats.choose_ridge tries.
_RIDGES = (1e-3, 1e-2, 1e-1, 1.0)


class PairedStats:
    """A layer's inputs ``x`` in the model being compressed, paired token by token with its
    inputs ``x0`` in the original model (sequential calibration, :mod:`gblr.sequential`).

    It accumulates ``C = mean(x x^T)`` (:attr:`inputs`, an :class:`InputStats`), the cross
    moment ``M = mean(x0 x^T)`` and ``mean(||W x0||^2)`` for the layer's original ``weight``
    ``W``. Among all weights, ``W' = W (M + l I)(C + l I)^-1`` (:meth:`corrected`) gives
    outputs ``W' x`` closest to the original outputs ``W x0`` (least squares, with a small ridge
    ``l`` toward ``W``), and for any ``W_hat``

        E||W x0 - W_hat x||^2 + l ||W_hat - W||^2 = const + ||(W_hat - W') (C + l I)^(1/2)||_F^2,

    so decomposing ``W'`` in the metric ``C + l I`` makes the compressed layer reproduce the
    *original* model's outputs, correcting the drift of the compressed layers before it, not
    only the layer's own error. ``l`` is ``ridge`` (default ``1e-3``) times the mean eigenvalue
    of ``C``.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach().to(torch.float64)
        self.features = self.weight.shape[1]
        self.inputs = InputStats(self.features, device=self.weight.device)
        self._cross = _ScaledSum((self.features, self.features), self.weight.device)
        self._energy = _ScaledSum((), self.weight.device)

    @property
    def tokens(self) -> int:
        return self.inputs.tokens

    @torch.no_grad()
    def update(self, x: torch.Tensor, x0: torch.Tensor) -> None:
        """Add the layer's inputs ``x`` and, for the same tokens, its original inputs ``x0``."""
        flat = _finite_flat(x, self.features, self.weight.device)
        flat0 = _finite_flat(x0, self.features, self.weight.device)
        if flat.shape != flat0.shape:
            raise ValueError(f"paired activations must have the same shape, got {tuple(x.shape)} and {tuple(x0.shape)}")
        self.inputs._add(flat)
        factor = self._cross.factor(_peak(flat, flat0))
        if factor is not None:
            self._cross.scaled.addmm_((flat0 * factor).T, flat * factor)
        outputs = flat0 @ self.weight.T
        factor = self._energy.factor(_peak(outputs))
        if factor is not None:
            self._energy.scaled += (outputs * factor).square().sum()

    def check_weight(self) -> None:
        if not bool(torch.isfinite(self.weight).all()):
            raise ValueError("weight contains NaN or infinite values")

    def merge(self, other: PairedStats) -> None:
        """Add ``other``'s tokens (of the same layer) to these."""
        self.inputs._sum.add(other.inputs._sum)
        self.inputs.tokens += other.inputs.tokens
        self._cross.add(other._cross)
        self._energy.add(other._energy)

    def _moments(self, ridge: float = _RIDGE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``C``, ``M`` and the output energy at one common scale, and the ridge ``l`` at it."""
        shifts = [s.shift for s in (self.inputs._sum, self._cross, self._energy) if s.shift is not None]
        shift = max(shifts, default=None)
        C = self.inputs._sum.scaled_to(shift)
        C = (C + C.T) / 2
        mean = float(C.diagonal().mean()) if self.features else 0.0
        ridge = ridge * mean if mean > 0 else 1.0
        return C, self._cross.scaled_to(shift), self._energy.scaled_to(shift), ridge

    def corrected(self, ridge: float = _RIDGE) -> tuple[torch.Tensor, InputStats]:
        """``(W', stats)``: the drift-corrected weight (float64) and the metric ``C + l I`` to
        decompose it in, ``l`` = ``ridge`` times the mean eigenvalue of ``C``."""
        if self.tokens == 0:
            raise ValueError("PairedStats has seen no activations; call update() with some inputs first")
        self.check_weight()
        C, M, _, ridge = self._moments(ridge)
        eye = torch.eye(self.features, dtype=torch.float64, device=C.device)
        corrected = self.weight @ torch.linalg.solve(C + ridge * eye, (M + ridge * eye).T).T
        return corrected, InputStats.from_second_moment(C + ridge * eye, tokens=self.tokens)

    def relative_error(self, approximation: torch.Tensor) -> float:
        """``sqrt(E||W x0 - W_hat x||^2 / E||W x0||^2)``: how far ``W_hat`` on the inputs it
        gets is from the original layer on its original inputs (0 where those outputs are 0)."""
        C, M, energy, _ = self._moments()
        W_hat = approximation.detach().to(C.device, torch.float64)
        total = float(energy)
        error = total - 2 * float((W_hat @ M.T * self.weight).sum()) + float((W_hat @ C * W_hat).sum())
        return 0.0 if total <= 0 else (max(error, 0.0) / total) ** 0.5


class SplitPairedStats:
    """:class:`PairedStats` of one layer in two parts: the first half of every update's tokens
    (``fit``) and the second (``held``, to judge a fit on tokens it did not see). For a batch of
    several sequences the halves are whole sequences. ``merged()`` is all of them."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.fit = PairedStats(weight)
        self.held = PairedStats(weight)

    @property
    def tokens(self) -> int:
        return self.fit.tokens + self.held.tokens

    def update(self, x: torch.Tensor, x0: torch.Tensor) -> None:
        if x.shape != x0.shape:
            raise ValueError(f"paired activations must have the same shape, got {tuple(x.shape)} and {tuple(x0.shape)}")
        flat, flat0 = x.reshape(-1, x.shape[-1]), x0.reshape(-1, x.shape[-1])
        half = (flat.shape[0] + 1) // 2
        self.fit.update(flat[:half], flat0[:half])
        if half < flat.shape[0]:
            self.held.update(flat[half:], flat0[half:])

    def merged(self) -> PairedStats:
        merged = PairedStats(self.fit.weight)
        merged.merge(self.fit)
        merged.merge(self.held)
        return merged

    @torch.no_grad()
    def choose_ridge(self, rank: int, ridges: tuple[float, ...] = _RIDGES) -> float | None:
        """The ridge among ``ridges`` whose drift correction, fitted on ``fit`` and truncated to
        ``rank`` (its activation-aware truncated SVD, the start of any decomposition), reproduces
        the original outputs of the ``held`` tokens best; None without tokens in both halves.

        All candidates share one eigendecomposition ``C = Q diag(e) Q^T`` of the fitted second
        moment: in the basis ``Q``, ``W' (C + l I)^(1/2)`` is ``W (M + l I) Q diag(e + l)^(-1/2)``,
        so each candidate costs one SVD of an ``(out, in)`` matrix."""
        if rank <= 0 or self.fit.tokens == 0 or self.held.tokens == 0:
            return None
        self.fit.check_weight()
        C, M, _, _ = self.fit._moments()
        mean = float(C.diagonal().mean())
        if mean <= 0:
            return None
        try:
            values, Q = torch.linalg.eigh(C)
        except torch.linalg.LinAlgError:  # (the SVD is the same decomposition for a PSD matrix)
            Q, values, _ = torch.linalg.svd(C)
        values = values.clamp_min(0)
        W = self.fit.weight
        WQ, WMQ = W @ Q, W @ M @ Q
        C_held, M_held, energy, _ = self.held._moments()
        C_held = Q.T @ C_held @ Q
        cross = W @ M_held @ Q  # tr(W_hat M_held^T W^T) = sum((W_hat Q) * cross)
        scored = []
        for ridge in ridges:
            root = (values + ridge * mean).sqrt()
            U, S, Vh = torch.linalg.svd((WMQ + ridge * mean * WQ) / root, full_matrices=False)
            rotated = (U[:, :rank] * S[:rank]) @ Vh[:rank] / root  # W_hat Q
            error = float(energy) - 2 * float((rotated * cross).sum()) + float((rotated @ C_held * rotated).sum())
            scored.append((error, ridge))
        return min(scored)[1]
