"""Our safetensors reader/writer agree with the safetensors library, byte for byte where it
matters, and fail with the file and tensor named."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert.safetensors_io import (
    DTYPES,
    SafetensorsError,
    open_reader,
    read_header,
    read_tensor,
    write_file,
)


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES.values()):
        t = (torch.randn(3, 5, generator=g) * 10).to(dtype)
        out[f"m{i}.t_{str(dtype).split('.')[-1]}"] = t
    out["scalar.scale"] = torch.tensor(1.5)
    out["empty.t"] = torch.zeros(0, 4)
    return out


def test_safetensors_reads_what_we_write(tmp_path: Path) -> None:
    tensors = sample()
    write_file(tmp_path / "a.safetensors", tensors, {"format": "pt", "z": "1", "a": "2"})
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "z": "1", "a": "2"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_we_read_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = {k: v for k, v in sample().items() if v.numel()}
    save_file(tensors, tmp_path / "b.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "b.safetensors")
    assert header.metadata == {"format": "pt"}
    with open_reader(tmp_path / "b.safetensors") as f:
        for name, t in tensors.items():
            got = read_tensor(header.tensors[name], f)
            assert torch.equal(
                got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
            ), name


def test_writes_are_deterministic(tmp_path: Path) -> None:
    meta = {f"k{i}": json.dumps({"i": i}) for i in range(50)}
    write_file(tmp_path / "1.safetensors", sample(), meta)
    write_file(
        tmp_path / "2.safetensors", dict(reversed(sample().items())), dict(reversed(meta.items()))
    )
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_tensors_are_aligned(tmp_path: Path) -> None:
    write_file(tmp_path / "a.safetensors", sample(), {})
    for info in read_header(tmp_path / "a.safetensors").tensors.values():
        assert info.start % info.dtype.itemsize == 0, info.name


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_file(path, {"a.weight": torch.ones(64, 64), "b.weight": torch.ones(64, 64)}, {})
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(SafetensorsError, match=r"t\.safetensors: tensor '.\.weight' lies outside"):
        read_header(path)
    path.write_bytes(data[:20])
    with pytest.raises(SafetensorsError, match="corrupt or truncated"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(SafetensorsError, match="corrupt safetensors header"):
        read_header(path)
