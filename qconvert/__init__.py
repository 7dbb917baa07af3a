"""qconvert: pre-quantized NVFP4 / MXFP8 / FP8 diffusion-transformer checkpoints for diffusers."""

from qconvert import quiet

__version__ = "0.1.0"

quiet.apply()  # before torchao, torch and diffusers are imported: see qconvert/quiet.py
