"""The exceptions VRAMancer raises, one hierarchy, each with the CLI exit code it maps to.

    VramancerError                    exit 1  any other failure
    ├── BadInputError                 exit 2  the person asked for something malformed
    │   ├── UnknownModelError                 model name / path / HF id not found
    │   ├── MalformedCheckpointError          config.json, safetensors or GGUF header unreadable
    │   ├── DeviceSpecError                   a --devices item that does not parse or names no device
    │   └── WorkloadError                     negative context, zero batch, unknown dtype, bad split
    ├── DoesNotFitError               exit 3  the model cannot be placed on the devices given
    ├── CheckpointMismatchError       exit 2  checkpoint tensors do not match the model built from config
    ├── DeviceOutOfMemoryError        exit 3  a device ran out of memory while loading or generating
    └── TraceFileError                exit 2  a telemetry trace that is truncated or malformed

A person sees ``str(error)`` as one line; ``--debug`` shows the traceback.
"""
from __future__ import annotations

__all__ = [
    "VramancerError",
    "BadInputError",
    "UnknownModelError",
    "MalformedCheckpointError",
    "DeviceSpecError",
    "WorkloadError",
    "DoesNotFitError",
    "CheckpointMismatchError",
    "DeviceOutOfMemoryError",
    "TraceFileError",
]


class VramancerError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class BadInputError(VramancerError, ValueError):
    exit_code = 2


class UnknownModelError(BadInputError):
    pass


class MalformedCheckpointError(BadInputError):
    pass


class DeviceSpecError(BadInputError):
    pass


class WorkloadError(BadInputError):
    pass


class TraceFileError(BadInputError):
    pass


class CheckpointMismatchError(BadInputError):
    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])


class DoesNotFitError(VramancerError):
    """``shortfall_bytes``: how much more memory the cheapest placement needed;
    ``suggestions``: what would make it fit, each a short sentence."""

    exit_code = 3

    def __init__(self, message: str, shortfall_bytes: int = 0, suggestions: list[str] | None = None):
        super().__init__(message)
        self.shortfall_bytes = int(shortfall_bytes)
        self.suggestions = list(suggestions or [])


class DeviceOutOfMemoryError(VramancerError):
    exit_code = 3

    def __init__(self, message: str, device: str = "", stage: int | None = None):
        super().__init__(message)
        self.device = device
        self.stage = stage
