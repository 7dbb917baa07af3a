"""A tiny LTX-2 pipeline: the real diffusers/transformers classes at a small fixed config.

Mirrors Lightricks/LTX-2's ``LTX2Pipeline`` (joint audio-video, LTX-2.0 layout):
``LTX2VideoTransformer3DModel`` (video head_dim 128, audio head_dim 64, 128 video latent channels,
split RoPE in double precision, prompt projections inside the transformer),
``AutoencoderKLLTX2Video`` (patch 4, spatial/temporal/spatiotemporal downsampling: 32× spatial and
8× temporal compression, causal encoder, non-causal decoder), ``AutoencoderKLLTX2Audio`` (ch_mult
(1, 2, 4), 8 latent channels, 16 kHz mel with hop 160), ``LTX2Vocoder`` (upsampling 6·5·2·2·2 to
24 kHz stereo), ``LTX2TextConnectors`` (split RoPE, learnable registers), a
``Gemma3ForConditionalGeneration`` text encoder (vision tower present) with a ``GemmaTokenizer``
built locally, and ``FlowMatchEulerDiscreteScheduler`` with LTX-2's values. Weights are seeded
random. The transformer's video and audio streams are both 1024 wide (8 × 128 and 16 × 64 heads,
MLP 4096) with 2 blocks, so the recipe's size rule leaves their attention (self, prompt, a2v, v2a),
MLP and AdaLN layers quantizable, as on the 4096/2048-wide original.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qconvert.tiny.common import init_linears

if TYPE_CHECKING:
    from diffusers import LTX2Pipeline
    from transformers import GemmaTokenizer

# LTX-2: 48 layers, 32 × 128 video heads, 32 × 64 audio heads, cross_attention_dim 4096 and
# audio_cross_attention_dim 2048 (each stream's width), caption_channels 3840 (Gemma-3-12B's),
# audio_in_channels 128 (8 latent channels × 16 latent mel bins).
TRANSFORMER: dict[str, Any] = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 8,
    "attention_head_dim": 128,
    "cross_attention_dim": 1024,
    "vae_scale_factors": (8, 32, 32),
    "pos_embed_max_pos": 20,
    "base_height": 2048,
    "base_width": 2048,
    "audio_in_channels": 32,
    "audio_out_channels": 32,
    "audio_patch_size": 1,
    "audio_patch_size_t": 1,
    "audio_num_attention_heads": 16,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 1024,
    "audio_scale_factor": 4,
    "audio_pos_embed_max_pos": 20,
    "audio_sampling_rate": 16000,
    "audio_hop_length": 160,
    "num_layers": 2,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 64,
    "attention_bias": True,
    "attention_out_bias": True,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "causal_offset": 1,
    "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000,
    "rope_type": "split",
}
# LTX-2: 30 × 128 heads (= caption_channels), 2 layers and 128 registers per connector,
# text_proj_in_factor 49 (Gemma-3-12B's 48 layers + embeddings).
CONNECTORS: dict[str, Any] = {
    "caption_channels": 64,
    "text_proj_in_factor": 3,
    "video_connector_num_attention_heads": 2,
    "video_connector_attention_head_dim": 32,
    "video_connector_num_layers": 1,
    "video_connector_num_learnable_registers": 16,
    "audio_connector_num_attention_heads": 2,
    "audio_connector_attention_head_dim": 32,
    "audio_connector_num_layers": 1,
    "audio_connector_num_learnable_registers": 16,
    "connector_rope_base_seq_len": 4096,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "causal_temporal_positioning": False,
    "rope_type": "split",
}
# LTX-2: block_out_channels (256, 512, 1024, 2048), decoder (256, 512, 1024), layers_per_block
# (4, 6, 6, 2, 2), decoder_layers_per_block (5, 5, 5, 5); the rest as here.
VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "block_out_channels": (8, 16, 32, 32),
    "decoder_block_out_channels": (8, 16, 32),
    "layers_per_block": (1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1),
    "spatio_temporal_scaling": (True, True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True),
    "upsample_factor": (2, 2, 2),
    "timestep_conditioning": False,
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "encoder_causal": True,
    "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros",
    "decoder_spatial_padding_mode": "reflect",
    "spatial_compression_ratio": 32,
    "temporal_compression_ratio": 8,
}
# LTX-2: base_channels 128 (= latent_channels × mel_bins / 4, the packed audio width), 2 res
# blocks, 64 mel bins.
AUDIO_VAE: dict[str, Any] = {
    "base_channels": 32,
    "output_channels": 2,
    "ch_mult": (1, 2, 4),
    "num_res_blocks": 1,
    "attn_resolutions": None,
    "in_channels": 2,
    "resolution": 256,
    "latent_channels": 8,
    "norm_type": "pixel",
    "causality_axis": "height",
    "dropout": 0.0,
    "mid_block_add_attention": False,
    "sample_rate": 16000,
    "mel_hop_length": 160,
    "is_causal": True,
    "mel_bins": 16,
}
# LTX-2: in_channels 128 (2 channels × 64 mel bins), hidden 1024, resnet kernels (3, 7, 11).
VOCODER: dict[str, Any] = {
    "in_channels": 32,
    "hidden_channels": 32,
    "out_channels": 2,
    "upsample_kernel_sizes": [16, 15, 8, 4, 4],
    "upsample_factors": [6, 5, 2, 2, 2],
    "resnet_kernel_sizes": [3],
    "resnet_dilations": [[1, 3, 5]],
    "leaky_relu_negative_slope": 0.1,
    "output_sampling_rate": 24000,
}
# Gemma-3-12B: hidden 3840, 48 layers (5 sliding : 1 global), 16 heads / 8 kv heads, head_dim 256,
# linear RoPE scaling ×8 on global layers; vocab 262208. Token ids come from the tokenizer.
TEXT: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 16,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 131072,
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
}
# Gemma-3-12B's SigLIP tower: hidden 1152, 27 layers, 896 px in 14 px patches, 256 image tokens.
VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}
MM_TOKENS_PER_IMAGE = 4
# LTX-2's scheduler/scheduler_config.json.
SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 1024,
    "base_shift": 0.95,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 2.05,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.1,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# What a tiny LTX-2 pipeline is called with in tests (with a prompt): CFG, STG and modality
# guidance all on, so every transformer path runs. max_sequence_length must be a multiple of the
# connectors' 16 registers.
CALL: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "frame_rate": 24.0,
    "num_inference_steps": 2,
    "guidance_scale": 3.0,
    "stg_scale": 1.0,
    "modality_scale": 3.0,
    "spatio_temporal_guidance_blocks": [1],
    "max_sequence_length": 32,
}

# Gemma 3's special tokens (pad, eos, bos, unk, mask first, as there), then byte-fallback tokens.
SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
CHARS = "▁" + string.ascii_letters + string.digits + string.punctuation
WORDS = [
    "a",
    "robot",
    "dancing",
    "cat",
    "dog",
    "the",
    "of",
    "video",
    "walking",
    "in",
    "rain",
    "bad",
    "quality",
    "blurry",
]


def tokenizer() -> GemmaTokenizer:
    """A byte-fallback BPE GemmaTokenizer: specials, 256 bytes, characters and ``WORDS``."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIAL_TOKENS) + b for b in range(256)})
    for char in CHARS:
        vocab.setdefault(char, len(vocab))
    merges = []
    for word in ["▁" + w for w in WORDS] + WORDS:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((word[: end - 1], word[end - 1]))
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_pipeline(seed: int = 0) -> LTX2Pipeline:
    """The tiny LTX2Pipeline in memory: transformer in bf16 (as LTX-2 ships), rest fp32."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    if len(tok) > TEXT["vocab_size"]:
        raise RuntimeError(f"tiny Gemma tokenizer has {len(tok)} tokens > {TEXT['vocab_size']}")
    text_config = {
        **TEXT,
        "pad_token_id": ids("<pad>"),
        "eos_token_id": ids("<eos>"),
        "bos_token_id": ids("<bos>"),
    }
    config = Gemma3Config(
        text_config=text_config,
        vision_config=VISION,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = LTX2VideoTransformer3DModel(**TRANSFORMER)
        init_linears(transformer, seed)
        # nn.Module.to: diffusers' own .to warns about fp32 modules, of which this model has none.
        torch.nn.Module.to(transformer, torch.bfloat16)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLLTX2Video(**VAE)
        torch.manual_seed(seed + 2)
        audio_vae = AutoencoderKLLTX2Audio(**AUDIO_VAE)
        torch.manual_seed(seed + 3)
        vocoder = LTX2Vocoder(**VOCODER)
        torch.manual_seed(seed + 4)
        connectors = LTX2TextConnectors(**CONNECTORS)
        torch.manual_seed(seed + 5)
        text_encoder = Gemma3ForConditionalGeneration(config)
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae.eval(),
        audio_vae=audio_vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tok,
        connectors=connectors.eval(),
        transformer=transformer.eval(),
        vocoder=vocoder.eval(),
    )


def build(dst: Path, seed: int = 0) -> None:
    """Write the tiny LTX-2 pipeline to ``dst`` as a diffusers folder (safetensors)."""
    build_pipeline(seed).save_pretrained(dst, safe_serialization=True)
