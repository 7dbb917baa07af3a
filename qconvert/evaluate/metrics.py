"""How far a quantized pipeline's outputs and weights are from bf16.

Image metrics compare uint8 outputs (what a user sees), scaled to [0, 1]:
- PSNR (torchmetrics), dB, higher is better. Identical outputs have an infinite PSNR, which
  JSON cannot hold: such a value is written as ``null`` with ``"identical": true`` beside it.
  A video's PSNR pools the squared error of all its frames; the aggregate over prompts pools
  all prompts' squared errors (so one identical prompt does not make the mean infinite).
- SSIM (torchmetrics, Gaussian window 11, σ 1.5), 1 = identical; per frame, averaged.
- LPIPS (``lpips.py``), 0 = identical, lower is better; per frame, averaged.
- Audio: log-spectral distance (dB) between the two waveforms' power spectrograms (STFT,
  Hann window), 0 = identical.
From the weights: SQNR (dB) of each quantized weight's dequantized values against its bf16
source, and the relative L2 error of one transformer forward pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from qconvert.evaluate.cache import Sample


def torchmetrics_image() -> Any:
    """torchmetrics' image functions; EvalError naming the extra when it is missing."""
    try:
        from torchmetrics.functional import image
    except ModuleNotFoundError:
        from qconvert.evaluate.errors import EvalError

        raise EvalError(
            "qconvert eval needs torchmetrics (PSNR, SSIM): pip install 'qconvert[eval]'"
        ) from None
    return image


def _unit(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 255.0


def mse(ref: Sample, out: Sample) -> float:
    return float(((_unit(ref.frames) - _unit(out.frames)) ** 2).mean())


def psnr_db(ref: Sample, out: Sample) -> float:
    """PSNR in dB (``math.inf`` when identical), over all frames."""
    value = torchmetrics_image().peak_signal_noise_ratio(
        _unit(out.frames), _unit(ref.frames), data_range=1.0
    )
    return float(value)


def ssim(ref: Sample, out: Sample) -> float:
    """SSIM per frame, averaged."""
    a, b = _unit(ref.frames), _unit(out.frames)
    value = torchmetrics_image().structural_similarity_index_measure(b, a, data_range=1.0)
    return float(value)  # type: ignore[arg-type]


def lpips_distance(model: torch.nn.Module, ref: Sample, out: Sample, chunk: int = 16) -> float:
    """LPIPS per frame, averaged (frames in chunks to bound memory)."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for start in range(0, ref.frames.shape[0], chunk):
            a = _unit(ref.frames[start : start + chunk]).to(device)
            b = _unit(out.frames[start : start + chunk]).to(device)
            total += float(model(a, b).sum())
    return total / ref.frames.shape[0]


def spectral_distance_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Log-spectral distance (dB) between two waveforms [channels, samples], averaged over
    channels and STFT frames; 0 when identical."""
    n = min(ref.shape[-1], out.shape[-1])
    n_fft = min(1024, 1 << max(4, (n.bit_length() - 1)))
    window = torch.hann_window(n_fft)

    def power_db(x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            x[..., :n].float(), n_fft, hop_length=n_fft // 4, window=window, return_complex=True
        )
        return 10 * torch.log10(spec.abs() ** 2 + 1e-10)

    diff = power_db(ref) - power_db(out)  # [channels, freq, frames]
    return float(torch.sqrt((diff**2).mean(dim=-2)).mean())


def compare(ref: Sample, out: Sample, lpips_model: torch.nn.Module | None) -> dict[str, Any]:
    """Every metric for one prompt: a JSON-ready row (PSNR sentinel: see the module doc)."""
    if ref.frames.shape != out.frames.shape:
        raise ValueError(f"output shapes differ: {tuple(ref.frames.shape)} vs {out.frames.shape}")
    psnr = psnr_db(ref, out)
    row: dict[str, Any] = {
        "psnr_db": None if math.isinf(psnr) else round(psnr, 4),
        "identical": math.isinf(psnr),
        "mse": mse(ref, out),
        "ssim": round(ssim(ref, out), 6),
    }
    if lpips_model is not None:
        row["lpips"] = round(lpips_distance(lpips_model, ref, out), 6)
    if ref.audio is not None and out.audio is not None:
        row["audio_lsd_db"] = round(spectral_distance_db(ref.audio, out.audio), 4)
    return row


def pooled_psnr(rows: list[dict[str, Any]]) -> float:
    """PSNR of the mean squared error over all rows (``math.inf`` when all are identical)."""
    mean = sum(r["mse"] for r in rows) / len(rows)
    return math.inf if mean == 0 else 10 * math.log10(1.0 / mean)


def sqnr_db(ref: torch.Tensor, dequantized: torch.Tensor) -> float:
    """10·log10(Σ ref² / Σ (ref − dequantized)²) (sums accumulated in float64); ``math.inf``
    when they are equal."""
    r = ref.float()
    noise = float(torch.sum((r - dequantized.float()) ** 2, dtype=torch.float64))
    signal = float(torch.sum(r * r, dtype=torch.float64))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal else -math.inf


def rel_l2(ref: Any, out: Any) -> float:
    """‖out − ref‖ / ‖ref‖ over every tensor of two (nested) transformer outputs."""
    a, b = flatten(ref), flatten(out)
    num = sum(float(((y.double() - x.double()) ** 2).sum()) for x, y in zip(a, b, strict=True))
    den = sum(float((x.double() ** 2).sum()) for x in a)
    return math.sqrt(num / den) if den else math.inf


def flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().float().cpu()]
    if isinstance(value, list | tuple):
        return [t for v in value for t in flatten(v)]
    if hasattr(value, "to_tuple"):
        return flatten(value.to_tuple())
    return []


class _Tensors:
    """Every tensor of a folder's safetensors files, read one at a time (safetensors' pread
    reader, one per file, kept open while streaming)."""

    def __init__(self, folder: Path) -> None:
        from qconvert.safetensors_io import read_header

        self.infos: dict[str, Any] = {}
        self.meta: dict[str, str] = {}
        self.readers: dict[Path, Any] = {}
        for path in sorted(folder.glob("*.safetensors")):
            header = read_header(path)
            self.infos.update(header.tensors)
            self.meta.update(header.metadata)

    def read(self, name: str) -> torch.Tensor:
        from qconvert.safetensors_io import open_reader, read_tensor

        info = self.infos[name]
        if info.path not in self.readers:
            self.readers[info.path] = open_reader(info.path)
        return read_tensor(info, self.readers[info.path])


def stored_weights(
    transformer_dir: Path, names: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each named weight of a qconvert output's transformer, rebuilt as its torchao tensor
    from the safetensors files one at a time (the pieces may lie in different shards)."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    files = _Tensors(transformer_dir)
    for name in names:
        weight = f"{name}.weight"
        prefix = f"{name}._weight_"
        pieces = {k: files.read(k) for k in files.infos if k.startswith(prefix)}
        if weight not in files.meta or not pieces:
            raise ValueError(f"{transformer_dir}: no quantized weight {weight!r} in the files")
        md = {"tensor_names": json.dumps([weight]), weight: files.meta[weight]}
        result, _ = unflatten_tensor_state_dict(pieces, md)
        yield name, result[weight]


def source_weights(
    transformer_dir: Path, names: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each named bf16 weight of a diffusers transformer folder, one tensor at a time."""
    files = _Tensors(transformer_dir)
    for name in names:
        if f"{name}.weight" not in files.infos:
            raise ValueError(f"{transformer_dir}: no weight {name}.weight in the reference")
        yield name, files.read(f"{name}.weight")


def weight_sqnr(
    pairs: Iterable[tuple[str, str, torch.Tensor, torch.Tensor]],
) -> list[dict[str, Any]]:
    """[{layer, format, sqnr_db}] for (name, format, bf16 weight, quantized weight) pairs;
    an exact layer gets ``sqnr_db: null, "exact": true``."""
    rows = []
    for name, fmt, ref, quantized in pairs:
        value = sqnr_db(ref, quantized.dequantize(torch.float32))
        row: dict[str, Any] = {"layer": name, "format": fmt}
        row["sqnr_db"] = None if math.isinf(value) else round(value, 4)
        if math.isinf(value):
            row["exact"] = True
        rows.append(row)
    return rows


def file_sqnr(ref_dir: Path, out_dir: Path, layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer SQNR from the files alone: ``layers`` are the manifest's quantized layers."""
    names = [str(layer["name"]) for layer in layers]
    formats = {str(layer["name"]): str(layer["action"]) for layer in layers}
    pairs = (
        (name, formats[name], ref, quantized)
        for (name, ref), (_, quantized) in zip(
            source_weights(ref_dir, names), stored_weights(out_dir, names), strict=True
        )
    )
    return weight_sqnr(pairs)


def summarize_sqnr(rows: list[dict[str, Any]], worst: int = 5) -> dict[str, Any]:
    finite = [r for r in rows if r["sqnr_db"] is not None]
    ordered = sorted(finite, key=lambda r: r["sqnr_db"])
    return {
        "layers": len(rows),
        "exact_layers": len(rows) - len(finite),
        "mean_db": round(sum(r["sqnr_db"] for r in finite) / len(finite), 3) if finite else None,
        "min_db": ordered[0]["sqnr_db"] if ordered else None,
        "worst": ordered[:worst],
    }
