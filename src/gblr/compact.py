"""The content phase's product: training a GBLR layer on its cropped blocks only.

Once the structure is fixed (``sigma=None``, widths and locations held, the last 20 % of a
:class:`gblr.StructureLearner` run), the layer's weight is a sum of rank-``r`` blocks on known
supports, and only the entries of ``u`` and ``v`` inside them reach the output. The masked product
(:mod:`gblr.product`) still multiplies full-length factors, at ``K r (m + n)`` MACs per token or
by materialising the weight; the compact product reads only the blocks, at about the layer's FLOPs
ratio of a dense layer's cost, forward and backward.

The live rank rows (those of components with both widths non-zero) are sorted by where their
support starts on each side and cut into groups; a group covers the span of its rows' supports
(the union, rounded out to one contiguous, possibly wrapping, run). Inside a group the rows are
ordered by where their support ends, last end first, so the rows that reach any column of the span
are a prefix of the group: the span is cut into segments, and a segment multiplies only the rows
that reach it. For ``x (T, n)`` and the hidden activations ``h (T, live rows)``:

    h[:, group g][:, :k_s]  += x[:, segment s of g] @ V_g[:k_s, s].T      stage 1, per segment
    y[:, segment s' of g']  += h'[:, group g'][:, :k_s'] @ U_g'[:k_s', s'] stage 2, per segment

where ``h'`` is ``h`` with its columns in the output side's order, ``V_g`` and ``U_g'`` are
gathered from ``v`` and ``u``, zero off each row's own support, and ``k_s`` is the number of rows
reaching segment ``s`` (the first segment reaches every row). Every GEMM writes a block of ``h``'s
columns or adds into a contiguous run of ``y``'s columns (a segment never crosses the wrap point),
so nothing is scattered element by element, and every large operand stays token-major (no
transposes of ``x`` or ``y``). The backward pass runs the same GEMMs transposed and writes the
group gradients back into ``u`` and ``v``: entries outside the supports get exactly zero, as under
the boxcar masks. A row pays the columns from its group's start to its own end, so large groups
pad more and small ones run slower GEMMs; :func:`plan_compact` cuts the rows into groups, and
each group's span into segments, where a measured cost model (a price per GEMM call, per column
of a group's span, per row and column a segment moves) predicts the least time. On the many-block
structures of ``benchmarks/training.py`` the segments cut the padded MACs from 0.59 to 0.44 of a
dense layer's (the structures' FLOPs ratio is 0.31).
"""

from __future__ import annotations

import dataclasses

import torch

from ._validation import compute_dtype
from .flops import low_rank_macs
from .kernels.choice import predicted_cost

__all__ = ["CompactGroup", "CompactSide", "CompactPlan", "CompactProduct", "plan_compact", "masked_cost",
           "GROUP_OVERHEAD_ROWS", "MAX_GROUP"]

# A group's GEMMs cost about its MACs plus reading its span of the input once more per this many
# rows (fitted to forward + backward of 768x3072 and 3072x768 layers at 4096 tokens on 2 cores:
# time per padded MAC 3.1x dense's at 16 rows, 2.0x at 32, 1.7x at 64, 1.4x at 128).
GROUP_OVERHEAD_ROWS = 32
MAX_GROUP = 256  # rows per group at most
SEGMENT_STEP = 32  # where a group's span may be cut into GEMMs (columns)
SEGMENT_OVERHEAD = 64  # a GEMM moves its operands at about this many MACs per row and column (at 4096
# tokens, a segment of 2 rows and 66 columns takes as long as 70 rows and 66 columns would at full speed)
SEGMENT = 128  # columns per segment, as the cost model of the groups assumes it


@dataclasses.dataclass
class CompactGroup:
    """Rows ``first:last`` of one side's order, multiplying columns ``start:stop`` (beyond the
    side's size: the wrapped columns ``0, 1, ...`` again)."""

    first: int
    last: int
    start: int
    stop: int
    sources: torch.Tensor  # (rows,) rank rows of the factor (v as (K r, in), u as (K r, out))
    outside: torch.Tensor | None  # (rows, stop - start) bool: off each row's support; None where none is
    pieces: tuple[tuple[int, int, int], ...]  # contiguous runs (column from, column to, offset in the span)
    # the GEMMs: (column from, column to, offset in the span, leading rows that reach these columns)
    segments: tuple[tuple[int, int, int, int], ...]


@dataclasses.dataclass
class CompactSide:
    size: int
    groups: list[CompactGroup]

    @property
    def macs(self) -> int:
        return sum(rows * (end - begin) for g in self.groups for begin, end, _, rows in g.segments)

    @property
    def gemms(self) -> int:
        return sum(len(g.segments) for g in self.groups)


@dataclasses.dataclass
class CompactPlan:
    """Both sides of a layer with a fixed structure (see the module docstring)."""

    hidden: int  # live rank rows
    inputs: CompactSide
    outputs: CompactSide
    order: torch.Tensor | None  # (hidden,) row of h for each row of h' (None: the same order)
    inverse: torch.Tensor | None  # (hidden,) row of h' for each row of h

    @property
    def macs(self) -> int:
        """Forward MACs per token, padding included (the backward pass costs twice as many)."""
        return self.inputs.macs + self.outputs.macs

    @property
    def gemms(self) -> int:
        """GEMMs per forward pass (the backward pass runs twice as many)."""
        return self.inputs.gemms + self.outputs.gemms

    def cost(self, tokens: int, device_type: str = "cpu") -> float:
        """Predicted cost of a training step (forward and backward) over ``tokens`` tokens, in MAC
        equivalents (:func:`gblr.kernels.choice.predicted_cost`), reading each group's span
        counted as :data:`GROUP_OVERHEAD_ROWS` more rows."""
        spans = sum(g.stop - g.start for side in (self.inputs, self.outputs) for g in side.groups)
        return 3 * predicted_cost(self.macs + GROUP_OVERHEAD_ROWS * spans, self.gemms, tokens, device_type)


def masked_cost(tokens: int, in_features: int, out_features: int, total_rank: int, device_type: str = "cpu",
                dense_blocks: int = 0) -> float:
    """Predicted cost of a training step of the masked product (:mod:`gblr.product`) in the same
    units as :meth:`CompactPlan.cost`: the cheaper of materialising the weight and two thin
    products. ``dense_blocks`` (:class:`gblr.GBLRLinear`'s) add their masked matrix to the
    materialised weight (its masks' product, once per step), or one dense product to the thin ones."""
    m, n, kr = out_features, in_features, total_rank
    thin = predicted_cost(low_rank_macs(kr, m, n), 2, tokens, device_type)
    materialise = predicted_cost(m * n, 2, tokens, device_type) + kr * m * n
    if dense_blocks:
        thin += predicted_cost(m * n, 1, tokens, device_type)
        materialise += dense_blocks * m * n
    return 3 * min(thin, materialise)


def _cuts(starts: list[int], ends: list[int], size: int, tokens: int, device_type: str) -> list[int]:
    """Where to cut rows sorted by start into groups: the least predicted cost, by dynamic
    programming over the cut points. A group of ``B`` rows over a span of ``s`` columns runs
    ``s / SEGMENT`` GEMMs (:func:`_segments`); each row pays the columns from the group's start to
    its own end, half a segment more on average (at most the span), and reading the span costs
    ``s * GROUP_OVERHEAD_ROWS`` MACs per token more (:func:`gblr.kernels.choice.predicted_cost`)."""
    count = len(starts)
    reach_sum = [0]
    for end in ends:
        reach_sum.append(reach_sum[-1] + end)
    best, cut = [0.0] + [float("inf")] * count, [0] * (count + 1)
    for last in range(1, count + 1):
        reach = 0
        for first in range(last - 1, max(0, last - MAX_GROUP) - 1, -1):
            reach = max(reach, ends[first])
            span = min(reach - starts[first], size)
            rows = last - first
            padded = min(reach_sum[last] - reach_sum[first] - rows * starts[first] + rows * SEGMENT // 2, rows * span)
            gemms = -(-span // SEGMENT)
            cost = best[first] + predicted_cost(padded + span * GROUP_OVERHEAD_ROWS, gemms, tokens, device_type)
            if cost < best[last]:
                best[last], cut[last] = cost, first
    cuts, last = [], count
    while last > 0:
        cuts.append(last)
        last = cut[last]
    return [0] + cuts[::-1]


def _segments(start: int, stop: int, size: int, ends: list[int], tokens: int,
              device_type: str) -> tuple[tuple[int, int, int, int], ...]:
    """The GEMMs of a group over the (unwrapped) span ``start:stop``, as (column from, column to,
    offset in the span, rows): the columns are cut where the predicted cost is least (dynamic
    programming over every :data:`SEGMENT_STEP` columns, and at ``size`` where the span wraps);
    a segment multiplies the rows that reach it, a prefix of the group's rows, ordered by their
    unwrapped ``ends`` (decreasing). A segment of ``k`` rows and ``w`` columns costs ``k w`` MACs
    per token, ``SEGMENT_OVERHEAD (k + w)`` more for moving its operands, and one call."""
    points = sorted(set(range(start, stop, SEGMENT_STEP)) | ({size} if start < size < stop else set()) | {stop})
    reach = [sum(1 for end in ends if end > point) for point in points]
    best, cut = [0.0] + [float("inf")] * (len(points) - 1), [0] * len(points)
    for last in range(1, len(points)):
        for first in range(last - 1, -1, -1):
            if points[first] < size < points[last]:  # no segment crosses the wrap point
                break
            rows, width = reach[first], points[last] - points[first]
            cost = best[first] + predicted_cost(rows * width + SEGMENT_OVERHEAD * (rows + width), 1, tokens,
                                                device_type)
            if cost < best[last]:
                best[last], cut[last] = cost, first
    bounds, last = [], len(points) - 1
    while last > 0:
        bounds.append(last)
        last = cut[last]
    bounds = [0] + bounds[::-1]
    segments = []
    for first, last in zip(bounds[:-1], bounds[1:]):
        begin, end = points[first], points[last]
        shift = size if begin >= size else 0
        segments.append((begin - shift, end - shift, begin - start, reach[first]))
    return tuple(segments)


def _side(widths: torch.Tensor, starts: torch.Tensor, live: torch.Tensor, size: int, group: int | None, tokens: int):
    """The groups of one side (``group`` rows each, or cut by :func:`_cuts`), and the order of its
    rows (indices into the live rows): by start across groups, by end (decreasing) within one."""
    full = widths >= size
    starts = torch.where(full, torch.zeros_like(starts), starts)  # a full row starts anywhere: say 0
    widths = widths.clamp(max=size)
    # full rows first (one group spans everything anyway), then by start and width
    order = torch.argsort(((~full).long() * size + starts) * (size + 1) + widths, stable=True)
    widths_sorted, starts_sorted = widths[order].tolist(), starts[order].tolist()
    ends_sorted = [s + w for s, w in zip(starts_sorted, widths_sorted)]
    if group is None:
        cuts = _cuts(starts_sorted, ends_sorted, size, tokens, widths.device.type)
    else:
        cuts = list(range(0, order.numel(), group)) + [order.numel()]
    groups = []
    for first, last in zip(cuts[:-1], cuts[1:]):
        start = starts_sorted[first]  # the least start in the group
        ends = sorted(ends_sorted[first:last], reverse=True)
        stop = ends[0]
        if stop - start > size:  # the union wraps onto itself: every column, unwrapped
            start, stop, ends = 0, size, [size] * (last - first)  # every row in every segment
        else:  # within the group, by end (decreasing): the rows reaching a segment are a prefix
            within = sorted(range(first, last), key=lambda row: -ends_sorted[row])
            order[first:last] = order[torch.tensor(within, dtype=torch.long, device=order.device)]
        pieces = ((start, min(stop, size), 0),) + (((0, stop - size, size - start),) if stop > size else ())
        columns = torch.arange(start, stop, device=widths.device) % size
        rows = order[first:last]
        outside = torch.remainder(columns[None, :] - starts[rows, None], size) >= widths[rows, None]
        groups.append(CompactGroup(first, last, start, stop, live[rows], outside if bool(outside.any()) else None,
                                   pieces, _segments(start, stop, size, ends, tokens, widths.device.type)))
    return CompactSide(size, groups), order


@torch.no_grad()
def plan_compact(supports, rank: int, in_features: int, out_features: int, group: int | None = None,
                 tokens: int = 4096) -> CompactPlan:
    """The :class:`CompactPlan` of a layer's rounded ``supports`` (``(in_width, in_location,
    out_width, out_location)`` in elements, one per component, as
    :meth:`gblr.GBLRLinear.supports` gives them) for components of ``rank``. ``group``: rows per
    group; by default each side is cut where the predicted cost over ``tokens`` is least
    (:func:`_cuts`)."""
    w_in, l_in, w_out, l_out = (s.repeat_interleave(rank) for s in supports)  # per rank row
    live = ((w_in > 0) & (w_out > 0)).nonzero().flatten()
    inputs, in_order = _side(w_in[live], l_in[live], live, in_features, group, tokens)
    outputs, out_order = _side(w_out[live], l_out[live], live, out_features, group, tokens)
    position = torch.empty_like(in_order)  # row of h (input order) of each live row
    position[in_order] = torch.arange(in_order.numel(), device=in_order.device)
    order = position[out_order]
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return CompactPlan(live.numel(), inputs, outputs, None, None)
    return CompactPlan(live.numel(), inputs, outputs, order, torch.argsort(order))


def _rank_rows(factor: torch.Tensor, side: str) -> torch.Tensor:
    """``v (K, r, in)`` as ``(K r, in)``, ``u (K, out, r)`` as ``(K r, out)`` (views for r = 1)."""
    if side == "in":
        return factor.reshape(-1, factor.shape[-1])
    return factor.transpose(1, 2).reshape(-1, factor.shape[1])


def _gather(rows: torch.Tensor, group: CompactGroup, dtype: torch.dtype) -> torch.Tensor:
    """A group's values ``(rows, span)``, zero off each row's support."""
    pieces = [rows[:, begin:end].index_select(0, group.sources) for begin, end, _ in group.pieces]
    values = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)).to(dtype)
    return values if group.outside is None else values.masked_fill_(group.outside, 0)


def _scatter(grad_rows: torch.Tensor, group: CompactGroup, values: torch.Tensor) -> None:
    """Write a group's factor gradient ``(rows, span)`` into the rank rows of the factor's gradient
    (each row is in one group per side and a span has distinct columns: nothing is written twice)."""
    if group.outside is not None:
        values.masked_fill_(group.outside, 0)
    values = values.to(grad_rows.dtype)
    for begin, end, offset in group.pieces:
        grad_rows[:, begin:end].index_copy_(0, group.sources, values[:, offset : offset + end - begin])


def _into_rows(flat: torch.Tensor, group: CompactGroup, values: torch.Tensor, out: torch.Tensor) -> None:
    """``out = flat[:, span] @ values.T``: ``flat (T, size)``, ``values (rows, span)``, ``out (T, rows)``;
    one product per segment, into the rows that reach it (the first segment reaches every row)."""
    for index, (begin, end, offset, rows) in enumerate(group.segments):
        part = values[:rows, offset : offset + end - begin].T
        if index == 0:
            torch.mm(flat[:, begin:end], part, out=out)
        else:
            out[:, :rows].addmm_(flat[:, begin:end], part)


def _onto_columns(flat: torch.Tensor, group: CompactGroup, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``flat[:, span] += rows @ values``: ``rows (T, rows)``, ``values (rows, span)``, per segment."""
    for begin, end, offset, count in group.segments:
        flat[:, begin:end].addmm_(rows[:, :count], values[:count, offset : offset + end - begin])


def _factor_gradient(rows: torch.Tensor, group: CompactGroup, flat: torch.Tensor) -> torch.Tensor:
    """``rows.T @ flat[:, span]`` for ``rows (T, rows)``, ``flat (T, size)``: a group's factor
    gradient, per segment (zero where a row does not reach a segment)."""
    gradient = rows.new_zeros(rows.shape[1], group.stop - group.start)
    for begin, end, offset, count in group.segments:
        gradient[:count, offset : offset + end - begin].addmm_(rows[:, :count].T, flat[:, begin:end])
    return gradient


class CompactProduct(torch.autograd.Function):
    """``y = x @ W.T + bias`` of a layer with a fixed structure from its cropped blocks only (see
    the module docstring), with the gradients of ``x``, ``u``, ``v`` and the bias: the masked
    product's at ``sigma=None``, up to rounding. ``x`` is ``(T, in_features)``.

    Every large operand (``x``, ``y``, the hidden activations ``h`` and their gradients) is
    token-major, so each GEMM reads and writes contiguous runs without a transpose.
    ``structure`` (a layer's widths and locations, optional) are taken into the graph with zero
    gradients: they do not move the output of a fixed structure, and DistributedDataParallel
    expects every parameter to take part in the loss."""

    @staticmethod
    def forward(ctx, x, u, v, bias, plan: CompactPlan, *structure):
        dtype, x_dtype = compute_dtype(x), x.dtype
        tokens = x.shape[0]
        inputs, outputs = plan.inputs, plan.outputs
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            V = [_gather(_rank_rows(v, "in"), g, dtype) for g in inputs.groups]
            U = [_gather(_rank_rows(u, "out"), g, dtype) for g in outputs.groups]
            h = x.new_empty(tokens, plan.hidden)  # tokens by live rank rows, in the input side's order
            for g, values in zip(inputs.groups, V):
                _into_rows(x, g, values, h[:, g.first : g.last])
            if plan.order is not None:  # in the output side's order
                h = h.index_select(1, plan.order)
            y = x.new_zeros(tokens, outputs.size)
            for g, values in zip(outputs.groups, U):
                _onto_columns(y, g, h[:, g.first : g.last], values)
            if bias is not None:
                y += bias.to(dtype)
        ctx.save_for_backward(x, h, *V, *U)
        ctx.plan, ctx.shapes = plan, (u.shape, v.shape)
        ctx.dtypes = (x_dtype, u.dtype, v.dtype, None if bias is None else bias.dtype)
        ctx.structure = [(t.shape, t.dtype, t.device) for t in structure]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        plan = ctx.plan
        inputs, outputs = plan.inputs, plan.outputs
        x, h, *factors = ctx.saved_tensors
        V, U = factors[: len(inputs.groups)], factors[len(inputs.groups):]
        want_x, want_u, want_v, want_bias = ctx.needs_input_grad[:4]
        (u_shape, v_shape), (x_dtype, u_dtype, v_dtype, bias_dtype) = ctx.shapes, ctx.dtypes
        grad_x = grad_u = grad_v = grad_bias = None
        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad_y.to(x.dtype)
            if want_bias:
                grad_bias = grad_y.sum(0).to(bias_dtype)
            grad_h = x.new_empty(x.shape[0], plan.hidden)
            grad_left = x.new_zeros(u_shape[0] * u_shape[2], u_shape[1]) if want_u else None
            for g, values in zip(outputs.groups, U):
                if want_u:
                    _scatter(grad_left, g, _factor_gradient(h[:, g.first : g.last], g, grad_y))
                _into_rows(grad_y, g, values, grad_h[:, g.first : g.last])
            if plan.order is not None:  # back to the input side's order
                grad_h = grad_h.index_select(1, plan.inverse)
            grad_right = x.new_zeros(v_shape[0] * v_shape[1], v_shape[2]) if want_v else None
            grad_x = x.new_zeros(x.shape) if want_x else None
            for g, values in zip(inputs.groups, V):
                rows = grad_h[:, g.first : g.last]
                if want_v:
                    _scatter(grad_right, g, _factor_gradient(rows, g, x))
                if want_x:
                    _onto_columns(grad_x, g, rows, values)
        if want_u:
            grad_u = grad_left.view(u_shape[0], u_shape[2], u_shape[1]).transpose(1, 2).contiguous().to(u_dtype)
        if want_v:
            grad_v = grad_right.view(v_shape).to(v_dtype)
        if want_x:
            grad_x = grad_x.to(x_dtype)
        zeros = [torch.zeros(shape, dtype=dtype, device=device) if wanted else None
                 for (shape, dtype, device), wanted in zip(ctx.structure, ctx.needs_input_grad[5:])]
        return grad_x, grad_u, grad_v, grad_bias, None, *zeros
