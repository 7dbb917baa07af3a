"""load → plan → quantize → save: the streaming converter.

Tensors are read one at a time (no mmap), quantized on the chosen device, and gathered into
the planned output shard, which is written as soon as its last tensor is in. Peak memory is
one output shard plus one tensor's working set, whatever the model size. Everything is
written into a hidden work directory beside the output and renamed into place at the end,
so an interrupted run never leaves an output that looks complete.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.convert import manifest
from qconvert.convert.plan import Plan, PlanError, Selection, make_plan
from qconvert.convert.recipes import (
    Recipe,
    RecipeError,
    check_pattern,
    families,
    generic,
    load_user_recipe,
    recipe_for_class,
)
from qconvert.convert.source import (
    WEIGHTS_INDEX,
    Source,
    SourceError,
    download,
    looks_like_repo_id,
    open_local,
)
from qconvert.convert.writer import (
    PROGRESS,
    Progress,
    finished_shards,
    known_hashes,
    plan_digest,
    quantization_metadata,
    shard_names,
    stream,
)
from qconvert.formats import FORMATS, get_format
from qconvert.sizes import human_size

log = logging.getLogger("qconvert")
DEFAULT_MAX_SHARD = 5 * 10**9


class OutputError(ValueError):
    """The output path cannot be written as asked."""


class Interrupted(Exception):
    """Ctrl-C during a conversion; the message says what was kept and how to resume."""


@dataclass
class Result:
    output: Path
    plan: Plan
    seconds: float
    manifest: dict[str, object]

    @property
    def params_per_second(self) -> float:
        return float(self.plan.summary()["params"]) / max(self.seconds, 1e-9)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(device)


@contextmanager
def open_source(
    source: str | Path | None,
    recipe: Recipe | None,
    revision: str | None,
    transformer_only: bool,
    seed: int = 0,
) -> Iterator[Source]:
    """Yield the source: a local folder, a Hub repo id, or (None) the recipe's tiny build."""
    if source is None:
        import importlib

        if recipe is None or not recipe.tiny_module:
            raise SourceError("no tiny build for this recipe; give a source")

        tiny = importlib.import_module(recipe.tiny_module)
        with tempfile.TemporaryDirectory(prefix="qconvert-tiny-") as tmp:
            tiny.build(Path(tmp), seed)
            yield open_local(Path(tmp), {"kind": "tiny", "family": recipe.name, "seed": seed})
        return
    if isinstance(source, str) and looks_like_repo_id(source):
        yield download(source, revision, transformer_only, None)
        return
    if revision:
        raise SourceError(f"{source}: --revision only applies to Hub repo ids")
    yield open_local(Path(source))


def _work_dir(output: Path, overwrite: bool, resume: bool) -> Path:
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.qconvert-partial"
    if work.exists() and not resume:
        raise OutputError(
            f"{work}: work directory of an interrupted run; re-run with --resume to continue it, "
            f"or delete it"
        )
    return work


def _fingerprint(plan: Plan, source: Source, fmt: str, transformer_only: bool) -> dict[str, object]:
    """What a resumed run must share with the interrupted one."""
    from qconvert import __version__

    described = {k: v for k, v in source.description.items() if k != "path"}
    shards: list[object] = [[h.path.name, h.path.stat().st_size] for h in source.shards]
    if source.description.get("kind") == "local":
        described["path"] = source.description["path"]
        shards = [[h.path.name, *_stamp(h.path)] for h in source.shards]
    return {
        "qconvert": __version__,
        "source": {**described, "shards": shards},
        "format": fmt,
        "plan": plan_digest(plan),
        "transformer_only": transformer_only,
    }


_WHAT = {
    "source": "source (or its files changed)",
    "format": "format",
    "plan": "recipe or options",
    "qconvert": "qconvert version",
    "transformer_only": "--transformer-only setting",
}


def _resume_state(work: Path, fingerprint: dict[str, object], dst: Path) -> Progress:
    state = Progress.load(work / PROGRESS) if work.exists() else None
    if state is None:
        return Progress(work / PROGRESS, fingerprint, {})
    differs = [_WHAT[k] for k in fingerprint if state.fingerprint.get(k) != fingerprint[k]]
    if differs:
        raise OutputError(
            f"--resume: {work} holds an interrupted run with a different {', '.join(differs)}; "
            f"delete it or re-run the original command"
        )
    done = finished_shards(state, dst)
    state.done = {k: v for k, v in state.done.items() if k in done}
    log.warning("qconvert: resuming: %d finished shard(s) reused from %s", len(done), work)
    return state


def _check_space(where: Path, needed: int) -> None:
    free = shutil.disk_usage(where).free
    if needed > free:
        raise OutputError(
            f"{where}: not enough disk space: the output needs {human_size(needed)}, "
            f"{human_size(free)} free; free space or write elsewhere with -o"
        )


def _write_index(plan: Plan, dst: Path, weight_map: dict[str, str]) -> None:
    if len(plan.shards) == 1:
        return
    meta = {k: v for k, v in quantization_metadata(plan).items() if k != "format"}
    index = {
        "metadata": {"total_size": plan.output_bytes, **meta},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (dst / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _config_json(plan: Plan, source: Source) -> str:
    """transformer/config.json: the source's config + the quantization_config diffusers reads."""
    from diffusers import TorchAoConfig

    kept = [layer.name for layer in plan.layers if not layer.quantized]
    if plan.formats == [plan.fmt.name]:
        quant_type = plan.fmt.config()  # what diffusers writes for a one-format model
    else:
        from torchao.quantization import FqnToConfig

        quant_type = FqnToConfig(
            {layer.name: FORMATS[layer.action].config() for layer in plan.layers if layer.quantized}
        )
    config = dict(source.config)
    config["quantization_config"] = TorchAoConfig(quant_type, modules_to_not_convert=kept).to_dict()
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _copy_components(source: Source, dst: Path, transformer_only: bool) -> list[str]:
    """Copy the base model's LICENSE files and, for a whole pipeline, model_index.json and the
    other components, verbatim."""
    copied = []
    files = sorted(source.root.glob("LICENSE*"))
    if not transformer_only:
        files.append(source.root / "model_index.json")
        for name in source.component_dirs():
            files += sorted(p for p in (source.root / name).rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(source.root)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / rel)
        copied.append(rel.as_posix())
    return copied


def selection_for(
    skips: tuple[str, ...] = (), only: tuple[str, ...] = (), recipe_file: str | Path | None = None
) -> Selection:
    """Check the user's patterns and recipe file; errors name the pattern or the file."""
    for flag, patterns in (("--skip", skips), ("--only", only)):
        for pattern in patterns:
            problem = check_pattern(pattern)
            if problem:
                raise RecipeError(f"{flag} {pattern!r}: {problem}")
    user = load_user_recipe(Path(recipe_file)) if recipe_file else None
    return Selection(tuple(skips), tuple(only), user)


def recipe_for(family: str, source: Source) -> Recipe:
    """The family's recipe; for "auto", the family whose class the source has, else generic."""
    if family != "auto":
        try:
            return families()[family]
        except KeyError:
            raise RecipeError(
                f"unknown family {family!r}; choose one of: {', '.join(families())}"
            ) from None
    found = recipe_for_class(source.class_name)
    return found or generic()


def plan_for(
    source: Source,
    family: str,
    fmt: str,
    selection: Selection,
    strict: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD,
) -> Plan:
    """Make the plan and report patterns that match nothing (an error with ``strict``)."""
    recipe = recipe_for(family, source)
    default = get_format(selection.user.format if selection.user and selection.user.format else fmt)
    plan = make_plan(source, recipe, default, selection, max_shard_size)
    user_patterns = set(selection.patterns())
    for pattern in plan.unmatched:
        if pattern in user_patterns:
            if strict:
                raise RecipeError(f"pattern {pattern!r} matches no Linear layer (--strict)")
            log.warning("qconvert: pattern %r matches no Linear layer", pattern)
        else:
            log.warning(
                "qconvert: recipe %s pattern %r matches no Linear layer of %s",
                recipe.name,
                pattern,
                source.class_name,
            )
    if not any(layer.quantized for layer in plan.layers):
        raise PlanError(
            f"{source.transformer_dir}: no Linear layer would be quantized; check --only, "
            f"--skip and the recipe"
        )
    return plan


def convert(
    output: str | Path,
    *,
    family: str = "flux",
    fmt: str = "nvfp4",
    source: str | Path | None = None,
    revision: str | None = None,
    skips: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    recipe_file: str | Path | None = None,
    strict: bool = False,
    transformer_only: bool = False,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    device: str = "auto",
    progress: bool = True,
    resume: bool = False,
    fast: bool = True,
    command: str = "qconvert (python API)",
) -> Result:
    """Convert a diffusers pipeline's transformer; returns where it went and how.

    ``family`` is a family name or "auto" (the source's family if known, else the generic
    recipe); ``source`` is a local folder, a Hub repo id, or None for the family's tiny build.
    """
    start = time.perf_counter()
    show_bar = progress
    get_format(fmt)
    selection = selection_for(skips, only, recipe_file)
    if max_shard_size <= 0:
        raise ValueError("--max-shard-size must be positive")
    if source is None and family == "auto":
        raise SourceError("give a source (a local folder or a Hub repo id)")
    output = Path(output)
    dev = resolve_device(device)
    work = _work_dir(output, overwrite, resume)
    tiny = families().get(family) if source is None else None
    with open_source(source, tiny, revision, transformer_only) as src:
        plan = plan_for(src, family, fmt, selection, strict, max_shard_size)
        only_transformer = transformer_only or src.transformer_only
        dst = work if only_transformer else work / "transformer"
        prefix = "" if only_transformer else "transformer/"
        stamps = {h.path: _stamp(h.path) for h in src.shards}
        progress = _resume_state(work, _fingerprint(plan, src, fmt, only_transformer), dst)
        skip = set(progress.done)
        names = shard_names(len(plan.shards))
        remaining = sum(
            i.out_bytes for n, s in zip(names, plan.shards, strict=True) if n not in skip for i in s
        )
        _check_space(output.parent, remaining)
        try:
            dst.mkdir(parents=True, exist_ok=True)
            copied = _copy_components(src, work, only_transformer)
            # The source's sha256 (for the manifest) is computed beside the conversion.
            with ThreadPoolExecutor(1, thread_name_prefix="qconvert-hash") as hasher:
                hashing = hasher.submit(manifest.source_table, src, copied)
                weight_map = stream(plan, src, dst, dev, progress, show_bar, skip, fast)
                source_files = hashing.result()
            _write_index(plan, dst, weight_map)
            (dst / "config.json").write_text(_config_json(plan, src))
            for header in src.shards:
                if _stamp(header.path) != stamps[header.path]:
                    raise SourceError(f"{header.path}: changed during conversion; re-run")
            (work / PROGRESS).unlink()
            files = manifest.file_table(work, known=known_hashes(progress, prefix))
            data = manifest.build(plan, src, command, source_files, files, only_transformer)
            (work / manifest.MANIFEST).write_text(manifest.dumps(data))
            from qconvert.cards import write_card  # cards reads convert's manifest module

            write_card(work)  # README.md, rendered from the manifest
            _replace(work, output)
        except BaseException as e:
            kept = bool(progress.done) and work.exists()
            if not kept:
                shutil.rmtree(work, ignore_errors=True)
            hint = (
                f"{len(progress.done)} finished shard(s) kept in {work}; re-run with --resume"
                if kept
                else "nothing was written"
            )
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(f"interrupted; {hint}") from None
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise OutputError(
                    f"{e.filename or work}: disk full ({human_size(remaining)} needed for the "
                    f"rest); free space, then {hint if kept else 're-run'}"
                ) from None
            raise
    seconds = time.perf_counter() - start
    log.info("converted %s in %.1f s", output, seconds)
    return Result(output, plan, seconds, data)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _replace(work: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.qconvert-old"
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        work.rename(output)
        shutil.rmtree(old)
    else:
        work.rename(output)
