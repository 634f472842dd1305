"""Errors that end a run with a TrainerTermination reason and one clear line, never a traceback."""
from __future__ import annotations


class TrainerError(Exception):
    """Base: ``reason`` is the TrainerTermination reason the operator sees."""

    reason = "Error"
    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadConfig(TrainerError):
    reason = "BadConfig"
    exit_code = 2


class BadData(TrainerError):
    reason = "BadData"
    exit_code = 3


class ModelLoadFailed(TrainerError):
    reason = "ModelLoadFailed"
    exit_code = 4


class StorageFailed(TrainerError):
    reason = "StorageFailed"
    exit_code = 5
