"""The conversion plan: one decision (and its reason) per Linear layer, output sizes, shards.

Made from safetensors headers and the transformer's class built on the meta device: no
weight is read, so planning a 12 B model takes a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.convert.recipes import Recipe, matches
from qconvert.convert.safetensors_io import TensorInfo
from qconvert.convert.source import Source, SourceError
from qconvert.formats import Format


class PlanError(ValueError):
    """A plan that cannot be made (wrong family, weights that do not fit the model)."""


@dataclass(frozen=True)
class Layer:
    """One Linear layer of the transformer and what happens to its weight."""

    name: str  # module name, e.g. "transformer_blocks.0.attn.to_q"
    shape: tuple[int, int]  # (out_features, in_features)
    action: str  # a format name, or "keep"
    reason: str

    @property
    def quantized(self) -> bool:
        return self.action != "keep"


@dataclass(frozen=True)
class Item:
    """One source tensor and how it is written."""

    info: TensorInfo
    fmt: Format | None  # None: copied as it is
    out_bytes: int


@dataclass
class Plan:
    recipe: Recipe
    fmt: Format
    skips: tuple[str, ...]
    layers: list[Layer]
    items: list[Item]
    shards: list[list[Item]]

    @property
    def source_bytes(self) -> int:
        return sum(i.info.nbytes for i in self.items)

    @property
    def output_bytes(self) -> int:
        return sum(i.out_bytes for i in self.items)

    def summary(self) -> dict[str, int | float]:
        params = sum(i.info.nbytes // i.info.dtype.itemsize for i in self.items)
        qparams = sum(i.info.nbytes // i.info.dtype.itemsize for i in self.items if i.fmt)
        return {
            "linear_layers": len(self.layers),
            "quantized_layers": sum(layer.quantized for layer in self.layers),
            "params": params,
            "params_quantized": qparams,
            "quantized_share": round(qparams / params, 6) if params else 0.0,
            "bf16_bytes": params * 2,
            "output_bytes": self.output_bytes,
            "size_ratio": round(self.output_bytes / (params * 2), 6) if params else 0.0,
        }


def meta_model(source: Source) -> torch.nn.Module:
    """The transformer class of the source, built from its config on the meta device."""
    import diffusers

    cls = getattr(diffusers, source.class_name, None)
    if cls is None:
        raise PlanError(
            f"{source.transformer_dir}: unknown model class {source.class_name!r} "
            f"(not in diffusers {diffusers.__version__})"
        )
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    with torch.device("meta"):
        return cls.from_config(config)


def decide(
    name: str,
    linear: torch.nn.Linear,
    dtype: torch.dtype,
    recipe: Recipe,
    fmt: Format,
    skips: tuple[str, ...],
) -> Layer:
    shape = (linear.out_features, linear.in_features)

    def keep(reason: str) -> Layer:
        return Layer(name, shape, "keep", reason)

    for pattern in skips:
        if matches(pattern, name):
            return keep(f"--skip {pattern}")
    for rule in recipe.skip:
        if matches(rule.pattern, name):
            return keep(f"'{rule.pattern}': {rule.reason}")
    if min(shape) < recipe.min_features:
        dim = "in" if linear.in_features < recipe.min_features else "out"
        return keep(f"{dim}_features {min(shape)} < {recipe.min_features}: too small to gain")
    problem = fmt.shape_problem(shape)
    if problem:
        return keep(problem)
    if not dtype.is_floating_point:
        return keep(f"weight dtype {dtype} is not floating point")
    return Layer(name, shape, fmt.name, "quantized")


def make_plan(
    source: Source,
    recipe: Recipe,
    fmt: Format,
    skips: tuple[str, ...] = (),
    max_shard_bytes: int = 5 * 10**9,
) -> Plan:
    if source.class_name != recipe.transformer_class:
        from qconvert.convert.recipes import recipe_for_class

        other = recipe_for_class(source.class_name)
        hint = f"use `qconvert {other.name}`" if other else "no recipe covers it yet"
        raise PlanError(
            f"{source.transformer_dir}: the transformer is a {source.class_name or 'unknown class'}"
            f", not a {recipe.transformer_class}; {hint}"
        )
    infos: dict[str, TensorInfo] = {}
    for header in source.shards:
        for name, info in header.tensors.items():
            if name in infos:
                raise SourceError(
                    f"{header.path}: tensor {name!r} also appears in {infos[name].path}"
                )
            infos[name] = info
    model = meta_model(source)
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(set(infos) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise PlanError(
            f"{source.transformer_dir}: weights do not match {source.class_name} built from its "
            f"config.json ({what}; {len(missing)} missing, {len(unexpected)} unexpected)"
        )
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers.append(decide(name, module, infos[f"{name}.weight"].dtype, recipe, fmt, skips))
    quantized = {f"{layer.name}.weight" for layer in layers if layer.quantized}
    items = []
    for name in sorted(infos):
        info = infos[name]
        if name in quantized:
            items.append(Item(info, fmt, fmt.bytes_for(info.shape)))  # type: ignore[arg-type]
        else:
            items.append(Item(info, None, info.nbytes))
    return Plan(recipe, fmt, skips, layers, items, split_shards(items, max_shard_bytes))


def split_shards(items: list[Item], max_bytes: int) -> list[list[Item]]:
    """Greedy split in name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.out_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.out_bytes
    return shards
