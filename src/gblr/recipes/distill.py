"""Distillation: recover a compressed model's outputs by matching the original's.

    teacher = copy.deepcopy(model)
    gblr.convert_(model, gblr.GBLRConfig(flops_ratio=0.5), calibration=batches)
    losses = gblr.distill(model, teacher, batches, steps=500)

The student is trained to reproduce the teacher's outputs on ``batches`` (cycled over for
``steps`` steps): for Hugging Face-style dict batches with an ``attention_mask``, the mean-pooled
last hidden state (the sentence embedding); otherwise the raw output tensor. The teacher is only
run in eval mode under ``torch.no_grad``; its outputs are cached per distinct batch up to
``teacher_cache_mb`` (a causal LM's logits are large: ``batch * seq_len * vocab * 4`` bytes), and
the batches beyond it are run through the teacher again at every step that uses them.

Choices:

* By default only the parameters of the GBLR layers (trainable and frozen) train; everything
  else (embeddings, norms, dense layers left by ``convert_``) stays as in the teacher, frozen
  for the run and its ``requires_grad`` flags restored afterwards. So the layers that
  :func:`gblr.save_pretrained` writes carry the whole change, and ``load_pretrained`` into the
  base model reproduces the distilled student exactly. ``train_all=True`` trains every parameter.
* The student runs in **eval mode** with gradients on. Dropout would make the student's output a
  noisy estimate of the deterministic target and only adds variance on a small calibration set,
  and the model is judged (and deployed) in eval mode; so dropout stays off.
* Every :class:`GBLRLinear` is kept at ``sigma=None`` (exact boxcars): distillation fine-tunes
  the structure that will be deployed, so :func:`gblr.freeze_` afterwards changes nothing.
* **The FLOPs never grow.** With ``train_structure`` the widths and locations get their own
  AdamW group (:func:`gblr.param_groups`) and, after every step, each layer whose cost rose above
  its cost at the start is projected back: its structural parameters move only as far along this
  step's update (a bisection on the fraction of the step) as keeps ``layer.flops()`` within its
  starting cost. :class:`gblr.StructureLearner` is not used: it steers a *global*, estimated
  budget (budget may move between layers) and smooths masks, whereas here every layer keeps an
  exact per-layer bound at sigma=None. Without ``train_structure`` the structural parameters are
  frozen (``requires_grad=False``) during the run and their flags restored afterwards.
* Learning rate: linear warm-up over the first few steps (5%, at most 100), then cosine decay to
  zero over the run; with ``max_seconds`` the decay follows whichever of steps or time runs out
  first, so a time-limited run still ends at a low learning rate.

Imports only torch and the gblr core (no transformers).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress_bar
from .._validation import check_finite_number
from ..learning import gblr_layers, param_groups
from ..frozen import FrozenGBLRLinear
from ..linear import GBLRLinear, check_finite_structure
from .text import sentence_output

__all__ = ["LOSSES", "WARMUP", "WARMUP_STEPS", "distill", "lr_factor", "token_kl"]

LOSSES = ("cosine", "mse", "kl")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between the softmax distributions over the
    last dimension (a language model's next-token distributions, from its logits)."""
    student_log = F.log_softmax(student_logits.float(), dim=-1)
    teacher_log = F.log_softmax(teacher_logits.float(), dim=-1)
    positions = student_log.numel() // student_log.shape[-1]
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="sum") / positions


def _loss_fn(loss) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(loss):
        return loss
    if loss == "cosine":
        return lambda student, teacher: 1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()
    if loss == "mse":
        return lambda student, teacher: F.mse_loss(student.float(), teacher.float())
    if loss == "kl":
        return token_kl
    raise ValueError(f"loss must be one of {', '.join(LOSSES)} or a callable(student_out, teacher_out), got {loss!r}")


WARMUP = 0.05  # of the run (steps, or time with max_seconds), and at most WARMUP_STEPS steps
WARMUP_STEPS = 100


def lr_factor(step: int, steps: int, elapsed: float = 0.0, max_seconds: float | None = None) -> float:
    """The learning rate of step ``step`` (from 0) as a fraction of the peak: a linear warm-up over
    the first :data:`WARMUP` of the run (at most :data:`WARMUP_STEPS` steps), then a cosine decay
    to zero at its end. The run's progress is ``step / steps``, or with ``max_seconds`` whichever
    of that and ``elapsed / max_seconds`` is further: a run bounded by time (``steps`` a mere
    upper bound) warms up and decays by the clock."""
    fraction = step / steps if max_seconds is None else max(step / steps, elapsed / max_seconds)
    warm = (step + 1) / max(1, min(WARMUP_STEPS, steps // round(1 / WARMUP)))
    if max_seconds is not None:
        warm = max(warm, elapsed / (WARMUP * max_seconds))
    return min(1.0, warm) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, fraction)))


class _FlopsBound:
    """Per-layer cost bounds at the start; :meth:`project` pulls a layer's structure back along
    the last update until its cost is within its bound."""

    def __init__(self, layers: list[GBLRLinear]) -> None:
        self.layers = layers
        self.bounds = [layer.flops() for layer in layers]
        self.before: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def remember(self) -> None:
        self.before = [[p.detach().clone() for p in layer.structural_parameters()] for layer in self.layers]

    @torch.no_grad()
    def project(self) -> None:
        for layer, bound, old in zip(self.layers, self.bounds, self.before):
            parameters = layer.structural_parameters()
            layer.in_width.clamp_(0.0, 1.0)
            layer.out_width.clamp_(0.0, 1.0)
            if layer.flops() <= bound:
                self._wrap(layer)
                continue
            new = [p.detach().clone() for p in parameters]
            low, high = 0.0, 1.0  # fraction of the step: low is feasible, high is not
            for _ in range(12):
                middle = 0.5 * (low + high)
                self._set(parameters, old, new, middle)
                if layer.flops() <= bound:
                    low = middle
                else:
                    high = middle
            self._set(parameters, old, new, low)
            self._wrap(layer)

    @staticmethod
    def _set(parameters, old, new, fraction: float) -> None:
        for parameter, start, end in zip(parameters, old, new):
            parameter.copy_(start + fraction * (end - start))

    @staticmethod
    def _wrap(layer: GBLRLinear) -> None:
        layer.in_location.remainder_(1.0)
        layer.out_location.remainder_(1.0)

    def flops(self) -> int:
        return sum(layer.flops() for layer in self.layers)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable,
    steps: int,
    *,
    lr: float = 1e-4,
    struct_lr: float | None = None,
    loss: str | Callable = "cosine",
    output_fn: Callable | None = None,
    train_structure: bool = True,
    train_all: bool = False,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    max_seconds: float | None = None,
    progress: bool = True,
    log_every: int = 0,
    teacher_cache_mb: float = 2048.0,
) -> list[float]:
    """Train ``student`` to reproduce ``teacher``'s outputs; returns the loss of every step.

    Args:
        student: the model to train (e.g. after :func:`gblr.convert_`), in place.
        teacher: the reference model; never changed.
        batches: a list (or iterable, read once) of inputs: tensors, or dicts passed as
            ``model(**batch)``; cycled over in order.
        steps: optimizer steps (at most; see ``max_seconds``).
        lr: peak learning rate of the contents (AdamW).
        struct_lr: learning rate of widths and locations (default ``lr``).
        loss: ``"cosine"`` (1 - mean cosine similarity over the last dimension), ``"mse"``,
            ``"kl"`` (:func:`token_kl`: outputs are logits, e.g. ``output_fn=logits_output`` of a
            causal LM: the mean KL divergence of the student's next-token distributions from the
            teacher's), or a callable ``(student_out, teacher_out) -> scalar``.
        output_fn: ``output_fn(model, batch) -> Tensor`` compared between the two models; default
            :func:`gblr.recipes.text.sentence_output` (mean-pooled last hidden state for dict
            batches with an attention mask, the raw output otherwise).
        train_structure: also train widths and locations (each layer's FLOPs bounded by its
            starting FLOPs); otherwise they are frozen.
        train_all: train every parameter of the student, not only those of its GBLR layers.
        weight_decay: AdamW weight decay of the matrices (default 0: stay near the teacher).
        max_grad_norm: gradient-norm clipping (None: off).
        max_seconds: stop after this much wall time; the schedule warms up and decays by time as well.
        progress: show a progress bar (tqdm, if installed).
        log_every: print the mean loss every this many steps (0: never).
        teacher_cache_mb: the teacher's outputs are kept for the batches they fit in this many
            MiB (first come, first kept); the others are recomputed when used (0: never kept).

    See the module docstring for the choices (eval mode, sigma=None, FLOPs bound, schedule).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be a positive number or None, got {max_seconds!r}")
    if max_grad_norm is not None:
        check_finite_number("max_grad_norm", max_grad_norm, 0.0, allow_minimum=False)
    check_finite_number("teacher_cache_mb", teacher_cache_mb, 0.0)
    if student is teacher:
        raise ValueError("student and teacher are the same module; distil a copy (copy.deepcopy(teacher))")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: nothing to distil on")
    loss_fn = _loss_fn(loss)
    output_fn = output_fn or sentence_output

    layers = gblr_layers(student)
    module_names = {id(module): name or "(model)" for name, module in student.named_modules()}
    for layer in layers:
        layer.sigma = None
    structural = {id(p) for layer in layers for p in layer.structural_parameters()}
    ours = {id(p) for module in student.modules() if isinstance(module, (GBLRLinear, FrozenGBLRLinear))
            for p in module.parameters()}
    if not train_all and not ours:
        raise ValueError("the student has no GBLR layers to train (see gblr.convert_); pass train_all=True to train "
                         "all its parameters")
    everything = list(student.parameters())
    flags = [p.requires_grad for p in everything]
    teacher_was_training, student_was_training = teacher.training, student.training
    targets: dict[int, torch.Tensor] = {}  # the teacher's outputs kept, by batch index
    cached_bytes = 0
    losses: list[float] = []
    bar = None
    try:  # from here on, flags and modes are restored however the run ends
        for parameter in everything:
            if (not train_all and id(parameter) not in ours) or (not train_structure and id(parameter) in structural):
                parameter.requires_grad_(False)
        if not any(p.requires_grad for p in everything):
            raise ValueError("the student has no parameter to train (all have requires_grad=False)")
        bound = _FlopsBound([layer for layer in layers if train_structure and layer.in_width.requires_grad])
        optimizer = torch.optim.AdamW(param_groups(student, lr, struct_lr=struct_lr, weight_decay=weight_decay))
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        teacher.eval()
        student.eval()
        # bounded by time: the bar counts seconds (the step count may be a mere upper bound)
        bar = (progress_bar(steps, "distill", progress) if max_seconds is None
               else progress_bar(round(max_seconds), "distill", progress, unit="s"))
        started = shown = time.perf_counter()
        for step in range(steps):
            elapsed = time.perf_counter() - started
            if max_seconds is not None and elapsed >= max_seconds:
                break
            factor = lr_factor(step, steps, elapsed, max_seconds)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor

            index = step % len(batches)
            target = targets.get(index)
            if target is None:
                with torch.no_grad():
                    target = output_fn(teacher, batches[index]).detach()
                size = target.numel() * target.element_size()
                if cached_bytes + size <= teacher_cache_mb * 2**20:
                    targets[index], cached_bytes = target, cached_bytes + size
            output = output_fn(student, batches[index])
            value = loss_fn(output, target.to(output.device))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            bound.remember()
            optimizer.step()
            check_finite_structure(
                bound.layers, f"after the optimizer step of distillation step {step}",
                names=[module_names[id(layer)] for layer in bound.layers],
                cause="probably from a non-finite loss or gradient; lower lr / struct_lr or check the batches",
            )
            bound.project()

            losses.append(float(value.detach()))
            if bar is not None:
                if max_seconds is None:
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                else:
                    now = min(time.perf_counter(), started + max_seconds)
                    bar.update(round(now - started) - round(shown - started))
                    shown = now
                    bar.set_postfix(step=step + 1, loss=f"{losses[-1]:.4f}")
            if log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                print(f"distill step {step + 1}/{steps}: loss {sum(recent) / len(recent):.5f}", flush=True)
    finally:
        if bar is not None:
            bar.close()
        for parameter, flag in zip(everything, flags):
            parameter.grad = None
            parameter.requires_grad_(flag)
        teacher.train(teacher_was_training)
        student.train(student_was_training)
    return losses
