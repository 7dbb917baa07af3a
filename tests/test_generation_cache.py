"""qconvert.evaluate.cache: entries round-trip, a damaged entry is dropped and regenerated, and
nothing but safetensors is read."""

from __future__ import annotations

from pathlib import Path

import torch

from qconvert.evaluate.cache import GenerationCache, Sample, key


def test_samples_and_objects_round_trip(tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path)
    k = key("pipe", "a cat", 0, {"steps": 2}, "cpu")
    assert cache.get(k) is None
    frames = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    audio = torch.randn(2, 16)
    cache.put(k, Sample(frames, audio, 1.25, 3), {"prompt": "a cat"})
    got = cache.get(k)
    assert got is not None and torch.equal(got.frames, frames) and torch.equal(got.audio, audio)
    assert (got.seconds, got.non_finite) == (1.25, 3)
    value = {"x": torch.arange(3), "kw": (1, "s", None, [torch.ones(2, 2)])}
    cache.put_object("ab" + "0" * 62, value)
    back = cache.get_object("ab" + "0" * 62)
    assert torch.equal(back["x"], value["x"]) and back["kw"][:3] == (1, "s", None)
    assert torch.equal(back["kw"][3][0], torch.ones(2, 2))
    assert not list(tmp_path.rglob("*.tmp"))  # written to a temporary name, then renamed


def test_a_damaged_entry_is_dropped(tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path)
    k = key("pipe", "a dog", 1, {}, "cpu")
    cache.put(k, Sample(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)), {})
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:20])  # truncated
    assert cache.get(k) is None and not path.exists()
    cache.put_object(k, {"y": torch.ones(1)})  # an object entry read as a sample: no frames
    assert cache.get(k) is None and not path.exists()
    cache.put(k, Sample(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)), {})
    assert cache.get_object(k) is None and not path.exists()  # a sample read as an object
