"""Counts in messages: ``counted(1, "image")`` reads "1 image", ``counted(3, "image")`` "3 images"."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """Return ``count`` and ``noun``, in the plural (``noun + "s"`` unless given) unless the count is 1."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
