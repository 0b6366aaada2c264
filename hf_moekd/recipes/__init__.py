"""The text recipes behind `hf-moekd distill` / `evaluate` and the example scripts: their arguments (`arguments`),
tasks (`tasks`), data readers (`readers`), student construction (`students`), the run itself (`text`) and what the
scripts share (`common`). Study pipelines (images, the main job) are in `hf_moekd.studies`."""
from .arguments import DataArguments, GlueDataArguments, ModelArguments, ReportArguments, TaskArguments
from .common import (
    USER_ERRORS,
    check_output_dir,
    configure_losses,
    removed_on_failure,
    resume_checkpoint,
    run,
    save_results,
    save_run,
)
from .students import build_model, model_for_saving

__all__ = ["USER_ERRORS", "DataArguments", "GlueDataArguments", "ModelArguments", "ReportArguments", "TaskArguments",
           "build_model", "check_output_dir", "configure_losses", "model_for_saving", "removed_on_failure",
           "resume_checkpoint", "run", "save_results", "save_run"]
