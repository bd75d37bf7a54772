import hashlib
import os

import numpy as np
import pytest

from pipelines.datasets.emoji import DEFAULT_FONT, EmojiSource, FontNotFoundError


@pytest.fixture(scope="module")
def source():
    if not os.path.isfile(DEFAULT_FONT):
        pytest.fail(f"{DEFAULT_FONT} missing: `apt-get install fonts-noto-color-emoji` "
                    f"(scripts/setup.sh --test does it)")
    return EmojiSource(resolution=32)


def test_count_and_names(source):
    assert 3000 <= len(source) <= 4500
    names = [e[2] for e in source.entries]
    assert len(set(names)) >= 0.99 * len(names)
    assert all(n == n.lower() and n.strip() for n in names)


def _index(source, codepoints):
    return next(i for i, e in enumerate(source.entries) if e[1] == codepoints)


@pytest.mark.parametrize("codepoints, caption", [
    ("1F600", "an emoji of grinning face"),
    ("1F1EF-1F1F5", "an emoji of flag jp"),
    ("1F44D-1F3FD", "an emoji of thumbs up sign medium skin tone"),
    ("1F3C3-200D-2640", "an emoji of woman runner"),
])
def test_known_emoji(source, codepoints, caption):
    s = source.sample(_index(source, codepoints))
    assert s.caption == caption
    assert s.meta["codepoints"] == codepoints
    arr = np.asarray(s.image)
    assert arr.shape == (32, 32, 3)
    assert (arr < 240).any(-1).mean() > 0.1          # drawn, not blank
    assert (arr[0, 0] > 240).all()                   # on white


def test_deterministic(source):
    a = source.sample(123).image
    b = EmojiSource(resolution=32).sample(123).image
    assert hashlib.sha256(a.tobytes()).digest() == hashlib.sha256(b.tobytes()).digest()
    assert EmojiSource(resolution=64).sample(123).image.size == (64, 64)


def test_index_out_of_range(source):
    with pytest.raises(IndexError):
        source.sample(len(source))


def test_missing_font_names_path_and_install(tmp_path):
    with pytest.raises(FontNotFoundError) as e:
        EmojiSource(font_path=str(tmp_path / "nope.ttf"))
    assert "nope.ttf" in str(e.value) and "apt-get install fonts-noto-color-emoji" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("codepoints, name", [
    ("1F1FA-1F1F8", "flag us"),      # shares its glyph with UM: the real flag wins
    ("1F1EB-1F1F7", "flag fr"),      # ... with CP
    ("1F469-200D-2764-200D-1F48B-200D-1F468", "woman heavy black heart kiss mark man"),
    ("1F469-1F3FB-200D-1F91D-200D-1F469-1F3FF", "woman light skin tone handshake woman dark skin tone"),
    ("1F6B6-200D-27A1", "pedestrian black rightwards arrow"),
    ("1F3F3-200D-1F308", "waving white flag rainbow"),
])
def test_sequences_in_unicode_order(source, codepoints, name):
    # Noto also ligates each ZWJ sequence reversed (for right-to-left text); meta must carry the
    # Unicode sequence, not the twin.
    assert source.entries[_index(source, codepoints)][2] == name


def test_no_flag_halves_or_fallback_glyphs(source):
    names = [e[2] for e in source.entries]
    assert not any(n.startswith("regional indicator") for n in names)
    assert len(set(names)) == len(names)
