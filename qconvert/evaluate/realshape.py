"""The family's real architecture with random weights, quantized in memory: speed depends on
shapes, not values, so any GPU can be measured without downloading a checkpoint.

The transformer is built from the config the family's recipe records (``real_config``), with
seeded random weights on the device. The quantized side takes the same weights and the same
layer decisions as a conversion (``plan_for`` on the real config), builds each weight with
``qconvert.formats`` on the device and prepares it with ``qconvert.loaders.prepare``: what a
checkpoint of that shape runs, no files involved.

End to end (FLUX.1 only): the pipeline is FluxPipeline with FLUX.1-dev's scheduler values, a
random-weight VAE of FLUX.1-dev's VAE config, and no text encoders: prompt embeddings are random
tensors of the real shapes (T5-XXL: max_sequence_length × joint_attention_dim; CLIP pooled:
pooled_projection_dim), seeded from the prompt. Text encoding is therefore not timed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import torch

from qconvert.evaluate.errors import EvalError

# black-forest-labs/FLUX.1-dev vae/config.json (AutoencoderKL), where it differs from defaults.
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
FAMILIES = ("flux",)  # families with a real-shape pipeline (end to end)


def recipe(family: str, overrides: dict[str, Any] | None = None) -> Any:
    """The family's recipe, its real config updated with ``overrides`` (tests shrink it)."""
    from qconvert.convert.recipes import families

    if family not in FAMILIES:
        raise EvalError(
            f"--real-shape: only {', '.join(FAMILIES)} has a real-shape pipeline here; "
            f"measure a converted {family} checkpoint instead"
        )
    found = families()[family]
    if overrides:  # as a recipe's TOML would hold them (lists, not tuples)
        plain = json.loads(json.dumps(overrides))
        found = dataclasses.replace(found, real_config={**found.real_config, **plain})
    return found


def build_transformer(rec: Any, device: torch.device, seed: int) -> torch.nn.Module:
    """The real-config transformer, bf16, seeded random weights, built on ``device`` (on a GPU
    directly in bf16; on a CPU in fp32, whose initialization is faster there, then cast)."""
    from qconvert.convert.plan import model_class

    cls = model_class(rec.transformer_class, f"recipe {rec.name}")
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = cls(**rec.real_config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def quantize_in_memory(
    model: torch.nn.Module,
    rec: Any,
    fmt: str,
    device: torch.device,
    selection: Any = None,
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Quantize ``model``'s Linear weights as a conversion would (same plan), then prepare it
    for ``device``. Returns (runtime paths by tensor type, per-layer SQNR rows)."""
    from qconvert.convert import plan_for
    from qconvert.convert.plan import Selection, real_config_source
    from qconvert.evaluate.metrics import weight_sqnr
    from qconvert.formats import FORMATS
    from qconvert.loaders import prepare

    plan = plan_for(real_config_source(rec), rec.name, FORMATS[fmt], selection or Selection())
    decided = {layer.name: layer.action for layer in plan.layers if layer.quantized}

    def pairs() -> Any:  # one layer at a time: each bf16 weight is freed once replaced
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name in decided:
                weight = module.weight.data
                quantized = FORMATS[decided[name]].quantize(weight, name=name)
                module.weight = torch.nn.Parameter(quantized, requires_grad=False)
                yield name, decided[name], weight, quantized

    rows = weight_sqnr(pairs())
    return prepare(model, device), rows


def _embeds(prompt: str, shape: tuple[int, ...], device: torch.device, salt: str) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(f"{salt}:{prompt}".encode()).digest()[:8], "little")
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)


class RealShapeSubject:
    """A family's real architecture, random weights: bf16 against each format, in memory."""

    real_shape = True
    tiny = False

    def __init__(
        self,
        family: str,
        formats: list[str],
        seed: int = 0,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        from qconvert.formats import get_format

        self.family = family
        self.rec = recipe(family, overrides)
        for fmt in formats:
            get_format(fmt)
        self.variants = list(formats)
        self.seed = seed
        self.shrunk = bool(overrides)  # a test's smaller config: fine on a CPU
        config = json.dumps(self.rec.real_config, sort_keys=True)
        self.ref_identity = f"realshape:{family}:seed{seed}:{config}"
        self.reference_text = (
            f"bf16 {self.rec.title} real architecture (random weights, seed {seed}) "
            f"through diffusers"
        )
        self.sqnr: dict[str, list[dict[str, Any]]] = {}
        self.runtime: dict[str, dict[str, str]] = {}
        self._vae: dict[str, Any] = {}  # one random VAE per device, shared by every pipeline

    def identity(self, variant: str | None) -> str:
        return self.ref_identity if variant is None else f"{self.ref_identity}:{variant}"

    def describe(self) -> str:
        return f"{self.rec.title} real architecture, random weights"

    def transformer(self, variant: str | None, device: torch.device) -> torch.nn.Module:
        model = build_transformer(self.rec, device, self.seed)
        if variant is not None:
            runtime, rows = quantize_in_memory(model, self.rec, variant, device)
            self.runtime[variant], self.sqnr[variant] = runtime, rows
        return model

    def load(self, variant: str | None, device: torch.device) -> Any:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

        from qconvert.tiny.flux import SCHEDULER  # FLUX.1-dev's scheduler values

        transformer = self.transformer(variant, device)
        if str(device) not in self._vae:
            torch.manual_seed(self.seed + 1)
            vae = AutoencoderKL(**FLUX_VAE).to(device=device, dtype=torch.bfloat16)
            self._vae[str(device)] = vae.eval().requires_grad_(False)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
            vae=self._vae[str(device)],
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def files(self, variant: str | None) -> list[Any]:
        return []

    def prompt_inputs(self, prompt: str, device: torch.device) -> dict[str, Any]:
        config = self.rec.real_config
        from qconvert.evaluate.settings import defaults

        length = int(defaults(self.family).call["max_sequence_length"])
        joint = int(config.get("joint_attention_dim", 4096))
        pooled = int(config.get("pooled_projection_dim", 768))
        return {
            "prompt_embeds": _embeds(prompt, (1, length, joint), device, "t5"),
            "pooled_prompt_embeds": _embeds(prompt, (1, pooled), device, "clip"),
        }

    def weight_sqnr(self) -> list[dict[str, Any]] | None:
        """Computed when the quantized transformer is built (None before)."""
        return next(iter(self.sqnr.values()), None)
