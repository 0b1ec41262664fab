"""Calibration: collecting the second moments of layers' inputs (:mod:`gblr.stats`) from a model.

With calibration, the error a decomposition minimises is the *output* error on the calibration
activations, ``||(W - W_hat) C^(1/2)||_F`` with ``C`` the inputs' second moment, instead of the
weight error. :func:`collect_stats` gathers ``C`` for many layers at once: it runs the model on
calibration batches with forward pre-hooks on the layers (an :class:`InputRecorder`). For dict
batches with a 2-D ``attention_mask`` (Hugging Face style), inputs of shape ``(batch, tokens,
features)`` count only at the real tokens, not at the padding. :mod:`gblr.sequential` uses the
same recorder block by block. (The statistics classes are defined in :mod:`gblr.stats` and
importable from here too.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ._progress import progress_bar
from .stats import InputStats, PairedStats, SplitInputStats, SplitPairedStats
from .conv import im2col_rows
from .targets import Target, is_conv, module_device

__all__ = [
    "InputRecorder",
    "InputStats",
    "PairedStats",
    "SplitPairedStats",
    "call_model",
    "check_batches",
    "collect_stats",
    "fisher_sensitivities",
    "new_stats",
    "to_device",
    "token_mask",
    "warn_unseen",
]

def to_device(batch, device: torch.device | None):
    """``batch`` (a tensor, or dicts / tuples / lists / named tuples of them) with its tensors on
    ``device``; unchanged when ``device`` is None."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        values = [to_device(value, device) for value in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
    return batch


def call_model(model: nn.Module, batch):
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple / list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def token_mask(batch) -> torch.Tensor | None:
    """The real tokens of a dict batch with a 2-D ``attention_mask`` (bool), else None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def check_batches(calibration) -> None:
    """Refuse what is not an iterable of batches (a lone tensor or dict is one batch, not many)."""
    if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be an iterable of batches (a list, a DataLoader, ...), each a tensor, a tuple of "
            f"positional inputs or a dict of keyword inputs; got {type(calibration).__name__} (wrap one batch in a list)"
        )


class InputRecorder:
    """Forward pre-hooks that add each target's inputs to its :class:`InputStats`, while active
    (``with InputRecorder(targets, stats) as recorder: ...``; the hooks are removed on exit,
    also after an error). A subclass may override :meth:`record`, which receives the inputs.

    Set ``recorder.mask`` to the real tokens of the batch that runs next (see :func:`token_mask`)
    and ``recorder.batch`` to its index: inputs of shape ``mask.shape + (features,)`` count only
    where the mask is set, and an error names the batch and the layer.
    """

    def __init__(self, targets: list[Target], stats: dict[str, InputStats]) -> None:
        self.targets = targets
        self.stats = stats
        self.mask: torch.Tensor | None = None
        self.batch = 0
        self._handles: list = []

    def _hook_for(self, name: str):
        def hook(module, args, kwargs):
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(inputs, torch.Tensor):
                if is_conv(module):  # a convolution multiplies its kernel's matrix view by im2col rows
                    inputs = im2col_rows(module, inputs)
                elif self.mask is not None and inputs.shape[:-1] == self.mask.shape:
                    inputs = inputs[self.mask]  # real tokens only: padding never reaches the output
                try:
                    self.record(name, inputs)
                except ValueError as error:  # say where: which layer, which batch
                    raise ValueError(f"calibration batch {self.batch} (counting from 0): the inputs of layer "
                                     f"{name!r}: {error}") from None

        return hook

    def record(self, name: str, inputs: torch.Tensor) -> None:
        self.stats[name].update(inputs)

    def __enter__(self) -> InputRecorder:
        for target in self.targets:
            self._handles.append(target.module.register_forward_pre_hook(self._hook_for(target.name), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def new_stats(targets: list[Target]) -> dict[str, InputStats]:
    """An empty :class:`SplitInputStats` per target, by name, on the target's device (the held
    half lets :func:`gblr.decompose` judge its structure variants on tokens they were not fitted to)."""
    return {target.name: SplitInputStats(target.in_features, device=target.module.weight.device)
            for target in targets}


def warn_unseen(names: list[str], stacklevel: int = 4) -> None:
    """Warn that the targets ``names`` saw no input (they fall back to the weight error)."""
    if names:
        warnings.warn(
            f"{len(names)} target layer(s) saw no input during calibration and use the weight error instead: "
            f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}",
            stacklevel=stacklevel,
        )


def collect_stats(
    model: nn.Module, targets: list[Target], calibration: Iterable, progress: bool = True, warn: bool = True
) -> dict[str, InputStats]:
    """Input second moments of every target over the calibration batches, by target name.

    Each batch is moved to the model's device and called as ``model(**batch)`` (a dict),
    ``model(*batch)`` (a tuple / list) or ``model(batch)``, in eval mode without gradients. The
    forward pre-hooks are always removed and every module's training flag restored, also when
    the model fails. Targets that saw no input are left out, with a warning unless ``warn`` is
    false (they fall back to the weight error).
    """
    check_batches(calibration)
    stats = new_stats(targets)
    modes = [(module, module.training) for module in model.modules()]
    device = module_device(model)
    batches = 0
    try:
        total = len(calibration)
    except TypeError:
        total = None
    try:
        model.eval()
        with InputRecorder(targets, stats) as recorder, torch.no_grad():
            for batch in progress_bar(total, "gblr calibration", progress, calibration):
                batch = to_device(batch, device)
                recorder.mask, recorder.batch = token_mask(batch), batches
                call_model(model, batch)
                batches += 1
    finally:
        for module, mode in modes:
            module.training = mode
    if batches == 0:
        raise ValueError("calibration yielded no batches")
    if warn:
        warn_unseen([name for name, layer_stats in stats.items() if layer_stats.tokens == 0])
    return {name: layer_stats for name, layer_stats in stats.items() if layer_stats.tokens > 0}


def _next_token_pairs(logits: torch.Tensor, batch, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (P, vocabulary), next tokens (P,))`` of every position that has a real next token."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (tuple, list)) \
        else batch
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.shape != logits.shape[:-1]:
        raise ValueError("fisher labels='next-token' needs batches of token ids (a tensor, or a dict with input_ids) "
                         f"and logits at every position of them; got logits of shape {tuple(logits.shape)}")
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else mask[:, 1:] & mask[:, :-1]
    return logits[:, :-1][keep].float(), ids[:, 1:][keep]


def _logits(output) -> torch.Tensor:
    """The logits of a model's output: the output itself (a tensor) or its ``.logits``."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(
            "allocation='fisher' needs a model whose output is logits (a floating point tensor, or an object with "
            f".logits, such as a Hugging Face ...ForCausalLM's), got {type(output).__name__}; use allocation='error'"
        )
    return logits


def _per_position(tensor: torch.Tensor, conv: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer's outputs (or their gradients) as ``(positions, features)``: a convolution's
    channels last, a masked batch's real tokens only."""
    if conv:
        tensor = tensor.movedim(-3, -1)
    elif mask is not None and tensor.shape[:-1] == mask.shape:
        tensor = tensor[mask]
    return tensor.reshape(-1, tensor.shape[-1])


FISHER_LABELS = ("sampled", "next-token")


def fisher_sensitivities(
    model: nn.Module, targets: list[Target], calibration: Iterable, progress: bool = True, seed: int = 0,
    labels: str = "sampled",
) -> dict[str, float]:
    """How much the model's predictions depend on each target's output, by target name.

    The model's output must be logits (a classifier's, a language model's at every position).
    For each calibration batch, labels are drawn from the model's own predicted distribution and
    the summed cross-entropy is differentiated with respect to every target's output ``y`` (its
    gradient ``g``; averaged over such draws, ``E[g g^T]`` is the Fisher information of the
    output). A relative output error ``e`` (``E||dy||^2 = e E||y||^2``) spread evenly over the
    ``m`` output features then costs about ``e * E||y||^2 * E||g||^2 / m`` of the expected KL
    divergence of the predictions (to second order), so this returns ``E||y||^2 E||g||^2 / m``
    (means over the positions: tokens, a convolution's output pixels). No labels are needed.
    ``labels="next-token"`` (causal LMs) uses the batch's own next tokens instead of drawn ones
    (the empirical Fisher): each position's logits against the token that follows it.
    The model runs in eval mode; its parameters get no gradients.
    """
    check_batches(calibration)
    if labels not in FISHER_LABELS:
        raise ValueError(f"labels must be one of {FISHER_LABELS}, got {labels!r}")
    outputs: dict[str, list[torch.Tensor]] = {target.name: [] for target in targets}
    sums = {target.name: [0.0, 0.0, 0] for target in targets}  # sum ||y||^2, sum ||g||^2, positions
    conv = {target.name: target.is_conv for target in targets}
    weights = [(target.module.weight, target.module.weight.requires_grad) for target in targets]
    modes = [(module, module.training) for module in model.modules()]
    handles = [target.module.register_forward_hook(lambda module, args, output, name=target.name:
                                                   outputs[name].append(output)) for target in targets]
    device = module_device(model)
    generator = None
    try:
        model.eval()
        for weight, _ in weights:  # so that the outputs are part of the autograd graph
            weight.requires_grad_(True)
        with torch.enable_grad():
            total = len(calibration) if hasattr(calibration, "__len__") else None
            for batch in progress_bar(total, "gblr calibration: sensitivities", progress, calibration):
                batch = to_device(batch, device)
                mask = token_mask(batch)
                logits = _logits(call_model(model, batch))
                if labels == "next-token":
                    flat, drawn = _next_token_pairs(logits, batch, mask)
                else:
                    if mask is not None and logits.shape[:-1] == mask.shape:
                        logits = logits[mask]
                    flat = logits.reshape(-1, logits.shape[-1]).float()
                    if generator is None:
                        generator = torch.Generator(device=flat.device).manual_seed(seed)
                    drawn = torch.multinomial(flat.detach().softmax(-1), 1, generator=generator).squeeze(1)
                seen = [(name, y) for name, ys in outputs.items() for y in ys if y.requires_grad]
                loss = F.cross_entropy(flat, drawn, reduction="sum")
                grads = torch.autograd.grad(loss, [y for _, y in seen], allow_unused=True)
                for (name, y), g in zip(seen, grads):
                    if g is None:
                        continue
                    y, g = _per_position(y.detach(), conv[name], mask), _per_position(g, conv[name], mask)
                    entry = sums[name]
                    entry[0] += float(y.double().square().sum())
                    entry[1] += float(g.double().square().sum())
                    entry[2] += y.shape[0]
                for ys in outputs.values():
                    ys.clear()
    finally:
        for handle in handles:
            handle.remove()
        for weight, flag in weights:
            weight.requires_grad_(flag)
        for module, training in modes:
            module.training = training
    sensitivities = {}
    for target in targets:
        outputs_energy, gradients_energy, positions = sums[target.name]
        sensitivities[target.name] = (outputs_energy / positions) * (gradients_energy / positions) / target.out_features \
            if positions else 0.0
    return sensitivities
