"""Selective-quantization recipes: which Linear layers to quantize, to which format, and why.

Family recipes are data: one TOML file per family in ``family_recipes/`` (its classes, default
source, the real transformer's config, and skip rules with the reason that goes into the plan,
the manifest and the card). Users add rules with ``--skip`` / ``--only`` or a recipe file
(TOML) that maps patterns to formats or to "keep". Patterns match module names: a plain
pattern as a substring (the seed's ``"embed" in name``), ``exact:NAME`` as the whole name (the
seed's ``name == "proj_out"``), one with ``* ? [`` as a glob over the whole name, and
``re:...`` as a regular expression searched in the name.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from qconvert.errors import QconvertError
from qconvert.formats import FORMATS

# Layers with in or out features below this stay in bf16 (the seed's size rule: the GEMMs are
# too small for low-precision kernels to pay for their quantization overhead).
MIN_FEATURES = 1024
KEEP = "keep"
EXACT = "exact:"
REGEX = "re:"


class RecipeError(QconvertError, ValueError):
    """A recipe file or pattern that cannot be used; the message names the file and place."""


@dataclass(frozen=True)
class Rule:
    pattern: str
    reason: str
    action: str = KEEP  # "keep" or a format name


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
    tiny: str = ""  # family name of the embedded tiny build (qconvert.tiny), "" for none
    only_repeated_blocks: bool = False
    real_config: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class UserRecipe:
    """A user's recipe file: ordered rules (first match wins) and an optional default format."""

    path: str
    rules: tuple[Rule, ...]
    format: str | None = None


def matches(pattern: str, name: str) -> bool:
    """Whether a pattern matches a module name: substring, ``exact:`` whole name, glob over the
    whole name, or ``re:`` regex searched in it."""
    if pattern.startswith(REGEX):
        return re.search(pattern[len(REGEX) :], name) is not None
    if pattern.startswith(EXACT):
        return name == pattern[len(EXACT) :]
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def check_pattern(pattern: str) -> str | None:
    """Why a user-given pattern is invalid, or None."""
    if not pattern.strip():
        return "empty pattern"
    if pattern.startswith(REGEX):
        try:
            re.compile(pattern[len(REGEX) :])
        except re.error as e:
            return f"invalid regular expression {pattern[len(REGEX) :]!r}: {e}"
    if pattern.startswith(EXACT) and not pattern[len(EXACT) :].strip():
        return f"{EXACT} needs a module name, e.g. {EXACT}proj_out"
    return None


def _family(data: dict[str, Any]) -> Recipe:
    return Recipe(
        name=data["name"],
        title=data["title"],
        transformer_class=data["transformer_class"],
        pipeline_classes=tuple(data["pipeline_classes"]),
        default_source=data["default_source"],
        pipeline_tag=data["pipeline_tag"],
        skip=tuple(Rule(r["pattern"], r["reason"]) for r in data.get("skip", [])),
        min_features=int(data.get("min_features", MIN_FEATURES)),
        tiny=data.get("tiny", ""),
        only_repeated_blocks=bool(data.get("only_repeated_blocks", False)),
        real_config=dict(data.get("real_config", {})),
        notes=tuple(data.get("notes", ())),
    )


@cache
def _load_families() -> dict[str, Recipe]:
    out = {}
    for entry in sorted(resources.files("qconvert.convert.family_recipes").iterdir(), key=str):
        if entry.name.endswith(".toml"):
            recipe = _family(tomllib.loads(entry.read_text(encoding="utf-8")))
            out[recipe.name] = recipe
    return out


def families() -> dict[str, Recipe]:
    """Family recipes by command name (the generic recipe excluded)."""
    return {k: v for k, v in _load_families().items() if k != "generic"}


def generic() -> Recipe:
    return _load_families()["generic"]


def recipe_for_class(class_name: str) -> Recipe | None:
    """The family recipe whose transformer class is ``class_name``, if any."""
    return next((r for r in families().values() if r.transformer_class == class_name), None)


def load_user_recipe(path: Path) -> UserRecipe:
    """Read a recipe file::

    format = "nvfp4"            # optional: the default for layers no rule names
    [[rule]]
    pattern = "re:^transformer_blocks\\.[0-3]\\."
    format = "mxfp8"            # a format name, or "keep"
    reason = "first blocks are the most sensitive"
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    allowed = {*FORMATS, KEEP}
    unknown = set(data) - {"format", "rule"}
    if unknown:
        raise RecipeError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected format, rule)")
    default = data.get("format")
    if default is not None and not isinstance(default, str):
        raise RecipeError(f"{path}: format must be one format name (a string), not {default!r}")
    if not isinstance(data.get("rule", []), list):
        raise RecipeError(f"{path}: rule must be a list of [[rule]] tables")
    if default is not None and default not in FORMATS:
        raise RecipeError(f"{path}: unknown format {default!r}; choose one of {', '.join(FORMATS)}")
    rules = []
    for i, raw in enumerate(data.get("rule", []), start=1):
        where = f"{path}: rule {i}"
        if not isinstance(raw, dict) or "pattern" not in raw or "format" not in raw:
            raise RecipeError(f"{where}: needs `pattern` and `format`")
        extra = set(raw) - {"pattern", "format", "reason"}
        if extra:
            raise RecipeError(f"{where}: unknown key {sorted(extra)[0]!r}")
        if not isinstance(raw["format"], str) or not isinstance(raw["pattern"], str):
            raise RecipeError(f"{where}: `pattern` and `format` must be strings")
        action = raw["format"]
        if action not in allowed:
            raise RecipeError(
                f"{where}: unknown format {action!r}; use one of {', '.join(sorted(allowed))}"
            )
        problem = check_pattern(str(raw["pattern"]))
        if problem:
            raise RecipeError(f"{where}: {problem}")
        reason = str(raw.get("reason") or f"recipe file rule {i}")
        rules.append(Rule(str(raw["pattern"]), reason, action))
    return UserRecipe(str(path), tuple(rules), default)
