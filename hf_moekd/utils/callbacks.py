"""Trainer callbacks: `CSVLoggerCallback` writes the log history to a CSV file; `EpochProgressCallback` shows
one progress bar of epochs for runs that keep the Trainer's own output quiet."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

CSV_NAME = "log_history.csv"


class CSVLoggerCallback(TrainerCallback):
    """Write every log line of the Trainer (`state.log_history`: loss, each `loss_<term>` a `DistillationTrainer`
    logs, learning rate, evaluation metrics, ...) to `<output_dir>/log_history.csv`, one row per line.

    Columns are `step`, `epoch`, then every other key in the order it first appears; a row leaves out the keys its
    line has not. Rows are appended as they are logged (the file is rewritten when a new key appears), so the file is
    current during training; a resumed run starts it with the history of its checkpoint. Main process only.

        trainer = DistillationTrainer(..., callbacks=[CSVLoggerCallback()])
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._columns: list[str] = []
        self._written = 0  # rows of log_history already in the file

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        path = self.path or Path(args.output_dir) / CSV_NAME
        rows = state.log_history
        if self._written > len(rows) or not path.is_file():  # a new file, or a history that started again
            self._columns, self._written = [], 0
        columns = list(dict.fromkeys(["step", "epoch", *self._columns, *(k for row in rows[self._written:] for k in row)]))
        if columns != self._columns or not self._written:  # new keys: rewrite the whole file
            self._columns, self._written, mode = columns, 0, "w"
        else:
            mode = "a"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows[self._written:])
        self._written = len(rows)


class EpochProgressCallback(TrainerCallback):
    """A progress bar of epochs (`desc`: what is training), closed when training ends; main process only."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=math.ceil(state.num_train_epochs or args.num_train_epochs), desc=self.desc,
                            unit="epoch", leave=False)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
