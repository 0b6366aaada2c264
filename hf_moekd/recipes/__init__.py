"""End-to-end recipes on data: the text tasks (`text`, with the student recipe in `students`), the image pipelines
(`vision`, with OneS in `ones` and m2mKD in `m2mkd`), the main job (`demo`) and what the example scripts share
(`common`)."""
from .common import USER_ERRORS, check_output_dir, configure_losses, removed_on_failure, resume_checkpoint, run, save_results, save_run
from .students import ModelArguments, build_model, model_for_saving

__all__ = ["USER_ERRORS", "ModelArguments", "build_model", "check_output_dir", "configure_losses", "model_for_saving",
           "removed_on_failure", "resume_checkpoint", "run", "save_results", "save_run"]
