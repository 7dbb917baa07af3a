"""The side-by-side picture of a quality report: bf16 | quantized for a few prompts (for a
video, a strip of evenly spaced frames of each, one above the other), each captioned with its
prompt."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qconvert.evaluate.cache import Sample

if TYPE_CHECKING:
    from PIL.Image import Image

GAP = 6
LINE = 14  # pixels per caption line (PIL's default font)
CHAR = 6  # approximate width of one character of PIL's default font
MIN_TILE, MAX_TILE = 128, 384


def _frame(frame: torch.Tensor, width: int) -> Image:
    from PIL import Image as PILImage

    img = PILImage.fromarray(frame.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if img.width == width:
        return img
    resample = PILImage.NEAREST if width > img.width else PILImage.LANCZOS
    return img.resize((width, max(1, round(img.height * width / img.width))), resample)


def _row(frames: torch.Tensor, width: int) -> Image:
    from PIL import Image as PILImage

    tiles = [_frame(f, width) for f in frames]
    out = PILImage.new("RGB", (len(tiles) * (width + GAP) - GAP, tiles[0].height), "white")
    for i, tile in enumerate(tiles):
        out.paste(tile, (i * (width + GAP), 0))
    return out


def _pick(frames: torch.Tensor, count: int) -> torch.Tensor:
    if frames.shape[0] <= count:
        return frames
    return frames[torch.linspace(0, frames.shape[0] - 1, count).round().long()]


def _captioned(parts: list[tuple[str, Image]], width: int) -> Image:
    """Images stacked, each under its caption (wrapped to ``width``)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    wrapped = [textwrap.wrap(text, max(16, width // CHAR))[:3] or [""] for text, _ in parts]
    height = sum(
        len(w) * LINE + 4 + img.height + GAP for w, (_, img) in zip(wrapped, parts, strict=True)
    )
    out = PILImage.new("RGB", (width, height - GAP), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for lines, (_, img) in zip(wrapped, parts, strict=True):
        for line in lines:
            draw.text((2, y), line, fill="black")
            y += LINE
        y += 4
        out.paste(img, (0, y))
        y += img.height + GAP
    return out


def side_by_side(
    rows: list[tuple[str, Sample, Sample]], labels: tuple[str, str], strip: int = 4
) -> Image:
    """The picture for (prompt, bf16 sample, quantized sample) rows."""
    video = rows[0][1].frames.shape[0] > 1
    native = int(rows[0][1].frames.shape[-1])
    tile = min(MAX_TILE // (2 if video else 1), max(MIN_TILE, native))
    parts: list[tuple[str, Image]] = []
    for prompt, ref, out in rows:
        a, b = _row(_pick(ref.frames, strip), tile), _row(_pick(out.frames, strip), tile)
        if video:
            parts.append((f"{labels[0]}: {prompt}", a))
            parts.append((labels[1], b))
        else:
            from PIL import Image as PILImage

            pair = PILImage.new("RGB", (a.width + GAP + b.width, a.height), "white")
            pair.paste(a, (0, 0))
            pair.paste(b, (a.width + GAP, 0))
            parts.append((f"{labels[0]} | {labels[1]}: {prompt}", pair))
    return _captioned(parts, max(img.width for _, img in parts))


def write(path: Path, picture: Image) -> Path:
    """Save as PNG through a temporary file (nothing half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    picture.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path
