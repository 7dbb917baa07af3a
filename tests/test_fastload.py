"""The fast load path (qconvert.loaders.fastload / fastpipe / reading) builds exactly what the
compatibility path builds — diffusers' from_pretrained, then runtime.prepare — for tiny FLUX in
each format and tiny Qwen-Image / LTX-2 outputs mixing all three formats, on the CPU path and
on the Hopper (sm89) path (whose modules run on CPU too); without gc.collect, reference cycles
or leftover tensors; from a pipeline folder, a lone transformer and shards that split a
weight's pieces; with a logged fallback for what it cannot represent, and one-line errors for
damaged files. The Hub path is in test_fastload_hub.py."""

from __future__ import annotations

import copy
import functools
import gc
import json
import logging
import re
import shutil
import struct
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import AutoModel
from model_compare import same_model
from safetensors.torch import load_file, save_file

from qconvert.contain import ContainmentError
from qconvert.convert import convert
from qconvert.loaders import fastload, load_pipeline, load_transformer, reading, runtime
from qconvert.loaders.fastload import FastLoad, Unsupported
from qconvert.manifest import MANIFEST
from qconvert.safetensors_io import SafetensorsError
from qconvert.tiny import ltx2 as tiny_ltx2
from qconvert.tiny import qwenimage as tiny_qwenimage

CPU = torch.device("cpu")
# Every family's quantized layers in all three formats at once (first matching rule wins).
MIXED = {
    "qwenimage": [("re:\\.attn\\.to_[qkv]$", "fp8"), ("re:\\.img_mlp\\.", "mxfp8")],
    "ltx2": [("re:attn\\d*\\.to_[qkv]$", "fp8"), ("re:\\.ff\\.net\\.", "mxfp8")],
}


def old_path(root: Path, dclass: str, subfolder: str | None = "transformer") -> torch.nn.Module:
    """What load_transformer did before the fast path: from_pretrained, .to, prepare."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    model = AutoModel.from_pretrained(str(root), dtype=torch.bfloat16, **kwargs)
    model.to(CPU)
    runtime.prepare(model, CPU, dclass=dclass)
    # prepare swaps Linears after from_pretrained's eval(): its new modules keep nn.Module's
    # default training=True; the fast path's are in eval mode like the rest. Nothing reads the
    # flag in these modules (no dropout); the comparison below checks everything else.
    return model.eval()


def fast_path(
    root: Path, dclass: str, subfolder: str | None = "transformer", **kw: object
) -> torch.nn.Module:
    load_id = {"pretrained_model_name_or_path": str(root), "subfolder": subfolder}
    fast = FastLoad(
        root / subfolder if subfolder else root, root, CPU, str(root), dclass=dclass,
        load_id=load_id, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    fast.begin()
    return fast.finish()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen-Image and LTX-2 transformers, each holding nvfp4, mxfp8 and fp8 layers."""
    out = {}
    for family, module in (("qwenimage", tiny_qwenimage), ("ltx2", tiny_ltx2)):
        root = tmp_path_factory.mktemp(family)
        module.build(root / "src", seed=0)
        recipe = root / "mixed.toml"
        rules = "".join(
            f'[[rule]]\npattern = "{p}"\nformat = "{f}"\nreason = "test"\n'
            for p, f in MIXED[family]
        )
        recipe.write_text(f'format = "nvfp4"\n{rules}'.replace("\\", "\\\\"))
        result = convert(
            root / "out", family=family, fmt="nvfp4", source=root / "src", recipe_file=recipe,
            transformer_only=True, progress=False,
        )  # fmt: skip
        assert result.manifest["formats"] == ["fp8", "mxfp8", "nvfp4"]
        out[family] = result.output
    return out


@pytest.mark.parametrize("dclass", ["cpu", "sm89"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "fp8"])
def test_flux_equals_from_pretrained_and_prepare(
    fmt: str, dclass: str, converted: dict[str, Path]
) -> None:
    ours = fast_path(converted[fmt], dclass)
    same_model(ours, old_path(converted[fmt], dclass))
    kinds = {type(m).__name__ for m in ours.modules()}
    if dclass == "sm89":
        assert ("HopperQuantLinear" if fmt != "fp8" else "Fp8RowwiseLinear") in kinds
    if dclass == "sm89" and fmt == "fp8":  # q/k/v fused, module by module
        assert hasattr(ours.transformer_blocks[0].attn, "to_qkv")


@pytest.mark.parametrize("dclass", ["cpu", "sm89"])
@pytest.mark.parametrize("family", ["qwenimage", "ltx2"])
def test_mixed_formats_equal_from_pretrained_and_prepare(
    family: str, dclass: str, mixed: dict[str, Path]
) -> None:
    ours = fast_path(mixed[family], dclass, subfolder=None)
    same_model(ours, old_path(mixed[family], dclass, subfolder=None))
    weights = {type(m.weight).__name__ for m in ours.modules() if hasattr(m, "weight")}
    if dclass == "cpu":
        assert {"NVFP4Tensor", "MXTensor", "Float8Tensor"} <= weights


def test_the_comparison_sees_differences(converted: dict[str, Path]) -> None:
    """The equality checks above can fail: one flipped byte, one attribute, one repr."""
    ref = old_path(converted["nvfp4"], "cpu")
    ours = fast_path(converted["nvfp4"], "cpu")
    ours.transformer_blocks[0].attn.to_q.weight.qdata.view(-1)[7] ^= 1
    with pytest.raises(AssertionError, match=r"to_q\.weight\.qdata: values differ"):
        same_model(ours, ref)
    ours = fast_path(converted["nvfp4"], "cpu")
    ours.transformer_blocks[0].attn.to_q.weight.act_quant_kwargs = object()
    with pytest.raises(AssertionError, match="act_quant_kwargs"):
        same_model(ours, ref)
    ours = fast_path(converted["nvfp4"], "cpu")
    del ours.transformer_blocks[0].attn.to_k.extra_repr  # diffusers' repr of quantized Linears
    with pytest.raises(AssertionError, match="to_k: keys"):
        same_model(ours, ref)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_no_gc_no_cycles_no_leftover_tensors(
    fmt: str, converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swapped and fused modules are freed by reference counting as the load goes: nothing
    calls gc.collect, and after the load no tensor is alive outside the model."""
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    gc.disable()
    try:
        held = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]  # ids stay unique
        before = {id(o) for o in held}
        model = fast_path(converted[fmt], "sm89")
        kept = set()  # the storages the model's tensors (and their pieces) use
        for t in [*model.parameters(), *model.buffers()]:
            for piece in [t, *(getattr(t, n) for n in getattr(t, "tensor_data_names", []))]:
                if type(piece) is torch.Tensor or isinstance(piece, torch.nn.Parameter):
                    kept.add(piece.untyped_storage().data_ptr())
        stray = [
            o for o in gc.get_objects()
            if type(o) is torch.Tensor and id(o) not in before and o.numel() > 64
            and o.untyped_storage().data_ptr() not in kept
        ]  # fmt: skip
    finally:
        gc.enable()
    assert calls == []
    assert stray == [], [(type(t).__name__, tuple(t.shape)) for t in stray[:5]]


def test_fusing_many_attention_modules_needs_no_gc(
    converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path fuses q/k/v without fp8.fuse_projections' gc.collect every 8 modules
    (FLUX has 57; each collection costs ~0.25 s): 9 unfused attention modules fuse with no
    collection and no leftover tensor, as the fast path asks for."""
    from qconvert.loaders import fp8

    calls: list[object] = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    unfused = fast_path(converted["fp8"], "sm89", fuse_qkv=False)
    attention = unfused.transformer_blocks[0].attn
    many = torch.nn.ModuleList([copy.deepcopy(attention) for _ in range(9)])
    assert fp8.fuse_projections(copy.deepcopy(many)) == 9 and len(calls) == 1  # the default
    calls.clear()
    gc.disable()
    try:
        parts = [weakref.ref(m.qdata) for a in many for m in (a.to_q, a.to_k, a.to_v)]
        assert fp8.fuse_projections(many, collect=False) == 9 and calls == []
        alive = [r for r in parts if r() is not None]
    finally:
        gc.enable()
    assert alive == []  # the unfused weights went as each module was fused
    seen = []
    real = fp8.fuse_projections
    monkeypatch.setattr(fp8, "fuse_projections", lambda m, **kw: seen.append(kw) or real(m, **kw))
    fast_path(converted["fp8"], "sm89")
    assert seen == [{"collect": False}]


def test_load_transformer_and_pipeline_use_it(
    converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The public functions take the fast path and build what the compatibility path builds
    (QCONVERT_FAST_LOAD=0), pipeline components included."""
    root = converted["mxfp8"]
    with caplog.at_level(logging.WARNING, "qconvert.loaders"):
        fast_t, fast_p = load_transformer(root, device="cpu"), load_pipeline(root, device="cpu")
    assert "compatibility path" not in caplog.text
    assert caplog.text.count("MXTensor weights on cpu run emulated") == 2
    monkeypatch.setenv("QCONVERT_FAST_LOAD", "0")
    caplog.clear()
    with caplog.at_level(logging.WARNING, "qconvert.loaders"):
        old_t, old_p = load_transformer(root, device="cpu"), load_pipeline(root, device="cpu")
    assert caplog.text.count("(compatibility path): QCONVERT_FAST_LOAD=0") == 2
    same_model(fast_t, old_t)
    assert dict(fast_p.config) == dict(old_p.config)
    assert fast_p.components.keys() == old_p.components.keys()
    for name, part in old_p.components.items():
        if isinstance(part, torch.nn.Module):
            same_model(fast_p.components[name], part, name)
        else:
            assert type(fast_p.components[name]) is type(part), name
            assert dict(getattr(part, "config", {})) == dict(
                getattr(fast_p.components[name], "config", {})
            )


def test_lone_transformer_and_pieces_split_across_shards(
    converted: dict[str, Path], tmp_path: Path
) -> None:
    """A transformer folder at the root, written as two shards that split every quantized
    weight's pieces (diffusers and torchao accept that; so must we)."""
    src = converted["nvfp4"]
    dst = tmp_path / "lone"
    dst.mkdir()
    shutil.copy(src / "transformer" / "config.json", dst)
    shutil.copy(src / MANIFEST, dst)
    tensors, metadata = {}, {}
    for f in fastload.shard_files(src / "transformer"):
        tensors.update(load_file(f))
        metadata.update(fastload.read_header(f)[1])
    one = {k: v for k, v in tensors.items() if not k.endswith("_weight_qdata")}
    two = {k: v for k, v in tensors.items() if k.endswith("_weight_qdata")}
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors",
             "diffusion_pytorch_model-00002-of-00002.safetensors"]  # fmt: skip
    save_file(one, dst / names[0], metadata=metadata)
    save_file(two, dst / names[1], metadata=metadata)
    weight_map = {k: names[0] for k in one} | {k: names[1] for k in two}
    (dst / fastload.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    same_model(fast_path(dst, "sm89", subfolder=None), old_path(dst, "sm89", subfolder=None))
    assert type(load_transformer(dst, device="cpu")).__name__ == "FluxTransformer2DModel"


def test_other_readers_give_the_same_model(
    converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """safe_open(device=...) (QCONVERT_LOAD_READER=safetensors) and the staged reads of the
    CUDA path build the same model as the CPU path's in-place reads."""
    ref = fast_path(converted["fp8"], "sm89")
    same_model(fast_path(converted["fp8"], "sm89", reader="safetensors"), ref)
    monkeypatch.setattr(fastload, "Stream", functools.partial(reading.Stream, staged=True))
    same_model(fast_path(converted["fp8"], "sm89"), ref)


@pytest.mark.parametrize("staged", [False, True])
def test_stream_chunks_and_threads(
    staged: bool, converted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors spanning many chunks, read by several threads, come back byte for byte, read
    in place (the CPU path) or through two staging buffers per thread (the CUDA path's logic:
    a buffer is refilled while the other's copy runs)."""
    monkeypatch.setattr(reading, "CHUNK", 4099)
    files = fastload.shard_files(converted["mxfp8"] / "transformer")[:2]
    entries = [e for f in files for e in reading.read_header(f)[0].values()]
    want = {k: v for f in files for k, v in load_file(f).items()}
    with reading.Stream(entries, CPU, threads=3, staged=staged) as stream:
        got = dict((e.name, t) for e, t in stream)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def test_fallback_is_logged_and_works(
    converted: dict[str, Path], tiny_flux: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a qconvert output, another manifest schema, a tensor type the fast path does not
    build, unknown keyword arguments: one log line, then the compatibility path."""
    old = tmp_path / "old-schema"
    shutil.copytree(converted["fp8"], old)
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps({**manifest, "schema": 0}))
    cases = [
        (tiny_flux, {}, "no qconvert.json; not a qconvert output"),
        (old, {}, "qconvert.json schema 0 (this qconvert reads 1)"),
        (converted["fp8"], {"low_cpu_mem_usage": True}, "does not take low_cpu_mem_usage"),
    ]
    for root, kwargs, why in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, "qconvert.loaders"):
            model = load_transformer(root, device="cpu", **kwargs)
        lines = [r.getMessage() for r in caplog.records if "compatibility path" in r.getMessage()]
        assert len(lines) == 1 and why in lines[0], caplog.text
        assert type(model).__name__ == "FluxTransformer2DModel"
    unknown = tmp_path / "unknown-type"
    shutil.copytree(converted["fp8"], unknown)
    name = "transformer_blocks.0.attn.to_k.weight"
    for shard in fastload.shard_files(unknown / "transformer"):
        tensors, metadata = load_file(shard), fastload.read_header(shard)[1]
        metadata[name] = metadata[name].replace("Float8Tensor", "Int8Tensor")
        save_file(tensors, shard, metadata=metadata)
    with pytest.raises(Unsupported, match=re.escape(f"tensor '{name}': torchao type 'Int8Tensor'")):
        fastload.layout(unknown / "transformer", unknown)


def test_damaged_files_fail_in_one_line(converted: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(converted["nvfp4"], root)
    tdir = root / "transformer"
    index = json.loads((tdir / fastload.INDEX).read_text())
    first = next(iter(index["weight_map"]))
    (tdir / fastload.INDEX).write_text(
        json.dumps({**index, "weight_map": {**index["weight_map"], first: "../x.safetensors"}})
    )
    with pytest.raises(ContainmentError, match=r"weight_map entry '\.\./x\.safetensors' climbs"):
        load_transformer(root, device="cpu")
    shutil.copy(converted["nvfp4"] / "transformer" / fastload.INDEX, tdir)
    shard = fastload.shard_files(tdir)[0]
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(SafetensorsError, match=f"tensor '{key}': .* but data_offsets span"):
        load_transformer(root, device="cpu")
    shard.write_bytes(data[: 8 + n + 100])  # the original header, most of the data gone
    with pytest.raises(SafetensorsError, match="lies outside the file"):
        load_transformer(root, device="cpu")
