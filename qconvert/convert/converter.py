"""open the source → plan → stream → finish → card: the converter, in a few verbs.

Tensors are read one at a time (no mmap), quantized on the chosen device, and written at
their planned offsets in the output shards; reading, quantizing and writing overlap. Everything
goes into a hidden work directory beside the output (``workdir``), which is renamed into place
at the end, so an interrupted run never leaves an output that looks complete.
"""

from __future__ import annotations

import errno
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

from qconvert import manifest, tiny
from qconvert.convert import base_model as base_models
from qconvert.convert import record, workdir
from qconvert.convert.plan import Plan, PlanError, Selection, make_plan, real_config_source
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
    Source,
    SourceError,
    download,
    open_local,
    remote_headers,
)
from qconvert.convert.workdir import Interrupted, OutputError
from qconvert.convert.writer import PROGRESS, Progress, known_hashes, shard_names, stream
from qconvert.errors import UsageError
from qconvert.formats import Format, get_format
from qconvert.locate import hub_lookup, local_or_repo, looks_like_repo_id
from qconvert.sizes import human_size

log = logging.getLogger("qconvert")
DEFAULT_MAX_SHARD = 5 * 10**9
__all__ = [
    "DEFAULT_MAX_SHARD",
    "Interrupted",
    "OutputError",
    "Result",
    "convert",
    "plan_target",
]


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
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
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
        if recipe is None or not recipe.tiny:
            raise SourceError("no tiny build for this recipe; give a source")
        with tempfile.TemporaryDirectory(prefix="qconvert-tiny-") as tmp:
            tiny.build(recipe.tiny, Path(tmp), seed)
            yield open_local(Path(tmp), {"kind": "tiny", "family": recipe.name, "seed": seed})
        return
    where = local_or_repo(source)  # "no such folder" before any network access
    if isinstance(where, str):
        with hub_lookup(where):
            src = download(where, revision, transformer_only, None)
        yield src
        return
    if revision:
        raise SourceError(f"{source}: --revision only applies to Hub repo ids")
    yield open_local(where)


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
    fmt: Format,
    selection: Selection,
    strict: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD,
) -> Plan:
    """Make the plan and report patterns that match nothing (an error with ``strict``).
    A recipe file's own ``format`` overrides ``fmt`` as the default."""
    recipe = recipe_for(family, source)
    default = get_format(selection.user.format) if selection.user and selection.user.format else fmt
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
        tiny = source.description.get("kind") == "tiny"  # its folder is a temporary one
        where = f"the tiny {recipe.name} build" if tiny else source.transformer_dir
        raise PlanError(
            f"{where}: no Linear layer would be quantized; check --only, --skip and the recipe"
        )
    return plan


def plan_target(
    target: str,
    fmt: Format,
    selection: Selection,
    *,
    source: str | None = None,
    revision: str | None = None,
    tiny: bool = False,
    real_config: bool = False,
    strict: bool = False,
) -> Plan:
    """The plan for ``target``: a family name (its default source, ``source``, its tiny build or
    its real config with nothing downloaded) or a local folder / Hub repo id. Reads headers
    only."""
    known = families()
    recipe = known.get(target)
    if recipe is None and (source or tiny or real_config):
        raise UsageError("--source, --tiny and --real-config need a family name")
    if sum(map(bool, (source, tiny, real_config))) > 1:
        raise UsageError("--source, --tiny and --real-config exclude each other")
    family = target if recipe else "auto"
    if real_config and recipe:
        return plan_for(real_config_source(recipe), family, fmt, selection, strict)
    if tiny and recipe:
        with open_source(None, recipe, None, False) as src:
            return plan_for(src, family, fmt, selection, strict)
    where = source or (recipe.default_source if recipe else target)
    if family == "auto" and not looks_like_repo_id(where) and not Path(where).exists():
        raise SourceError(
            f"{target!r} is neither a family ({', '.join(known)}) nor an existing path or repo id"
        )
    if looks_like_repo_id(where):
        with hub_lookup(where):
            remote = remote_headers(where, revision)
        return plan_for(remote, family, fmt, selection, strict)
    with open_source(where, recipe, revision, False) as src:
        return plan_for(src, family, fmt, selection, strict)


def convert(
    output: str | Path,
    *,
    family: str = "flux",
    fmt: str | Format = "nvfp4",
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
    command: str = "qconvert (python API)",
    base_model: str | None = None,
) -> Result:
    """Convert a diffusers pipeline's transformer; returns where it went and how.

    ``family`` is a family name or "auto" (the source's family if known, else the generic
    recipe); ``source`` is a local folder, a Hub repo id, or None for the family's tiny build.
    ``base_model`` (``REPO[@REVISION]``) names the Hub model the source is, for the card; by
    default it is recognized where the source shows it (``convert.base_model``).
    """
    start = time.perf_counter()
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    selection = selection_for(skips, only, recipe_file)
    if max_shard_size <= 0:
        raise UsageError("--max-shard-size must be positive")
    if source is None and family == "auto":
        raise SourceError("give a source (a local folder or a Hub repo id)")
    if base_model is not None:
        base_models.parse(base_model)  # a bad value fails before any work
    output = Path(output)
    dev = resolve_device(device)
    if source is not None and Path(source).exists():
        workdir.check_apart(output, Path(source))  # before anything is written
    with workdir.locked(output):
        work = workdir.work_dir(output, overwrite, resume)
        tiny_recipe = families().get(family) if source is None else None
        with open_source(source, tiny_recipe, revision, transformer_only) as src:
            workdir.check_apart(output, src.root)
            only_transformer = transformer_only or src.transformer_only
            copies = src.component_files(only_transformer)  # checked before the long work
            plan = plan_for(src, family, fmt, selection, strict, max_shard_size)
            base = base_models.resolve(src, base_model)
            job = _Job(plan, src, work, only_transformer, copies, dev, progress, command, base)
            data = job.run()
            workdir.replace(work, output)
    seconds = time.perf_counter() - start
    log.info("converted %s in %.1f s", output, seconds)
    return Result(output, plan, seconds, data)


class _Job:
    """One conversion into a work directory: stream the shards, then finish the folder."""

    def __init__(
        self,
        plan: Plan,
        src: Source,
        work: Path,
        transformer_only: bool,
        copies: list[str],
        device: torch.device,
        show_bar: bool,
        command: str,
        base: dict[str, object] | None = None,
    ) -> None:
        self.plan, self.src, self.work, self.device = plan, src, work, device
        self.transformer_only, self.show_bar, self.command = transformer_only, show_bar, command
        self.base = base
        self.dst = work if transformer_only else work / "transformer"
        self.stamps = {h.path: workdir.stamp(h.path) for h in src.shards}
        fingerprint = workdir.fingerprint(plan, src, plan.fmt.name, transformer_only)
        names = shard_names(len(plan.shards))
        self.shard_rels = {workdir.shard_rel(src, h.path) for h in src.shards}
        self.progress: Progress = workdir.resume_state(
            work, fingerprint, self.dst, names, sorted(self.shard_rels)
        )
        # What the interrupted run recorded: its reused shards hold only while the source's
        # sha256 (computed again beside this run) is the same.
        self.reused = dict(self.progress.done)
        self.recorded = dict(self.progress.sources)
        self.stale: str | None = None
        self.copies = copies
        self.remaining = sum(
            i.out_bytes
            for n, s in zip(names, plan.shards, strict=True)
            if n not in self.progress.done
            for i in s
        )
        copied_bytes = sum((src.root / rel).stat().st_size for rel in self.copies)
        # + the configs, index, manifest and card: a few MiB at most
        workdir.check_space(work.parent, self.remaining + copied_bytes + 2**22)

    def _hashed(self, rel: str, digest: str) -> None:
        """A source file's sha256, from the hashing beside the conversion: record the shards'
        (what --resume checks) and drop reused shards made from a source that has changed."""
        if rel not in self.shard_rels:
            return
        drop: tuple[str, ...] = ()
        if self.recorded.get(rel, digest) != digest and self.reused:
            self.stale, drop = rel, tuple(self.reused)
        self.progress.record_source(rel, digest, drop)

    def run(self) -> dict[str, object]:
        try:
            self.dst.mkdir(parents=True, exist_ok=True)
            copied = _copy_components(self.src, self.work, self.copies)
            # The source's sha256 (for the manifest) is computed beside the conversion.
            with ThreadPoolExecutor(1, thread_name_prefix="qconvert-hash") as hasher:
                hashing = hasher.submit(record.source_table, self.src, copied, self._hashed)
                weight_map = stream(
                    self.plan,
                    self.src,
                    self.dst,
                    self.device,
                    self.progress,
                    self.show_bar,
                    set(self.progress.done),
                )
                source_files = hashing.result()
            if self.stale:
                for name in self.reused:
                    (self.dst / name).unlink(missing_ok=True)
                raise SourceError(
                    f"{self.src.root / self.stale}: changed since the interrupted run (its sha256 "
                    f"differs; size and mtime do not): its {len(self.reused)} reused shard(s) "
                    f"were dropped; re-run with --resume to redo them"
                )
            return self._finish(weight_map, source_files)
        except BaseException as e:
            error = self._failed(e)
            if error is e:
                raise
            raise error from None

    def _finish(
        self, weight_map: dict[str, str], source_files: list[dict[str, object]]
    ) -> dict[str, object]:
        plan, src, work = self.plan, self.src, self.work
        record.write_index(plan, self.dst, weight_map)
        (self.dst / "config.json").write_text(record.config_json(plan, src))
        for header in src.shards:
            if workdir.stamp(header.path) != self.stamps[header.path]:
                raise SourceError(f"{header.path}: changed during conversion; re-run")
        (work / PROGRESS).unlink()
        prefix = "" if self.transformer_only else "transformer/"
        files = manifest.file_table(work, known=known_hashes(self.progress, prefix))
        data = record.manifest(
            plan, src, self.command, source_files, files, self.transformer_only, self.base
        )
        (work / manifest.MANIFEST).write_text(manifest.dumps(data))
        from qconvert.cards import write_card

        write_card(work)  # README.md, rendered from the manifest
        return data

    def _failed(self, e: BaseException) -> BaseException:
        """Clean up after a failure; the error to raise (user-facing ones say what was kept)."""
        kept = bool(self.progress.done) and self.work.exists()
        if not kept:
            shutil.rmtree(self.work, ignore_errors=True)
        hint = (
            f"{len(self.progress.done)} finished shard(s) kept in {self.work}; re-run with --resume"
            if kept
            else "nothing was written"
        )
        if isinstance(e, KeyboardInterrupt):
            return Interrupted(f"interrupted; {hint}")
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return OutputError(
                f"{e.filename or self.work}: disk full ({human_size(self.remaining)} needed for "
                f"the rest); free space, then {hint if kept else 're-run'}"
            )
        return e


def _copy_components(source: Source, dst: Path, files: list[str]) -> list[str]:
    """Copy ``files`` (``Source.component_files``: the LICENSE files and, for a whole pipeline,
    model_index.json and the other components, each checked to stay inside the source)
    verbatim."""
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.root / rel, dst / rel)
    return list(files)
