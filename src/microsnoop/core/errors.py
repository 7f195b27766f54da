"""One exception type for user-facing problems: the CLI prints it as one line and exits non-zero."""
from __future__ import annotations


class MicrosnoopError(Exception):
    """A problem with the user's input or settings, with the file it concerns."""

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class MicrosnoopWarning(UserWarning):
    """Something a user must see but that does not stop the run (padded tiny images, dropped planes)."""
