"""A tiny FLUX.1 pipeline: the real diffusers/transformers classes at a small fixed config.

Mirrors FLUX.1-dev's structure (FluxTransformer2DModel with guidance embedding, 16-channel VAE
latents packed 2×2 into 64 transformer channels, CLIP + T5 text encoders, flow-match
scheduler with FLUX.1-dev's values) with seeded random weights and locally built tokenizers.
The transformer is 1024 wide (8 heads × 128) so the real FLUX recipe quantizes its attention
and MLP layers and skips the rest, as it does on the 3072-wide original.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 8,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 16,
    "sample_size": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "gelu",
}
T5 = {
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "decoder_start_token_id": 0,
}
# FLUX.1-dev's scheduler/scheduler_config.json.
SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# What a converted tiny pipeline is called with in tests and the CLI's load hint.
CALL = {
    "height": 32,
    "width": 32,
    "num_inference_steps": 2,
    "guidance_scale": 3.5,
    "max_sequence_length": 32,
}

_WORDS = [
    *string.ascii_lowercase,
    *string.digits,
    "a",
    "cat",
    "dog",
    "holding",
    "sign",
    "says",
    "hello",
    "world",
    "photo",
    "of",
    "the",
    "red",
    "blue",
]


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in dict.fromkeys(_WORDS):
        for piece in (word, word + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(_WORDS)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_pipeline(seed: int = 0):
    """The tiny FluxPipeline in memory: transformer in bf16 (as FLUX.1-dev ships), rest fp32."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER).to(torch.bfloat16)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok), bos_token_id=0, eos_token_id=1, pad_token_id=1, **CLIP
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=len(t5_tok), pad_token_id=0, eos_token_id=1, **T5)
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=t5_tok,
        transformer=transformer.eval(),
    )


def build(dst: Path, seed: int = 0) -> None:
    """Write the tiny FLUX pipeline to ``dst`` as a diffusers folder (safetensors)."""
    build_pipeline(seed).save_pretrained(dst, safe_serialization=True)
