"""LPIPS (Zhang et al. 2018) in plain torch: AlexNet's or VGG16's feature stack with the
learned linear heads of the ``lpips`` package (v0.1).

Why not ``lpips`` or torchmetrics' ``LearnedPerceptualImagePatchSimilarity``: both build the
backbone from torchvision (``torchvision.models.alexnet(...).features``), and torchvision's
compiled operators do not load against a CPU-only torch from the package index (``operator
torchvision::nms does not exist``), so neither imports on a CPU machine. The network itself is
a dozen standard layers; this module builds them with the same indices as torchvision's
``features`` so that torchvision's own weight files load unchanged.

- Linear heads: the ``alex.pth`` / ``vgg.pth`` files that ship inside the torchmetrics wheel
  (identical to the lpips package's v0.1 weights), read with ``torch.load(weights_only=True)``.
- Backbone: torchvision's ImageNet weights from their official URL through
  ``torch.hub.load_state_dict_from_url(weights_only=True, check_hash=True)``, cached in
  ``$TORCH_HOME/hub/checkpoints`` (drop the file there to run offline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot run here; the message says why in one line."""


@dataclass(frozen=True)
class Backbone:
    url: str
    channels: tuple[int, ...]  # of the five tapped feature maps
    bounds: tuple[int, ...]  # ``features`` indices where each tapped slice ends
    layers: Callable[[], list[nn.Module]]


def _alexnet() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    ]


def _vgg16() -> list[nn.Module]:
    layers: list[nn.Module] = []
    channels = 3
    for width in (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
    ):
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(width), kernel_size=3, padding=1), nn.ReLU()]
            channels = int(width)
    return layers


BACKBONES = {
    "alex": Backbone(
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        (64, 192, 384, 256, 256),
        (2, 5, 8, 10, 12),
        _alexnet,
    ),
    "vgg": Backbone(
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        (64, 128, 256, 512, 512),
        (4, 9, 16, 23, 30),
        _vgg16,
    ),
}
# The lpips package's input scaling (ImageNet statistics in [-1, 1] units).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """Distance between images in [0, 1], one value per image pair (lower: more alike)."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        spec = BACKBONES[net]
        self.net = net
        self.features = nn.Sequential(*spec.layers())
        self.bounds = spec.bounds
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in spec.channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """torchvision's state dict (``features.N.*`` keys used, the classifier ignored)."""
        own = {
            k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
        }
        self.features.load_state_dict(own, strict=True)

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        """The lpips package's head weights (``lin{i}.model.1.weight`` keys)."""
        own = {f"{i}.weight": state[f"lin{i}.model.1.weight"] for i in range(len(self.heads))}
        self.heads.load_state_dict(own, strict=True)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in self.bounds:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = ((a * 2 - 1) - self.shift) / self.scale
        b = ((b * 2 - 1) - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for head, fa, fb in zip(self.heads, self._taps(a), self._taps(b), strict=True):
            na = fa / torch.sqrt(1e-8 + (fa**2).sum(dim=1, keepdim=True))
            nb = fb / torch.sqrt(1e-8 + (fb**2).sum(dim=1, keepdim=True))
            total = total + head((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total


def head_weights(net: str) -> dict[str, torch.Tensor]:
    """The learned heads from the installed torchmetrics package."""
    try:
        folder = resources.files("torchmetrics.functional.image").joinpath("lpips_models")
    except ModuleNotFoundError:
        raise LpipsUnavailable(
            "torchmetrics is not installed (it ships the LPIPS heads): pip install 'qconvert[eval]'"
        ) from None
    path = folder.joinpath(f"{net}.pth")
    if not path.is_file():
        raise LpipsUnavailable(f"torchmetrics has no LPIPS heads for {net!r} ({path})")
    with resources.as_file(path) as local:
        return torch.load(local, map_location="cpu", weights_only=True)


def backbone_weights(net: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, downloaded once into torch's hub cache."""
    url = BACKBONES[net].url
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        reason = getattr(e, "reason", None) or str(e).splitlines()[0]
        where = f"{torch.hub.get_dir()}/checkpoints/{url.rsplit('/', 1)[-1]}"
        raise LpipsUnavailable(
            f"cannot get the {net} backbone weights from {url} ({reason}); "
            f"put that file at {where} to use LPIPS offline"
        ) from None


def load(
    net: str = "alex",
    device: torch.device | str = "cpu",
    backbone: dict[str, torch.Tensor] | None = None,
) -> LPIPS:
    """LPIPS with torchmetrics' heads and torchvision's backbone (or ``backbone``, a state
    dict in torchvision's layout: tests pass random weights). Raises LpipsUnavailable."""
    if net not in BACKBONES:
        raise LpipsUnavailable(f"unknown LPIPS network {net!r}; choose {', '.join(BACKBONES)}")
    model = LPIPS(net)
    model.load_heads(head_weights(net))
    model.load_backbone(backbone if backbone is not None else backbone_weights(net))
    return model.to(device)
