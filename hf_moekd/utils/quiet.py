"""Silence messages that look like failures but are expected on every run; actionable ones stay."""
from __future__ import annotations

import logging
import warnings

# (logger name, message fragment): DeepSpeed logs this at every start on a machine without a GPU.
_EXPECTED_LOGS = (("DeepSpeed", "Setting accelerator to CPU"),)
# torch's DataLoader warns when TrainingArguments' default pin_memory=True meets a machine without an accelerator.
_EXPECTED_WARNINGS = (r"'pin_memory' argument is set as true but no accelerator is found",)


class _DropExpected(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_expected_noise() -> None:
    """Drop the expected messages above (idempotent); called by the command line and the example scripts."""
    for name, fragment in _EXPECTED_LOGS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropExpected) and f.fragment == fragment for f in log.filters):
            log.addFilter(_DropExpected(fragment))
    for message in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
