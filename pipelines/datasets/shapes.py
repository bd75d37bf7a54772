"""Procedural captioned shapes with an exact pixel verifier.

Coloured circles, squares and triangles on white, drawn without antialiasing so every object pixel
has its palette colour exactly. Captions come from a small regular grammar:

    single:    "a {size} {color} {shape} at the {row} {col}"        a large red circle at the top left
    relation:  "a {size} {color} {shape} {rel} a {size} {color} {shape}"
               rel in {left of, right of, above, below}             a small blue square left of a large green circle
    count:     "{count} {color} {shapes}"                           two yellow triangles

`verify(image, caption)` parses the caption and decides from pixels alone whether the image
satisfies it; a caption describes every object, so an extra object fails. Semantics the generator
respects with margins (so its captions are never borderline):
- objects are connected components of one palette colour;
- shape by fill ratio of the bounding box (square ~1, circle ~0.79, triangle ~0.5);
- size by the bounding box's longer side against the midpoint of the two rendered sizes;
- grid cell (3x3) of the pixel centroid;
- relation by the dominant axis of the centroid displacement (|dx| > |dy| -> left/right).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipelines.datasets import Sample

__all__ = ["ShapesSource", "verify", "parse_caption", "caption_slots", "caption_pairs", "parse_pairs",
           "VOCABULARY", "PALETTE"]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (235, 195, 20),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
RELATIONS = ("left", "right", "above", "below")
COUNTS = {"two": 2, "three": 3}

VOCABULARY: dict[str, list[str]] = {
    "color": list(PALETTE), "shape": list(SHAPES), "shapes": [s + "s" for s in SHAPES],
    "size": list(SIZES), "row": list(ROWS), "col": list(COLS), "relation": list(RELATIONS),
    "count": list(COUNTS),
}


# ------------------------------------------------------------------------------------------ parse

def parse_pairs(pairs) -> frozenset[tuple[str, str]]:
    """("red triangle", ...) -> {("red", "triangle"), ...}; ValueError names a pair that is not
    "<color> <shape>" from the vocabulary."""
    out = set()
    for p in pairs:
        words = str(p).strip().lower().split()
        if len(words) != 2 or words[0] not in PALETTE or words[1] not in SHAPES:
            raise ValueError(f"{p!r}: expected '<color> <shape>' with color in {', '.join(PALETTE)} "
                             f"and shape in {', '.join(SHAPES)}")
        out.add((words[0], words[1]))
    return frozenset(out)


def caption_pairs(caption: str) -> set[tuple[str, str]]:
    """The (color, shape) compositions a caption mentions."""
    spec = parse_caption(caption)
    if spec["kind"] == "count":
        return {(spec["color"], spec["shape"])}
    return {(o["color"], o["shape"]) for o in spec["objects"]}


def _tokens(caption: str) -> list[str]:
    return caption.strip().lower().split()


def caption_slots(caption: str) -> list[tuple[int, str]]:
    """(word index, vocabulary category) for every word of the caption that carries meaning."""
    return _parse(_tokens(caption))[1]


def parse_caption(caption: str) -> dict:
    """The caption as a structure: {"kind": "single"|"relation"|"count", ...}. ValueError names the
    first word that does not fit the grammar."""
    return _parse(_tokens(caption))[0]


def _parse(w: list[str]) -> tuple[dict, list[tuple[int, str]]]:
    slots: list[tuple[int, str]] = []
    pos = 0

    def expect(options, cat=None):
        nonlocal pos
        if pos >= len(w):
            raise ValueError(f"caption ends early: expected {' or '.join(options)}")
        word = w[pos]
        if word not in options:
            raise ValueError(f"word {pos + 1} {word!r}: expected {' or '.join(options)}")
        if cat:
            slots.append((pos, cat))
        pos += 1
        return word

    def obj():
        expect(["a"])
        return {"size": expect(SIZES, "size"), "color": expect(PALETTE, "color"),
                "shape": expect(SHAPES, "shape")}

    if not w:
        raise ValueError("caption is empty")
    if w[0] in COUNTS:
        n = COUNTS[expect(list(COUNTS), "count")]
        color = expect(list(PALETTE), "color")
        shape = expect([s + "s" for s in SHAPES], "shapes")[:-1]
        out = {"kind": "count", "count": n, "color": color, "shape": shape}
    else:
        first = obj()
        if pos < len(w) and w[pos] == "at":
            pos += 1
            expect(["the"])
            first["row"] = expect(ROWS, "row")
            first["col"] = expect(COLS, "col")
            out = {"kind": "single", "objects": [first]}
        else:
            rel = expect(RELATIONS, "relation")
            if pos < len(w) and w[pos] == "of":   # "left of" / "right of"; optional for any relation
                pos += 1
            out = {"kind": "relation", "relation": rel, "objects": [first, obj()]}
    if pos != len(w):
        raise ValueError(f"word {pos + 1} {w[pos]!r}: unexpected after a complete caption")
    return out, slots


# ------------------------------------------------------------------------------------- pixels

def _sizes(resolution: int) -> dict[str, int]:
    return {"small": max(5, round(resolution / 4)), "large": round(resolution * 7 / 16)}


def _objects(arr: np.ndarray, tolerance: float, min_area: int) -> list[dict] | None:
    """Connected components per palette colour. None if a pixel is neither background nor palette
    (exact mode), i.e. the image is not a clean render."""
    from scipy import ndimage
    names = list(PALETTE)
    colors = np.array([PALETTE[n] for n in names] + [BACKGROUND], dtype=np.float32)   # (K+1, 3)
    dist = np.linalg.norm(arr[:, :, None, :].astype(np.float32) - colors[None, None], axis=-1)  # (H, W, K+1)
    label = dist.argmin(-1)
    if tolerance == 0:
        if not np.all(dist.min(-1) == 0):
            return None
    objs = []
    for k, name in enumerate(names):
        comp, n = ndimage.label(label == k)   # 4-connectivity
        for i in range(1, n + 1):
            ys, xs = np.nonzero(comp == i)
            if len(xs) < min_area:
                if tolerance == 0:
                    return None    # a stray pixel in an exact render is not an object we drew
                continue
            h, w_ = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            objs.append({"color": name, "area": len(xs), "cx": xs.mean(), "cy": ys.mean(),
                         "bbox": (int(xs.min()), int(ys.min()), int(w_), int(h)),
                         "fill": len(xs) / float(w_ * h), "side": int(max(w_, h))})
    return objs


def _shape_of(o: dict) -> str:
    if o["fill"] > 0.92:
        return "square"
    if o["fill"] > 0.66:
        return "circle"
    return "triangle"


def _cell(o: dict, resolution: int) -> tuple[str, str]:
    third = resolution / 3
    # Pixel centres sit at i + 0.5.
    row = ROWS[min(2, int((o["cy"] + 0.5) // third))]
    col = COLS[min(2, int((o["cx"] + 0.5) // third))]
    return row, col


def _relation(a: dict, b: dict) -> str:
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def verify(image, caption: str, tolerance: float = 0.0) -> bool:
    """Does the image satisfy the caption? Exact for this module's renders (tolerance 0: every
    pixel must be white or a palette colour). tolerance > 0 (e.g. 80) classifies pixels by the
    nearest colour and ignores specks, for scoring generated images."""
    spec = parse_caption(caption)
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"image: expected a square HxWx3 image, got shape {arr.shape}")
    res = arr.shape[0]
    sizes = _sizes(res)
    objs = _objects(arr, tolerance, min_area=3 if tolerance == 0 else max(4, res * res // 200))
    if objs is None:
        return False
    size_cut = (sizes["small"] + sizes["large"]) / 2

    def matches(o, d):
        return (o["color"] == d["color"] and _shape_of(o) == d["shape"]
                and ("small" if o["side"] < size_cut else "large") == d["size"])

    if spec["kind"] == "count":
        return (len(objs) == spec["count"]
                and all(o["color"] == spec["color"] and _shape_of(o) == spec["shape"] for o in objs))
    if spec["kind"] == "single":
        (d,) = spec["objects"]
        return len(objs) == 1 and matches(objs[0], d) and _cell(objs[0], res) == (d["row"], d["col"])
    if len(objs) != 2:
        return False
    da, db = spec["objects"]
    for a, b in ((objs[0], objs[1]), (objs[1], objs[0])):
        if matches(a, da) and matches(b, db) and _relation(a, b) == spec["relation"]:
            return True
    return False


# ------------------------------------------------------------------------------------ generate

def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, color) -> None:
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=color)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=color)
    else:  # isosceles, apex up
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)


class ShapesSource:
    """Infinite procedural source: sample(index) is a pure function of (seed, index)."""

    def __init__(self, resolution: int = 32, seed: int = 0, max_objects: int = 2,
                 holdout=(), holdout_mode: str = "exclude"):
        """holdout: "color shape" pairs; holdout_mode "exclude" never draws a caption that mentions
        one (the training split), "only" draws only captions that mention one (held-out prompts)."""
        if not isinstance(resolution, int) or resolution < 16:
            raise ValueError(f"resolution must be an int >= 16, got {resolution!r}")
        if not isinstance(max_objects, int) or not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if holdout_mode not in ("exclude", "only"):
            raise ValueError(f"holdout_mode must be 'exclude' or 'only', got {holdout_mode!r}")
        self.holdout = parse_pairs(holdout)
        if holdout_mode == "only" and not self.holdout:
            raise ValueError("holdout: holdout_mode 'only' needs at least one pair")
        if holdout_mode == "exclude" and len(self.holdout) == len(PALETTE) * len(SHAPES):
            raise ValueError("holdout: every color-shape pair is held out; nothing is left to train on")
        self.holdout_mode = holdout_mode
        self.resolution, self.seed, self.max_objects = resolution, seed, max_objects
        self.sizes = _sizes(resolution)

    def __len__(self):
        return None

    def sample(self, index: int) -> Sample:
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"index must be a non-negative int, got {index!r}")
        rng = np.random.default_rng([self.seed, int(index)])
        kinds = ["single"] + (["relation", "count"] if self.max_objects >= 2 else [])
        for _ in range(1000):   # rejection sampling: keep only unambiguous layouts
            kind = kinds[rng.integers(len(kinds))]
            out = getattr(self, f"_{kind}")(rng)
            if out is not None:
                image, caption, objects = out
                if self.holdout and (self.holdout_mode == "only") != bool(caption_pairs(caption) & self.holdout):
                    continue
                if verify(image, caption):   # the generator's own guarantee, checked
                    return Sample(image=image, caption=caption,
                                  meta={"kind": kind, "objects": objects, "caption": caption})
        raise RuntimeError(f"shapes: no valid layout for index {index}")  # not reached in practice

    # Each layout returns (image, caption, objects) or None when the draw is borderline.
    def _place(self, rng, specs, cell=None):
        R = self.resolution
        img = Image.new("RGB", (R, R), BACKGROUND)
        draw = ImageDraw.Draw(img)
        boxes, objects = [], []
        for spec in specs:
            side = self.sizes[spec["size"]]
            if cell is not None:
                # Near the cell's centre (+-2 px), clamped into the image; large shapes in corner
                # cells then sit against the border, their centroid still well inside the cell.
                r, c = ROWS.index(cell[0]), COLS.index(cell[1])
                cx, cy = round(c * R / 3 + R / 6 - side / 2), round(r * R / 3 + R / 6 - side / 2)

                def clamp(v):
                    return min(max(v, 0), R - side)
                lo_x, hi_x, lo_y, hi_y = clamp(cx - 2), clamp(cx + 2), clamp(cy - 2), clamp(cy + 2)
            else:
                lo_x, hi_x, lo_y, hi_y = 0, R - side, 0, R - side
            x0, y0 = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
            box = (x0 - 2, y0 - 2, x0 + side + 2, y0 + side + 2)   # 2 px gap between objects
            if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                return None
            boxes.append(box)
            _draw(draw, spec["shape"], x0, y0, side, PALETTE[spec["color"]])
            objects.append({**spec, "bbox": [x0, y0, side, side]})
        return img, objects

    def _attrs(self, rng):
        return {"size": SIZES[rng.integers(2)], "color": list(PALETTE)[rng.integers(len(PALETTE))],
                "shape": SHAPES[rng.integers(3)]}

    def _single(self, rng):
        spec = self._attrs(rng)
        cell = (ROWS[rng.integers(3)], COLS[rng.integers(3)])
        placed = self._place(rng, [spec], cell)
        if placed is None:
            return None
        img, objects = placed
        (o,) = _objects(np.asarray(img), 0, 3)
        third = self.resolution / 3
        # keep the centroid at least a pixel away from any grid line
        for v in (o["cx"] + 0.5, o["cy"] + 0.5):
            if min(abs(v - third), abs(v - 2 * third)) < 1.0:
                return None
        if _cell(o, self.resolution) != cell:
            return None
        return img, f"a {spec['size']} {spec['color']} {spec['shape']} at the {cell[0]} {cell[1]}", objects

    def _relation(self, rng):
        a, b = self._attrs(rng), self._attrs(rng)
        if (a["color"], a["shape"]) == (b["color"], b["shape"]):
            return None   # the two descriptions must tell the objects apart
        placed = self._place(rng, [a, b])
        if placed is None:
            return None
        img, objects = placed
        objs = _objects(np.asarray(img), 0, 3)
        if objs is None or len(objs) != 2:
            return None
        oa = next(o for o in objs if o["color"] == a["color"] and _shape_of(o) == a["shape"])
        ob = next(o for o in objs if o is not oa)
        dx, dy = abs(oa["cx"] - ob["cx"]), abs(oa["cy"] - ob["cy"])
        if abs(dx - dy) < 2.0:
            return None   # too close to the diagonal: the relation would be borderline
        rel = _relation(oa, ob)
        rel_words = f"{rel} of" if rel in ("left", "right") else rel
        caption = (f"a {a['size']} {a['color']} {a['shape']} {rel_words} "
                   f"a {b['size']} {b['color']} {b['shape']}")
        return img, caption, objects

    def _count(self, rng):
        n = int(rng.integers(2, self.max_objects + 1))
        color = list(PALETTE)[rng.integers(len(PALETTE))]
        shape = SHAPES[rng.integers(3)]
        size = SIZES[rng.integers(2)] if n == 2 else "small"
        placed = self._place(rng, [{"size": size, "color": color, "shape": shape}] * n)
        if placed is None:
            return None
        img, objects = placed
        word = {2: "two", 3: "three"}[n]
        return img, f"{word} {color} {shape}s", objects
