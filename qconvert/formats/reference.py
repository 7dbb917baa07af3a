"""torchao's own construction of each format's weight, step by step (the reference).

Each ``quantize_*`` is the branch of torchao's ``quantize_`` handler for the format's config on
the hardware the format is made for (``torchao/prototype/mx_formats/inference_workflow.py``,
``torchao/quantization/quantize_/workflows/float8``), minus the hardware assert, so it runs on
any device. ``fastquant`` builds the same bytes faster on CPU and falls back to these.
"""

from __future__ import annotations

import torch
from torchao.prototype.mx_formats.inference_workflow import (
    MXDynamicActivationMXWeightConfig,
    NVFP4DynamicActivationNVFP4WeightConfig,
)
from torchao.prototype.mx_formats.mx_tensor import MXTensor, QuantizeTensorToMXKwargs
from torchao.prototype.mx_formats.nvfp4_tensor import (
    NVFP4Tensor,
    QuantizeTensorToNVFP4Kwargs,
    per_tensor_amax_to_scale,
)
from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
from torchao.quantization.quantize_.workflows.float8.float8_tensor import (
    Float8Tensor,
    QuantizeTensorToFloat8Kwargs,
)


def nvfp4_config() -> NVFP4DynamicActivationNVFP4WeightConfig:
    return NVFP4DynamicActivationNVFP4WeightConfig(
        use_dynamic_per_tensor_scale=True, use_triton_kernel=True
    )


def mxfp8_config() -> MXDynamicActivationMXWeightConfig:
    return MXDynamicActivationMXWeightConfig()


def nvfp4_act_quant_kwargs() -> QuantizeTensorToNVFP4Kwargs:
    """The activation settings torchao's NVFP4 handler stores in each weight."""
    config = nvfp4_config()
    return QuantizeTensorToNVFP4Kwargs(
        use_dynamic_per_tensor_scale=config.use_dynamic_per_tensor_scale,
        use_triton_kernel=config.use_triton_kernel,
        is_swizzled_scales=True,
    )


def mxfp8_act_quant_kwargs() -> QuantizeTensorToMXKwargs:
    """The activation settings torchao's MX handler stores in each weight."""
    config = mxfp8_config()
    return QuantizeTensorToMXKwargs(
        elem_dtype=config.activation_dtype,
        block_size=config.block_size,
        kernel_preference=config.kernel_preference,
        is_swizzled_scales=True,
        scaling_mode=config.scaling_mode,
    )


def quantize_nvfp4(weight: torch.Tensor) -> NVFP4Tensor:
    # The dynamic branch of torchao's _nvfp4_inference_linear_transform, minus its sm100 assert.
    config = nvfp4_config()
    per_tensor_scale = per_tensor_amax_to_scale(torch.max(torch.abs(weight)))
    act_quant_kwargs = nvfp4_act_quant_kwargs()
    quantized = NVFP4Tensor.to_nvfp4(
        weight,
        per_tensor_scale=per_tensor_scale,
        is_swizzled_scales=True,
        use_triton_kernel=False,
        act_quant_kwargs=act_quant_kwargs,
    )
    quantized.use_triton_kernel = config.use_triton_kernel
    return quantized


def quantize_mxfp8(weight: torch.Tensor) -> MXTensor:
    # torchao's _mx_inference_linear_transform (it has no hardware assert; MX wants bf16).
    config = mxfp8_config()
    act_quant_kwargs = mxfp8_act_quant_kwargs()
    return MXTensor.to_mx(
        weight,
        config.weight_dtype,
        block_size=config.block_size,
        kernel_preference=config.kernel_preference,
        act_quant_kwargs=act_quant_kwargs,
        is_swizzled_scales=True,
        scaling_mode=config.scaling_mode,
    )


def fp8_config() -> Float8DynamicActivationFloat8WeightConfig:
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_fp8(weight: torch.Tensor) -> Float8Tensor:
    # The PLAIN / PerRow branch of torchao's _float8_dynamic_activation_float8_weight_quantize_
    # tensor, minus its hardware check (CUDA sm89+), which is all that stops it on a CPU.
    config = fp8_config()
    activation_granularity, weight_granularity = config.granularity
    act_quant_kwargs = QuantizeTensorToFloat8Kwargs(
        config.activation_dtype,
        activation_granularity,
        hp_value_lb=config.activation_value_lb,
        hp_value_ub=config.activation_value_ub,
        kernel_preference=config.kernel_preference,
    )
    return Float8Tensor.from_hp(
        weight,
        float8_dtype=config.weight_dtype,
        granularity=weight_granularity,
        mm_config=config.mm_config,
        kernel_preference=config.kernel_preference,
        act_quant_kwargs=act_quant_kwargs,
    )
