"""Noto Color Emoji rendered on white, captioned from the emoji names (~3,700 images).

The font (Debian `fonts-noto-color-emoji`) is a CBDT bitmap font: every glyph is a 136x128 PNG in
its CBDT table. We enumerate the emoji as glyphs reached from the cmap (single code points) or from
GSUB ligatures (ZWJ sequences, flags, keycaps, skin tones), take each glyph's PNG straight from the
font (no text layout engine involved), and name it from Unicode character names.

Skipped: glyphs with no bitmap, code points Python's `unicodedata` cannot name (emoji newer than
its Unicode version), and non-emoji glyphs (ASCII, space, joiners).
"""
from __future__ import annotations

import functools
import io
import os
import unicodedata

import numpy as np
from PIL import Image

from pipelines.datasets import Sample

__all__ = ["EmojiSource", "FontNotFoundError", "DEFAULT_FONT", "list_emoji"]

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"

ZWJ, VS16, KEYCAP = 0x200D, 0xFE0F, 0x20E3
SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone", 0x1F3FD: "medium skin tone",
              0x1F3FE: "medium-dark skin tone", 0x1F3FF: "dark skin tone"}
HAIR = {0x1F9B0: "red hair", 0x1F9B1: "curly hair", 0x1F9B2: "bald", 0x1F9B3: "white hair"}
GENDER = {0x2640: "woman", 0x2642: "man"}


class FontNotFoundError(FileNotFoundError):
    """The emoji font is missing; the message says how to install it."""


def _find_font(font_path: str | None) -> str:
    path = font_path or DEFAULT_FONT
    if not os.path.isfile(path):
        raise FontNotFoundError(
            f"Noto Color Emoji font not found at {path}: install it with "
            f"`apt-get install fonts-noto-color-emoji` (Debian/Ubuntu) or set data.font_path")
    return path


def _name(seq: tuple[int, ...]) -> str | None:
    """A lowercase name for a code point sequence, or None if some part has no Unicode name."""
    if len(seq) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in seq):
        return "flag " + "".join(chr(ord("a") + c - 0x1F1E6) for c in seq)
    tags = [c for c in seq if 0xE0020 <= c <= 0xE007E]
    if tags:   # subdivision flags: black flag + tag letters
        return "flag " + "".join(chr(c - 0xE0000) for c in tags)
    if seq and seq[-1] == KEYCAP:
        return "keycap " + chr(seq[0])
    parts, gender = [], []
    for c in seq:
        if c == 0xE007F:
            return None   # only inside a subdivision flag, handled above
        if c in (ZWJ, VS16, 0xFE0E):
            continue
        if c in SKIN_TONES:
            parts.append(SKIN_TONES[c])
        elif c in HAIR:
            parts.append(HAIR[c])
        elif c in GENDER and len(seq) > 1:
            gender.append(GENDER[c])   # "woman" reads first: "woman weight lifter"
        else:
            try:
                parts.append(unicodedata.name(chr(c)).lower())
            except ValueError:
                return None
    parts = gender + parts
    return " ".join(parts) if parts else None


def _is_emoji_cp(c: int) -> bool:
    # Private-use code points (the font maps some flags there too) are not emoji of their own.
    private = 0xE000 <= c <= 0xF8FF or c >= 0xF0000
    return (c > 0x7F and not private and c not in (ZWJ, VS16, 0xFE0E, KEYCAP)
            and not 0xE0000 <= c <= 0xE007F and not 0x1F1E6 <= c <= 0x1F1FF)


def _well_formed(seq: tuple[int, ...]) -> bool:
    # A skin tone follows the emoji it modifies: never first, never right after a ZWJ. Noto's
    # right-to-left twins of multi-person sequences (couples, handshakes) break this.
    return all(i > 0 and seq[i - 1] != ZWJ for i, c in enumerate(seq) if c in SKIN_TONES and len(seq) > 1)


def _pick(candidates: dict[str, list[tuple[int, ...]]], glyph_id) -> dict[str, tuple[int, ...]]:
    """One sequence per glyph. Several sequences reach one glyph: Noto adds a right-to-left twin
    of every ZWJ sequence (components reversed), and some flags share a glyph (US/UM, FR/CP,
    ES/EA, NO/BV, IO/DG). Noto numbers sequence glyphs in sorted order of the sequences they were
    built from, so walking glyphs by id the real sequence is the smallest one not below the
    previous glyph's. (On the 2023 font every twin is settled this way or by `_well_formed`.)"""
    chosen, previous = {}, ()
    for glyph in sorted(candidates, key=glyph_id):
        seqs = sorted(candidates[glyph], key=lambda s: (len(s) > 1, s))   # a single code point wins
        if len(seqs) > 1 and len(seqs[0]) > 1:
            seqs = [s for s in seqs if s >= previous] or seqs
        chosen[glyph] = seqs[0]
        if len(seqs[0]) > 1:
            previous = seqs[0]
    return chosen


@functools.lru_cache(maxsize=4)
def list_emoji(font_path: str) -> tuple[tuple[str, str, str], ...]:
    """((glyph name, code points 'XXXX-YYYY', name), ...) sorted by code points; one per glyph."""
    from fontTools.ttLib import TTFont
    font = TTFont(font_path, lazy=True)
    cmap = font.getBestCmap()                      # code point -> glyph
    strike = font["CBDT"].strikeData[0]            # glyph -> bitmap
    candidates: dict[str, list[tuple[int, ...]]] = {}

    def offer(glyph: str, seq: tuple[int, ...]):
        if glyph in strike and _well_formed(seq) and _name(seq) is not None:
            candidates.setdefault(glyph, []).append(seq)

    glyph_cp: dict[str, int] = {}
    for cp, glyph in sorted(cmap.items()):
        glyph_cp.setdefault(glyph, cp)
        if _is_emoji_cp(cp):
            offer(glyph, (cp,))
    for lookup in font["GSUB"].table.LookupList.Lookup:
        for sub in lookup.SubTable:
            ext = getattr(sub, "ExtSubTable", sub)
            for first, ligs in getattr(ext, "ligatures", {}).items():
                for lig in ligs:
                    comps = [first, *lig.Component]
                    if all(g in glyph_cp for g in comps):
                        offer(lig.LigGlyph, tuple(glyph_cp[g] for g in comps))
    out = [(glyph, "-".join(f"{c:04X}" for c in seq), _name(seq))
           for glyph, seq in _pick(candidates, font.getGlyphID).items()]
    out.sort(key=lambda r: [int(c, 16) for c in r[1].split("-")])
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _strike(font_path: str):
    from fontTools.ttLib import TTFont
    return TTFont(font_path, lazy=True)["CBDT"].strikeData[0]


class EmojiSource:
    """Finite source: sample(index) renders the index-th emoji (sorted by code points)."""

    def __init__(self, resolution: int = 32, seed: int = 0, font_path: str | None = None):
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"resolution must be an int >= 8, got {resolution!r}")
        self.resolution, self.seed = resolution, seed
        self.font_path = _find_font(font_path)
        self.entries = list_emoji(self.font_path)

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, index: int) -> Sample:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"emoji index {index} out of range [0, {len(self.entries)})")
        glyph, codepoints, name = self.entries[index]
        png = _strike(self.font_path)[glyph].imageData
        with Image.open(io.BytesIO(png)) as im:
            rgba = im.convert("RGBA")
        # Centre on a white square canvas, then downsample with a box filter (area average).
        side = max(rgba.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2))
        image = canvas.convert("RGB").resize((self.resolution, self.resolution), Image.BOX)
        return Sample(image=image, caption=f"an emoji of {name}",
                      meta={"codepoints": codepoints, "name": name, "glyph": glyph})


def _nonwhite_fraction(image: Image.Image) -> float:
    return float((np.asarray(image) < 250).any(-1).mean())
