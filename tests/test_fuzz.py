"""Fuzz tests (issue 11) of the two readers of untrusted bytes: the safetensors header reader and
the source opener. Seeded and bounded (hypothesis, derandomized, a few seconds): every input
ends in success or in one QconvertError whose message is one line — never another exception —
and nothing outside the input's root is opened (an audit hook records every open)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from functools import cache
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from safety_fixtures import INDEX, SMALL, opened_files, secret_file, sparse_pipeline, specs_for

from qconvert.contain import is_plain
from qconvert.convert.source import open_local
from qconvert.errors import QconvertError
from qconvert.safetensors_io import DTYPES, read_header, read_tensor

FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the header reader -----------------------------------------------------------------------

dims = st.one_of(
    st.integers(-3, 40), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3),
    st.integers(2**62, 2**70),
)
entry = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from([*DTYPES, "Q4", "", "f32"]), st.integers()),
        "shape": st.one_of(st.lists(dims, max_size=4), st.integers(), st.none()),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 300), min_size=0, max_size=3), dims),
    }
)
metadata = st.one_of(
    st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), st.integers())),
    st.lists(st.integers(), max_size=2), st.text(max_size=4), st.none(),
)
header = st.one_of(
    st.dictionaries(st.text(max_size=6), st.one_of(entry, st.integers(), st.lists(st.none())),
                    max_size=5),
    st.builds(lambda t, m: {**t, "__metadata__": m},
              st.dictionaries(st.text(max_size=6), entry, max_size=4), metadata),
)


@cache
def _valid_specs() -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return dict(sorted(specs_for(SMALL).items())[:6])


def _well_formed(draw: st.DrawFn) -> dict[str, object]:
    """A header that would be valid, then one field of it changed (or not)."""
    out: dict[str, object] = {}
    offset = 0
    for name, (_dtype, shape) in _valid_specs().items():
        n = 2
        for d in shape:
            n *= d
        out[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(out)))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        out[name] = {**out[name], key: draw(entry)[key]}  # type: ignore[dict-item]
    return out


@st.composite
def files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json", "valid-ish", "valid-ish", "valid-ish", "bytes", "length"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + draw(st.binary(max_size=16))
    head = _well_formed(draw) if kind == "valid-ish" else draw(header)
    raw = json.dumps(head).encode()
    if kind == "json" and draw(st.booleans()):
        raw = raw[: draw(st.integers(0, len(raw)))]  # a cut header
    declared = len(raw) + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1, 5]))
    exact = sum(2 * torch.Size(shape).numel() for _, shape in _valid_specs().values())
    body = draw(st.sampled_from([0, 16, 4096, *[exact] * 6, exact - 1, exact + 1]))
    return struct.pack("<Q", max(declared, 0)) + raw + b"\0" * body


def _one_line(error: QconvertError) -> None:
    text = str(error)
    assert text and "\n" not in text and "\r" not in text, text


@seed(1101)
@FUZZ
@given(files())
def test_header_reader_is_one_line_or_sound(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(data)
        try:
            parsed = read_header(path)
        except QconvertError as e:
            _one_line(e)
            event("refused")
            return
        event("read")
        size = len(data)
        position = min((t.start for t in parsed.tensors.values()), default=size)
        for info in sorted(parsed.tensors.values(), key=lambda t: (t.start, t.nbytes)):
            assert info.start == position and info.start + info.nbytes <= size
            position += info.nbytes
            assert tuple(read_tensor(info).shape) == info.shape  # reads stay in the file
        assert position == size
        assert all(isinstance(v, str) for v in parsed.metadata.values())


# -- the source opener -----------------------------------------------------------------------

ENTRIES = [
    "diffusion_pytorch_model-00001-of-00002.safetensors",
    "diffusion_pytorch_model-00002-of-00002.safetensors",
    "../../outside/secret.safetensors", "<secret>", "./diffusion_pytorch_model-00001-of-00002"
    ".safetensors", "sub/../../x.safetensors", "", "/", "a\\b", "nul\0x", "missing.safetensors",
    "../transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
]
KEYS = ["vae", "../outside", "vae/../..", "/etc", "text_encoder_2", "_class_name", "a b", "é",
        "transformer", "..", ".", ""]
LINKS = ["vae", "vae/config.json", "LICENSE", "README.md", "transformer",
         "transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "model_index.json",
         "transformer/config.json", f"transformer/{INDEX}", "vae/sub"]


@st.composite
def sources(draw: st.DrawFn) -> dict[str, object]:
    if draw(st.integers(0, 4)) == 0:  # now and then the source as it was: it must open
        return {"entries": {}, "keys": {}, "links": [], "index": "keep", "readme": None}
    return {
        "entries": draw(st.dictionaries(st.sampled_from(["x_embedder.weight", "proj_out.bias",
                                                         "context_embedder.weight"]),
                                        st.sampled_from(ENTRIES), max_size=3)),
        "keys": draw(st.dictionaries(st.sampled_from(KEYS),
                                     st.sampled_from([["diffusers", "AutoencoderKL"], [None, None],
                                                      "x", ["a"], ["diffusers", 3]]),
                                     max_size=3)),
        "links": draw(st.lists(st.sampled_from(LINKS), max_size=2, unique=True)),
        "index": draw(st.sampled_from(["keep", "drop", "list", "garbage", "no weight_map"])),
        "readme": draw(st.sampled_from([None, "---\nlicense: [1, {a: 2}]\n---\n", "---\n: :\n"])),
    }


def _build(root: Path, outside: Path, spec: dict[str, object]) -> None:
    secret = outside / "secret.safetensors"
    index = root / "transformer" / INDEX
    data = json.loads(index.read_text())
    for tensor, entry in spec["entries"].items():  # type: ignore[attr-defined]
        data["weight_map"][tensor] = str(secret) if entry == "<secret>" else entry
    kind = spec["index"]
    if kind == "drop":
        index.unlink()
    elif kind == "list":
        index.write_text(json.dumps([data]))
    elif kind == "garbage":
        index.write_bytes(b"\xff{")
    elif kind == "no weight_map":
        index.write_text("{}")
    else:
        index.write_text(json.dumps(data))
    model_index = json.loads((root / "model_index.json").read_text())
    model_index.update(spec["keys"])  # type: ignore[arg-type]
    (root / "model_index.json").write_text(json.dumps(model_index))
    if spec["readme"]:
        (root / "README.md").write_text(str(spec["readme"]))
    for rel in spec["links"]:  # type: ignore[attr-defined]
        link = root / rel
        if link.is_dir() and not link.is_symlink():
            for p in sorted(link.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            link.rmdir()
        else:
            link.unlink(missing_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(outside if rel in ("vae", "transformer", "vae/sub") else secret)


@seed(1102)
@settings(FUZZ, max_examples=50)
@given(sources())
def test_source_opener_reads_nothing_outside(spec: dict[str, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outside = Path(tmp) / "outside"
        secret_file(outside)
        root = sparse_pipeline(Path(tmp) / "src")
        _build(root, outside, spec)
        private = str(outside.resolve())
        with opened_files() as opened:
            try:
                source = open_local(root)
                copies = source.component_files(False)
            except QconvertError as e:
                _one_line(e)
                event(f"refused: {type(e).__name__}")
                source = None
        assert not [p for p in opened if p.startswith(private)], (spec, opened)
        if source is None:
            return
        event("opened")
        real_root = root.resolve()
        for header in source.shards:
            assert header.path.resolve().is_relative_to(real_root)
        for rel in copies:
            assert is_plain(rel) and (root / rel).resolve().is_relative_to(real_root), rel
        assert not os.path.islink(source.transformer_dir)
