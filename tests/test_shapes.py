import hashlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.datasets.shapes import (PALETTE, VOCABULARY, ShapesSource, caption_slots, parse_caption,
                                       verify)


def _digest(img):
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()[:16]


def test_golden_first_sample():
    s = ShapesSource(32, seed=0, max_objects=2).sample(0)
    assert s.caption == "a large blue triangle at the middle center"
    assert _digest(s.image) == "52d9d9125a7c7890"
    assert s.image.size == (32, 32) and s.image.mode == "RGB"


def test_deterministic_in_seed_and_index():
    a, b = ShapesSource(32, 3, 3), ShapesSource(32, 3, 3)
    for i in (0, 7, 1234):
        sa, sb = a.sample(i), b.sample(i)
        assert sa.caption == sb.caption and _digest(sa.image) == _digest(sb.image)
    assert _digest(a.sample(0).image) != _digest(a.sample(1).image)
    assert _digest(ShapesSource(32, 4, 3).sample(0).image) != _digest(a.sample(0).image)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("max_objects", [1, 2, 3])
def test_accepts_own_renders(resolution, max_objects):
    src = ShapesSource(resolution, seed=11, max_objects=max_objects)
    kinds = set()
    for i in range(150):
        s = src.sample(i)
        assert verify(s.image, s.caption), s.caption
        assert verify(np.asarray(s.image), s.caption)       # arrays too
        kinds.add(s.meta["kind"])
    assert kinds == ({"single"} if max_objects == 1 else {"single", "relation", "count"})


def test_rejects_every_one_word_change():
    src = ShapesSource(32, seed=5, max_objects=3)
    checked = 0
    for i in range(100):
        s = src.sample(i)
        words = s.caption.split()
        for pos, category in caption_slots(s.caption):
            for alt in VOCABULARY[category]:
                if alt == words[pos]:
                    continue
                changed = " ".join(words[:pos] + [alt] + words[pos + 1:])
                assert not verify(s.image, changed), f"{s.caption!r} -> {changed!r}"
                checked += 1
    assert checked > 900


def test_every_category_word_is_a_slot():
    # Substitutions cover the whole caption: the only words without a slot are grammar words.
    for caption in ("a small red circle at the top left", "two blue squares",
                    "a large green triangle left of a small yellow circle",
                    "a small red square above a large blue circle"):
        slots = dict(caption_slots(caption))
        for i, w in enumerate(caption.split()):
            if w not in ("a", "at", "the", "of"):
                assert i in slots, (caption, w)


def test_extra_object_fails():
    src = ShapesSource(32, seed=2, max_objects=1)
    s = src.sample(0)
    img = s.image.copy()
    ImageDraw.Draw(img).rectangle([0, 28, 3, 31], fill=PALETTE["green"])   # a speck in a corner
    assert verify(s.image, s.caption) and not verify(img, s.caption)


def test_non_palette_pixels_fail_exact_but_pass_tolerant():
    s = ShapesSource(32, seed=2, max_objects=1).sample(3)
    noisy = np.asarray(s.image).astype(int) + np.random.default_rng(0).integers(-20, 21, (32, 32, 3))
    noisy = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    assert not verify(noisy, s.caption)
    assert verify(noisy, s.caption, tolerance=80)


@pytest.mark.parametrize("caption, word", [
    ("a huge red circle at the top left", "huge"),
    ("a small red circle at the top", "caption ends early"),
    ("four red circles", "four"),
    ("a small red circle at the top left please", "please"),
    ("", "empty"),
])
def test_bad_captions_raise(caption, word):
    with pytest.raises(ValueError, match=word):
        parse_caption(caption)


def test_parse_structure():
    assert parse_caption("three green triangles") == {"kind": "count", "count": 3, "color": "green",
                                                       "shape": "triangle"}
    rel = parse_caption("a small red circle right of a large blue square")
    assert rel["relation"] == "right" and rel["objects"][1]["shape"] == "square"


@pytest.mark.parametrize("kwargs, field", [
    ({"resolution": 8}, "resolution"), ({"max_objects": 0}, "max_objects"), ({"seed": -1}, "seed"),
])
def test_bad_constructor_args(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShapesSource(**kwargs)


def test_holdout_pairs_never_in_training_and_always_in_heldout_prompts():
    from pipelines.datasets.shapes import ShapesSource, caption_pairs
    held = {("red", "triangle"), ("blue", "circle")}
    train = ShapesSource(resolution=32, seed=3, max_objects=2, holdout=["red triangle", "blue circle"])
    only = ShapesSource(resolution=32, seed=4, max_objects=2, holdout=["red triangle", "blue circle"],
                        holdout_mode="only")
    kinds = set()
    for i in range(150):
        assert not caption_pairs(train.sample(i).caption) & held
        s = only.sample(i)
        assert caption_pairs(s.caption) & held
        kinds.add(s.meta["kind"])
    assert kinds == {"single", "relation", "count"}


def test_holdout_bad_input_names_the_pair():
    import pytest
    from pipelines.config import ConfigError, load_config
    from pipelines.datasets.shapes import ShapesSource
    with pytest.raises(ConfigError, match="data.holdout: 'purple circle'"):
        load_config(data={"data": {"holdout": ["purple circle"]}})
    with pytest.raises(ConfigError, match="data.holdout: only for source 'shapes'"):
        load_config(data={"data": {"source": "emoji", "holdout": ["red circle"]}})
    with pytest.raises(ValueError, match="nothing is left"):
        ShapesSource(holdout=[f"{c} {s}" for c in ("red", "green", "blue", "yellow")
                              for s in ("circle", "square", "triangle")])
