"""The fast load of a qconvert output's transformer: bytes over bandwidth, nothing else.

It builds what diffusers' ``from_pretrained`` followed by ``runtime.prepare`` builds — every
tensor, attribute, module type and name (tests/test_fastload.py compares them) — another way:

- the skeleton from the config on the meta device, as ``from_pretrained`` builds it (diffusers'
  own torchao quantizer object, default dtype, init contexts), while reader threads already
  stream the shards onto the device (``reading.Stream``: pread + pinned buffers + non-blocking
  copies on CUDA, pread into owned tensors on CPU);
- each torchao weight from its own metadata entry in the shard headers (torchao's
  ``object_from_dict``, what ``unflatten_tensor_state_dict`` calls, with one dict lookup per
  tensor where unflatten scans every name for each tensor);
- each quantized Linear switched to its runtime path as soon as its tensors are in, chosen by
  ``runtime.choose`` (the one table) and built by the path's own ``apply`` (our modules' public
  constructors). A replaced Linear never enters a reference cycle, so nothing waits for
  ``gc.collect``; q/k/v fusion runs module by module for the same reason.

What it cannot represent (no manifest, another schema, tensor types or dtypes it does not know,
keys that do not match the model) raises ``Unsupported`` before any weight is used: the caller
then takes the compatibility path (plain diffusers + prepare) and logs why.
"""

from __future__ import annotations

import copy
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qconvert.contain import inside
from qconvert.errors import ManifestError
from qconvert.loaders import runtime
from qconvert.loaders.compat import install_requantize
from qconvert.loaders.reading import Entry, ReadError, Stream, read_header
from qconvert.manifest import SCHEMA
from qconvert.manifest import load as load_manifest
from qconvert.safetensors_io import UnknownDtypeError

SUBCLASSES = ("NVFP4Tensor", "MXTensor", "Float8Tensor")  # what our formats write
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


class Unsupported(Exception):
    """Why the fast path cannot load this folder (the compatibility path can)."""


@dataclass
class Tensor:
    """One state-dict entry: its torchao metadata (None for a plain tensor) and its pieces."""

    key: str
    meta: dict[str, Any] | None
    pieces: list[str]


@dataclass
class Layout:
    """What the shard headers say: every piece's place, and how pieces make tensors."""

    folder: Path
    class_name: str
    files: list[Path]
    entries: dict[str, Entry]
    tensors: dict[str, Tensor]
    owner: dict[str, str] = field(default_factory=dict)  # piece name → state-dict key


def shard_files(folder: Path) -> list[Path]:
    """The transformer's safetensors files, from the index when there is one."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ReadError(f"{index}: not a safetensors index (no weight_map)") from None
        return [inside(folder, n, f"{index}: weight_map entry") for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise Unsupported(f"{folder}: no {WEIGHTS} (or its index)")


def layout(folder: Path, root: Path) -> Layout:
    """Read the manifest, config and every shard header; raise Unsupported when the fast path
    cannot build this output."""
    try:
        manifest = load_manifest(root)
    except ManifestError as exc:  # none (not ours) or unreadable: diffusers may still load it
        raise Unsupported(str(exc)) from None
    if manifest.get("schema") != SCHEMA:
        schema = manifest.get("schema")
        raise Unsupported(f"{root}: qconvert.json schema {schema!r} (this qconvert reads {SCHEMA})")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Unsupported(f"{folder}/config.json: unreadable ({exc})") from None
    if (config.get("quantization_config") or {}).get("quant_method") != "torchao":
        raise Unsupported(f"{folder}/config.json has no torchao quantization_config")
    files = shard_files(folder)
    entries: dict[str, Entry] = {}
    metadata: dict[str, str] = {}
    for path in files:
        try:
            found, md = read_header(path)
        except UnknownDtypeError as exc:
            raise Unsupported(str(exc)) from None
        for name in found.keys() & entries.keys():
            raise ReadError(f"{path}: tensor {name!r} also appears in {entries[name].path}")
        entries.update(found)
        for key, value in md.items():
            if metadata.setdefault(key, value) != value:
                raise Unsupported(f"{path}: metadata of {key!r} differs from another shard's")
    try:
        names = json.loads(metadata["tensor_names"])
    except (KeyError, ValueError):
        raise Unsupported(f"{files[0]}: no torchao tensor_names metadata") from None
    tensors: dict[str, Tensor] = {}
    for key in names:
        try:
            meta = json.loads(metadata[key])
            kind = meta["_type"]
        except (KeyError, ValueError, TypeError):
            raise Unsupported(f"{files[0]}: no usable torchao metadata for {key!r}") from None
        if kind == "Tensor":
            tensors[key] = Tensor(key, None, [key])
        elif kind in SUBCLASSES and "." in key and isinstance(meta.get("_data"), dict):
            module, attr = key.rsplit(".", 1)
            pieces = [f"{module}._{attr}_{s}" for s in meta.get("_tensor_data_names", [])]
            tensors[key] = Tensor(key, meta, pieces)
        else:
            raise Unsupported(
                f"tensor {key!r}: torchao type {kind!r} is not one the fast path builds"
            )
    owner = {p: t.key for t in tensors.values() for p in t.pieces}
    missing = [p for p in owner if p not in entries]
    extra = sorted(entries.keys() - owner.keys())
    if missing or extra:
        what = f"{missing[0]!r} missing" if missing else f"{extra[0]!r} not described"
        raise Unsupported(f"{folder}: shard tensors do not match their metadata ({what})")
    class_name = str(config.get("_class_name", ""))
    return Layout(folder, class_name, files, entries, tensors, owner)


@dataclass
class Skeleton:
    """The model on the meta device plus what diffusers' loader would know about it."""

    model: Any
    quantizer: Any
    dtype: torch.dtype
    keep_in_fp32: list[str]
    quantized: set[str]  # state-dict keys diffusers treats as quantized Linear weights


def skeleton(lay: Layout, dtype: torch.dtype, device_map: dict[str, Any] | None) -> Skeleton:
    """Build the model the way ``from_pretrained`` does, weights on meta. Not thread-safe
    (diffusers switches torch's default dtype and patches ``register_parameter`` meanwhile)."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.models.modeling_utils import no_init_weights
    from diffusers.quantizers import DiffusersAutoQuantizer

    cls = getattr(diffusers, lay.class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise Unsupported(f"{lay.folder}: model class {lay.class_name!r} is not in diffusers")
    config = copy.deepcopy(cls.load_config(str(lay.folder)))
    config["quantization_config"] = DiffusersAutoQuantizer.merge_quantization_configs(
        config["quantization_config"], None
    )
    quantizer = DiffusersAutoQuantizer.from_config(
        config["quantization_config"], pre_quantized=True
    )
    quantizer.validate_environment(torch_dtype=dtype, device_map=device_map)
    dtype = quantizer.update_torch_dtype(dtype)
    device_map = quantizer.update_device_map(device_map)
    keep = []
    if cls._keep_in_fp32_modules is not None and quantizer.use_keep_in_fp32_modules:
        keep = list(cls._keep_in_fp32_modules)
    original = cls._set_default_torch_dtype(dtype)
    try:
        with no_init_weights(), init_empty_weights():
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(original)
    quantizer.set_metadata([str(f) for f in lay.files])
    quantizer.preprocess_model(model=model, device_map=device_map, keep_in_fp32_modules=keep)
    quantizer.validate_environment(device_map=device_map)
    expected = model.state_dict()
    if expected.keys() != lay.tensors.keys():
        gone = sorted(expected.keys() - lay.tensors.keys())
        more = sorted(lay.tensors.keys() - expected.keys())
        what = f"missing {gone[0]!r}" if gone else f"unexpected {more[0]!r}"
        raise Unsupported(f"{lay.folder}: tensors do not match {lay.class_name} ({what})")
    device = "cpu" if not device_map else device_map[""]
    quantized = set()
    for key, t in lay.tensors.items():
        q = quantizer.check_if_quantized_param(model, expected[key], key, {}, param_device=device)
        if q:
            quantized.add(key)
        elif t.meta is not None:
            raise Unsupported(f"{key}: a {t.meta['_type']} that diffusers would not load as a "
                              "quantized Linear weight")  # fmt: skip
    return Skeleton(model, quantizer, dtype, keep, quantized)


def _plain(sk: Skeleton, module: torch.nn.Module, key: str, attr: str, t: torch.Tensor) -> None:
    """What diffusers' load_model_dict_into_meta + accelerate's set_module_tensor_to_device do
    with a plain tensor (casts, contiguity, Parameter class and requires_grad)."""
    cast = None
    if t.is_floating_point():
        if any(m in key.split(".") for m in sk.keep_in_fp32):
            cast = torch.float32
        elif t.dtype != torch.float8_e4m3fn:
            cast = sk.dtype
        if cast is not None:
            t = t.to(cast)
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if old is not None and old.is_contiguous():
        t = t.contiguous()
    if key in sk.quantized:  # diffusers' create_quantized_param, for a plain weight
        module._parameters[attr] = torch.nn.Parameter(t)
        return
    if cast is None and old is not None:
        t = t.to(old.dtype)
    if attr in module._buffers:
        module._buffers[attr] = t
    else:
        module._parameters[attr] = type(old)(t, requires_grad=old.requires_grad)


def _quantized(meta: dict[str, Any], pieces: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The torchao subclass one metadata entry describes, from its (on-device) pieces."""
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    module, attr = key.rsplit(".", 1)
    prefix = f"{module}._{attr}_"
    data = {**meta["_data"], **{name[len(prefix) :]: t for name, t in pieces.items()}}
    return torch.nn.Parameter(object_from_dict({**meta, "_data": data}))  # meta keeps no tensor


@dataclass
class Assembly:
    """Turns arriving tensors into the model: assigns them, then readies each quantized Linear."""

    sk: Skeleton
    lay: Layout
    device: torch.device
    dclass: str
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)  # module → keys still to come
    counts: dict[tuple[str, runtime.Path, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modules = dict(self.sk.model.named_modules())
        for key in self.lay.tensors:
            name = key.rpartition(".")[0]
            self.left[name] = self.left.get(name, 0) + 1

    def put(self, key: str, pieces: dict[str, torch.Tensor]) -> None:
        name, _, attr = key.rpartition(".")
        module = self.modules[name]
        meta = self.lay.tensors[key].meta
        if meta is None:
            _plain(self.sk, module, key, attr, pieces[key])
        else:
            module._parameters[attr] = _quantized(meta, pieces, key)
        self.left[name] -= 1
        if self.left[name] == 0 and f"{name}.weight" in self.sk.quantized:
            self.ready(name, module)

    def ready(self, name: str, linear: torch.nn.Module) -> None:
        """runtime.prepare's decision for one Linear, and diffusers' repr for a kept one."""
        from diffusers.quantizers.torchao.torchao_quantizer import _linear_extra_repr

        replacement = None
        weight = linear.weight
        if isinstance(weight, runtime.QUANTIZED):
            path, why = runtime.choose(weight, self.device, self.dclass)
            replacement = path.apply(linear)
            key = (type(weight).__name__, path, why)
            self.counts[key] = self.counts.get(key, 0) + 1
        if replacement is None:
            linear.extra_repr = types.MethodType(_linear_extra_repr, linear)
            return
        parent, _, child = name.rpartition(".")
        setattr(self.modules[parent], child, replacement)
        self.modules[name] = replacement


class FastLoad:
    """One transformer load: ``begin`` (headers, readers started, skeleton: main thread only),
    then ``finish`` (the weights; safe beside other loads running in other threads)."""

    def __init__(
        self,
        folder: Path,
        root: Path,
        device: torch.device,
        name_or_path: str,
        dtype: torch.dtype = torch.bfloat16,
        device_map: dict[str, Any] | None = None,
        dclass: str | None = None,
        fuse_qkv: bool = True,
        reader: str | None = None,
        load_id: dict[str, str | None] | None = None,
    ) -> None:
        self.folder, self.root, self.device = folder, root, device
        self.load_id = load_id
        self.name_or_path, self.dtype, self.device_map = name_or_path, dtype, device_map
        self.dclass = dclass or runtime.device_class(device)
        self.fuse_qkv, self.reader = fuse_qkv, reader
        self.stream: Stream | None = None

    def begin(self) -> Any:
        """Raises Unsupported (nothing kept) when the fast path cannot load the folder."""
        lay = layout(self.folder, self.root)
        order = sorted(lay.entries.values(), key=lambda e: (str(e.path), e.start))
        self.stream = Stream(order, self.device, self.reader).start()
        try:
            self.sk = skeleton(lay, self.dtype, self.device_map)
        except BaseException:
            self.stream.close()
            raise
        self.lay = lay
        return self.sk.model

    def finish(self) -> Any:
        assert self.stream is not None, "begin() first"
        sk, lay, device = self.sk, self.lay, self.device
        build = Assembly(sk, lay, device, self.dclass)
        arrived: dict[str, dict[str, torch.Tensor]] = {}
        with self.stream as stream:
            for entry, tensor in stream:
                key = lay.owner[entry.name]
                parts = arrived.setdefault(key, {})
                parts[entry.name] = tensor
                del tensor, parts
                if len(arrived[key]) == len(lay.tensors[key].pieces):
                    build.put(key, arrived.pop(key))
        counts = build.counts
        del build  # it references replaced modules: let them go now
        model = sk.model
        for module in model.modules():  # buffers made at init (non-persistent), as .to() would
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        fused = 0
        if self.fuse_qkv and any(path is runtime.FP8_FAST for _, path, _ in counts):
            from qconvert.loaders.fp8 import fuse_projections

            # As prepare does (one call: it installs the model's fusion hook), but without its
            # gc.collect every 8 modules (~0.25 s each on a loaded interpreter): nothing here is
            # in a reference cycle, each unfused copy is freed as it is replaced.
            fused = fuse_projections(model, collect=False)
        sk.quantizer.postprocess_model(model)
        model.hf_quantizer = sk.quantizer
        if counts:
            install_requantize(model)  # as prepare does: LoRA merges requantize with qconvert
        if self.device_map is not None:
            model.hf_device_map = dict(self.device_map)
        model.register_to_config(_name_or_path=self.name_or_path, _pre_quantization_dtype=sk.dtype)
        model.eval()
        if self.load_id is not None:  # what diffusers' AutoModel.from_pretrained records
            from diffusers.utils.constants import DIFFUSERS_LOAD_ID_FIELDS

            parts = [self.load_id.get(f) for f in DIFFUSERS_LOAD_ID_FIELDS]
            model._diffusers_load_id = "|".join("null" if p is None else p for p in parts)
        self.paths = runtime.report(counts, device, fused)
        return model
