"""What the tiny pipeline builders share."""

from __future__ import annotations

import torch


def init_linears(model: torch.nn.Module, seed: int) -> None:
    """Every Linear's weight and bias drawn from N(0, 0.02²), in module order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.02, generator=gen)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.02, generator=gen)
