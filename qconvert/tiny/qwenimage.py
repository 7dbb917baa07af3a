"""A tiny Qwen-Image pipeline: the real diffusers/transformers classes at a small fixed config.

Mirrors Qwen/Qwen-Image's ``QwenImagePipeline``: ``QwenImageTransformer2DModel`` (patch 2, 64 input
channels = 16 VAE latent channels packed 2×2, 16 output channels, head_dim 128, rope axes
(16, 56, 56), no guidance embedding), ``AutoencoderKLQwenImage`` (z_dim 16, 8× spatial compression,
the real latents_mean/std, which are the class defaults), a ``Qwen2_5_VLForConditionalGeneration``
text encoder (mrope, vision tower present) with a ``Qwen2Tokenizer`` built locally, and
``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's scheduler_config.json values. Weights are
seeded random. The transformer is 1024 wide (8 heads × 128, MLP 4096) with 2 blocks, so the recipe's
size rule leaves its attention, modulation and MLP layers quantizable as on the 3072-wide original.
The tokenizer's vocabulary spells the pipeline's prompt template word by word, so its system prefix
is 34 tokens long, as ``prompt_template_encode_start_idx`` expects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qconvert.tiny.common import init_linears

if TYPE_CHECKING:
    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer

# Qwen-Image: 60 layers, 24 heads, joint_attention_dim 3584 (the text encoder's width).
TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 8,
    "joint_attention_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# Qwen-Image: base_dim 96, num_res_blocks 2; same z_dim, dim_mult and temporal downsampling.
VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
# Qwen2.5-VL-7B's language model: hidden 3584, 28 layers, 28 heads / 4 kv heads, head_dim 128,
# mrope_section [16, 24, 24]; vocab 152064. The token ids come from the tokenizer at build time.
TEXT: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "max_window_layers": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"rope_type": "default", "mrope_section": [4, 6, 6]},
}
# Qwen2.5-VL-7B's vision tower: depth 32, hidden 1280, 16 heads, full attention every 8th block.
VISION: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
}
# Qwen-Image's scheduler/scheduler_config.json.
SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# What a tiny Qwen-Image pipeline is called with in tests (with a prompt). A negative prompt, even
# " ", turns on true CFG, so both transformer passes run.
CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 2,
    "true_cfg_scale": 4.0,
    "negative_prompt": " ",
    "max_sequence_length": 64,
}

# Qwen2.5-VL's special tokens, in its order; they follow the ordinary vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Text whose words become whole tokens: QwenImagePipeline's prompt template, then prompt words.
VOCAB_TEXT = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    " a cat holding a sign that says hello world, photo of the red blue dog, bad quality"
)


def tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2Tokenizer whose vocabulary spells ``VOCAB_TEXT`` word by word."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    pre_tokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    chunks = re.split("|".join(map(re.escape, SPECIAL_TOKENS)), VOCAB_TEXT)
    words = dict.fromkeys(p for c in chunks for p, _ in pre_tokenizer.pre_tokenize_str(c))
    # Sorted code points of the byte-level alphabet are GPT-2's byte order.
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    merges = []
    # Each word is a chain of merges (prefix, next char). The chains of space-led words come first,
    # so a space-led word never loses a pair to a merge that starts another word.
    for word in sorted(words, key=lambda w: not w.startswith("Ġ")):
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        model_max_length=32768,
        extra_special_tokens=SPECIAL_TOKENS[1:],
    )


def build_pipeline(seed: int = 0) -> QwenImagePipeline:
    """The tiny QwenImagePipeline in memory: transformer bf16 (as Qwen-Image ships), rest fp32."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    if len(tok) > TEXT["vocab_size"]:
        raise RuntimeError(f"tiny Qwen tokenizer has {len(tok)} tokens > {TEXT['vocab_size']}")
    text_config = {**TEXT, "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>")}
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=VISION,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**TRANSFORMER)
        init_linears(transformer, seed)
        # nn.Module.to: diffusers' own .to warns about fp32 modules, of which this model has none.
        torch.nn.Module.to(transformer, torch.bfloat16)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(**VAE)
        torch.manual_seed(seed + 2)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tok,
        transformer=transformer.eval(),
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    if len(tok(prefix).input_ids) != pipe.prompt_template_encode_start_idx:
        raise RuntimeError("QwenImagePipeline's prompt template changed: update VOCAB_TEXT")
    return pipe


def build(dst: Path, seed: int = 0) -> None:
    """Write the tiny Qwen-Image pipeline to ``dst`` as a diffusers folder (safetensors)."""
    build_pipeline(seed).save_pretrained(dst, safe_serialization=True)
