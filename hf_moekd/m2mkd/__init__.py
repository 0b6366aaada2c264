"""m2mKD (Lo et al., 2024): module-to-module distillation from a monolithic teacher into a modular (MoE) student.

* `config`: the method's settings (`M2MConfig`: modules, meta model start, KD scale, baseline budget).
* `modules`: cut a model into N modules of consecutive blocks (`split_model`), the shallow meta model
  (`build_meta`), stitch layers (`Stitch`), and assembly of trained modules into the full student (`assemble`).
* `path`: the hybrid networks that train one module (`student_path`) against the teacher's (`teacher_path`).
* `layouts`: where each kind of model keeps its stem, blocks and head.
* `report`: the study's table. The image pipeline end to end is `hf_moekd.studies.m2mkd`
  (`run_m2mkd(M2MArguments(...))`), resumable per stage and module.
"""
from . import card as _card  # noqa: F401  (registers the card section)
from .config import M2MConfig
from .layouts import LAYOUTS, layout_of
from .modules import Segment, Stitch, assemble, build_meta, module_state, run_segments, split_model
from .path import M2MPath, M2MPathOutput, student_path, teacher_path


__all__ = [
    "LAYOUTS", "M2MConfig", "M2MPath", "M2MPathOutput", "Segment", "Stitch", "assemble", "build_meta", "layout_of",
    "module_state", "run_segments", "split_model", "student_path", "teacher_path",
]
