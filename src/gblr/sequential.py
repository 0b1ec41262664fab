"""Sequential calibration: the repeated blocks of a model (a decoder's layers), one at a time.

    config = gblr.GBLRConfig(flops_ratio=0.5, calibration="sequential")   # the default
    gblr.convert_(model, config, calibration=batches)

One-shot calibration measures every layer's inputs on the original model; once the model is
compressed, block ``i`` sees what the compressed blocks before it produce instead, and the errors
compound unseen. Sequential calibration calibrates block ``i`` on the outputs of the already
compressed blocks ``0 .. i-1`` (as GPTQ and SVD-LLM do), and more: each layer is fitted to
reproduce the *original* model's outputs from the inputs it now gets
(:class:`gblr.stats.PairedStats`), so it also corrects the drift of the blocks before it.

1. :func:`find_stages` finds the blocks by structure, never by name: the ``nn.ModuleList`` or
   ``nn.Sequential`` of two or more modules that holds the most targets (a decoder's
   ``model.layers``, an encoder's ``encoder.layer``, the model itself if it is a Sequential).
2. :func:`check_stages` makes sure that calling the blocks one after the other, each with the
   first block's keyword arguments (masks, position embeddings, ...) and the previous block's
   output, reproduces the model's own forward on the first batch. Where it does not (a model
   that passes other arguments to each block, or runs something between them), the caller
   falls back to one-shot calibration.
3. :func:`run_stages` captures the first block's calls (a forward pre-hook with keyword
   arguments records each batch's call and stops the forward there), then, block by block,
   records its targets' input statistics while running the captured calls through it, lets the
   caller compress the block, and moves the calls on through it: its outputs are the next
   block's inputs. Paired, two streams move on: the original model's hidden states through
   the blocks as they were, the compressed model's through the blocks as compressed.

At most one block's inputs are held per stream (plus what the blocks get besides the hidden
states: masks, position embeddings). Key-value caches among the captured arguments are
dropped: a block run twice on the same batch would otherwise append to its cache twice.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ._progress import progress_bar
from .calibration import InputRecorder, call_model, new_stats, to_device, token_mask
from .stats import SplitPairedStats
from .targets import Target, module_device

__all__ = ["Stages", "check_stages", "find_stages", "run_stages"]


@dataclasses.dataclass
class Stages:
    """The repeated blocks of a model and which targets each holds."""

    path: str  # the container's name ("" for the model itself)
    container: nn.Module  # the nn.ModuleList or nn.Sequential
    names: list[str]  # its children's names, in call order
    members: list[list[Target]]  # per block, the targets all of whose names lie inside it
    outside: list[Target]  # the other targets: before or after the blocks, or shared by several

    def block(self, index: int) -> nn.Module:
        """The block now at ``index`` (read afresh: a block that is itself a target gets replaced)."""
        return getattr(self.container, self.names[index])

    def __len__(self) -> int:
        return len(self.names)

    def __str__(self) -> str:
        return f"{self.path or 'the model'} ({len(self)} blocks)"


def find_stages(model: nn.Module, targets: list[Target]) -> Stages | None:
    """The ``nn.ModuleList`` or ``nn.Sequential`` of two or more modules whose children hold the
    most targets (the outermost of equals), or None where none holds any."""
    best: Stages | None = None
    best_count = 0
    for name, container in model.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
            continue
        children = list(container.named_children())
        roots = [f"{name}.{child}" if name else child for child, _ in children]

        def block_of(path: str, roots: list[str] = roots) -> int | None:
            return next((i for i, root in enumerate(roots) if path == root or path.startswith(root + ".")), None)

        members: list[list[Target]] = [[] for _ in children]
        outside = []
        for target in targets:
            holders = {block_of(path) for path in target.names}
            if len(holders) == 1 and None not in holders:
                members[holders.pop()].append(target)
            else:
                outside.append(target)
        count = sum(len(block) for block in members)
        if count > best_count:
            best, best_count = Stages(name, container, [child for child, _ in children], members, outside), count
    return best


# -- one block call ---------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the first block."""


def _is_cache(value) -> bool:
    """A key-value cache (Hugging Face ``Cache`` and the like), recognised by its methods."""
    return not isinstance(value, torch.Tensor) and callable(getattr(value, "get_seq_length", None)) \
        and callable(getattr(value, "update", None))


@dataclasses.dataclass
class _Call:
    """One batch's call of a block: its positional and keyword arguments, where the hidden states
    are among them (an index into ``args`` or a keyword), the batch's real-token mask and index."""

    args: tuple
    kwargs: dict
    where: int | str
    mask: torch.Tensor | None
    batch: int

    @classmethod
    def of(cls, block: nn.Module, args: tuple, kwargs: dict, mask, batch: int) -> _Call:
        args = tuple(None if _is_cache(value) else value for value in args)
        kwargs = {key: None if _is_cache(value) else value for key, value in kwargs.items()}
        if args:
            where: int | str = 0
        else:  # called by keywords: the hidden states are the first parameter of forward that was passed
            names = [name for name in inspect.signature(block.forward).parameters if name in kwargs]
            where = names[0] if names else next(iter(kwargs), "")
        return cls(args, kwargs, where, mask, batch)

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[self.where] if isinstance(self.where, int) else self.kwargs[self.where]

    def run(self, block: nn.Module):
        return block(*self.args, **self.kwargs)

    def advance(self, output) -> None:
        """Make this the next block's call: the hidden states become ``output``'s."""
        hidden = _hidden_of(output)
        if isinstance(self.where, int):
            self.args = (hidden, *self.args[1:])
        else:
            self.kwargs[self.where] = hidden


def _hidden_of(output) -> torch.Tensor:
    """The hidden states in a block's output: the output itself, its first element (a tuple, as
    older Hugging Face layers return) or its first value (a dict or ModelOutput)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif isinstance(output, Mapping) and output:
        output = next(iter(output.values()))
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a block returned {type(output).__name__}, not hidden states (a tensor, or a tuple / dict "
                        "starting with one)")
    return output


def _capture(model: nn.Module, first: nn.Module, batches: list, progress: bool, stop: bool = True) -> list[_Call]:
    """The first block's call for every batch that reaches it (the forward stops there)."""
    calls: list[_Call] = []
    device = module_device(model)
    state = {"mask": None, "batch": 0}

    def hook(module, args, kwargs):
        calls.append(_Call.of(module, args, kwargs, state["mask"], state["batch"]))
        if stop:
            raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, batch in enumerate(progress_bar(len(batches), "gblr calibration: inputs", progress, batches)):
            batch = to_device(batch, device)
            state.update(mask=token_mask(batch), batch=index)
            try:
                call_model(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


def check_stages(model: nn.Module, stages: Stages, batch) -> str | None:
    """None if running the blocks one by one on ``batch`` (as :func:`run_stages` does) gives
    what the model's own forward gives at the last block's output; otherwise why not. The
    model must be in eval mode, under ``torch.no_grad``."""
    outputs = []
    handle = stages.block(len(stages) - 1).register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        calls = _capture(model, stages.block(0), [batch], progress=False, stop=False)
    finally:
        handle.remove()
    if not calls or not outputs:
        return f"the first batch does not run through {stages}"
    call = calls[0]
    try:
        expected = _hidden_of(outputs[-1])
        for index in range(len(stages)):
            call.advance(call.run(stages.block(index)))
    except (TypeError, ValueError, RuntimeError) as error:
        return f"running the blocks of {stages} one by one fails: {error}"
    found = call.hidden
    if found.shape != expected.shape:
        return f"the blocks of {stages} run one by one give shape {tuple(found.shape)}, the model {tuple(expected.shape)}"
    finite = torch.isfinite(expected)  # (a model with NaN weights fails later, naming the layer)
    if not torch.equal(finite, torch.isfinite(found)):
        return f"the blocks of {stages} run one by one give non-finite values elsewhere than the model's forward"
    found, expected = found[finite].double(), expected[finite].double()
    difference = float((found - expected).norm() / expected.norm().clamp_min(1e-30))
    if not difference <= 1e-3:
        return (f"the blocks of {stages} run one by one, each with the first block's keyword arguments, give another "
                f"output than the model's forward (relative difference {difference:.3g})")
    return None


class _PairedRecorder(InputRecorder):
    """Records the targets' inputs of one batch in two runs of a block: first on the original
    model's hidden states (``original = True``: kept), then on the compressed model's (paired
    with the kept ones, in call order, into each target's :class:`SplitPairedStats`)."""

    def __init__(self, targets: list[Target], stats: dict[str, SplitPairedStats]) -> None:
        super().__init__(targets, stats)
        self.original = True
        self.kept: dict[str, list[torch.Tensor]] = {target.name: [] for target in targets}

    def record(self, name: str, inputs: torch.Tensor) -> None:
        if self.original:
            self.kept[name].append(inputs)
        elif self.kept[name]:
            self.stats[name].update(inputs, self.kept[name].pop(0))


def run_stages(
    model: nn.Module,
    stages: Stages,
    batches: list,
    on_block: Callable[[int, dict], None],
    paired: bool,
    progress: bool = True,
    description: str = "gblr calibration",
) -> None:
    """Run ``batches`` through ``stages`` block by block and call ``on_block(index, stats)`` for
    each block, with statistics of its targets' inputs by target name (some perhaps without
    tokens). The model must be in eval mode, under ``torch.no_grad``.

    Without ``paired``: :class:`InputStats` of the model as it is, statistics and the next
    block's inputs from one pass; ``on_block`` must not change the block. With ``paired``: two
    streams of hidden states go through the blocks, the original model's (through each block as
    it was) and the compressed model's (through each block as ``on_block`` left it), and the
    statistics are :class:`SplitPairedStats` of the targets' inputs in both, token by token. Both
    streams start from the first block's captured calls; twice one block's inputs are held.
    """
    calls = _capture(model, stages.block(0), batches, progress)
    originals = [dataclasses.replace(call, kwargs=dict(call.kwargs)) for call in calls] if paired else []
    for index in progress_bar(len(stages), description, progress, range(len(stages))):
        block, targets = stages.block(index), stages.members[index]
        if not paired:
            stats = new_stats(targets)
            with InputRecorder(targets, stats) as recorder:
                for call in calls:
                    recorder.mask, recorder.batch = call.mask, call.batch
                    call.advance(call.run(block))
            on_block(index, stats)
            continue
        stats = {target.name: SplitPairedStats(target.float_weight()) for target in targets}
        with _PairedRecorder(targets, stats) as recorder:
            for original, call in zip(originals, calls):
                recorder.mask, recorder.batch = call.mask, call.batch
                recorder.original = True
                original.advance(original.run(block))  # the original stream moves on through the original block
                if targets:
                    recorder.original = False
                    call.run(block)
                for kept in recorder.kept.values():
                    kept.clear()
        on_block(index, stats)
        del stats
        block = stages.block(index)  # as on_block left it (it may have replaced the block itself)
        for call in calls:
            call.advance(call.run(block))
