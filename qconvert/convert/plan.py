"""The conversion plan: one decision (and its reason) per Linear layer, output sizes, shards.

Made from safetensors headers and the transformer's class built on the meta device: no
weight is read, so planning a 20 B model takes seconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconvert.convert.recipes import KEEP, Recipe, UserRecipe, matches, recipe_for_class
from qconvert.convert.source import Source, SourceError
from qconvert.errors import QconvertError
from qconvert.formats import FORMATS, Format
from qconvert.safetensors_io import Header, TensorInfo


class PlanError(QconvertError, ValueError):
    """A plan that cannot be made (wrong family, weights that do not fit the model)."""


@dataclass(frozen=True)
class Selection:
    """What the user added to the recipe: --skip, --only and a recipe file."""

    skips: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    user: UserRecipe | None = None

    def patterns(self) -> list[str]:
        rules = [r.pattern for r in self.user.rules] if self.user else []
        return [*self.skips, *self.only, *rules]


@dataclass(frozen=True)
class Layer:
    """One Linear layer of the transformer and what happens to its weight."""

    name: str  # module name, e.g. "transformer_blocks.0.attn.to_q"
    shape: tuple[int, int]  # (out_features, in_features)
    action: str  # a format name, or "keep"
    reason: str

    @property
    def quantized(self) -> bool:
        return self.action != KEEP


@dataclass(frozen=True)
class Item:
    """One source tensor and how it is written."""

    info: TensorInfo
    fmt: Format | None  # None: copied (cast to ``dtype`` when set)
    out_bytes: int
    dtype: torch.dtype | None = None  # a kept float tensor's output dtype, when not the source's


@dataclass
class Plan:
    recipe: Recipe
    fmt: Format  # the default format
    selection: Selection
    layers: list[Layer]
    items: list[Item]
    shards: list[list[Item]]
    unmatched: list[str] = field(default_factory=list)  # patterns that matched no layer
    source_class: str = ""
    source_description: dict[str, object] = field(default_factory=dict)

    @property
    def skips(self) -> tuple[str, ...]:
        return self.selection.skips

    @property
    def formats(self) -> list[str]:
        """Formats the output holds, sorted."""
        return sorted({layer.action for layer in self.layers if layer.quantized})

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


def model_class(class_name: str, where: object) -> type[torch.nn.Module]:
    """The diffusers model class named ``class_name`` (a config's ``_class_name``)."""
    import diffusers

    cls: object = None
    if class_name.isidentifier() and not class_name.startswith("_"):
        try:
            cls = getattr(diffusers, class_name, None)
        except Exception:  # diffusers' lazy module failing to import an optional part
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        what = "unknown model class" if cls is None else "not a model class"
        raise PlanError(
            f"{where}: {what} {class_name!r} (not a model in diffusers {diffusers.__version__}); "
            f"check _class_name in its config.json"
        )
    return cls


_COUNT_KEY = re.compile(r"layers|blocks|depth")


def check_config(source: Source, cls: type[torch.nn.Module]) -> dict[str, object]:
    """The source config's values that ``cls`` takes, checked against the types of the class's
    defaults and bounded (a layer count above the headers' tensor count cannot match them:
    building such a model would only hang); PlanError naming the key otherwise."""
    import inspect

    where = source.transformer_dir / "config.json"
    tensors = sum(len(h.tensors) for h in source.shards)
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    for key, value in config.items():
        param = params.get(key)
        if key.startswith("_") or param is None or value is None:
            continue
        default = param.default
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok = isinstance(value, int)  # a bool, or 0 / 1
        elif isinstance(default, int):
            ok = number and (isinstance(value, int) or value.is_integer())
        elif isinstance(default, float):
            ok = number
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, tuple | list):
            ok = isinstance(value, list | tuple) or number  # some take one number for all
        else:
            ok = True
        if not ok:
            raise PlanError(
                f"{where}: {key} = {json.dumps(value)[:80]} is a {type(value).__name__}, but "
                f"{cls.__name__} takes a {type(default).__name__} (default {default!r}); fix the "
                f"config"
            )
        if isinstance(value, int) and _COUNT_KEY.search(key) and value > max(tensors, 1):
            raise PlanError(
                f"{where}: {key} = {value} cannot match weights that hold {tensors} tensors; the "
                f"config does not belong to these weights"
            )
    return config


def meta_model(source: Source) -> torch.nn.Module:
    """The transformer class of the source, built from its (checked) config on the meta
    device."""
    cls = model_class(source.class_name, source.transformer_dir)
    config = check_config(source, cls)
    try:
        with torch.device("meta"):
            return cls.from_config(config)  # type: ignore[attr-defined]
    except Exception as e:  # the config is input: whatever it breaks is the config's fault
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        raise PlanError(
            f"{source.transformer_dir / 'config.json'}: {cls.__name__} cannot be built from it "
            f"({type(e).__name__}: {detail}); check its values"
        ) from None


def real_config_source(recipe: Recipe) -> Source:
    """A weightless source for the family's real architecture (headers made from the config)."""
    cls = model_class(recipe.transformer_class, f"recipe {recipe.name}")
    with torch.device("meta"):
        model = cls(**recipe.real_config)
    config = dict(model.config)  # type: ignore[attr-defined]
    config["_class_name"] = recipe.transformer_class
    where = Path(f"<{recipe.default_source} config>")
    tensors, offset = {}, 0
    for name, t in sorted(model.state_dict().items()):
        nbytes = t.numel() * 2
        tensors[name] = TensorInfo(where, name, torch.bfloat16, tuple(t.shape), offset, nbytes)
        offset += nbytes
    description = {"kind": "config", "family": recipe.name, "repo_id": recipe.default_source}
    return Source(where, where, config, [Header(where, tensors, {})], description)


def _block_prefixes(model: torch.nn.Module) -> list[str]:
    classes = set(getattr(model, "_repeated_blocks", []) or [])
    return [f"{n}." for n, m in model.named_modules() if type(m).__name__ in classes]


def decide(
    name: str,
    linear: torch.nn.Linear,
    dtype: torch.dtype,
    recipe: Recipe,
    fmt: Format,
    selection: Selection = Selection(),
    in_blocks: bool = True,
) -> Layer:
    """One layer's decision. Order: --skip, recipe-file rules, --only, the family's rules,
    the generic recipe's block rule, then the size and the format's shape rule."""
    shape = (linear.out_features, linear.in_features)
    action = fmt.name

    def keep(reason: str) -> Layer:
        return Layer(name, shape, KEEP, reason)

    for pattern in selection.skips:
        if matches(pattern, name):
            return keep(f"--skip {pattern}")
    chosen = None
    for rule in selection.user.rules if selection.user else ():
        if matches(rule.pattern, name):
            chosen = rule
            break
    if chosen and chosen.action == KEEP:
        return keep(f"'{chosen.pattern}': {chosen.reason}")
    if chosen is None:
        if selection.only and not any(matches(p, name) for p in selection.only):
            return keep("not matched by --only")
        for rule in recipe.skip:
            if matches(rule.pattern, name):
                return keep(f"'{rule.pattern}': {rule.reason}")
        if not in_blocks:
            return keep("outside the model's repeated blocks (generic recipe)")
    else:
        action = chosen.action
    if min(shape) < recipe.min_features:
        dim = "in" if linear.in_features < recipe.min_features else "out"
        return keep(f"{dim}_features {min(shape)} < {recipe.min_features}: too small to gain")
    problem = FORMATS[action].shape_problem(shape)
    if problem:
        return keep(problem)
    if not dtype.is_floating_point:
        return keep(f"weight dtype {dtype} is not floating point")
    reason = "quantized" if chosen is None else f"'{chosen.pattern}': {chosen.reason}"
    return Layer(name, shape, action, reason)


def check_family(source: Source, recipe: Recipe) -> None:
    if recipe.transformer_class and source.class_name != recipe.transformer_class:
        other = recipe_for_class(source.class_name)
        hint = (
            f"use `qconvert {other.name}`"
            if other
            else "use `qconvert model` (generic recipe) for other transformers"
        )
        raise PlanError(
            f"{source.transformer_dir}: the transformer's class is "
            f"{source.class_name or 'unknown'}, not {recipe.transformer_class}; {hint}"
        )


def make_plan(
    source: Source,
    recipe: Recipe,
    fmt: Format,
    selection: Selection = Selection(),
    max_shard_bytes: int = 5 * 10**9,
) -> Plan:
    check_family(source, recipe)
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
    for name in sorted(expected):
        check_tensor(infos[name], expected[name], source.class_name)
    prefixes = _block_prefixes(model) if recipe.only_repeated_blocks else []
    if recipe.only_repeated_blocks and not prefixes:
        raise PlanError(
            f"{source.transformer_dir}: {source.class_name} declares no _repeated_blocks; "
            f"the generic recipe needs them (use --recipe to name layers explicitly)"
        )
    layers: list[Layer] = []
    linear_names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear_names.append(name)
            in_blocks = not prefixes or any(name.startswith(p) for p in prefixes)
            dtype = infos[f"{name}.weight"].dtype
            layers.append(decide(name, module, dtype, recipe, fmt, selection, in_blocks))
    quantized = {
        f"{layer.name}.weight": FORMATS[layer.action] for layer in layers if layer.quantized
    }
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    items = []
    for name in sorted(infos):
        info = infos[name]
        if name in quantized:
            f = quantized[name]
            items.append(Item(info, f, f.bytes_for(info.shape)))  # type: ignore[arg-type]
        elif info.dtype in _TO_BF16 and not any(m in name.split(".") for m in keep_fp32):
            # Kept in bf16, as the summary and the card say: what diffusers loads them as
            # (dtype=torch.bfloat16) and what torchao's quantize_ of that model would save.
            items.append(Item(info, None, info.nbytes // info.dtype.itemsize * 2, torch.bfloat16))
        else:
            items.append(Item(info, None, info.nbytes))
    patterns = [*selection.patterns(), *(r.pattern for r in recipe.skip)]
    unmatched = [p for p in patterns if not any(matches(p, n) for n in linear_names)]
    shards = split_shards(items, max_shard_bytes)
    return Plan(
        recipe,
        fmt,
        selection,
        layers,
        items,
        shards,
        unmatched,
        source.class_name,
        source.description,
    )


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TO_BF16 = (torch.float16, torch.float32, torch.float64)


def check_tensor(info: TensorInfo, expected: torch.Tensor, class_name: str) -> None:
    """A source tensor must have the shape (and kind of dtype) of the model's own tensor."""
    if info.shape != tuple(expected.shape):
        raise PlanError(
            f"{info.path}: tensor {info.name!r} has shape {list(info.shape)}, but {class_name} "
            f"built from config.json expects {list(expected.shape)}; the weights and the config "
            f"do not match"
        )
    if expected.is_floating_point() != (info.dtype in _FLOATS):
        want = "a float (F16, BF16, F32)" if expected.is_floating_point() else "an integer"
        raise PlanError(
            f"{info.path}: tensor {info.name!r} is {info.dtype}, but {class_name} expects "
            f"{want} there (an already quantized checkpoint cannot be converted again)"
        )


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
