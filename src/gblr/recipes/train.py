"""The training recipe behind ``gblr train``: one readable loop, resumable, single- or multi-process.

    report = train(TrainConfig(dataset="fashion-mnist", model="vit", layer="gblr", flops_target=0.3,
                               epochs=3, out="runs/demo"))
    report = train(TrainConfig(dataset="text", model="gpt", data=["docs/"], seq_len=128, out="runs/lm"))

Image models classify images; the GPT predicts the next token of text windows
(:mod:`gblr.recipes.data.text`), and the same loop trains both: the loss is the cross-entropy of
every prediction (one per image, one per window position), an epoch is a pass over the training
images or ``windows_per_epoch`` random text windows, and the held-out evaluation adds bits per
byte and perplexity for text.

Writes into ``out``: ``log.csv`` (one row per epoch; TensorBoard events too if tensorboard is
installed), ``checkpoint.pt`` after every epoch (atomically; ``resume=True`` continues from it
with the same result as an uninterrupted run), and at the end ``report.json``, ``masks.png``
and ``budgets.png``. Under ``torchrun`` it trains with DistributedDataParallel: ``batch_size``
is the global batch, split across ranks, and rank 0 writes the files.

Before any work the run checks what it will need: the config (:meth:`TrainConfig.validate`),
that ``out`` is a folder it can write into, and that it does not hold another run's checkpoint
(which a new run would replace; ``resume=True`` continues it, ``overwrite=True`` deletes that
run's files first). Checkpoints hold tensors and plain data only and are read with
``torch.load(weights_only=True)``, so a checkpoint from elsewhere cannot run code
(:mod:`gblr.recipes.run_files`). Ctrl-C
raises :class:`TrainingInterrupted`, which says how many epochs the checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._files import check_writable_folder, write_atomic, write_text_atomic
from .._progress import progress_bar
from .._validation import check_flops_ratio, check_share
from ..learning import BUDGETS, SigmaSchedule, StructureLearner, param_groups
from ..frozen import FrozenGBLRLinear, freeze_
from .corpus import default_text
from .data import DATASETS, ImageData, TextData, batches, load_dataset, load_text
from .models import CONV_KINDS, LAYER_KINDS, MODELS, build_model, replaced_flops
from . import run_files
from .options import check_number, check_positive_int, check_seed, option_name

__all__ = ["TrainConfig", "TrainingInterrupted", "train", "fit", "evaluate", "evaluate_text"]

# The options that only one kind of dataset reads; set for the other kind, they are refused.
IMAGE_OPTIONS = ("data_dir", "download", "image_size")
TEXT_OPTIONS = ("data", "tokenizer")
# Dense blocks per GBLR linear layer when dense_blocks is not set: with 0.8 of the start in them,
# 4 beat none on the LM (docs/benchmarks/lm.md, 3 seeds) and on both ViTs at 3 epochs, and were
# level at 10 (fashion_mnist*.md).
DENSE_BLOCKS = 4


@dataclasses.dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"  # an image dataset, or text (for --model gpt)
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    data: list[str] | None = None  # text: files, folders, glob patterns (default: corpus.PYTHON_DOCS)
    tokenizer: str | None = None  # text: a Hugging Face tokenizer folder (default: bytes, vocabulary 256)
    model: str = "vit"  # vit, mixer, gpt (linear layers replaced) or resnet (3x3 convolutions replaced)
    layer: str = "gblr"
    flops_target: float = 0.3  # of the replaced layers; baselines are built at it, GBLR learns to it
    init_flops_ratio: float | None = None  # GBLR start; default min(1, 2 * flops_target)
    init_full_width_share: float = 0.5  # of the starting budget, in full-width GBLR components
    rank: int = 1  # rank of each GBLR component
    dense_blocks: int | None = None  # GBLR dense blocks per linear layer; default DENSE_BLOCKS (resnet: none)
    init_dense_share: float = 0.8  # of the starting budget, in the dense blocks (when there are any)
    epochs: int = 3
    batch_size: int = 128  # global, across ranks
    lr: float = 2e-3
    struct_lr: float | None = None  # default: lr
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    structure_fraction: float = 0.8
    budget: str = "global"  # GBLR: one FLOPs budget split among the layers by learning, or "per-layer"
    settle_steps: int | None = None  # end the structure phase once no support moved for this many steps
    sigma_start: float = 1.0
    sigma_end: float = 100.0
    seed: int = 0
    dim: int = 64
    depth: int = 4
    heads: int = 4
    patch_size: int = 4
    mlp_ratio: float = 2.0
    seq_len: int = 128  # gpt: tokens per window, its context
    width: int = 16  # ResNet: channels of the first stage, doubled in each of the 3 stages
    stage_depth: int = 1  # ResNet: residual blocks per stage
    limit_train: int | None = None  # images: the first N; text: N windows per epoch
    limit_test: int | None = None  # images: the first N; text: N held-out windows, evenly spaced
    eval_batch_size: int = 500  # images (text is evaluated in batches of batch_size windows)
    threads: int | None = None
    out: str = "runs/gblr"
    resume: bool = False  # continue the run in out from its checkpoint
    overwrite: bool = False  # start afresh in an out that holds a run: its files are deleted first
    stop_after: int | None = None  # stop after this many epochs (the schedule still spans all of them)
    progress: bool = True
    pictures: bool = True

    def resolved(self) -> "TrainConfig":
        """This config with the defaults that depend on other settings filled in: ``dense_blocks``
        is :data:`DENSE_BLOCKS` for GBLR linear layers and 0 otherwise (resnet, the baselines)."""
        if self.dense_blocks is not None:
            return self
        linear_gblr = self.layer == "gblr" and self.model != "resnet"
        return dataclasses.replace(self, dense_blocks=DENSE_BLOCKS if linear_gblr else 0)

    def validate(self) -> None:
        """Raise a ValueError naming the field (and its ``gblr train`` option) of the first bad value.

        Checks the values alone, without touching files: the output folder and the data are
        checked by :func:`fit`, before it trains.
        """
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)} (--dataset); got {self.dataset!r}")
        if self.layer not in LAYER_KINDS:
            raise ValueError(f"layer must be one of {', '.join(LAYER_KINDS)} (--layer); got {self.layer!r}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)} (--model); got {self.model!r}")
        check_flops_ratio(self.flops_target, option_name("flops_target"))
        if self.init_flops_ratio is not None:
            check_flops_ratio(self.init_flops_ratio, option_name("init_flops_ratio"))
        check_share(self.init_full_width_share, option_name("init_full_width_share"))
        check_share(self.init_dense_share, option_name("init_dense_share"))
        blocks = self.dense_blocks
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0):
            raise ValueError(f"{option_name('dense_blocks')} must be an int >= 0, got {self.dense_blocks!r}")
        if self.dense_blocks and self.model == "resnet":
            raise ValueError(f"{option_name('dense_blocks')} is for linear layers; resnet replaces convolutions "
                             "(GBLRConv2d has no dense blocks)")
        check_share(self.structure_fraction, option_name("structure_fraction"))
        if self.budget not in BUDGETS:
            raise ValueError(f"{option_name('budget')} must be one of {', '.join(BUDGETS)}; got {self.budget!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "rank", "dim", "depth", "heads", "patch_size", "width",
                     "stage_depth", "seq_len"):
            check_positive_int(self, name)
        for name in ("image_size", "limit_train", "limit_test", "threads", "stop_after", "settle_steps"):  # None: not set
            check_positive_int(self, name, optional=True)
        for name in ("lr", "mlp_ratio", "sigma_start", "sigma_end", "struct_lr"):  # struct_lr None: lr
            check_number(self, name, positive=True, optional=name == "struct_lr")
        for name in ("weight_decay", "warmup_epochs"):
            check_number(self, name, positive=False)
        check_seed(self)
        if MODELS[self.model].layer_argument == "conv" and self.layer not in CONV_KINDS:
            raise ValueError(f"there is no {self.layer} convolution: the {self.model} model takes {option_name('layer')} "
                             f"{', '.join(CONV_KINDS)}; got {self.layer!r}")
        text = self.dataset == "text"
        if text != (MODELS[self.model].inputs == "tokens"):
            wants = "text" if MODELS[self.model].inputs == "tokens" else "an image dataset"
            raise ValueError(f"{option_name('model')} {self.model} trains on {wants} ({option_name('dataset')}), got "
                             f"--dataset {self.dataset}")
        defaults = TrainConfig()
        for name in IMAGE_OPTIONS if text else TEXT_OPTIONS:
            if getattr(self, name) != getattr(defaults, name):
                reads = "image datasets" if text else "--dataset text"
                raise ValueError(f"{option_name(name)} is read by {reads} only, not by --dataset {self.dataset}")
        if self.model in ("vit", "gpt") and self.dim % self.heads:
            raise ValueError(f"{option_name('dim')} must be divisible by {option_name('heads')}: "
                             f"{self.dim} by {self.heads}")
        if self.dataset == "imagefolder":
            for name, missing in (("data_dir", self.data_dir is None), ("image_size", self.image_size is None)):
                if missing:
                    raise ValueError(f"the imagefolder dataset needs {option_name(name)}")
            if self.download:
                raise ValueError(f"the imagefolder dataset cannot be downloaded ({option_name('download')}); point "
                                 f"{option_name('data_dir')} at an existing image tree")
        if self.resume and self.overwrite:
            raise ValueError(f"{option_name('resume')} and {option_name('overwrite')} exclude each other: continue "
                             "the run in out, or start it afresh")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit`. ``out/checkpoint.pt`` holds ``epochs_saved`` of ``epochs``
    epochs (0: none was finished, so there is nothing to resume), and ``resume=True`` with the
    same settings continues from it, with the same result as an uninterrupted run (the epoch that
    was interrupted is trained again from its start)."""

    def __init__(self, out: Path, epochs_saved: int, epochs: int) -> None:
        self.out, self.epochs_saved, self.epochs = Path(out), epochs_saved, epochs
        if epochs_saved:
            message = (f"interrupted; {self.out / 'checkpoint.pt'} holds {epochs_saved} of {epochs} epochs: continue "
                       f"with the same options and --resume")
        else:
            message = "interrupted before the first epoch ended; nothing was saved to resume from"
        super().__init__(message)


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


@torch.no_grad()
def _totals(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> tuple[float, int, int]:
    """``(nats, correct, predictions)`` over ``inputs`` in batches, the model in eval mode: the summed
    cross-entropy, the correct top-1 predictions and the number of predictions (one per image, one
    per position of a text window)."""
    was_training = model.training
    model.eval()
    nats, correct = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size]).flatten(0, -2)
        labels = targets[start : start + batch_size].flatten()
        nats += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return nats, correct, targets.numel()


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy."""
    return _totals(model, images, labels, batch_size)[1] / max(1, len(images))


def evaluate_text(model: nn.Module, data: TextData, batch_size: int) -> dict:
    """A language model on the held-out windows of ``data`` (:meth:`TextData.test_windows`):
    ``bits_per_byte`` (the summed cross-entropy in nats / ln 2 / the UTF-8 bytes the predicted
    tokens decode to; for byte tokens the mean nats per token / ln 2), ``perplexity`` (per token:
    exp of the mean nats per token) and ``accuracy`` (of the next-token predictions, top-1)."""
    inputs, targets = data.test_windows()
    nats, correct, count = _totals(model, inputs, targets, batch_size)
    return {"accuracy": correct / count, "bits_per_byte": nats / math.log(2) / data.test_bytes,
            "perplexity": math.exp(nats / count)}


def _held_out(model: nn.Module, data: ImageData | TextData, config: TrainConfig) -> dict:
    """The held-out metrics: ``accuracy``; for text also ``bits_per_byte`` and ``perplexity``."""
    if isinstance(data, TextData):
        return evaluate_text(model, data, config.batch_size)
    return {"accuracy": evaluate(model, data.test_images, data.test_labels, config.eval_batch_size)}


def _schedule(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _load_data(config: TrainConfig) -> ImageData | TextData:
    if config.dataset == "text":
        paths = default_text("--data") if config.data is None else config.data
        # The same held-out files whatever --seed: runs of several seeds are judged on one text.
        data = load_text(paths, config.seq_len, config.tokenizer, seed=0)
        return dataclasses.replace(data, windows_per_epoch=config.limit_train or data.windows_per_epoch,
                                   test_limit=config.limit_test)
    data = load_dataset(config.dataset, config.data_dir, config.download, config.image_size).normalized()
    if config.limit_train is not None:
        limit = config.limit_train
        data = dataclasses.replace(data, train_images=data.train_images[:limit], train_labels=data.train_labels[:limit])
    if config.limit_test is not None:
        data = dataclasses.replace(
            data, test_images=data.test_images[: config.limit_test], test_labels=data.test_labels[: config.limit_test]
        )
    return data


def train(config: TrainConfig) -> dict:
    """Train, freeze, evaluate and report. Returns the report (also written to ``report.json``;
    empty when ``stop_after`` ended the run early)."""
    return fit(config)[1]


def fit(config: TrainConfig) -> tuple[nn.Module, dict]:
    """:func:`train`, also returning the (frozen, if GBLR) model.

    Raises ValueError or OSError (a bad setting, an unusable output folder or data folder, a
    checkpoint that is not one or belongs to other settings, ``out`` holding a run while neither
    ``resume`` nor ``overwrite`` is set), FileNotFoundError (no data), ImportError (``tokenizer``
    without transformers) before training, and :class:`TrainingInterrupted` on Ctrl-C.
    """
    config.validate()
    config = config.resolved()
    rank, world = _distributed()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} (--batch-size) must be divisible by the number of processes "
                         f"({world})")
    if config.threads:
        torch.set_num_threads(config.threads)
    main = rank == 0
    out = Path(config.out)
    started = time.perf_counter()

    # Everything a run needs from the file system is checked before the data is even loaded.
    if config.data_dir is not None:
        folder = Path(config.data_dir)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{option_name('data_dir')}: {folder} is a file, not a folder")
        if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
            raise PermissionError(f"{option_name('data_dir')}: cannot read {folder} (permission denied)")
    check_writable_folder(out, option_name("out"))
    checkpoint_path = out / "checkpoint.pt"
    state = run_files.previous_run(config, out, checkpoint_path, main)  # None: a new run

    data = _load_data(config)
    text = isinstance(data, TextData)
    if config.model == "resnet":
        architecture = {"width": config.width, "depth": (config.stage_depth,) * 3}
    else:
        architecture = {"dim": config.dim, "depth": config.depth}
        if not text:
            if data.image_shape[-1] % config.patch_size or data.image_shape[-2] % config.patch_size:
                raise ValueError(f"{option_name('patch_size')} must divide the image size {data.image_shape[-2]}x"
                                 f"{data.image_shape[-1]}, got {config.patch_size}")
            architecture["patch_size"] = config.patch_size
        if config.model in ("vit", "gpt"):
            architecture.update(heads=config.heads, mlp_ratio=config.mlp_ratio)
    torch.manual_seed(config.seed)  # the same initial model on every rank
    layer_options = {"init_flops_ratio": config.init_flops_ratio, "init_full_width_share": config.init_full_width_share,
                     "rank": config.rank} if config.layer == "gblr" else {}
    if config.layer == "gblr" and config.dense_blocks:
        layer_options.update(dense_blocks=config.dense_blocks, init_dense_share=config.init_dense_share)
    input_shape, classes = ((config.seq_len,), data.vocab_size) if text else (data.image_shape, data.num_classes)
    model = build_model(
        config.model, input_shape, classes, layer=config.layer, flops_ratio=config.flops_target,
        layer_options=layer_options, **architecture,
    )

    examples = data.windows_per_epoch if text else len(data.train_images)
    steps_per_epoch = examples // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the training set ({examples} "
                         f"{'windows per epoch' if text else 'images'}; --batch-size, --limit-train)")
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(  # foreach: one call per group instead of one per tensor (also on CPU)
        param_groups(model, lr=config.lr, struct_lr=config.struct_lr, weight_decay=config.weight_decay), foreach=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total_steps, int(config.warmup_epochs * steps_per_epoch))
    )
    learner = (
        StructureLearner(
            model, optimizer, config.flops_target, total_steps, structure_fraction=config.structure_fraction,
            settle_steps=config.settle_steps, budget=config.budget,
            sigma_schedule=SigmaSchedule(config.sigma_start, config.sigma_end),
        )
        if config.layer == "gblr"
        else None
    )
    network = nn.parallel.DistributedDataParallel(model) if world > 1 else model

    start_epoch, rows, seconds_so_far = 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if learner is not None:
            learner.load_state_dict(state["learner"])
        torch.set_rng_state(state["rng"])
        start_epoch, rows, seconds_so_far = state["epoch"], state["rows"], state["train_seconds"]
        if main:
            print(f"resuming {out} after epoch {start_epoch}")
    if config.overwrite and main:  # only now: a run that fails to start leaves the previous one alone
        run_files.delete_run_files(out)
    log = run_files.EpochLog(out, rows, enabled=main)
    epochs_saved = start_epoch  # how many epochs the checkpoint in out holds
    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)
    try:
        for epoch in range(start_epoch, last_epoch):
            epoch_start = time.perf_counter()
            network.train()
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
            bar = progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", config.progress and main)
            loss_sum = torch.zeros(())
            correct = torch.zeros(())
            seen = 0
            try:
                for inputs, labels in _epoch_batches(data, config, generator, rank, world):
                    # one prediction per image, or per window position: (predictions, classes)
                    logits, labels = network(inputs).flatten(0, -2), labels.flatten()
                    loss = F.cross_entropy(logits, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    if learner is not None:
                        learner.step()
                    loss_sum += loss.detach() * len(labels)
                    correct += (logits.detach().argmax(-1) == labels).sum()
                    seen += len(labels)
                    bar.update()
                    if not bar.disable:  # loss.item() waits for the device: only when the bar shows it
                        if learner is not None:
                            bar.set_postfix(loss=f"{loss.item():.3f}", flops=f"{learner.last['flops_ratio']:.3f}")
                        else:
                            bar.set_postfix(loss=f"{loss.item():.3f}")
            finally:
                bar.close()  # also on Ctrl-C, so that a message after it starts on a line of its own
            totals = torch.stack([loss_sum, correct, torch.tensor(float(seen))])
            if world > 1:
                dist.all_reduce(totals)
            train_seconds = time.perf_counter() - epoch_start
            seconds_so_far += train_seconds
            metrics = _held_out(model, data, config)
            row = {
                "epoch": epoch + 1,
                "train_loss": float(totals[0] / totals[2]),
                "train_accuracy": float(totals[1] / totals[2]),
                "test_accuracy": metrics["accuracy"],
                **{name: value for name, value in metrics.items() if name != "accuracy"},  # text: bits_per_byte, ...
                "flops_ratio": replaced_flops(model).ratio,
                "sigma": (learner.last.get("sigma", float("nan")) if learner is not None else float("nan")),
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": train_seconds,
            }
            log.add(row)
            if main:
                bits = f", held-out {metrics['bits_per_byte']:.4f} bits per byte" if text else ""
                print(
                    f"epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f}, train "
                    f"{row['train_accuracy']:.4f}, test {metrics['accuracy']:.4f}{bits}, FLOPs ratio "
                    f"{row['flops_ratio']:.3f}, {train_seconds:.1f} s",
                    flush=True,
                )
                # Tensors and plain data only (no pickled objects): it loads with weights_only=True.
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "learner": None if learner is None else learner.state_dict(),
                    "rng": torch.get_rng_state(),
                    "epoch": epoch + 1,
                    "rows": log.rows,
                    "train_seconds": seconds_so_far,
                    "config": dataclasses.asdict(config),
                }
                write_atomic(checkpoint_path, lambda handle: torch.save(state, handle))
            epochs_saved = epoch + 1

        finished = last_epoch == config.epochs
        report = _finish(config, model, learner, data, rows, seconds_so_far, started, main) if finished else {}
    except KeyboardInterrupt as interrupt:
        # Ctrl-C: the checkpoint of the last finished epoch is in place (written atomically, so a
        # Ctrl-C while writing it leaves the previous one); say how much of the run it holds.
        raise TrainingInterrupted(out, epochs_saved, config.epochs) from interrupt
    finally:
        log.close()
    if world > 1:
        dist.barrier()
    return model, report


def _epoch_batches(data: ImageData | TextData, config: TrainConfig, generator: torch.Generator, rank: int,
                   world: int):
    """One epoch's minibatches ``(inputs, targets)`` for this rank: shuffled images, or random text windows."""
    if isinstance(data, TextData):
        return data.train_batches(config.batch_size, generator, rank, world)
    return batches(data.train_images, data.train_labels, config.batch_size, shuffle=True, generator=generator,
                   rank=rank, world_size=world, drop_last=True)


def _dataset_entry(data: ImageData | TextData) -> dict:
    if isinstance(data, ImageData):
        return {"name": data.name, "train": len(data.train_images), "test": len(data.test_images)}
    return {"name": data.name, "tokenizer": data.tokenizer.name, "vocab_size": data.vocab_size,
            "train_files": len(data.train_files), "train_tokens": len(data.train_tokens),
            "windows_per_epoch": data.windows_per_epoch, "test_files": [str(path) for path in data.test_files],
            "test_tokens": data.test_windows()[1].numel(), "test_bytes": data.test_bytes}


def _finish(config, model, learner, data, rows, train_seconds, started, main) -> dict:
    eval_start = time.perf_counter()
    unfrozen = _held_out(model, data, config)
    if config.layer == "gblr":
        freeze_(model)
    metrics = _held_out(model, data, config)
    eval_seconds = time.perf_counter() - eval_start
    flops = replaced_flops(model)
    out = Path(config.out)
    report = {
        **metrics,  # accuracy; text: bits_per_byte, perplexity (of the frozen model)
        **{f"{name}_before_freeze": value for name, value in unfrozen.items()},
        "train_loss": rows[-1]["train_loss"] if rows else None,  # of the last epoch
        "flops_ratio": flops.ratio,
        "flops_target": config.flops_target,
        "dense_macs": flops.dense_macs,
        "macs": flops.gblr_macs,
        "layers": _layer_rows(model, flops),
        "parameters": sum(p.numel() for p in model.parameters()),
        "timings": {
            "train_seconds": train_seconds,
            "epoch_seconds": [row["epoch_seconds"] for row in rows],
            "eval_seconds": eval_seconds,
            "total_seconds": time.perf_counter() - started,
        },
        "dataset": _dataset_entry(data),
        # where the structure phase ended (earlier than planned with --settle-steps); null for baselines
        "structure_steps": None if learner is None else learner.structure_steps,
        "planned_structure_steps": None if learner is None else learner.planned_structure_steps,
        "total_steps": None if learner is None else learner.total_steps,
        "config": dataclasses.asdict(config),
        "pictures": [],
    }
    if main:
        if config.pictures:
            report["pictures"] = _pictures(model, flops, config, out)
        write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _layer_rows(model: nn.Module, flops) -> list[dict]:
    """Per replaced layer: name, shape, FLOPs ratio; for a frozen GBLR layer also how many
    blocks it kept and ``wide_macs_share``, the share of its MACs in blocks that span at least
    half of the layer's rows and half of its columns (low-rank-like bands, as opposed to local
    blocks), and ``dense_macs_share``, the share in blocks deployed as one dense matrix (dense
    blocks, and components whose support is cheaper as a dense block)."""
    frozen = {f"blocks.{name}": module for name, module in model.blocks.named_modules()
              if isinstance(module, FrozenGBLRLinear)}
    rows = []
    for layer in flops:
        row = {"name": layer.name, "shape": list(layer.shape), "flops_ratio": layer.ratio}
        if layer.name in frozen:
            module = frozen[layer.name]
            wide = sum(block_macs for support, block_macs in module.block_macs()
                       if 2 * support.in_width >= module.in_features and 2 * support.out_width >= module.out_features)
            dense = sum(support.in_width * support.out_width for support, _, right in module.blocks() if right is None)
            row.update(blocks=len(module.supports), wide_macs_share=wide / max(1, layer.gblr_macs),
                       dense_macs_share=dense / max(1, layer.gblr_macs))
        rows.append(row)
    return rows


def _pictures(model, flops, config, out: Path) -> list[str]:
    try:
        from ..viz import plot_budgets, plot_masks
    except ImportError:
        return []
    paths = []
    try:
        if config.layer == "gblr":
            paths.append(str(plot_masks(model, out / "masks.png")))
        paths.append(str(plot_budgets(flops, out / "budgets.png", target=config.flops_target)))
    except ImportError as error:
        print(f"no pictures: {error}")
    return paths
