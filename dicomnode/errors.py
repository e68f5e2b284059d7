"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Every message says what was wrong and what to do about it.
"""


class DicomnodeError(Exception):
    """Base for errors caused by input, configuration or the environment (exit status 1)."""

    exit_code = 1


class ConfigError(DicomnodeError):
    """The configuration file, an environment variable or a flag is invalid (exit status 2)."""

    exit_code = 2


class UnusableImageError(DicomnodeError):
    """A DICOM object cannot be turned into a model input; the message names its UID."""
