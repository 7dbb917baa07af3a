"""load → plan → quantize → save: the streaming converter.

Tensors are read one at a time (no mmap), quantized on the chosen device, and gathered into
the planned output shard, which is written as soon as its last tensor is in. Peak memory is
one output shard plus one tensor's working set, whatever the model size. Everything is
written into a hidden work directory beside the output and renamed into place at the end,
so an interrupted run never leaves an output that looks complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

from qconvert.convert import manifest
from qconvert.convert.plan import Item, Plan, PlanError, Selection, make_plan
from qconvert.convert.recipes import (
    Recipe,
    RecipeError,
    check_pattern,
    families,
    generic,
    load_user_recipe,
    recipe_for_class,
)
from qconvert.convert.safetensors_io import TensorInfo, read_tensor, write_file
from qconvert.convert.source import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    Source,
    SourceError,
    download,
    looks_like_repo_id,
    open_local,
)
from qconvert.formats import FORMATS, get_format

log = logging.getLogger("qconvert")
DEFAULT_MAX_SHARD = 5 * 10**9
TENSOR_META = json.dumps({"_type": torch.Tensor.__name__})


class OutputError(ValueError):
    """The output path cannot be written as asked."""


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


def _work_dirs(output: Path, overwrite: bool) -> Path:
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: already exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.qconvert-partial"
    if work.exists():
        raise OutputError(
            f"{work}: stale work directory from an interrupted run; delete it and re-run"
        )
    return work


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_FILE]
    return [
        f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)
    ]


def _quantize(item: Item, handle: BinaryIO, device: torch.device) -> dict[str, torch.Tensor]:
    """The output tensors (torchao-flattened names) for one source tensor."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    info: TensorInfo = item.info
    tensor = read_tensor(info, handle)
    if item.fmt is None:
        return {info.name: tensor}
    weight = tensor.to(device=device, dtype=torch.bfloat16)
    quantized = item.fmt.quantize(weight, name=info.name.removesuffix(".weight"))
    flat, meta = flatten_tensor_state_dict({info.name: quantized})
    if meta[info.name] != item.fmt.tensor_metadata():
        raise RuntimeError(f"{info.name}: torchao metadata differs from the format's; bug")
    return {k: v.to("cpu") for k, v in flat.items()}


def write_transformer(
    plan: Plan, source: Source, dst: Path, device: torch.device, progress: bool
) -> None:
    """Stream the transformer's tensors into quantized shards + index + config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    names = _shard_names(len(plan.shards))
    metadata = {"format": "pt"}
    tensor_names = []
    for item in plan.items:
        tensor_names.append(item.info.name)
        metadata[item.info.name] = item.fmt.tensor_metadata() if item.fmt else TENSOR_META
    metadata["tensor_names"] = json.dumps(tensor_names)
    weight_map: dict[str, str] = {}
    total = 0
    with (
        ExitStack() as stack,
        tqdm(
            total=plan.source_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="quantizing",
            disable=not progress,
        ) as bar,
    ):
        handles = {h.path: stack.enter_context(h.path.open("rb")) for h in source.shards}
        for shard_name, shard in zip(names, plan.shards, strict=True):
            tensors: dict[str, torch.Tensor] = {}
            for item in shard:
                tensors.update(_quantize(item, handles[item.info.path], device))
                bar.update(item.info.nbytes)
            write_file(dst / shard_name, tensors, metadata)
            for key, t in tensors.items():
                weight_map[key] = shard_name
                total += t.numel() * t.dtype.itemsize
            del tensors
    if len(names) > 1:
        index_meta = {"total_size": total, **{k: v for k, v in metadata.items() if k != "format"}}
        index = {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}
        (dst / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (dst / "config.json").write_text(_config_json(plan, source))


def _config_json(plan: Plan, source: Source) -> str:
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
    command: str = "qconvert (python API)",
) -> Result:
    """Convert a diffusers pipeline's transformer; returns where it went and how.

    ``family`` is a family name or "auto" (the source's family if known, else the generic
    recipe); ``source`` is a local folder, a Hub repo id, or None for the family's tiny build.
    """
    start = time.perf_counter()
    get_format(fmt)
    selection = selection_for(skips, only, recipe_file)
    if max_shard_size <= 0:
        raise ValueError("--max-shard-size must be positive")
    if source is None and family == "auto":
        raise SourceError("give a source (a local folder or a Hub repo id)")
    output = Path(output)
    dev = resolve_device(device)
    work = _work_dirs(output, overwrite)
    tiny = families().get(family) if source is None else None
    with open_source(source, tiny, revision, transformer_only) as src:
        plan = plan_for(src, family, fmt, selection, strict, max_shard_size)
        only_transformer = transformer_only or src.transformer_only
        stamps = {h.path: _stamp(h.path) for h in src.shards}
        try:
            work.mkdir()
            copied = _copy_components(src, work, only_transformer)
            dst = work if only_transformer else work / "transformer"
            write_transformer(plan, src, dst, dev, progress)
            source_files = manifest.source_table(src, copied)
            for header in src.shards:
                if _stamp(header.path) != stamps[header.path]:
                    raise SourceError(f"{header.path}: changed during conversion; re-run")
            files = manifest.file_table(work)
            data = manifest.build(plan, src, command, source_files, files, only_transformer)
            (work / manifest.MANIFEST).write_text(manifest.dumps(data))
            _replace(work, output)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
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
