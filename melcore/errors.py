"""Errors that carry a message meant for the user (CLI, pages, job records).

Raise these (or subclasses) for bad input: the message must say what was wrong,
where (row, file, column) and what to do. ``python -m melcore`` prints the message
on one line and exits with status 2; pages show it with ``st.error``.
"""


class MelcoreError(ValueError):
    """Bad input or an impossible request, with a message for the user."""


class CohortError(MelcoreError):
    """A lesion table that cannot be read (wrong columns, bad labels, duplicates)."""


class ImageError(MelcoreError):
    """An image that is missing, unreadable, corrupt, too large or not an image."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LeakageError(MelcoreError):
    """The same patient (or lesion) is on both sides of a split."""


class ConfigError(MelcoreError):
    """A training or evaluation configuration that cannot work (unknown name, bad size...)."""


class CancelledError(MelcoreError):
    """Work stopped on request (a cancelled job) before it finished; nothing was recorded."""
