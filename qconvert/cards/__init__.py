"""Model cards: the README.md of a qconvert output, rendered from its manifest.

The card is a function of ``qconvert.json`` (plus the optional ``quality.json`` / ``speed.json``
beside it and the repo id it is published under), so ``qconvert card DIR`` reproduces it and two
identical conversions write identical cards: no timestamps, no paths of the machine that renders
it. The template is ``template.md.j2``, rendered through huggingface_hub's ``ModelCard`` with a
``ModelCardData`` header (license, base_model, base_model_relation, pipeline_tag, library_name,
tags). The hardware matrix is rendered from ``qconvert.loaders.runtime.TABLE``, the table the
loader itself runs.

Measurements are never invented: the quality and speed sections appear only when a
measurement file exists (``cards.measurements`` holds their schema).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qconvert import manifest as mf
from qconvert.cards.base import (
    Base,
    CardError,
    base_of,
    default_repo_name,
    formats_of,
    restricts_use,
)
from qconvert.cards.context import context
from qconvert.cards.measurements import PICTURE, QUALITY, SPEED, read_measurement
from qconvert.contain import ContainmentError, inside
from qconvert.errors import ManifestError

CARD = "README.md"
# Files an output may hold besides those its manifest lists.
EXTRA_FILES = (mf.MANIFEST, CARD, QUALITY, SPEED, PICTURE)
TEMPLATE = Path(__file__).with_name("template.md.j2")
TAGS = ("torchao", "qconvert")


def card_data(ctx: dict[str, Any]) -> Any:
    """The YAML header, as huggingface_hub's ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    lic = ctx["license"]
    return ModelCardData(
        base_model=ctx["base"].repo_id,
        base_model_relation="quantized" if ctx["base"].repo_id else None,
        library_name="diffusers",
        pipeline_tag=ctx["pipeline_tag"],
        license=lic["id"],
        license_name=lic["name"],
        license_link=lic["link"],
        tags=[TAGS[0], *(f["name"] for f in ctx["formats"]), *TAGS[1:]],
    )


def render_card(output_dir: str | Path, repo_id: str | None = None) -> str:
    """The README.md text for a qconvert output folder.

    ``repo_id`` is the Hub id the usage snippets load (default: the default repo name, which is
    also the CLI's default output folder name).
    """
    from huggingface_hub import ModelCard

    root = Path(output_dir)
    try:
        manifest = mf.load(root)
    except ManifestError as e:
        raise CardError(str(e)) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CardError(f"{root / mf.MANIFEST}: not readable JSON ({e})") from e
    ctx = context(manifest, repo_id, read_measurement(root, QUALITY), read_measurement(root, SPEED))
    card = ModelCard.from_template(
        card_data(ctx), template_str=TEMPLATE.read_text(encoding="utf-8"), **ctx
    )
    text = str(card).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def write_card(output_dir: str | Path, repo_id: str | None = None) -> Path:
    """Render the card and write it to ``output_dir/README.md``; returns the path."""
    try:  # never write through a link out of the folder
        path = inside(Path(output_dir), CARD, f"{output_dir}: card")
    except ContainmentError as e:
        raise CardError(str(e)) from None
    text = render_card(output_dir, repo_id)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = [
    "CARD",
    "EXTRA_FILES",
    "QUALITY",
    "SPEED",
    "Base",
    "CardError",
    "base_of",
    "context",
    "default_repo_name",
    "formats_of",
    "render_card",
    "restricts_use",
    "write_card",
]
