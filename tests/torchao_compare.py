"""One comparison for "the same tensor torchao builds", shared by the format, fast-quantizer
and conversion tests."""

from __future__ import annotations

import torch
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict


def assert_identical(ours: torch.Tensor, ref: torch.Tensor, strides: bool = True) -> None:
    """Same subclass, shape, dtype, every data tensor byte for byte (and stride, unless the
    tensor went through a file), every attribute, and the same serialized metadata."""
    assert type(ours) is type(ref)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    names = [*ref.tensor_data_names, *getattr(ref, "optional_tensor_data_names", [])]
    for name in names:
        a, b = getattr(ours, name), getattr(ref, name)
        if b is None:
            assert a is None, name
            continue
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        if strides:
            assert a.stride() == b.stride(), name
        a8, b8 = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        if not torch.equal(a8, b8):
            bad = (a8 != b8).nonzero().flatten()
            raise AssertionError(
                f"{name}: {bad.numel()} bytes differ, first at {bad[:4].tolist()}: "
                f"ours {a8[bad[:4]].tolist()} torchao {b8[bad[:4]].tolist()}"
            )
    attrs = [*ref.tensor_attribute_names, *getattr(ref, "optional_tensor_attribute_names", [])]
    for attr in attrs:
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert (
        flatten_tensor_state_dict({"l.weight": ours})[1]
        == flatten_tensor_state_dict({"l.weight": ref})[1]
    )
