"""A training run's folder: whether a run may start there, its epoch log, what resuming reads.

A run in ``out`` writes ``log.csv`` (and TensorBoard events, if installed) and
``checkpoint.pt`` after every epoch (tensors and plain data only). A new
run refuses a folder that holds another run's checkpoint unless told to continue it
(``resume``) or to start afresh (``overwrite``, which deletes that run's files first).
Checkpoints are read with ``torch.load(weights_only=True)``, so a checkpoint from elsewhere
cannot run code, and resuming checks that the saved run had the same settings.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import sys
from pathlib import Path

import torch

from .._files import write_text_atomic

__all__ = ["EpochLog", "RESUMABLE_CHANGES", "CHECKPOINT_KEYS", "RUN_FILES", "previous_run", "delete_run_files", "read_checkpoint",
           "check_same_run"]

# Settings that may change between a run and its resumption: they do not change the result.
RESUMABLE_CHANGES = {"resume", "overwrite", "stop_after", "progress", "pictures", "out", "threads", "data_dir",
                      "download", "eval_batch_size"}

# What a checkpoint holds (all of it tensors and plain data).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "learner", "rng", "epoch", "rows", "train_seconds", "config")

# The files of a run in its folder; overwrite=True deletes them before a new run starts, so that
# none of the previous run's is left beside (or mistaken for) the new run's.
RUN_FILES = ("checkpoint.pt", "log.csv", "report.json", "masks.png", "budgets.png")


def previous_run(config, out: Path, checkpoint_path: Path, main: bool) -> dict | None:
    """The state to resume from, or None for a new run; raises if ``out`` holds a run that a new
    one would replace without being told to (``overwrite``, whose deleting waits for
    :func:`delete_run_files`, once the new run is ready to train)."""
    if config.overwrite:
        return None
    if not checkpoint_path.exists():
        if config.resume and main:
            print(f"no checkpoint in {out}: starting a new run", file=sys.stderr, flush=True)
        return None
    if not config.resume:
        raise FileExistsError(f"{out} already holds a run ({checkpoint_path.name}): pass --resume to continue it or "
                              "--overwrite to start afresh")
    state = read_checkpoint(checkpoint_path)
    check_same_run(state["config"], config, checkpoint_path)
    return state


def delete_run_files(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        events.unlink()


def read_checkpoint(path: Path) -> dict:
    """The state saved in ``path``, loaded with ``weights_only=True`` (tensors and plain data only,
    so a checkpoint from elsewhere cannot run code); a ValueError naming the file if it is not a
    checkpoint of this recipe."""
    with open(path, "rb") as handle:  # a file that cannot be opened: the OSError names it and why
        try:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as error:  # torch's messages name neither the file nor the problem plainly
            if "Weights only load failed" in str(error):
                reason = "it holds objects other than tensors and plain data, not loaded as they could run code"
            else:
                reason = "it is not a file written by torch.save, or a truncated one"
            raise ValueError(f"cannot resume (--resume) from {path}: {reason}") from error
    if not isinstance(state, dict) or not set(CHECKPOINT_KEYS) <= set(state) or not isinstance(state["config"], dict):
        raise ValueError(f"cannot resume (--resume) from {path}: it is not a checkpoint of gblr train")
    return state


def check_same_run(saved: dict, config, path: Path) -> None:
    """Raise if the run saved with config ``saved`` differs from ``config`` in a setting that changes
    the result (a setting added since then counts with its default)."""
    current = dataclasses.asdict(config)
    saved = {**dataclasses.asdict(type(config)()), **saved}  # a setting added since then had its default there
    changed = [f"{key}={saved[key]!r} there, {value!r} here" for key, value in current.items()
               if key not in RESUMABLE_CHANGES and saved[key] != value]
    if changed:
        raise ValueError(
            f"{path} belongs to a run with other settings ({'; '.join(changed)}); resume with the same settings "
            "or choose another --out"
        )


class EpochLog:
    """Epoch rows to ``log.csv`` (rewritten atomically) and, if installed, TensorBoard."""

    def __init__(self, out: Path, rows: list[dict], enabled: bool) -> None:
        self.path, self.rows, self.enabled = out / "log.csv", rows, enabled
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buffer.getvalue())
        if self.board is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, row["epoch"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
