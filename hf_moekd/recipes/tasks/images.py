"""`--task image-classification`: your images (`--train_file` / `--validation_file` / `--test_file` as folders with one
subfolder per class, or saved `datasets` folders) or `--dataset_name` (a Hub or local dataset with an image and a label
column). The class names (ClassLabel names, or the sorted label values) become the model's id2label."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from datasets import Dataset, DatasetDict, Image
from transformers import AutoModelForImageClassification, default_data_collator

from ...data.images import image_pixels, quiet_progress, read_image_folder
from ..readers import Source, data_sources, label_names_of, require_columns
from .base import cap_splits
from .files import FileTask, TextClassificationTask, _label_text, label_order

if TYPE_CHECKING:
    from ..arguments import DataArguments


@dataclass
class ImagePixels:
    """Images -> `pixel_values` for one model: its checkpoint's image processor when it has one, else a plain resize
    to the config's `image_size`, scaled to [0, 1] (as hf_moekd's OneS / V-MoE models are trained). Images are first
    converted to grayscale (1 channel) or RGB, as the model's `num_channels` says."""

    channels: int
    size: int | None = None
    image_processor: Any = None
    model_input_names = ["pixel_values"]  # noqa: RUF012 - what Trainer asks a processing_class

    @classmethod
    def for_model(cls, path: str | Path, config: Any) -> ImagePixels:
        channels = getattr(config, "num_channels", 3)
        processor = _image_processor(path)
        size = getattr(config, "image_size", None)
        if processor is None and not isinstance(size, int):
            raise ValueError(f"{path} has no image processor (preprocessor_config.json) and its config no integer "
                             "image_size: pass a checkpoint that has one")
        return cls(channels, size, processor)

    def __call__(self, images: list[Any]) -> np.ndarray:
        if self.image_processor is None:
            return np.stack([image_pixels(image, self.size, self.channels) for image in images])
        converted = [image.convert("L" if self.channels == 1 else "RGB") for image in images]
        return np.asarray(self.image_processor(converted, return_tensors="np")["pixel_values"], dtype=np.float32)

    def save_pretrained(self, folder: str | Path) -> None:
        """Save the image processor next to the model (the plain resize needs nothing: it is read from the config)."""
        if self.image_processor is not None:
            self.image_processor.save_pretrained(folder)


def _image_processor(path: str | Path) -> Any:
    """The checkpoint's image processor, or None when it has none."""
    from transformers import AutoImageProcessor

    if Path(path).is_dir() and not (Path(path) / "preprocessor_config.json").is_file():
        return None
    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return None


@dataclass
class ImageClassificationTask(FileTask):
    """Image classification on image folders or datasets with an image column; scored by accuracy and macro F1."""

    name: str = "image-classification"
    image_column: str = "image"

    @property
    def auto_class(self) -> type:
        return AutoModelForImageClassification

    @staticmethod
    def load_processor(path: str | Path, config: Any) -> ImagePixels:
        """What turns images into the model's `pixel_values` (see `ImagePixels`)."""
        return ImagePixels.for_model(path, config)

    @staticmethod
    def check_teacher(student: Any, teacher: Any | None) -> None:
        """The teacher sees the student's `pixel_values`: refuse one that takes another image size or channel count."""
        if teacher is None:
            return
        shapes = [(getattr(c, "image_size", None), getattr(c, "num_channels", None)) for c in (student, teacher)]
        if None not in shapes[0] + shapes[1] and shapes[0] != shapes[1]:
            (s_size, s_channels), (t_size, t_channels) = shapes
            raise ValueError(f"the teacher takes {t_size}x{t_size} images with {t_channels} channel(s), the student "
                             f"{s_size}x{s_size} with {s_channels}: distil between models of the same input (e.g. "
                             f"--student_config_overrides image_size={t_size},num_channels={t_channels})")

    def load(self, data_args: DataArguments) -> DatasetDict:
        with quiet_progress():  # --dataset_name: a local image folder is read by datasets' imagefolder too
            sources = data_sources(data_args, self.name)
        image, label = data_args.image_column_name, data_args.label_column_name
        tables = {split: _read(source) for split, source in sources.items()}
        for split, table in tables.items():
            require_columns(table, [image, label], sources[split].where)
            if not isinstance(table.features[image], Image):
                raise ValueError(f"{sources[split].where}: column {image!r} holds no images "
                                 f"({table.features[image]}); pass the image column with --image_column_name")
        first = "train" if "train" in tables else "validation"
        if not self.source:  # training: the class names come from the training data
            self.label_names = _class_names(tables[first], label, sources[first].where)
            self.source = f"the training data ({sources[first].where})"
        data = {}
        for split, table in tables.items():
            names = label_names_of(table, label)
            rows = [(i, names[v] if names else _label_text(v)) for i, v in enumerate(table[label])
                    if v is not None and not (names and v < 0)]  # -1: unlabelled (the Hub's test splits)
            if not rows and split == "test":
                continue
            kept = table if len(rows) == len(table) else table.select([i for i, _ in rows])
            ids = self._ids([name for _, name in rows], split, sources[split].where)
            data[split] = kept.select_columns([image]).add_column("labels", ids)
        self.image_column = image
        self.eval_splits = tuple(s for s in ("validation", "test") if s in data)
        return cap_splits(DatasetDict(data), data_args, self.eval_splits)

    def tokenize(self, raw: DatasetDict, tokenizer: ImagePixels, max_length: int) -> DatasetDict:
        """Each image as the model's `pixel_values` (`tokenizer` is the `ImagePixels` of `load_processor`)."""
        column = self.image_column

        def encode(batch: dict) -> dict:
            return {"pixel_values": tokenizer(batch[column])}

        return DatasetDict({split: data.map(encode, batched=True, remove_columns=[column], desc=f"{split} images")
                            .with_format("torch") for split, data in raw.items()})

    def collator(self, tokenizer: Any) -> Callable:
        return default_data_collator

    compute_metrics = TextClassificationTask.compute_metrics  # accuracy and macro F1


def _read(source: Source) -> Dataset:
    return source.read() if source.data is not None else read_image_folder(source.path, source.where)


def _class_names(data: Dataset, label: str, where: str) -> tuple[str, ...]:
    """A ClassLabel's names in its order, else the label values sorted (numbers by value); at least two."""
    values = {_label_text(v) for v in data[label] if v is not None}
    names = label_names_of(data, label) or sorted(values, key=label_order)
    if len(names) < 2:
        raise ValueError(f"{where} has a single class {list(names)}: classification needs at least two")
    return tuple(names)


__all__ = ["ImageClassificationTask", "ImagePixels"]
