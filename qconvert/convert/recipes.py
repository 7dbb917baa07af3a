"""Selective-quantization recipes: which Linear layers of a family's transformer to quantize.

A recipe is data: the family's classes, its default source, and skip rules, each with the
reason that goes into the plan, the manifest and the card. Rules match module names: a plain
pattern matches as a substring (the seed's ``"embed" in name``), one with ``* ? [`` as a glob
over the whole name, and ``re:...`` as a regular expression searched in the name.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

# Layers with in or out features below this stay in bf16 (the seed's size rule: the GEMMs are
# too small for low-precision kernels to pay for their quantization overhead).
MIN_FEATURES = 1024


@dataclass(frozen=True)
class Rule:
    pattern: str
    reason: str


@dataclass(frozen=True)
class Recipe:
    name: str
    title: str
    transformer_class: str
    pipeline_classes: tuple[str, ...]
    default_source: str
    pipeline_tag: str
    skip: tuple[Rule, ...]
    min_features: int = MIN_FEATURES
    tiny_module: str = ""
    notes: tuple[str, ...] = field(default=())


def matches(pattern: str, name: str) -> bool:
    """Whether a skip pattern matches a module name (substring, glob or ``re:`` regex)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def check_pattern(pattern: str) -> str | None:
    """Why a user-given pattern is invalid, or None."""
    if not pattern.strip():
        return "empty pattern"
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            return f"invalid regular expression {pattern[3:]!r}: {e}"
    return None


FLUX = Recipe(
    name="flux",
    title="FLUX.1",
    transformer_class="FluxTransformer2DModel",
    pipeline_classes=("FluxPipeline",),
    default_source="black-forest-labs/FLUX.1-dev",
    pipeline_tag="text-to-image",
    skip=(
        Rule("embed", "embedding layer: kept in bf16 for accuracy (seed recipe)"),
        Rule("norm_out.linear", "final AdaLN modulation: kept in bf16 for accuracy (seed recipe)"),
        Rule("proj_out", "output projection: kept in bf16 for accuracy (seed recipe)"),
    ),
    tiny_module="qconvert.convert.tiny_flux",
    notes=(
        "The seed's `proj_out` rule matches by substring, so it keeps every single block's "
        "`proj_out` in bf16 as well as the final one.",
    ),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (FLUX,)}


def recipe_for_class(class_name: str) -> Recipe | None:
    """The recipe whose transformer class is ``class_name``, if any."""
    return next((r for r in RECIPES.values() if r.transformer_class == class_name), None)
