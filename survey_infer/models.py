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

    With ``emit_features`` set (bundles whose ``engine_io.outputs`` name ``features``), a third output is the
    penultimate layer: the ``hidden`` ReLU activations that the last Linear reads (the trust score's input).
    """

    emit_features = False


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
        hidden = self.head[:-1](features)
        out = self.head[-1](hidden)
        ml = nn.functional.softplus(out[:, 0])
        log_var = out[:, 1].clamp(-12.0, 6.0)
        return (ml, log_var, hidden) if self.emit_features else (ml, log_var)



class _ResidualBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU-3x3 conv-BN plus the (1x1-projected where needed) input, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(self.body(x) + self.skip(x))


@register("cluster_resnet")
class ClusterResNet(nn.Module):
    """A small ResNet for semi-resolved star clusters (after Bialopetravicius et al. 2019), Gaussian heads.

    3x3 stem (full resolution, so single stars stay sharp) -> four stages of ``blocks`` basic blocks, each
    stage halving the grid (64 -> 4 px) and widening (``widths``) -> global average pool -> FC ``hidden`` ->
    per target a mean and a log variance. The paper's follow-up used ResNet-50 with binned softmax heads; this
    one regresses (Gaussian negative log-likelihood) so every row gets a mean and a 1-sigma per target, far
    cheaper to train on a CPU. Targets are standardised inside the network (``target_mean``, ``target_std``
    recorded as kwargs), so its outputs are physical: log10 age [yr], log10 mass [Msun], log10 r_h [pc].
    With ``emit_features`` set, a third output is the penultimate layer (the ``hidden`` ReLU activations).
    """

    emit_features = False


    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 1,
                 hidden: int = 256, n_targets: int = 3, target_mean: tuple[float, ...] = (0.0, 0.0, 0.0),
                 target_std: tuple[float, ...] = (1.0, 1.0, 1.0)):  # fmt: skip
        super().__init__()
        if len(target_mean) != n_targets or len(target_std) != n_targets:
            raise ValueError(f"target_mean and target_std need {n_targets} values each")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        c = widths[0]
        for w in widths:
            for k in range(blocks):
                layers.append(_ResidualBlock(c, w, stride=2 if k == 0 else 1))
                c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, 2 * n_targets))
        self.n_targets = n_targets
        self.register_buffer("target_mean", torch.tensor(target_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("target_std", torch.tensor(target_std, dtype=torch.float32), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.head[:-1](self.features(image))
        out = self.head[-1](hidden)
        mean = self.target_mean + self.target_std * out[:, : self.n_targets]
        log_var = out[:, self.n_targets :].clamp(-14.0, 6.0) + 2 * torch.log(self.target_std)
        return (mean, log_var, hidden) if self.emit_features else (mean, log_var)
