"""One deep comparison for "the same model" of two loaded models (or pipelines), for the loader
tests — module names, order and types, every attribute, every parameter and buffer (type,
Parameter-ness, requires_grad, dtype, shape, stride, device, bytes; torchao subclasses piece
by piece and attribute by attribute), the config and the diffusers quantizer."""

from __future__ import annotations

import enum
import types
from typing import Any

import torch

SKIP = {"_parameters", "_buffers", "_modules", "_internal_dict"}
# Hook registries are keyed by global handle ids: compared by the hooks they hold, not the ids.
HOOKS = {
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
}
SCALARS = (int, float, str, bool, type(None), torch.dtype, torch.device, enum.Enum, torch.Size)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor | None, where: str) -> None:
    if b is None or a is None:
        assert a is None and b is None, f"{where}: {type(a).__name__} vs {type(b).__name__}"
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    assert isinstance(a, torch.nn.Parameter) == isinstance(b, torch.nn.Parameter), where
    assert getattr(a, "_is_param", False) == getattr(b, "_is_param", False), where
    assert a.requires_grad == b.requires_grad, f"{where}: requires_grad"
    assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), (
        f"{where}: {a.dtype} {list(a.shape)} {a.device} vs {b.dtype} {list(b.shape)} {b.device}"
    )
    names = getattr(b, "tensor_data_names", None)
    if names is None:  # a plain tensor
        assert a.stride() == b.stride() and a.is_contiguous() == b.is_contiguous(), where
        a8 = a.detach().reshape(-1).view(torch.uint8) if a.numel() else a
        b8 = b.detach().reshape(-1).view(torch.uint8) if b.numel() else b
        assert torch.equal(a8, b8), f"{where}: values differ"
        return
    for name in [*names, *getattr(b, "optional_tensor_data_names", [])]:
        same_tensor(getattr(a, name), getattr(b, name), f"{where}.{name}")
    attrs = [*b.tensor_attribute_names, *getattr(b, "optional_tensor_attribute_names", [])]
    for attr in attrs:
        assert getattr(a, attr) == getattr(b, attr), f"{where}.{attr}"
    same_attributes(a.__dict__, b.__dict__, where)


def same_value(a: Any, b: Any, where: str) -> None:
    if isinstance(b, torch.Tensor):
        same_tensor(a, b, where)
    elif isinstance(b, types.MethodType):
        assert isinstance(a, types.MethodType) and a.__func__ is b.__func__, where
    elif isinstance(b, SCALARS):
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"
    elif isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_value(x, y, f"{where}[{i}]")
    elif isinstance(b, dict):
        same_attributes(a, b, where)
    else:  # objects: same type, and comparable ones equal
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if type(b).__eq__ is not object.__eq__:
            assert a == b, where


def same_attributes(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    assert sorted(a) == sorted(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
    for key in b:
        if key in HOOKS:
            names = [
                [getattr(h, "__name__", type(h).__name__) for h in d[key].values()] for d in (a, b)
            ]
            assert names[0] == names[1], f"{where}.{key}: {names}"
        elif key not in SKIP:
            same_value(a[key], b[key], f"{where}.{key}")


def same_config(a: Any, b: Any, where: str) -> None:
    da, db = dict(a), dict(b)
    qa, qb = da.pop("quantization_config", None), db.pop("quantization_config", None)
    assert da == db, f"{where}: config {set(da.items()) ^ set(db.items())}"
    if qb is not None:
        assert type(qa) is type(qb) and qa.to_dict() == qb.to_dict(), f"{where}: quant config"


def same_model(a: torch.nn.Module, b: torch.nn.Module, where: str = "model") -> None:
    """Equal in every respect a user or a kernel could see."""
    mods_a, mods_b = list(a.named_modules()), list(b.named_modules())
    assert [n for n, _ in mods_a] == [n for n, _ in mods_b], f"{where}: module names/order"
    for (name, ma), (_, mb) in zip(mods_a, mods_b, strict=True):
        here = f"{where}.{name}" if name else where
        assert type(ma) is type(mb), f"{here}: {type(ma).__name__} vs {type(mb).__name__}"
        assert list(ma._parameters) == list(mb._parameters), f"{here}: parameter names"
        assert list(ma._buffers) == list(mb._buffers), f"{here}: buffer names"
        for key in mb._parameters:
            same_tensor(ma._parameters[key], mb._parameters[key], f"{here}.{key}")
        for key in mb._buffers:
            same_tensor(ma._buffers[key], mb._buffers[key], f"{here}.{key}")
        assert ma._non_persistent_buffers_set == mb._non_persistent_buffers_set, here
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
        assert all(len(getattr(ma, h)) == len(getattr(mb, h)) for h in hooks), f"{here}: hooks"
        extra = {"hf_quantizer", "config"}
        da = {k: v for k, v in ma.__dict__.items() if k not in extra}
        db = {k: v for k, v in mb.__dict__.items() if k not in extra}
        same_attributes(da, db, here)
        if hasattr(mb, "config") and hasattr(mb, "register_to_config"):
            same_config(ma.config, mb.config, here)
        qa, qb = getattr(ma, "hf_quantizer", None), getattr(mb, "hf_quantizer", None)
        assert type(qa) is type(qb), f"{here}: hf_quantizer"
        if qb is not None:
            assert qa.quantization_config.to_dict() == qb.quantization_config.to_dict(), here
            assert qa.pre_quantized == qb.pre_quantized and qa.metadata == qb.metadata, here
            assert qa.modules_to_not_convert == qb.modules_to_not_convert, here
            assert qa._pending_flattened_state_dict == qb._pending_flattened_state_dict == {}


def same_weights(a: torch.nn.Module, b: torch.nn.Module, where: str = "model") -> None:
    """Same module names and types, every parameter and buffer equal in dtype, shape, device
    and bytes (for components loaded by different diffusers/transformers code paths)."""
    mods_a, mods_b = list(a.named_modules()), list(b.named_modules())
    assert [n for n, _ in mods_a] == [n for n, _ in mods_b], f"{where}: module names/order"
    assert [type(m) for _, m in mods_a] == [type(m) for _, m in mods_b], f"{where}: types"
    ta = dict(a.state_dict(keep_vars=True))
    tb = dict(b.state_dict(keep_vars=True))
    assert list(ta) == list(tb), f"{where}: state dict keys"
    for key, t in tb.items():
        u = ta[key]
        assert (u.dtype, u.shape, u.device) == (t.dtype, t.shape, t.device), f"{where}.{key}"
        assert torch.equal(u.detach().reshape(-1).view(torch.uint8),
                           t.detach().reshape(-1).view(torch.uint8)), f"{where}.{key}"  # fmt: skip
