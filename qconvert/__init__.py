"""qconvert: pre-quantized NVFP4 / MXFP8 diffusion-transformer checkpoints that plain diffusers loads."""

__version__ = "0.1.0"
