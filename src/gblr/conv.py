"""GBLR convolutions: :class:`GBLRConv2d` (trainable) and :class:`FrozenGBLRConv2d` (deployed).

A ``(out, in, kh, kw)`` kernel is viewed as the ``(out, in * kh * kw)`` matrix with the input
channels outermost (``weight.reshape(out, -1)``, the column order of ``F.unfold``), and that
matrix is a GBLR matrix (docs/method.md section 9). A block's columns are then a run of input
channels (with all their taps, partial at the two ends), so a cropped block ``left @ right`` is a
narrow convolution over a channel slice into ``R`` channels followed by a 1x1 convolution into
the block's rows: its cost per output pixel is the block's MACs, the same count as for the
linear layer. FLOPs are MACs per output pixel (:meth:`GBLRConv2d.flops`); layers remember the
output pixels of their last forward pass (``output_pixels``), which the FLOPs report and the
structure learner use to weigh convolutions at different resolutions by their real cost.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_input_dtype, check_positive_int, compute_dtype
from .flops import cyclic_ranges
from .frozen import FrozenGBLRLinear
from .kernels import choice
from .linear import GBLRLinear
from .product import GBLRWeight, ProductPlan

__all__ = ["ConvGeometry", "GBLRConv2d", "FrozenGBLRConv2d", "CONV_KERNELS", "im2col_rows"]

CONV_KERNELS = ("auto", "reference", "dense", "blocks", "unfold")  # FrozenGBLRConv2d(kernel=...)
CONV_MEASURED_PATHS = ("dense", "blocks")  # what kernel="auto" may time ("unfold" never won on the CPU)


GEOMETRY_KEYS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")  # geometry_config()


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


class ConvGeometry:
    """What a 2-D convolution's shape and sliding window are, for the GBLR convolutions and the
    convolution baselines: ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
    ``padding`` (ints, pairs, ``"valid"`` or ``"same"``), ``dilation``, as in ``nn.Conv2d``
    (``groups=1``, ``padding_mode="zeros"``). Also the im2col view of an input and the output
    pixels of the last forward pass. A mixin of the convolution layers; :meth:`of`,
    :meth:`of_conv` and :meth:`from_config` make a plain geometry (to check, compare or unfold)."""

    @classmethod
    def of(cls, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros") -> "ConvGeometry":
        """A geometry alone, checked as the layers check theirs."""
        geometry = cls()
        geometry._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                padding_mode)
        return geometry

    @classmethod
    def of_conv(cls, conv: nn.Conv2d) -> "ConvGeometry":
        """The geometry of an ``nn.Conv2d`` (a ValueError if gblr cannot replace it)."""
        return cls.of(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      conv.groups, conv.padding_mode)

    @classmethod
    def from_config(cls, config: dict) -> "ConvGeometry":
        """The geometry of a :meth:`geometry_config` dict (KeyError, TypeError or ValueError if malformed)."""
        return cls.of(*(config[key] for key in GEOMETRY_KEYS))

    def _init_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                       padding_mode) -> None:
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.dilation = _pair("dilation", dilation, 1)
        if groups != 1:
            raise ValueError(f"groups must be 1 (a grouped convolution is already block-diagonal), got {groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros', got {padding_mode!r}")
        self.groups, self.padding_mode = 1, "zeros"
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d)")
            self.padding = padding
        else:
            self.padding = _pair("padding", padding, 0)
        self.output_pixels: int | None = None  # output height * width of the last forward pass

    @property
    def taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def explicit_padding(self) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` zero padding, ``"same"`` resolved as torch does (any
        odd extra on the right and bottom)."""
        if self.padding == "valid":
            return 0, 0, 0, 0
        if self.padding == "same":
            pads = []
            for size, dilation in zip(self.kernel_size, self.dilation):
                total = dilation * (size - 1)
                pads.append((total // 2, total - total // 2))
            (top, bottom), (left, right) = pads
            return left, right, top, bottom
        ph, pw = self.padding
        return pw, pw, ph, ph

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        left, right, top, bottom = self.explicit_padding()
        sizes = []
        for size, pad, kernel, stride, dilation in zip(
            (height, width), (top + bottom, left + right), self.kernel_size, self.stride, self.dilation
        ):
            sizes.append((size + pad - dilation * (kernel - 1) - 1) // stride + 1)
        return sizes[0], sizes[1]

    def check_image(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a batch ``(N, C, H, W)`` (an unbatched ``(C, H, W)`` gets a batch of one), or
        an error that says what shape was expected."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"input must be (N, C, H, W) or (C, H, W) with C = in_channels = {self.in_channels}, "
                f"got shape {tuple(x.shape)}"
            )
        height, width = self.output_size(x.shape[-2], x.shape[-1])
        if height <= 0 or width <= 0:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[-2:])} is smaller than the (dilated) kernel "
                f"{self.kernel_size} with padding {self.padding}"
            )
        return x if x.dim() == 4 else x.unsqueeze(0)

    def convolve(self, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.conv2d`` of a batch with this geometry's stride, padding and dilation."""
        return F.conv2d(x, kernel, bias, self.stride, self.padding, self.dilation)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """The im2col matrix ``(N * H' * W', C * kh * kw)`` of a batch, columns in the order of
        ``weight.reshape(out, -1)``."""
        left, right, top, bottom = self.explicit_padding()
        if left == right and top == bottom:
            cols = F.unfold(x, self.kernel_size, self.dilation, (top, left), self.stride)
        else:
            cols = F.unfold(F.pad(x, (left, right, top, bottom)), self.kernel_size, self.dilation, 0, self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def fold_output(self, flat: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        """``(N * H' * W', out)`` rows back to a ``(N, out, H', W')`` image batch."""
        return flat.reshape(batch, height * width, -1).transpose(1, 2).reshape(batch, -1, height, width)

    def geometry_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )

    def sliding_window(self) -> tuple:
        """What the convolution computes, whatever the spelling: ``"valid"`` equals padding 0,
        ``"same"`` its explicit padding."""
        return (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.dilation,
                self.explicit_padding())

    def geometry_config(self) -> dict:
        """The constructor arguments of the geometry (JSON-ready), for saving and rebuilding."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": padding,
                "dilation": list(self.dilation)}


def _remember_pixels(layer: ConvGeometry, y: torch.Tensor) -> torch.Tensor:
    layer.output_pixels = int(y.shape[-2] * y.shape[-1])
    return y


class GBLRConv2d(ConvGeometry, GBLRLinear):
    """Drop-in replacement for :class:`torch.nn.Conv2d` (``groups=1``, zero padding) whose
    kernel, viewed as the ``(out_channels, in_channels * kh * kw)`` matrix, is a learnable GBLR
    matrix: everything :class:`GBLRLinear` has (structural parameters, masks, ``flops()`` per
    output pixel, :class:`gblr.StructureLearner`, ``freeze()``) with ``in_features =
    in_channels * kh * kw`` and ``out_features = out_channels``.

    The forward pass builds the masked kernel (one autograd function, revival of pruned blocks
    included, :class:`gblr.product.GBLRWeight`) and convolves with it: the cost of building is
    ``K r m n`` MACs, small next to the convolution at any real batch. ``weight`` is the
    ``(out, in, kh, kw)`` kernel as in ``nn.Conv2d``; ``matrix`` its matrix view.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as in ``nn.Conv2d`` (``groups`` must be 1 and
        ``padding_mode`` ``"zeros"``).
        components, rank, sigma, init_flops_ratio, init_full_width_share: as in
        :class:`GBLRLinear` (``components`` defaults to ``min(in_channels * kh * kw, out_channels)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        components: int | None = None,
        rank: int = 1,
        sigma: float | None = None,
        device=None,
        dtype=None,
        *,
        init_flops_ratio: float = 0.5,
        init_full_width_share: float = 0.5,
    ) -> None:
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        super().__init__(self.in_channels * self.taps, self.out_channels, bias, components, rank, sigma, device, dtype,
                         init_flops_ratio=init_flops_ratio, init_full_width_share=init_full_width_share,
                         product="materialise")

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_channels, in_channels, kh, kw)`` kernel this layer convolves with (differentiable)."""
        return self.matrix.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def materialises(self, tokens: int) -> bool:
        return True  # a convolution always builds its kernel (see the class docstring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.check_image(x)
        check_input_dtype(x, self.u.dtype, self)
        supports = self._supports("forward", always=False)
        revived = None
        if torch.is_grad_enabled() and self.in_width.requires_grad:
            revived = self.revived_widths(supports)
        plan = ProductPlan(self.in_features, self.out_features, self.sigma, self.in_width.dtype, True)
        matrix = GBLRWeight.apply(self.u, self.v, self.in_width, self.in_location, self.out_width, self.out_location,
                                  plan, supports, revived, compute_dtype(x))
        kernel = matrix.reshape(self.out_channels, self.in_channels, *self.kernel_size)
        y = _remember_pixels(self, self.convolve(batch, kernel, self.bias))
        return y if x.dim() == 4 else y.squeeze(0)

    @classmethod
    def from_matrix_layer(cls, layer: GBLRLinear, like: nn.Conv2d) -> "GBLRConv2d":
        """The convolution of ``like``'s geometry whose kernel's matrix view is the GBLR matrix of
        ``layer`` (a :class:`GBLRLinear` of ``like``'s ``(out, in * kh * kw)`` shape, e.g. from
        :func:`gblr.decompose` of ``like.weight.reshape(out, -1)``): same parameters, exactly."""
        if (layer.in_features, layer.out_features) != (int(like.weight[0].numel()), like.out_channels):
            raise ValueError(
                f"a GBLR layer of (in_features, out_features) = {(layer.in_features, layer.out_features)} is not the "
                f"matrix view of {like} ({(int(like.weight[0].numel()), like.out_channels)})"
            )
        conv = cls(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding, like.dilation,
                   like.groups, layer.bias is not None, like.padding_mode, layer.components, layer.rank, layer.sigma,
                   device=layer.u.device, dtype=layer.u.dtype)
        conv.load_state_dict(layer.state_dict())
        conv.train(layer.training)
        return conv

    def _frozen_form(self, blocks, bias) -> "FrozenGBLRConv2d":
        frozen = FrozenGBLRConv2d(self.in_channels, self.out_channels, self.kernel_size, blocks, bias,
                                  stride=self.stride, padding=self.padding, dilation=self.dilation, dtype=self.u.dtype,
                                  device=self.u.device)
        frozen.output_pixels = self.output_pixels  # the FLOPs report counts the same as before freezing
        return frozen

    def extra_repr(self) -> str:
        linear = super().extra_repr()  # "in_features=..., out_features=..., bias=..., components=..."
        return f"{self.geometry_repr()}, bias={linear.split(', bias=', 1)[1]}"


class _BlockConvolutions:
    """The ``"blocks"`` path's packed form: for each run of input channels that some blocks read,
    one convolution into those blocks' ``R`` hidden channels (taps outside a block's columns are
    zero), then one 1x1 convolution from all hidden channels into the outputs."""

    def __init__(self, layer: "FrozenGBLRConv2d", device, dtype) -> None:
        taps, n = layer.taps, layer.in_features
        runs: dict[tuple[int, int], list[torch.Tensor]] = {}
        lefts: list[tuple[torch.Tensor, object]] = []  # per hidden slot: (left factor, its support)
        for support, left, right in layer.blocks():
            if right is None:  # a dense block: hidden channels are its rows, the 1x1 step is the identity
                right, left = left, torch.eye(left.shape[0], device=left.device, dtype=left.dtype)
            for at, start, stop in cyclic_ranges(support.in_start, support.in_width, n):
                first, last = at // taps, -(-(at + stop - start) // taps)
                kernel = right.new_zeros(right.shape[0], (last - first) * taps)
                kernel[:, at - first * taps : at - first * taps + stop - start] = right[:, start:stop]
                runs.setdefault((first, last), []).append(kernel)
                lefts.append(((first, last), left, support))
        self.runs = []
        hidden_of: dict[tuple[int, int], int] = {}
        offset = 0
        for (first, last), kernels in runs.items():
            stacked = torch.cat(kernels).reshape(-1, last - first, *layer.kernel_size)
            self.runs.append((first, last, stacked.to(device, dtype)))
            hidden_of[(first, last)] = offset
            offset += stacked.shape[0]
        mixing = torch.zeros(layer.out_features, offset, device=device, dtype=dtype)
        filled = dict.fromkeys(hidden_of, 0)
        for key, left, support in lefts:
            start = hidden_of[key] + filled[key]
            filled[key] += left.shape[1]
            for at, lo, hi in cyclic_ranges(support.out_start, support.out_width, layer.out_features):
                mixing[at : at + hi - lo, start : start + left.shape[1]] = left[lo:hi].to(device, dtype)
        self.mixing = mixing.reshape(layer.out_features, offset, 1, 1)
        self.hidden = offset

    def __call__(self, layer: "FrozenGBLRConv2d", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.runs:
            height, width = layer.output_size(x.shape[-2], x.shape[-1])
            y = x.new_zeros(x.shape[0], layer.out_features, height, width)
            return y if bias is None else y + bias[:, None, None]
        hidden = [layer.convolve(x[:, first:last], kernel, None) for first, last, kernel in self.runs]
        hidden = hidden[0] if len(hidden) == 1 else torch.cat(hidden, 1)
        return F.conv2d(hidden, self.mixing, bias)


class FrozenGBLRConv2d(ConvGeometry, FrozenGBLRLinear):
    """Inference form of :class:`GBLRConv2d`: cropped blocks of the kernel's matrix view
    (as :class:`gblr.FrozenGBLRLinear`), computed by one of the paths of :data:`CONV_KERNELS`:

    * ``"dense"``: ``F.conv2d`` with the dense kernel (the fallback; also what a layer near
      ratio 1 should use);
    * ``"blocks"``: each cropped block as a convolution over its channel slice into ``R``
      channels, then one 1x1 convolution into the outputs (few, large blocks: low rank, bands);
    * ``"unfold"``: im2col and the frozen linear layer's tiled product (for explicit use: on the
      CPU ``F.unfold`` alone costs more than the dense convolution);
    * ``"reference"``: ``F.conv2d`` with the kernel rebuilt from the blocks (differentiable).

    ``kernel="auto"`` times ``"dense"`` and ``"blocks"`` (where the cost model finds it plausible)
    on the first input of each batch-size bucket and input size and keeps the fastest
    (:attr:`choices`), measuring again if its calls drift far from that time. Build it with
    :meth:`GBLRConv2d.freeze`.
    """

    KERNELS = CONV_KERNELS

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        blocks,
        bias: torch.Tensor | None,
        *,
        stride=1,
        padding=0,
        dilation=1,
        dtype: torch.dtype | None = None,
        device=None,
        kernel: str = "auto",
        tile: int = 128,
    ) -> None:
        self._init_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, "zeros")
        super().__init__(self.in_channels * self.taps, self.out_channels, blocks, bias, dtype=dtype, device=device,
                         kernel=kernel, tile=tile)

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_channels, in_channels, kh, kw)`` kernel this layer applies."""
        return self.matrix.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def packed(self, what: str, x: torch.Tensor):
        """The dense kernel (``"dense"``), the block convolutions (``"blocks"``) or the frozen
        linear layer's packed forms for ``x``'s device and dtype, built once (see
        :meth:`FrozenGBLRLinear.packed`)."""
        if what not in ("dense", "blocks"):
            return super().packed(what, x)
        key = (x.device, x.dtype, self.tile)
        cached = self._packed.get(what)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                if what == "dense":
                    value = self.weight.to(x.device, x.dtype)
                else:
                    value = _BlockConvolutions(self, x.device, x.dtype)
            self._packed[what] = cached = (key, value)
        return cached[1]

    def run(self, path: str, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, H, W) -> (N, out, H', W')`` by one path of :data:`CONV_KERNELS` (but ``"auto"``)."""
        if path == "dense":
            return self.convolve(x, self.packed("dense", x), bias)
        if path == "blocks":
            return self.packed("blocks", x)(self, x, bias)
        if path == "unfold":
            height, width = self.output_size(x.shape[-2], x.shape[-1])
            flat = FrozenGBLRLinear.run(self, "tiled", self.unfold(x))
            y = self.fold_output(flat, x.shape[0], height, width)
            return y if bias is None else y + bias[:, None, None]
        if path == "reference":
            return self.convolve(x, self.weight.to(x.dtype), bias)
        raise ValueError(f"path must be one of {CONV_KERNELS[1:]}, got {path!r}")

    def path_for(self, tokens: int, x: torch.Tensor | None = None) -> str:
        raise TypeError("a convolution's path depends on the image batch, not a token count: use path_for_batch(x)")

    def predicted_costs(self, x: torch.Tensor) -> dict[str, choice.Cost]:
        """The cost models of the paths of :data:`CONV_MEASURED_PATHS` for images like ``x``
        (:class:`gblr.kernels.choice.Cost`), per image: MACs over the output pixels of one image."""
        height, width = self.output_size(x.shape[-2], x.shape[-1])
        blocks = self.packed("blocks", x)
        block_macs = sum(kernel.numel() for *_, kernel in blocks.runs) + blocks.mixing.numel()
        return {"dense": choice.Cost(self.in_features * self.out_features * height * width, 1, x.device.type),
                "blocks": choice.Cost(block_macs * height * width, len(blocks.runs) + 2, x.device.type)}

    def path_for_batch(self, x: torch.Tensor) -> str:
        """The path a forward pass over the batch ``x`` takes: ``kernel``, or with
        ``kernel="auto"`` the fastest of the paths of :data:`CONV_MEASURED_PATHS` that the cost
        model finds plausible (:meth:`predicted_costs`; dense always), timed on ``x`` once per
        device, dtype, power-of-two bucket of the batch size and input size, and measured again
        when its calls drift far from that time (:class:`gblr.kernels.choice.Watch`)."""
        if x.shape[0] == 0:
            return "reference"
        if self.kernel != "auto":
            return self.kernel
        key = self.choice_key(x)
        if key not in self.choices:
            with torch.no_grad():
                self.choices[key] = choice.choose(self.run, self.predicted_costs(x), x, x.shape[0])
        return self.choices[key].path

    def observe_batch(self, x: torch.Tensor, seconds: float) -> None:
        """Tell the watch a call on the batch ``x`` took ``seconds`` (see :meth:`FrozenGBLRLinear.observe`)."""
        self._watch_call(self.choice_key(x), x.shape[0], seconds)

    def choice_key(self, x: torch.Tensor) -> tuple:
        return choice.choice_key(x.shape[0], x.device, x.dtype) + tuple(x.shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.check_image(x)
        check_input_dtype(x, self.dtype, self)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):  # as FrozenGBLRLinear: all in the compute dtype
            batch = batch.to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            if needs_grad or torch.compiler.is_compiling():
                if needs_grad:
                    self.refresh()
                y = self.run("reference", batch, bias)
            else:
                path = self.path_for_batch(batch)
                start = time.perf_counter()
                y = self.run(path, batch, bias)
                if self.kernel == "auto" and batch.device.type == "cpu":
                    self.observe_batch(batch, time.perf_counter() - start)
        y = _remember_pixels(self, y)
        return y if x.dim() == 4 else y.squeeze(0)

    def extra_repr(self) -> str:
        return (f"{self.geometry_repr()}, bias={self.bias is not None}, blocks={len(self.supports)}, "
                f"flops_ratio={self.flops_ratio():.3f}")


def im2col_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The inputs ``x`` of the convolution ``conv`` as the rows its kernel's matrix view
    multiplies, ``(N * H' * W', in_channels * kh * kw)``: what calibration statistics count."""
    geometry = ConvGeometry.of_conv(conv)
    return geometry.unfold(geometry.check_image(x))
