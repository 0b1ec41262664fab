"""Dense weight -> GBLR: structure search and content fit (docs/method.md section 6).

    layer = gblr.decompose(linear.weight, 0.5, bias=linear.bias)              # weight error
    stats = gblr.InputStats(linear.in_features); stats.update(activations)
    layer = gblr.decompose(linear.weight, 0.5, calibration=stats)            # output error

The error measured is ``||(W - W_hat) S||_F`` with ``S = C^(1/2)``, ``C`` the second moment of
the layer's inputs (``S = I`` without calibration), i.e. the output error on the calibration
activations. Truncated SVD of ``W S`` (activation-aware SVD) is the best rank-``R`` answer; a
GBLR matrix contains it, so :func:`decompose` starts from it and only keeps changes that lower
the error.
"""

from __future__ import annotations

import torch

from ._validation import check_flops_ratio, check_matrix
from .flops import low_rank_macs, rank_for_ratio
from .linear import GBLRLinear
from .stats import InputStats, SplitInputStats
from .structures import from_components, low_rank

__all__ = ["decompose", "svd_decompose", "svd_error_curve", "relative_error"]


def _as_stats(calibration, features: int) -> InputStats | None:
    if calibration is None or isinstance(calibration, InputStats):
        if calibration is not None and calibration.features != features:
            raise ValueError(f"calibration has {calibration.features} features, the weight has {features} inputs")
        return calibration
    if isinstance(calibration, torch.Tensor):
        stats = InputStats(features, device=calibration.device)
        stats.update(calibration)
        return stats
    raise TypeError(f"calibration must be None, activations (a Tensor) or gblr.InputStats, got {type(calibration).__name__}")


# Eigenvalues of a (normalised) second moment below this fraction of its largest are raised to it.
# float64 eigh is accurate to about n * 2e-16 of the largest eigenvalue, so smaller ones are noise;
# raised, C^(-1/2) exists with a condition number of at most 1e5, and the metric is C up to 1e-10
# of its scale. It only ever raises eigenvalues (C' >= C), which keeps every rank-1 least-squares
# step of the search an error decrease in the true metric C (see _atoms_from_block).
_EIGEN_FLOOR = 1e-10


def _moment(stats: InputStats | None) -> torch.Tensor | None:
    """The metric of the output error: ``C / max(diag C)`` (float64, symmetric), or None without
    calibration or when every calibration input was 0 (then every output error is 0 and the
    weight error decides)."""
    if stats is None:
        return None
    C = stats.normalized_second_moment
    return None if not bool(C.diagonal().gt(0).any()) else C


def _spectrum(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of (a batch of) symmetric PSD matrices, each eigenvalue raised to at
    least ``_EIGEN_FLOOR`` times the matrix's largest (a matrix that is all 0 gets the identity's
    eigenvalues: it carries no energy, so any metric fits it). Never raises for finite input:
    should eigh not converge, the SVD (the same decomposition for a PSD matrix) is used."""
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        vectors, values, _ = torch.linalg.svd(matrix)
    top = values.amax(-1, keepdim=True)
    floor = torch.where(top > 0, _EIGEN_FLOOR * top, torch.ones_like(top))
    return values.maximum(floor), vectors


def _whitener(C: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(S, S^-1)`` with ``S = C'^(1/2)`` (symmetric), ``C'`` the floored ``C`` (:func:`_spectrum`)."""
    if C is None:
        return None
    values, vectors = _spectrum(C)
    root = values.sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def _squared_error(difference: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    """``tr(D C D^T)`` (``||D||^2`` without ``C``), never below 0 (rounding on a PSD ``C``)."""
    if C is None:
        return difference.square().sum()
    return (difference @ C * difference).sum().clamp_min(0)


def relative_error(weight: torch.Tensor, approximation: torch.Tensor, calibration=None) -> float:
    """``||(W - W_hat) S||_F / ||W S||_F`` (``S = I`` without calibration; 0 where ``W S = 0``,
    for instance when every calibration input was 0)."""
    weight = check_matrix("weight", weight).to(torch.float64)
    difference = weight - approximation.detach().to(weight.device, torch.float64)
    stats = _as_stats(calibration, weight.shape[1])
    C = _moment(stats)
    if stats is not None and C is None:
        return 0.0
    C = None if C is None else C.to(weight.device)
    total = float(_squared_error(weight, C))
    return 0.0 if total <= 0 else (float(_squared_error(difference, C)) / total) ** 0.5


def svd_error_curve(weight: torch.Tensor, calibration=None) -> torch.Tensor:
    """Relative squared error of the best rank-``R`` approximation (activation-aware with
    calibration) for ``R = 0 .. min(m, n)``: a float64 tensor, 1 at ``R = 0``, 0 at full rank."""
    weight = check_matrix("weight", weight).to(torch.float64)
    C = _moment(_as_stats(calibration, weight.shape[1]))
    whitener = _whitener(None if C is None else C.to(weight.device))
    target = weight if whitener is None else weight @ whitener[0]
    energy = torch.linalg.svdvals(target).square()
    tail = energy.flip(0).cumsum(0).flip(0)
    curve = torch.cat([tail, tail.new_zeros(1)])
    return curve / curve[0].clamp_min(1e-300)


def _truncated_svd(W: torch.Tensor, C: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)``, ``(m, rank)`` and ``(rank, n)`` float64 factors of the rank-``rank``
    truncated SVD that leaves the smaller error ``tr(E C E^T)``: the activation-aware one (SVD
    of ``W S``, mapped back by ``S^-1``), or the plain one where rounding or the eigenvalue
    floor would make that worse. Singular values are split evenly between the factors."""

    def truncated(target: torch.Tensor, inverse_root: torch.Tensor | None):
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        root = S[:rank].sqrt()
        right = root[:, None] * Vh[:rank]
        return U[:, :rank] * root, right if inverse_root is None else right @ inverse_root

    plain = truncated(W, None)
    if C is None:
        return plain
    root, inverse_root = _whitener(C)
    aware = truncated(W @ root, inverse_root)
    errors = [_squared_error(W - left @ right, C) for left, right in (aware, plain)]
    return aware if errors[0] <= errors[1] else plain


def svd_decompose(weight: torch.Tensor, flops_ratio: float, *, calibration=None, bias=None) -> GBLRLinear:
    """The baseline: truncated SVD (of ``W S`` with calibration, i.e. activation-aware SVD) at
    the largest rank ``R`` with ``R (m + n) <= flops_ratio * m * n``, as full-width components.
    With calibration it is never worse in the output error than the plain truncated SVD: where
    the plain one would be better (it can only be by the eigenvalue floor), it is returned."""
    weight = check_matrix("weight", weight)
    flops_ratio = check_flops_ratio(flops_ratio)
    m, n = weight.shape
    rank = rank_for_ratio(flops_ratio, m, n)
    if rank == 0:
        raise ValueError(
            f"flops_ratio={flops_ratio} buys no full rank-1 component of a {m}x{n} matrix (that needs "
            f"{low_rank_macs(1, m, n) / (m * n):.4g}); gblr.decompose can still use partial blocks"
        )
    C = _moment(_as_stats(calibration, n))
    left, right = _truncated_svd(weight.to(torch.float64), None if C is None else C.to(weight.device), rank)
    return low_rank(left.to(weight.dtype), right.to(weight.dtype), bias=None if bias is None else bias.detach())


# ---------------------------------------------------------------------------------------------
# Structure search: greedy block atoms in the output-error metric.
# ---------------------------------------------------------------------------------------------


def _split_counts(size: int) -> list[int]:
    """How many equal blocks to cut a dimension of ``size`` into: 1 and the divisors up to 16
    giving blocks of at least 16 elements (head-sized and power-of-two splits)."""
    return [g for g in (1, 2, 3, 4, 6, 8, 12, 16) if g == 1 or (size % g == 0 and size // g >= 16)]


class _Search:
    """The residual ``R = W - W_hat`` of a greedy block decomposition, in the output metric.

    A rank-1 atom ``a b^T`` on rows ``I`` and columns ``J`` removes ``sigma^2`` of the squared
    output error ``tr(R C R^T)``, ``sigma`` the top singular value of ``(R C)[I, J] C_JJ^(-1/2)``,
    at a cost of ``|I| + |J|`` MACs; its best ``b`` is ``C_JJ^(-1/2) z`` for the matching right
    singular vector ``z`` (with ``C = I`` this is the plain SVD of the block). For each column
    split ``g1`` the matrix ``H = R C diag(C_JJ^(-1/2))`` is kept up to date row by row, so a
    round costs a few matrix-vector products per grid, not a whitening of the whole residual.
    """

    def __init__(self, W: torch.Tensor, C: torch.Tensor | None) -> None:
        self.m, self.n = W.shape
        self.C = C
        self.R = W.clone()
        self.grids = [(g0, 1) for g0 in _split_counts(self.m)] + [(1, g1) for g1 in _split_counts(self.n)[1:]]
        self.grids += [(g, g) for g in _split_counts(self.m)[1:] if g in _split_counts(self.n)]
        self._roots: dict[int, torch.Tensor] = {}
        self.H: dict[int, torch.Tensor] = {}
        if C is not None:
            self.G = W @ C
            for g1 in sorted({g1 for _, g1 in self.grids}):
                self._roots[g1] = self._inverse_root(g1)
                self.H[g1] = self._whiten(self.G, g1)

    def _inverse_root(self, g1: int) -> torch.Tensor:
        """``C_JJ'^(-1/2)`` for the ``g1`` column blocks, stacked ``(g1, n/g1, n/g1)`` (floored, :func:`_spectrum`)."""
        b = self.n // g1
        blocks = torch.stack([self.C[j * b : (j + 1) * b, j * b : (j + 1) * b] for j in range(g1)])
        values, vectors = _spectrum(blocks)
        return (vectors / values.sqrt()[:, None, :]) @ vectors.transpose(1, 2)

    def _whiten(self, rows_of_G: torch.Tensor, g1: int) -> torch.Tensor:
        k, b = rows_of_G.shape[0], self.n // g1
        blocks = rows_of_G.reshape(k, g1, b).transpose(0, 1) @ self._roots[g1]  # (g1, k, b)
        return blocks.transpose(0, 1).reshape(k, self.n)

    def inverse_root(self, g1: int) -> torch.Tensor | None:
        return self._roots.get(g1)

    def blocks(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(g0 * g1, m/g0, n/g1)``: the blocks whose top singular triplets are the atoms."""
        g0, g1 = grid
        bo, bi = self.m // g0, self.n // g1
        H = self.R if self.C is None else self.H[g1]
        return H.reshape(g0, bo, g1, bi).permute(2, 0, 1, 3).reshape(g1 * g0, bo, bi)

    def top_rates(self, grid: tuple[int, int], iterations: int = 4) -> torch.Tensor:
        """Squared top singular value per MAC of every block of ``grid``, by power iteration
        (enough to rank blocks; the chosen block is then decomposed exactly)."""
        blocks = self.blocks(grid)
        v = torch.ones(blocks.shape[0], blocks.shape[2], 1, dtype=blocks.dtype, device=blocks.device)
        v = v + 0.01 * torch.arange(blocks.shape[2], dtype=blocks.dtype, device=blocks.device)[:, None]
        for _ in range(iterations):
            v = blocks.transpose(1, 2) @ (blocks @ v)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        top = (blocks @ v).square().sum(dim=(1, 2))
        return top / (self.m // grid[0] + self.n // grid[1])

    def copy(self) -> "_Search":
        clone = object.__new__(_Search)
        clone.__dict__.update(self.__dict__, R=self.R.clone(), H={g1: H.clone() for g1, H in self.H.items()})
        if self.C is not None:
            clone.G = self.G.clone()
        return clone

    def subtract(self, rows: slice, cols: slice, a: torch.Tensor, b: torch.Tensor) -> None:
        """Remove the atoms ``a (|I|, t) @ b (t, |J|)`` from the residual."""
        self.R[rows, cols] -= a @ b
        if self.C is not None:
            right = b @ self.C[cols]  # rows I of R C change by a @ right, in every column
            self.G[rows] -= a @ right
            for g1, H in self.H.items():
                H[rows] -= a @ self._whiten(right, g1)

    def error(self) -> float:
        """Squared output error ``tr(R C R^T)`` (``||R||^2`` without calibration)."""
        return float((self.R * (self.R if self.C is None else self.G)).sum())


def _leading_right_vectors(M: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Z, S)``: ``count`` orthonormal rows spanning (about) the top right singular subspace
    of ``M``, and the singular values found. Randomised (``svd_lowrank``) when ``count`` is
    small next to ``M``, exact otherwise; only the subspace matters, the left factor is then
    fitted by least squares."""
    if count > 16 or count + 10 >= min(M.shape) // 2:
        _, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return Vh[:count], S
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # deterministic, without disturbing the caller's random stream
    _, S, V = torch.svd_lowrank(M, q=count + 10, niter=3)
    torch.random.set_rng_state(generator_state)
    return V[:, :count].T, S


def _atoms_from_block(search: _Search, grid: tuple[int, int], block: int, take: int | None, rate_floor: float,
                      budget_left: float, atoms: list) -> int:
    """Remove the leading atoms of one block of ``grid`` from the residual and append them to
    ``atoms``: ``take`` of them, or (``take=None``) those whose error removed per MAC is at
    least ``rate_floor`` (at least one). Returns the MACs spent.

    The atoms are ``a_k b_k^T`` with ``b_k = z_k C_JJ'^(-1/2)`` for orthonormal ``z_k`` and
    ``a_k = M z_k``, the least squares fit given ``z`` in the floored metric ``C'``: with
    ``B = Z C_JJ'^(-1/2)`` the squared error changes by ``-2 ||A||^2 + tr(A B C_JJ B^T A^T)``,
    and ``B C_JJ B^T <= I`` since ``C' >= C``, so they remove at least ``||M Z^T||^2`` (exactly
    that where no eigenvalue was floored), whether ``Z`` came from an exact or a randomised SVD.
    """
    m, n = search.m, search.n
    g0, g1 = grid
    bo, bi = m // g0, n // g1
    cost = bo + bi
    i, j = block % g0, block // g0
    limit = min(int(budget_left // cost), bo, bi)
    if limit <= 0:
        return 0
    M = search.blocks(grid)[block]
    if take is None:
        Z, S = _leading_right_vectors(M, min(limit, 16))
        take = max(1, int((S[: Z.shape[0]].square() / cost >= rate_floor).sum()))
        if take == Z.shape[0] and take < limit:
            Z, S = _leading_right_vectors(M, limit)
            take = max(1, int((S[:limit].square() / cost >= rate_floor).sum()))
    take = min(take, limit)
    Z, _ = _leading_right_vectors(M, take)
    a = M @ Z.T
    roots = search.inverse_root(g1)
    b = Z if roots is None else Z @ roots[j]
    rows, cols = slice(i * bo, (i + 1) * bo), slice(j * bi, (j + 1) * bi)
    search.subtract(rows, cols, a, b)
    atoms += [(i * bo, bo, j * bi, bi, a[:, k].clone(), b[k].clone()) for k in range(take)]
    return take * cost


def _greedy(search: _Search, budget: float, atoms: list, rounds: int) -> list:
    """Spend what is left of ``budget`` MACs on block atoms, greedily by squared error removed
    per MAC.

    Each round scores the top singular value of every block of every affordable grid, takes
    the best block, and removes from it all its leading atoms that still beat the best other
    block (deflating one block by its own SVD is exact), at least enough to finish in about
    ``rounds`` rounds.
    """
    m, n = search.m, search.n
    spent = sum(atom[1] + atom[3] for atom in atoms)
    for round_index in range(4 * rounds):
        remaining = budget - spent
        grids = [g for g in search.grids if m // g[0] + n // g[1] <= remaining]
        if not grids:
            break
        best, best_rate, runner_up = None, -1.0, 0.0
        for grid in grids:
            values, order = search.top_rates(grid).sort(descending=True)
            top, second = float(values[0]), float(values[1]) if len(values) > 1 else 0.0
            if top > best_rate:
                runner_up = max(best_rate, second)
                best, best_rate = (grid, int(order[0])), top
            else:
                runner_up = max(runner_up, top)
        grid, block = best
        cost = m // grid[0] + n // grid[1]
        pace = -(-int(remaining // max(1, rounds - round_index)) // cost)  # atoms per round to finish in time
        taken = _atoms_from_block(search, grid, block, None, runner_up, remaining, atoms)
        if pace > 1 and taken < pace * cost:
            taken += _atoms_from_block(search, grid, block, pace - taken // cost, 0.0, remaining - taken, atoms)
        spent += taken
    return atoms


def _svd_atoms(W: torch.Tensor, C: torch.Tensor | None, rank: int) -> list:
    """The truncated SVD, as :func:`svd_decompose` gives it, as full-width atoms."""
    if not rank:
        return []
    m, n = W.shape
    left, right = _truncated_svd(W, C, rank)
    return [(0, m, 0, n, left[:, k], right[k]) for k in range(rank)]


def _variants(W: torch.Tensor, C: torch.Tensor | None, rank: int, trade: int, budget: float, rounds: int,
              only: int | None = None) -> list[tuple[float, list]]:
    """``(error, atoms)`` of each structure :func:`decompose` considers, in order: the truncated
    SVD alone, then with ``trade, trade - 1, ..., 0`` of its weakest components given up and the
    rest of the budget spent greedily on block atoms (``only``, from 1: that traded variant alone). The
    truncated SVD is the floor every variant is compared with (rounding aside, greedy atoms only
    lower the error)."""
    start = _Search(W, C)
    svd_atoms = _svd_atoms(W, C, rank)  # shared by every variant

    def remove(search: _Search, full_atoms: list) -> None:
        if full_atoms:
            a = torch.stack([atom[4] for atom in full_atoms], dim=1)
            b = torch.stack([atom[5] for atom in full_atoms])
            search.subtract(slice(None), slice(None), a, b)

    common = svd_atoms[: rank - trade]
    remove(start, common)
    variants = []
    if only is None:
        svd_only = start.copy()
        remove(svd_only, svd_atoms[rank - trade :])
        variants.append((svd_only.error(), svd_atoms))
    for index, traded in enumerate(range(trade, -1, -1), start=1):
        if only is not None and only != index:
            continue
        search = start.copy()
        extra = svd_atoms[rank - trade : rank - traded]
        remove(search, extra)
        atoms = _greedy(search, budget, common + extra, rounds)
        variants.append((search.error(), atoms))
    return variants


def _matrix(atoms: list, m: int, n: int) -> torch.Tensor:
    """The ``(m, n)`` sum of the block atoms ``(out_start, out_width, in_start, in_width, a, b)``."""
    matrix = torch.zeros(m, n, dtype=torch.float64, device=atoms[0][4].device if atoms else None)
    for out_start, out_width, in_start, in_width, a, b in atoms:
        matrix[out_start : out_start + out_width, in_start : in_start + in_width] += torch.outer(a, b)
    return matrix


def decompose(
    weight: torch.Tensor,
    flops_ratio: float,
    *,
    calibration=None,
    bias=None,
    trade: int = 2,
    rounds: int = 24,
) -> GBLRLinear:
    """A :class:`GBLRLinear` with ``flops() <= flops_ratio * m * n`` approximating ``weight``.

    Args:
        weight: the dense ``(out_features, in_features)`` matrix.
        flops_ratio: the budget as a fraction of the dense MACs ``m * n``, in ``(0, 1]``.
        calibration: ``None`` (minimise the weight error ``||W - W_hat||_F``), the layer's input
            activations (a tensor of shape ``(..., in_features)``) or a :class:`InputStats`
            (minimise the output error ``||(W - W_hat) X||_F``). With a
            :class:`gblr.stats.SplitInputStats` (what :func:`gblr.convert_` collects) each
            structure variant below is fitted on the first half of its tokens, the one with the
            least output error on the held half is kept and fitted again on all of them, so a
            variant that only fits the calibration tokens better loses to the truncated SVD.
        bias: copied into the layer's bias if given.
        trade: how many of the truncated SVD's full-width components may be given up, one at a
            time, for block atoms of the same total cost (each variant is scored, the best kept).
        rounds: greedy rounds that spend what is left of the budget.

    The search: the truncated SVD (activation-aware with calibration) at the largest rank that
    fits, then the rest of the budget (which a low-rank matrix cannot use) spent greedily on
    rank-1 atoms supported on blocks of row/column grids (splits into 2, 3, 4, 6, 8, 12, ...
    equal parts, head-sized blocks included), each round taking the block whose top singular
    value removes the most output error per MAC. Each atom is the exact best rank-1 fit of the
    residual on its block, so the error never exceeds the truncated SVD's; ``trade`` variants
    also try swapping the weakest full-width components for block atoms. Without structure in
    the weight the gain is the unused remainder of the budget; with it (e.g. per-head blocks)
    the blocks win outright.
    """
    weight = check_matrix("weight", weight)
    flops_ratio = check_flops_ratio(flops_ratio)
    if isinstance(trade, bool) or not isinstance(trade, int) or trade < 0:
        raise ValueError(f"trade must be a non-negative int, got {trade!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds <= 0:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    m, n = weight.shape
    stats = _as_stats(calibration, n)
    budget = flops_ratio * m * n
    rank = rank_for_ratio(flops_ratio, m, n)
    C = _moment(stats)
    C = None if C is None else C.to(weight.device)
    W = weight.to(torch.float64)
    trade = min(trade, rank)
    fitted = stats.fitted_second_moment() if C is not None and isinstance(stats, SplitInputStats) else None
    if fitted is None:
        _, best_atoms = min(_variants(W, C, rank, trade, budget, rounds), key=lambda variant: variant[0])
    else:  # each variant fitted on the first halves, judged on the held ones, the best fitted on all
        held = stats.held.normalized_second_moment.to(weight.device)
        variants = _variants(W, fitted.to(weight.device), rank, trade, budget, rounds)
        scores = [float(_squared_error(W - _matrix(atoms, m, n), held)) for _, atoms in variants]
        chosen = min(range(len(variants)), key=lambda index: (scores[index], index))
        if chosen == 0:  # the truncated SVD alone: no block search to run again
            best_atoms = _svd_atoms(W, C, rank)
        else:
            best_atoms = _variants(W, C, rank, trade, budget, rounds, only=chosen)[0][1]
    components = [
        (a.to(weight.dtype), b.to(weight.dtype), out_start, out_width, in_start, in_width)
        for out_start, out_width, in_start, in_width, a, b in best_atoms
    ]
    return from_components((m, n), components, weight, None if bias is None else bias.detach())
