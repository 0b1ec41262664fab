"""FrozenGBLRLinear: the deployed form of a GBLR layer, and ``freeze_`` for whole models.

A frozen layer is a list of blocks, each with a cyclic support and either two cropped factors
or one dense block (whichever is cheaper, :func:`gblr.flops.group_macs`). Its forward pass
takes one of several paths that compute the same product (:data:`gblr.kernels.choice.KERNELS`):
the plain reference, tiled GEMMs (:mod:`gblr.kernels.tiled`), two GEMMs over all blocks' factors
stacked, the Triton kernel on CUDA (:mod:`gblr.kernels.segmented`) or the dense weight, the last two
also on long-row storage (``"stacked-t"``, ``"dense-t"``: :class:`gblr.kernels.tiled.LongRows`,
faster at one token on a CPU); ``kernel="auto"`` times them and keeps the fastest
(:mod:`gblr.kernels.choice`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_input, check_input_dtype, compute_dtype, check_positive_int, layer_name
from .flops import Support, cyclic_indices, cyclic_ranges, group_macs
from .kernels import choice, segmented
from .kernels.tiled import (LongRows, batch, batched_forward, long_rows_stacked, long_rows_stacked_forward, pack, stack,
                            stacked_forward, tiled_forward)

__all__ = ["FrozenGBLRLinear", "freeze_", "KERNELS", "COARSE_TILE_FACTOR", "SUPPORTS_KEY"]

KERNELS = choice.KERNELS
COARSE_TILE_FACTOR = 3  # "tiled-coarse": 3x wider tiles, fewer GEMMs (small token counts), more padding
SUPPORTS_KEY = "block_supports"  # the state-dict buffer of the block supports, (blocks, 4) int64


class FrozenGBLRLinear(nn.Module):
    """Inference form of a GBLR layer: a list of blocks, each with a cyclic support.

    A block with support ``s`` applies ``y[rows(s)] += left @ (right @ x[cols(s)])`` with
    ``left (out_width, R)`` and ``right (R, in_width)``, or one dense ``(out_width, in_width)``
    matrix when that is cheaper (``R * (a + b) >= a * b``). Build it with
    :meth:`GBLRLinear.freeze`.

    The supports are part of the state: the buffer ``block_supports`` (``(blocks, 4)`` int64 rows
    ``(in_start, in_width, out_start, out_width)``), so ``load_state_dict`` refuses a state of a
    layer with other supports instead of loading its factors into the wrong blocks.
    """

    KERNELS = KERNELS  # the values of ``kernel`` (a subclass with other paths has its own)

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
        self.choices: dict[tuple, choice.Choice] = {}  # choice_key -> the kept choice (path, seconds per path, ...)
        self.watch = choice.Watch()  # re-measures a choice whose calls drift far from its measured time
        # Remembers dtype and device (moved by .to()) even when there are no blocks and no bias.
        self.register_buffer("_like", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.supports = [support for support, _, _ in blocks]
        self.register_buffer(SUPPORTS_KEY, self._support_rows(device))
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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the layer's factors (kept by ``.to()`` also when it has no blocks)."""
        return self._like.dtype

    @property
    def device(self) -> torch.device:
        """The device of the layer's factors (kept by ``.to()`` also when it has no blocks)."""
        return self._like.device

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
        """The dense ``(out_features, in_features)`` weight, as ``nn.Linear.weight`` (:attr:`matrix`)."""
        return self.matrix

    @property
    def matrix(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix this layer applies."""
        weight = self._like.new_zeros(self.out_features, self.in_features)
        for support, left, right in self.blocks():
            block = left if right is None else left @ right
            # a cyclic support is at most two contiguous ranges per side: add through views
            # (advanced indexing would keep a block-sized index tensor per block for autograd)
            for out_at, out_from, out_to in cyclic_ranges(support.out_start, support.out_width, self.out_features):
                for in_at, in_from, in_to in cyclic_ranges(support.in_start, support.in_width, self.in_features):
                    weight[out_at : out_at + out_to - out_from, in_at : in_at + in_to - in_from] += (
                        block[out_from:out_to, in_from:in_to]
                    )
        return weight

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {value!r}")
        if value == "triton" and not segmented.available():
            raise ValueError("kernel='triton' needs Triton (pip install triton) and a CUDA device; "
                             "kernel='auto' picks the fastest available path")
        self._kernel = value

    def packed(self, what: str, x: torch.Tensor):
        """The tiled product (``what="tiled"`` / ``"tiled-coarse"``), its padded batched form
        (``"tiled-batched"``) or the dense weight for ``x``'s device and dtype. Built once;
        :meth:`refresh` drops it (done after every training step through the reference path and
        on ``load_state_dict``). ``what="triton"`` gives the Triton kernel's packed product."""
        key = (x.device, x.dtype, self.tile)
        cached = self._packed.get(what)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                if what == "dense":
                    value = self.matrix.to(x.device, x.dtype)
                elif what == "tiled-batched":
                    value = batch(self.packed("tiled", x), x)
                elif what == "dense-t":
                    value = LongRows.of(self.packed("dense", x))
                elif what == "stacked-t":
                    value = long_rows_stacked(self.packed("stacked", x))
                elif what == "stacked":
                    value = stack(self.in_features, self.out_features, list(self.blocks()), device=x.device,
                                  dtype=x.dtype)
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

    def _support_rows(self, device) -> torch.Tensor:
        rows = [[s.in_start, s.in_width, s.out_start, s.out_width] for s in self.supports]
        return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), 4)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        # The supports buffer mirrors self.supports: rewritten after every conversion, so that
        # to_empty (used to build layers on the meta device and then load them) leaves no garbage.
        buffer = getattr(self, SUPPORTS_KEY)
        if not buffer.is_meta:
            self._buffers[SUPPORTS_KEY] = self._support_rows(buffer.device)
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self.refresh()
        key = prefix + SUPPORTS_KEY
        if key in state_dict:
            problem = self._support_mismatch(state_dict[key])
            if problem is not None:  # nothing of this layer is loaded: its factors belong to other blocks
                error_msgs.append(
                    f"{layer_name(self)} at {prefix or '(the root)'!r}: {problem}. A frozen layer loads only the state "
                    "of a layer with the same block supports: freeze the same trained layer, or rebuild the model "
                    "with gblr.load_pretrained, which stores the structure"
                )
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:
            # State dicts written before the supports were part of the state have no such key; they
            # still load (unchecked) so that older checkpoints keep working.
            missing_keys.remove(key)

    def _support_mismatch(self, value) -> str | None:
        """Why the supports ``value`` from a state dict differ from this layer's, or None."""
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] != 4 or value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{SUPPORTS_KEY} must be an integer tensor of shape (blocks, 4), got {shape}"
        theirs = [Support(*row) for row in value.tolist()]
        if len(theirs) != len(self.supports):
            return f"the state dict has {len(theirs)} blocks, this layer {len(self.supports)}"
        for index, (mine, other) in enumerate(zip(self.supports, theirs)):
            if mine != other:
                return f"block {index} differs: the state dict has {other}, this layer {mine}"
        return None

    def tiled_product(self, coarse: bool = False):
        """The precomputed tiles of the tiled path (:mod:`gblr.kernels.tiled`) for this layer's
        device and dtype (``coarse``: the ``tiled-coarse`` path's)."""
        return self.packed("tiled-coarse" if coarse else "tiled", self._like)

    def run(self, path: str, x: torch.Tensor) -> torch.Tensor:
        """``x (T, in) -> (T, out)`` without bias by one path of :data:`KERNELS` (but ``"auto"``)."""
        if path == "tiled-batched":
            return batched_forward(x, self.packed(path, x))
        if path == "triton":
            return segmented.triton_forward(x, self.packed(path, x))
        if path == "stacked":
            return stacked_forward(x, self.packed(path, x))
        if path == "stacked-t":
            return long_rows_stacked_forward(x, self.packed(path, x))
        if path == "dense-t":
            return self.packed(path, x).apply(x)
        if path.startswith("tiled"):
            return tiled_forward(x, self.packed(path, x))
        if path == "dense":
            return F.linear(x, self.packed("dense", x))
        return self._reference(x)

    def predicted_costs(self, x: torch.Tensor) -> dict[str, choice.Cost]:
        """The cost model of each path ``kernel="auto"`` may take for rows like ``x``
        (:class:`gblr.kernels.choice.Cost`): padded MACs per token and kernel calls (a tile costs
        a GEMM and a scatter or gather)."""
        costs = {}
        for path in choice.measured_paths(x):
            if path == "dense":
                macs, calls = self.in_features * self.out_features, 1
            elif path == "tiled-batched":
                macs, calls = self.packed(path, x).macs, 6  # pad, two bmm, scatter, gather, crop
            elif path == "dense-t":
                if not LongRows.turns(self.out_features, self.in_features):
                    continue  # stored as it is: the same product as "dense"
                macs, calls = self.in_features * self.out_features, 1
            elif path == "stacked-t":
                stacked = self.packed("stacked", x)
                if not (LongRows.turns(*stacked.right.shape) or LongRows.turns(*stacked.left.shape)):
                    continue  # stored as they are: the same products as "stacked"
                macs, calls = stacked.macs, 2
            elif path == "stacked":
                macs, calls = self.packed(path, x).macs, 2
            else:  # the tiled paths, and the Triton kernel reads the same supports
                product = self.packed("tiled" if path == "triton" else path, x)
                macs, calls = product.macs, (2 if path == "triton" else 2 * product.gemms)
            costs[path] = choice.Cost(macs, calls, x.device.type)
        return costs

    def path_for(self, tokens: int, x: torch.Tensor | None = None) -> str:
        """The path a forward pass over ``tokens`` rows takes. With ``kernel="auto"`` the paths of
        :func:`gblr.kernels.choice.measured_paths` that the cost model finds plausible
        (:meth:`predicted_costs`, dense always) are timed once per device, dtype and
        power-of-two bucket of token counts (on ``x``, or on random rows), and the fastest is
        kept in :attr:`choices` until its calls drift far from its measured time
        (:class:`gblr.kernels.choice.Watch`). Zero rows take the reference path (nothing to time)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        if tokens == 0:
            return "reference"
        if self.kernel != "auto":
            return self.kernel
        if x is None:
            x = torch.randn(tokens, self.in_features, device=self.device, dtype=self.dtype)
        return self._kept(tokens, x, self.choice_key(tokens, x)).path

    def _kept(self, tokens: int, x: torch.Tensor, key: tuple) -> choice.Choice:
        """The choice kept under ``key`` for ``tokens`` rows like ``x``, made now if there is none."""
        kept = self.choices.get(key)
        if kept is None:
            with torch.no_grad():
                kept = self.choices[key] = choice.choose(self.run, self.predicted_costs(x), x, tokens)
            # timing packed every candidate (a dense copy, tiles, stacked factors, each also on
            # long rows): keep only what the kept choices run, or a frozen model holds several
            # copies of its weights
            used = {made.path for made in self.choices.values()}
            for what in [what for what in self._packed if what not in used]:
                del self._packed[what]
        return kept

    def choice_key(self, tokens: int, x: torch.Tensor | None = None) -> tuple:
        """The key of :attr:`choices` for ``tokens`` rows like ``x`` (default: this layer's
        device and dtype)."""
        like = self._like if x is None else x
        return choice.choice_key(tokens, like.device, like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features)
        check_input_dtype(x, self.dtype, self)
        if torch.is_autocast_enabled(x.device.type):
            # Under autocast every path computes in the autocast dtype, as nn.Linear does: the input
            # and the bias are cast to it (the caches are kept per dtype, the paths timed in it) and
            # autocast is off inside, so that the products and their scatter into the output agree
            # on one dtype. (Entering that context costs microseconds: only where it is needed.)
            dtype = compute_dtype(x)  # the autocast dtype, read before autocast is turned off
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x, dtype)
        return self._forward(x, x.dtype)

    def _forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != dtype:  # (a .to() that changes nothing still costs microseconds: at one token they count)
            flat = flat.to(dtype)
        tokens, kept = flat.shape[0], None
        if tokens == 0:
            path = "reference"  # zero rows: the reference path gives the (0, out) zeros
        elif needs_grad or torch.compiler.is_compiling():
            path = "reference"  # differentiable in the parameters; traceable
            if needs_grad:
                self.refresh()  # the parameters are about to change: the caches would go stale
        elif self.kernel != "auto":
            path = self.kernel
        else:
            key = choice.choice_key(tokens, flat.device, flat.dtype)
            kept = self._kept(tokens, flat, key)
            path = kept.path
        watched = kept is not None and flat.device.type == "cpu"
        start = time.perf_counter() if watched else 0.0
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if path == "dense":
            y = F.linear(flat, self.packed("dense", flat), bias)  # one call: at a few tokens calls are the cost
        elif path == "dense-t":
            y = self.packed("dense-t", flat).apply(flat, bias)
        else:
            y = self.run(path, flat)
            if bias is not None:
                y = y + bias
        if watched:
            self._watch_call(key, tokens, time.perf_counter() - start)
        return y.reshape(*x.shape[:-1], self.out_features)

    def observe(self, tokens: int, x: torch.Tensor, seconds: float) -> None:
        """Tell the watch a call over ``tokens`` rows like ``x`` took ``seconds``; drop the choice
        (it is measured again on the next call) if its calls keep drifting from its time."""
        self._watch_call(self.choice_key(tokens, x), tokens, seconds)

    def _watch_call(self, key: tuple, tokens: int, seconds: float) -> None:
        """:meth:`observe` for the choice kept under ``key``: drop it if the watch says so."""
        kept = self.choices.get(key)
        if kept is not None and self.watch.observe(key, kept, tokens, seconds):
            del self.choices[key]

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain torch path, one gather and two products per block: the ground truth."""
        y = x.new_zeros(*x.shape[:-1], self.out_features)
        for support, left, right in self.blocks():
            cols = cyclic_indices(support.in_start, support.in_width, self.in_features, x.device)
            rows = cyclic_indices(support.out_start, support.out_width, self.out_features, x.device)
            part = x.index_select(-1, cols)
            if right is not None:
                part = F.linear(part, right.to(x.dtype))
            y.index_add_(-1, rows, F.linear(part, left.to(x.dtype)))
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
    from .linear import GBLRLinear  # here, not at the top: gblr.linear imports this module

    if isinstance(model, GBLRLinear):
        return model.freeze()
    for name, child in model.named_children():
        if isinstance(child, GBLRLinear):
            setattr(model, name, child.freeze())
        else:
            freeze_(child)
    return model
