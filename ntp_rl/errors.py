"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """What a one-line error message quotes of an exception from a library."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """A mistake in the command line, the config or the inputs, not a bug in ntp-rl."""

    exit_code = 2


class ConfigError(UserError):
    """A config key holds a value that cannot work; the message names the key."""

    def __init__(self, key: str, message: str, value: object = ...):
        self.key = key
        shown = key if value is ... else f"{key}={value}"
        super().__init__(f"{shown}: {message}")


class DataError(UserError):
    """A dataset, file or checkpoint the run needs is missing, empty or unreadable."""


class StorageError(UserError):
    """A file could not be written for want of space (a full disk, a quota). Not a mistake in the command, but
    like one the user's to fix, and said in one line naming the file and what it held."""

    exit_code = 1


class TrainingDiverged(Exception):
    """The loss or the gradients became non-finite; the run stops without saving."""

    exit_code = 3
