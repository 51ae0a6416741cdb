"""User-facing errors: each names the file or parameter at fault.

The CLI turns any :class:`WsssError` into one line on stderr and a non-zero exit code,
without a traceback, so DVC marks the stage failed and caches nothing.
"""

from __future__ import annotations

from pathlib import Path


class WsssError(Exception):
    """Base class for errors caused by the user's input (data or parameters)."""


class ConfigError(WsssError):
    """A parameter is missing, unknown, of the wrong type or out of range."""

    def __init__(self, source: str | Path, problems: list[tuple[str, str]]):
        self.source = str(source)
        self.problems = problems
        lines = [f"{self.source}: {key}: {message}" for key, message in problems]
        super().__init__("invalid parameters\n" + "\n".join(lines))


class DataError(WsssError):
    """An input file is missing, unreadable or inconsistent with the dataset."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class TrainingDiverged(WsssError):
    """A training loss became NaN or infinite: the weights it would save are garbage."""

    def __init__(self, group: str, epoch: int, value: float, precision: str):
        self.group = group
        super().__init__(f"params.yaml: {group}: the training loss is {value} in epoch {epoch} (compute.precision: "
                         f"{precision}); this epoch was not saved: lower {group}'s learning rate, "
                         f"or train in compute.precision fp32")
