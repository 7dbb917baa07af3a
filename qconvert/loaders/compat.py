"""What diffusers, PEFT and ``torch.nn`` expect of a quantized Linear, on every runtime path.

LoRA (PEFT, through diffusers' ``load_lora_weights``) finds its targets by module name, checks
``state_dict()[name + ".weight"].shape`` and picks its layer class from the target's ``weight``:
a torchao tensor gets PEFT's ``TorchaoLoraLinear``, whose forward is ``base_layer(x) +
B(A(x)) * scale``. So every quantized Linear keeps its name, its ``nn.Linear`` type and a
torchao ``weight``:

- on the in-place paths (Blackwell native, CPU, older GPUs) the module *is* the loaded
  ``nn.Linear`` holding the file's torchao tensor (runtime attributes switched);
- qconvert's runtime modules (:class:`RuntimeLinear`: the Hopper kernels, the fp8 fast path)
  are ``nn.Linear`` subclasses whose ``weight`` rebuilds, on access, the torchao tensor the file
  held (same class, attributes and pieces) from the buffers the kernels read.

Either way ``state_dict()`` holds what the file holds (saved runtime attributes, swizzled block
scales), so ``save_pretrained`` writes the original tensors back.

Merging (``fuse_lora``): PEFT dequantizes ``weight``, adds the LoRA delta, assigns the dense
result to ``weight`` and calls ``quantize_(layer, model.hf_quantizer.quantization_config
.get_apply_tensor_subclass())``. ``prepare`` points that config at :class:`Requantize`, whose
handler requantizes with qconvert's formats (the bytes torchao builds on Blackwell) and re-applies
the layer's runtime path; a :class:`RuntimeLinear` requantizes in its ``weight`` setter. Lossy:
the merged weight is rounded to the format once more.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from qconvert.errors import QconvertError
from qconvert.formats import FORMATS

log = logging.getLogger("qconvert.loaders")


class RuntimeDtypeError(QconvertError, TypeError):
    """A dtype change asked of quantized layers (they compute in bf16)."""


@functools.cache
def _format_by_type() -> dict[str, str]:
    return {FORMATS[name].tensor_type(): name for name in FORMATS}


def format_of(weight: torch.Tensor) -> str:
    """The qconvert format a torchao weight is stored in ("nvfp4", "mxfp8", "fp8")."""
    return _format_by_type()[type(weight).__name__]


@dataclass(frozen=True)
class SavedLayout:
    """How a torchao weight was stored: its class, attributes, shape and inner tensors, so that
    the same tensor can be rebuilt from the pieces a runtime keeps."""

    cls: type
    attrs: dict[str, Any]
    size: torch.Size
    pieces: dict[str, tuple[torch.dtype, torch.Size]]

    @classmethod
    def of(cls, weight: torch.Tensor) -> SavedLayout:
        names, attrs = weight.__tensor_flatten__()
        pieces = {n: (getattr(weight, n).dtype, getattr(weight, n).shape) for n in names}
        return cls(type(weight), dict(attrs), weight.shape, pieces)

    def unswizzled(self, block: int) -> SavedLayout:
        """The same tensor with row-major block scales (``[N, K / block]``, not swizzled)."""
        dtype, _ = self.pieces["scale"]
        n, k = (int(d) for d in self.size)
        pieces = {**self.pieces, "scale": (dtype, torch.Size([n, k // block]))}
        return SavedLayout(self.cls, {**self.attrs, "is_swizzled_scales": False}, self.size, pieces)

    def build(self, inner: dict[str, torch.Tensor]) -> torch.Tensor:
        """The torchao tensor from ``inner`` pieces, each viewed as saved (dtype, shape)."""
        data = {}
        for name, (dtype, shape) in self.pieces.items():
            t = inner[name]
            if t.dtype != dtype:
                t = t.view(dtype)
            data[name] = t.reshape(shape)
        return self.cls.__tensor_unflatten__(data, dict(self.attrs), self.size, None)


@functools.cache
def _probe_attrs(fmt: str, k: int) -> tuple[type, dict[str, Any]]:
    rows, cols = (16, k) if fmt == "fp8" else (128, 128)  # fp8's block_size names the row length
    probe = FORMATS[fmt].build(torch.ones(rows, cols, dtype=torch.bfloat16))
    _, attrs = probe.__tensor_flatten__()
    return type(probe), dict(attrs)


def default_layout(fmt: str, n: int, k: int) -> SavedLayout:
    """The layout qconvert writes for an ``[n, k]`` weight of ``fmt`` (torchao's Blackwell
    tensor), for runtime modules built from bare pieces rather than a loaded weight."""
    cls, attrs = _probe_attrs(fmt, k)
    pieces = {
        name: (dtype, torch.Size(shape))
        for name, (dtype, shape) in FORMATS[fmt].pieces((n, k)).items()
    }
    return SavedLayout(cls, attrs, torch.Size([n, k]), pieces)


def with_attrs(weight: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    """A torchao tensor sharing ``weight``'s data, with ``attrs`` replacing its attributes."""
    names, current = weight.__tensor_flatten__()
    inner = {n: getattr(weight, n) for n in names}
    return type(weight).__tensor_unflatten__(inner, {**current, **attrs}, weight.shape, None)


# ---------------------------------------------------------------------------------------------
# qconvert's runtime modules
# ---------------------------------------------------------------------------------------------


class RuntimeLinear(nn.Linear):
    """Base of qconvert's runtime Linears: an ``nn.Linear`` (for PEFT, diffusers, ``quantize_``)
    whose ``weight`` is the saved torchao tensor, rebuilt on access from the runtime buffers.

    Subclasses implement ``torchao_weight(saved)`` (``saved``: the tensor as the file holds it,
    for ``state_dict``; else the same values in the runtime's layout, sharing its buffers: what
    ``weight`` returns, cheap enough for PEFT's many reads) and ``set_dense_weight(w)``
    (requantize a dense bf16 weight into the buffers); they never call ``nn.Linear.__init__``
    (no dense weight is ever allocated). Buffers never change dtype: ``.to(dtype)`` /
    ``.half()`` on these modules raises, ``.to(device)`` moves them.
    """

    fmt: str

    def __init__(self, in_features: int, out_features: int) -> None:
        nn.Module.__init__(self)
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def torchao_weight(self, saved: bool = True) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_dense_weight(self, weight: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_quantized_weight(self, weight: torch.Tensor) -> None:
        """Take a torchao weight as this layer's (subclasses repack it without rounding)."""
        self.set_dense_weight(weight.dequantize(torch.bfloat16))

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        """This layer's torchao tensor: the checkpoint's values, in the runtime's layout, sharing
        the kernels' buffers (``state_dict`` gives the file's layout)."""
        return self.torchao_weight(saved=False)

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        if isinstance(value, nn.Parameter):
            value = value.data
        if type(value).__name__ in _format_by_type():
            self.set_quantized_weight(value)
        else:
            self.set_dense_weight(value)

    @weight.deleter
    def weight(self) -> None:  # PEFT's merge deletes, then assigns: the setter does the work
        pass

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight":  # nn.Module would register a Parameter under the property
            type(self).weight.fset(self, value)  # type: ignore[attr-defined]
            return
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name == "weight":
            return
        super().__delattr__(name)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.torchao_weight(saved=True)
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        bias = self.bias
        if bias is not None:
            destination[prefix + "bias"] = bias if keep_vars else bias.detach()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        some = next(iter(self.buffers()), None)
        device = some.device if some is not None else torch.device("cpu")
        probe = fn(torch.zeros((), dtype=torch.bfloat16, device=device))
        if probe.dtype != torch.bfloat16:
            raise RuntimeDtypeError(
                f"{type(self).__name__} computes in bf16 with {self.fmt} weights; it cannot be "
                f"cast to {probe.dtype} (move it with .to(device) only)"
            )
        moved = {}
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            out = fn(buf)
            moved[name] = out if out.dtype == buf.dtype else buf.to(probe.device)
        self._buffers.update(moved)
        return self

    def reset_parameters(self) -> None:  # nn.Linear API; there is nothing to initialize
        return None


# ---------------------------------------------------------------------------------------------
# In-place paths: the loaded nn.Linear keeps the file's tensor, runtime attributes switched
# ---------------------------------------------------------------------------------------------

_SAVED_ATTRS = "_qconvert_saved_attrs"
_FORMAT = "_qconvert_format"
_APPLY = "_qconvert_apply"


def _restore_saved_attrs(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
    saved = getattr(module, _SAVED_ATTRS, None)
    key = prefix + "weight"
    if saved is not None and key in state_dict:
        state_dict[key] = with_attrs(state_dict[key], saved)


def record_in_place(linear: nn.Linear, apply: Callable[[nn.Linear], nn.Module | None]) -> None:
    """Before a path switches ``linear.weight``'s runtime attributes: remember the saved ones
    (``state_dict`` reports them, so a save writes the file's tensor back), the format and the
    path (``apply``, re-run after a LoRA merge requantized the weight). Idempotent."""
    if getattr(linear, _SAVED_ATTRS, None) is None:
        _, attrs = linear.weight.__tensor_flatten__()
        object.__setattr__(linear, _SAVED_ATTRS, dict(attrs))
        linear.register_state_dict_post_hook(_restore_saved_attrs)
    object.__setattr__(linear, _FORMAT, format_of(linear.weight))
    object.__setattr__(linear, _APPLY, apply)


# ---------------------------------------------------------------------------------------------
# LoRA merge: PEFT's requantize hook
# ---------------------------------------------------------------------------------------------


@dataclass
class Requantize(AOBaseConfig):
    """What ``quantize_`` runs on a layer after PEFT merged a LoRA into its dense weight:
    quantize it again in its qconvert format and re-apply its runtime path."""


@register_quantize_module_handler(Requantize)
def _requantize(module: nn.Module, config: Requantize) -> nn.Module:
    if isinstance(module, RuntimeLinear):
        return module  # its weight setter already requantized into the kernels' buffers
    fmt = getattr(module, _FORMAT, None)
    weight = getattr(module, "weight", None)
    if fmt is None or weight is None:
        raise QconvertError(
            f"{type(module).__name__}: not a layer qconvert prepared; cannot requantize it"
        )
    if isinstance(weight, nn.Parameter):
        weight = weight.data
    if type(weight).__name__ in _format_by_type():
        return module  # already quantized (PEFT left it so)
    quantized = FORMATS[fmt].quantize(weight.to(torch.bfloat16).contiguous())
    if "weight" in module.__dict__:  # PEFT assigned the dense tensor as a plain attribute
        del module.__dict__["weight"]
    module.weight = nn.Parameter(quantized, requires_grad=False)
    _, attrs = quantized.__tensor_flatten__()
    object.__setattr__(module, _SAVED_ATTRS, dict(attrs))
    getattr(module, _APPLY)(module)
    return module


def _qconvert_config_class(base: type) -> type:
    """``base`` (diffusers' TorchAoConfig) whose ``get_apply_tensor_subclass`` returns
    :class:`Requantize`; everything it serializes is ``base``'s."""
    return _SUBCLASSES.setdefault(
        base,
        type(
            "Qconvert" + base.__name__,
            (base,),
            {"get_apply_tensor_subclass": lambda self: Requantize(), "_qconvert_base": base},
        ),
    )


_SUBCLASSES: dict[type, type] = {}


def install_requantize(model: nn.Module) -> bool:
    """Make PEFT requantize merged LoRA layers of ``model`` with qconvert's formats (see the
    module docstring). Returns whether the model has a torchao quantizer to answer through."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None or not hasattr(config, "get_apply_tensor_subclass"):
        return False
    if getattr(type(config), "_qconvert_base", None) is None:
        config.__class__ = _qconvert_config_class(type(config))
    return True
