"""Network architectures, looked up by the name a bundle records (no pickled modules, ever)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        ARCHITECTURES[name] = cls
        return cls

    return wrap


def build_model(name: str, **kwargs) -> nn.Module:
    """Instantiate the architecture a bundle names with the kwargs it records."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](**kwargs)


@register("ml_cnn")
class MassToLightCNN(nn.Module):
    """The workshop's base CNN for single-band M/L, with a heteroscedastic head.

    Conv 32@5x5 -> maxpool -> 64@4x4 -> maxpool -> 128@3x3 -> maxpool -> 128@3x3 -> global max pool ->
    [concat n_meta scalars] -> Dense 512 -> (M/L, log variance). Valid padding and ReLU as in the workshop;
    the M/L head uses softplus rather than ReLU so that gradients never die at zero, and the second output
    (Gaussian negative log-likelihood) gives every row its own uncertainty.
    """

    def __init__(self, in_channels: int = 1, n_meta: int = 0, width: int = 32, hidden: int = 512):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.n_meta = n_meta
        self.head = nn.Sequential(nn.Linear(4 * w + n_meta, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(image)
        if self.n_meta:
            features = torch.cat([features, meta], dim=1)
        out = self.head(features)
        ml = nn.functional.softplus(out[:, 0])
        log_var = out[:, 1].clamp(-12.0, 6.0)
        return ml, log_var
