"""A name -> spec table filled at import time: models and training methods register the same way."""
from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Specs by their ``name``; registering a name twice is a programming error, not a user error."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, spec: T) -> T:
        """Register ``spec`` under ``spec.name``.

        Parameters
        ----------
        spec : object with a ``name``
            The model or method spec.

        Returns
        -------
        object
            ``spec`` itself (so registration can be an expression).
        """
        name = spec.name  # type: ignore[attr-defined]
        if name in self:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self[name] = spec
        return spec
