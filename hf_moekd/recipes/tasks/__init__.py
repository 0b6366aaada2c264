"""The tasks of the text recipes, each a `Task`: GLUE and CoNLL-2003 (`benchmarks`), your own classification and
NER files (`files`), your images (`images`), causal and sequence-to-sequence language modelling (`lm`); `get_task`
picks one by name."""
from __future__ import annotations

from ...data.text import CONLL_LABELS, get_glue_task
from ..arguments import CONLL
from .base import ClassifierTask, Task, cap_splits
from .benchmarks import BenchmarkTask
from .files import FileTask, TextClassificationTask, TokenClassificationTask, align_labels
from .images import ImageClassificationTask
from .lm import CausalLMTask, LanguageModelTask, Seq2SeqTask


def get_task(name: str) -> Task:
    """A GLUE task (sst2, cola, mrpc, rte, stsb), CoNLL-2003 ("conll" / "conll2003"), your texts ("text-classification",
    "ner"), your images ("image-classification"), causal LM ("clm") or sequence-to-sequence ("seq2seq")."""
    if name.lower() == "clm":
        return CausalLMTask()
    if name.lower() == "text-classification":
        return TextClassificationTask()
    if name.lower() == "image-classification":
        return ImageClassificationTask()
    if name.lower() in ("ner", "token-classification"):
        return TokenClassificationTask()
    if name.lower() == "seq2seq":
        return Seq2SeqTask()
    if name.lower() in ("conll", CONLL):
        return BenchmarkTask(CONLL, CONLL_LABELS, True, ("validation", "test"))
    try:
        glue = get_glue_task(name)
    except ValueError as err:
        raise ValueError(f"{err}, conll (CoNLL-2003 NER), clm (causal language modelling) or seq2seq") from None
    return BenchmarkTask(glue.name, glue.label_names, False, ("validation",))


__all__ = ["BenchmarkTask", "CausalLMTask", "ClassifierTask", "FileTask", "ImageClassificationTask",
           "LanguageModelTask", "Seq2SeqTask", "Task", "TextClassificationTask", "TokenClassificationTask",
           "align_labels", "cap_splits", "get_task"]
