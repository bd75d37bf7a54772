"""Built-in captioned-image sources for offline work: a flat registry `name -> source class`.

A source has `sample(index) -> Sample`, a pure function of (seed, index), and `__len__` (None for
an infinite source)."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

__all__ = ["Sample", "SOURCES"]


@dataclass(frozen=True)
class Sample:
    image: Image.Image   # RGB, resolution x resolution
    caption: str
    meta: dict           # JSON-ready: objects for shapes, codepoints/name for emoji


def _shapes(**kw):
    from pipelines.datasets.shapes import ShapesSource
    return ShapesSource(**kw)


def _emoji(**kw):
    from pipelines.datasets.emoji import EmojiSource
    return EmojiSource(**kw)


SOURCES = {"shapes": _shapes, "emoji": _emoji}
