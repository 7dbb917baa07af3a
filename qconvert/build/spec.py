"""The build spec: one TOML file naming sources × formats × recipes, expanded into targets.

::

    [defaults]
    formats = ["nvfp4", "mxfp8"]
    repo = "my-org/{name}-{format}"     # {name}: the target's name stem; {format}; {family}

    [[target]]
    family = "flux"
    source = "black-forest-labs/FLUX.1-dev"   # a Hub repo id or a local folder (relative to
    revision = "main"                         # the spec file); or tiny = true (no source)

Every target expands to one build per format, named ``<stem>-<format>``; the stem is the
target's ``name`` or the source's repo / folder name (``tiny-<family>`` for tiny sources). A
spec that cannot be built as written is refused before anything runs, with one line naming the
spec, the target and the key (line and column for TOML syntax errors).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconvert.errors import QconvertError
from qconvert.formats import FORMATS

AUTO = "auto"  # the source's family when its class has one, else the generic recipe
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_PLACEHOLDERS = ("name", "format", "family")
# key -> (python type(s), what the error says it should be)
_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "family": (str, "a family name"),
    "source": (str, "a Hub repo id or a local folder"),
    "tiny": (bool, "true or false"),
    "revision": (str, "a branch, tag or commit"),
    "formats": (list, "a list of format names"),
    "repo": (str, "a repo id or template, e.g. my-org/{name}-{format}"),
    "private": (bool, "true or false"),
    "name": (str, "a target name stem"),
    "recipe": (str, "a recipe file path"),
    "skip": (list, "a list of patterns"),
    "only": (list, "a list of patterns"),
    "strict": (bool, "true or false"),
    "transformer-only": (bool, "true or false"),
    "max-shard-size": ((int, str), 'a size: bytes, or e.g. "5GB", "500MiB"'),
    "eval": (dict, "a table of `qconvert eval` options"),
    "bench": (dict, "a table of `qconvert bench` options"),
}
_PER_TARGET_ONLY = ("name", "source", "tiny")


class SpecError(QconvertError, ValueError):
    """A spec that cannot be built as written; the message names the file, target and key."""


@dataclass(frozen=True)
class Target:
    """One build: one source in one format, published to one repo."""

    name: str
    index: int  # the [[target]] table it came from (1-based)
    family: str
    fmt: str
    source: str | None  # a Hub repo id or a local folder path; None: the family's tiny build
    source_kind: str  # "hub", "local" or "tiny"
    revision: str | None
    repo: str
    private: bool = False
    recipe: str | None = None  # a user recipe file, as a path usable from the working directory
    skips: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    strict: bool = False
    transformer_only: bool = False
    max_shard_size: int | None = None  # None: the converter's default
    eval: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "format": self.fmt,
            "source": self.source,
            "source_kind": self.source_kind,
            "revision": self.revision,
            "repo": self.repo,
            "private": self.private,
            "recipe": self.recipe,
            "skip": list(self.skips),
            "only": list(self.only),
            "strict": self.strict,
            "transformer_only": self.transformer_only,
            "max_shard_size": self.max_shard_size,
            "eval": self.eval or None,
            "bench": self.bench or None,
        }

    def matrix_entry(self) -> dict[str, str]:
        """One ``strategy.matrix.include`` row: what a workflow job needs to name and cache it."""
        if self.source_kind == "tiny":
            key = self.family
        else:
            key = re.sub(r"[^A-Za-z0-9._-]+", "--", str(self.source)).strip("-.")
        return {
            "target": self.name,
            "family": self.family,
            "format": self.fmt,
            "repo": self.repo,
            "source-key": f"{self.source_kind}-{key}",
        }


@dataclass(frozen=True)
class Spec:
    path: Path
    targets: tuple[Target, ...]

    def select(self, only: tuple[str, ...] | list[str] = ()) -> list[Target]:
        """The targets named by ``--only`` (all when empty), in spec order."""
        names = {t.name for t in self.targets}
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SpecError(
                f"--only {unknown[0]}: no such target in {self.path}; targets: "
                f"{', '.join(t.name for t in self.targets)}"
            )
        return [t for t in self.targets if not only or t.name in only]


def listing(spec: Spec, targets: list[Target]) -> dict[str, Any]:
    """``--list --json``: the targets, and the matrix a workflow feeds to ``strategy.matrix``
    through ``fromJSON``."""
    return {
        "spec": str(spec.path),
        "targets": [t.to_dict() for t in targets],
        "matrix": {"include": [t.matrix_entry() for t in targets]},
    }


def render_listing(targets: list[Target]) -> str:
    rows = [
        (
            t.name,
            t.family,
            t.fmt,
            "tiny"
            if t.source is None
            else f"{t.source}@{t.revision or 'main'}"
            if t.source_kind == "hub"
            else t.source,
            t.repo,
        )
        for t in targets
    ]
    head = ("target", "family", "format", "source", "repo")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join(
        "  ".join(f"{c!s:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    )


def _toml_error(path: Path, text: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    line, column = getattr(error, "lineno", None), getattr(error, "colno", None)
    found = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if found:
        line, column = int(found.group(1)), int(found.group(2))
        message = message[: found.start()]
    elif message.endswith(" (at end of document)"):
        message = message.removesuffix(" (at end of document)")
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
    return f"{path}: line {line}, column {column}: invalid TOML: {message}"


def load_spec(path: str | Path) -> Spec:
    """Read, check and expand a spec file; SpecError (one line) when it cannot be built."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the spec ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(_toml_error(path, text, e)) from None
    unknown = sorted(set(data) - {"defaults", "target"})
    if unknown:
        raise SpecError(
            f"{path}: unknown top-level key {unknown[0]!r}; a spec has [defaults] and [[target]]"
        )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise SpecError(f"{path}: key 'defaults': expected a table ([defaults])")
    _check_keys(path, "[defaults]", defaults, set(_KEYS) - set(_PER_TARGET_ONLY))
    tables = data.get("target", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise SpecError(f"{path}: key 'target': expected [[target]] tables")
    if not tables:
        raise SpecError(f"{path}: no [[target]] tables; add one with a family and a source")
    targets: list[Target] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(tables, start=1):
        _check_keys(path, f"target {index}", table, set(_KEYS))
        for target in _expand(path, index, {**defaults, **table}):
            if target.name in seen:
                raise SpecError(
                    f"{path}: target {index} ({target.name!r}): key 'name': duplicate target "
                    f"name (target {seen[target.name]} has it too); give one of them another "
                    f"`name`"
                )
            seen[target.name] = index
            targets.append(target)
    return Spec(path, tuple(targets))


def _check_keys(path: Path, where: str, table: dict[str, Any], allowed: set[str]) -> None:
    for key, value in table.items():
        if key not in allowed:
            hint = (
                f"{key!r} belongs in a [[target]]"
                if key in _KEYS
                else f"unknown key; expected one of {', '.join(k for k in _KEYS if k in allowed)}"
            )
            raise SpecError(f"{path}: {where}: key {key!r}: {hint}")
        kind, what = _KEYS[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise SpecError(f"{path}: {where}: key {key!r}: expected {what}, got {value!r}")
        if kind is list and not all(isinstance(v, str) for v in value):
            raise SpecError(f"{path}: {where}: key {key!r}: expected {what} (strings)")
        if kind is dict:
            for option, v in value.items():
                ok = isinstance(v, str | int | float | bool) or (
                    isinstance(v, list) and all(isinstance(x, str | int | float) for x in v)
                )
                if not ok:
                    raise SpecError(
                        f"{path}: {where}: key '{key}.{option}': expected a string, number, "
                        f"boolean or list of them"
                    )


def _expand(path: Path, index: int, table: dict[str, Any]) -> list[Target]:
    from qconvert.convert import families

    where = f"target {index}"

    def fail(key: str, problem: str) -> SpecError:
        return SpecError(f"{path}: {where}: key {key!r}: {problem}")

    known = families()
    family = table.get("family")
    if family is None:
        raise fail("family", f"missing; choose one of {', '.join([*known, AUTO])}")
    if family not in known and family != AUTO:
        raise fail("family", f"unknown family {family!r}; choose one of {', '.join(known)}")
    source, kind = _source(path, table, fail, family)
    stem = table.get("name") or _stem(source, kind, family)
    where = f"target {index} ({stem!r})"
    if not _NAME.match(stem):
        raise fail(
            "name",
            f"{stem!r} is not usable as a target name; use letters, digits, "
            f"'-', '_' and '.' (set `name`)",
        )
    formats = table.get("formats")
    if not formats:
        raise fail("formats", f"missing or empty; a list of {', '.join(FORMATS)}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise fail("formats", f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise fail("formats", "a format is listed twice")
    revision = table.get("revision")
    if revision is not None and kind != "hub":
        raise fail("revision", f"only applies to Hub repo ids, not to a {kind} source")
    recipe = table.get("recipe")
    if recipe is not None:
        recipe = str(path.parent / recipe)
    _check_selection(table, recipe, fail)
    size = _size(table.get("max-shard-size"), fail)
    template = table.get("repo")
    if template is None:
        raise fail("repo", 'missing; set e.g. repo = "my-org/{name}-{format}" in [defaults]')
    out = []
    for fmt in formats:
        name = f"{stem}-{fmt}"
        where = f"target {index} ({name!r})"
        repo = _repo(template, {"name": stem, "format": fmt, "family": family}, fail)
        out.append(
            Target(
                name=name,
                index=index,
                family=family,
                fmt=fmt,
                source=source,
                source_kind=kind,
                revision=revision,
                repo=repo,
                private=bool(table.get("private", False)),
                recipe=recipe,
                skips=tuple(table.get("skip", ())),
                only=tuple(table.get("only", ())),
                strict=bool(table.get("strict", False)),
                transformer_only=bool(table.get("transformer-only", False)),
                max_shard_size=size,
                eval=dict(table.get("eval", {})),
                bench=dict(table.get("bench", {})),
            )
        )
    return out


def _source(path: Path, table: dict[str, Any], fail: Any, family: str) -> tuple[str | None, str]:
    from qconvert.convert.source import looks_like_repo_id

    source, tiny = table.get("source"), table.get("tiny", False)
    if tiny:
        if source is not None:
            raise fail("tiny", "tiny = true and a source exclude each other")
        if family == AUTO:
            raise fail("tiny", "a tiny build needs a family name, not 'auto'")
        return None, "tiny"
    if source is None:
        raise fail("source", "missing; give a Hub repo id or a local folder, or tiny = true")
    local = path.parent / source
    if local.exists():
        if not local.is_dir():
            raise fail("source", f"{local}: not a folder; give a diffusers pipeline folder")
        return str(local), "local"
    if looks_like_repo_id(source):
        return source, "hub"
    raise fail("source", f"{local}: no such folder, and {source!r} is not a Hub repo id")


def _size(value: int | str | None, fail: Any) -> int | None:
    from qconvert.sizes import parse_size

    if isinstance(value, str):
        try:
            value = parse_size(value)
        except QconvertError as e:
            raise fail("max-shard-size", str(e)) from None
    if value is not None and value <= 0:
        raise fail("max-shard-size", "must be positive")
    return value


def _stem(source: str | None, kind: str, family: str) -> str:
    if kind == "tiny" or source is None:
        return f"tiny-{family}"
    return Path(source.rstrip("/")).name


def _check_selection(table: dict[str, Any], recipe: str | None, fail: Any) -> None:
    from qconvert.convert import RecipeError, selection_for
    from qconvert.convert.recipes import check_pattern

    for key in ("skip", "only"):
        for pattern in table.get(key, ()):
            problem = check_pattern(pattern)
            if problem:
                raise fail(key, f"{pattern!r}: {problem}")
    if recipe is not None:
        try:
            selection_for(recipe_file=recipe)
        except RecipeError as e:
            raise fail("recipe", str(e)) from None


def _repo(template: str, values: dict[str, str], fail: Any) -> str:
    from qconvert.hub import PushError, validate_repo_id

    try:
        repo = template.format_map(values)
    except KeyError as e:
        raise fail(
            "repo",
            f"unknown placeholder {{{e.args[0]}}} in {template!r}; use "
            + ", ".join(f"{{{p}}}" for p in _PLACEHOLDERS),
        ) from None
    except (ValueError, IndexError) as e:
        raise fail("repo", f"malformed template {template!r} ({e})") from None
    try:
        validate_repo_id(repo)
    except PushError as e:
        raise fail("repo", str(e)) from None
    return repo
