"""qconvert: pre-quantized NVFP4 / MXFP8 diffusion-transformer checkpoints for diffusers."""

__version__ = "0.1.0"
