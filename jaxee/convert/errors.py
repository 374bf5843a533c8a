"""Errors raised while reading or converting checkpoint files.

Every checkpoint problem (unsafe pickle, corrupt archive, truncated storage,
unexpected layout) is reported as a `CheckpointError`. When the file is known,
its path is part of the message so that a user with many files can tell which
one is at fault.
"""
import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
  """A checkpoint could not be read safely or has an unexpected layout.

  Attributes:
    path: The file (or directory) the error is about, or None when unknown.
    reason: The message without the path prefix.
  """

  def __init__(self, message: str, path: Optional[PathLike] = None):
    self.path = None if path is None else os.fspath(path)
    self.reason = message
    if self.path is not None and self.path not in message:
      message = f"{self.path}: {message}"
    super().__init__(message)

  def with_path(self, path: PathLike) -> "CheckpointError":
    """Returns this error with `path` attached (self when it already has one).

    Args:
      path: The file the error is about.

    Returns:
      An error of the same class whose message names `path`.
    """
    if self.path is not None:
      return self
    new = type(self)(self.reason, path)
    new.__cause__ = self.__cause__
    return new


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint path does not exist (also a `FileNotFoundError`)."""

  def __init__(self, message: str, path: Optional[PathLike] = None):
    CheckpointError.__init__(self, message, path)
