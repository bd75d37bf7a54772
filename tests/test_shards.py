import json

import numpy as np
import pytest
from PIL import Image

from pipelines.shards import (decode_sample, encode_png, image_to_tensor_array, iter_samples, npy_bytes,
                              rank_samples, write_shard)


def _samples(n, offset=0):
    rng = np.random.default_rng(offset)
    for i in range(offset, offset + n):
        img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        yield {"__key__": f"s{i:05d}", "png": encode_png(img), "txt": f"caption {i}",
               "json": json.dumps({"index": i}), "mean.npy": npy_bytes(np.full((4, 2, 2), i, np.float32)),
               "__img": img}


def _write(path, samples):
    return write_shard(path, [{k: v for k, v in s.items() if k != "__img"} for s in samples])


def test_round_trip(tmp_path):
    originals = list(_samples(5))
    assert _write(tmp_path / "a.tar", originals) == 5
    got = [decode_sample(s) for s in iter_samples([str(tmp_path / "a.tar")])]
    assert [g["__key__"] for g in got] == [o["__key__"] for o in originals]
    for g, o in zip(got, originals):
        assert np.array_equal(np.asarray(g["png"]), np.asarray(o["__img"]))   # PNG is lossless
        assert g["txt"] == o["txt"]
        assert g["json"] == json.loads(o["json"])
        assert g["mean.npy"].dtype == np.float32 and g["mean.npy"].shape == (4, 2, 2)


def test_same_samples_same_bytes(tmp_path):
    _write(tmp_path / "a.tar", _samples(4))
    _write(tmp_path / "b.tar", _samples(4))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))   # the atomic write leaves no temp file


def test_pickles_are_never_loaded(tmp_path):
    import pickle
    _write(tmp_path / "a.tar", [{"__key__": "k", "txt": "x", "pyd": pickle.dumps({"evil": 1})}])
    (s,) = [decode_sample(r) for r in iter_samples([str(tmp_path / "a.tar")])]
    assert "pyd" not in s and s["txt"] == "x"


@pytest.mark.parametrize("n_shards, world", [(4, 2), (1, 2), (3, 2)])
def test_rank_split_covers_every_sample_once(tmp_path, n_shards, world):
    urls = []
    for k in range(n_shards):
        _write(tmp_path / f"{k}.tar", _samples(6, offset=10 * k))
        urls.append(str(tmp_path / f"{k}.tar"))
    seen = []
    for rank in range(world):
        seen += [s["__key__"] for s in rank_samples(urls, rank, world, seed=0, repeat=False)]
    expected = sorted(f"s{10 * k + i:05d}" for k in range(n_shards) for i in range(6))
    assert sorted(seen) == expected


def test_rank_samples_repeat_and_shuffle(tmp_path):
    _write(tmp_path / "a.tar", _samples(8))
    it = rank_samples([str(tmp_path / "a.tar")], 0, 1, seed=3, shuffle_buffer=4)
    keys = [next(it)["__key__"] for _ in range(24)]   # three passes
    assert sorted(set(keys)) == [f"s{i:05d}" for i in range(8)]
    assert keys[:8] != sorted(keys[:8])


def test_image_transform():
    img = Image.new("RGB", (64, 48), (255, 0, 0))
    arr = image_to_tensor_array(img, 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert np.allclose(arr[0], 1.0) and np.allclose(arr[1], -1.0)


@pytest.mark.parametrize("preload", [2 ** 31, 0])
def test_rank_batches_in_memory_and_streaming(tmp_path, preload):
    from pipelines.shards import rank_batches
    urls = []
    for k in range(2):
        _write(tmp_path / f"{k}.tar", _samples(8, offset=10 * k))
        urls.append(str(tmp_path / f"{k}.tar"))
    seen = []
    for rank in range(2):
        it = rank_batches(urls, rank, 2, seed=0, batch_size=4, preload_max_bytes=preload,
                          to_arrays=lambda s: {"m": s["mean.npy"], "k": np.array(int(s["__key__"][1:]))})
        for _ in range(4):   # two epochs of this rank's 8 samples
            b = next(it)
            assert b["m"].shape == (4, 4, 2, 2)
            assert np.all(b["m"][:, 0, 0, 0] == b["k"])   # arrays of one sample stay together
            seen += b["k"].tolist()
    everything = [10 * k + i for k in range(2) for i in range(8)]
    assert len(seen) == 32
    if preload:   # in memory: every epoch is a permutation, so two epochs cover each sample twice
        assert sorted(seen) == sorted(everything * 2)
    else:         # streaming: a shuffle buffer, so only membership is certain
        assert set(seen) <= set(everything) and len(set(seen)) >= 8
