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


def _histogram_branch(width: int, bins: int) -> nn.Sequential:
    """Conv 3x3 (w) -> pool -> conv (2w) -> pool -> conv (4w) -> pool -> flatten: (1, B, B) -> 4w (B/8)^2."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )  # fmt: skip


@register("mass_profile_cnn")
class MassProfileNet(nn.Module):
    """Two-branch CNN on a galaxy's spatial and dynamical 2-D histograms + a conditional flow (mass_profiles).

    Each branch: three conv-ReLU-maxpool stages on its (1, B, B) histogram. The two flattened branches and the
    scalars (except the first, log10 of the mass scale M_s) are merged by Linear(hidden)-ReLU-Linear(32)-SiLU
    into the 32-number penultimate layer (``features``), then Linear(32, 10) gives the standardised log masses
    log10 M(< f R_h) - log10 M_s; the network adds back M_s, so ``forward`` returns physical log masses
    (``log_mass``, (N, 10)) and the ``features`` (N, 32): that is the part the engines run.

    ``flow`` (zuko MAF, ``flow_transforms`` affine MADE transforms, conditioned on the 32 features) models the
    residual (log M - log_mass) / ``residual_std``; :meth:`sample_posterior` draws the joint posterior. It runs
    in torch (see ``survey_infer.tasks.mass_profiles``).
    """

    emit_features = True  # always: the flow is conditioned on them

    def __init__(self, bins: int = 32, width: int = 16, hidden: int = 128, n_features: int = 32,
                 n_scalars: int = 5, n_radii: int = 10, target_mean: tuple[float, ...] | None = None,
                 target_std: tuple[float, ...] | None = None, residual_std: tuple[float, ...] | None = None,
                 flow_transforms: int = 4, flow_hidden: tuple[int, ...] = (64, 64)):  # fmt: skip
        super().__init__()
        import zuko

        self.spatial = _histogram_branch(width, bins)
        self.dynamical = _histogram_branch(width, bins)
        flat = 4 * width * (bins // 8) ** 2
        self.merge = nn.Sequential(nn.Linear(2 * flat + n_scalars - 1, hidden), nn.ReLU(),
                                   nn.Linear(hidden, n_features), nn.SiLU())  # fmt: skip
        self.head = nn.Linear(n_features, n_radii)
        for name, values in (("target_mean", target_mean or [0.0] * n_radii), ("target_std", target_std or [1.0] * n_radii),
                             ("residual_std", residual_std or [1.0] * n_radii)):  # fmt: skip
            if len(values) != n_radii:
                raise ValueError(f"{name} needs {n_radii} values, got {len(values)}")
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)
        self.flow = zuko.flows.MAF(features=n_radii, context=n_features, transforms=flow_transforms,
                                   hidden_features=tuple(flow_hidden))  # fmt: skip

    def forward(self, spatial: torch.Tensor, dynamical: torch.Tensor, scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        merged = torch.cat([self.spatial(spatial), self.dynamical(dynamical), scalars[:, 1:]], dim=1)
        features = self.merge(merged)
        log_mass = scalars[:, :1] + self.target_mean + self.target_std * self.head(features)
        return log_mass, features

    def residual_log_prob(self, features: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """log p(residual / residual_std | features) of standardised residuals (training objective)."""
        return self.flow(features).log_prob(residual / self.residual_std)

    def sample_posterior(self, features: torch.Tensor, log_mass: torch.Tensor, n_samples: int) -> torch.Tensor:
        """(N, n_samples, 10) samples of log10 M(< f R_h) given the CNN's features and point estimate."""
        z = self.flow(features).sample((n_samples,))  # (S, N, 10)
        return (log_mass.unsqueeze(0) + self.residual_std * z).transpose(0, 1)


def _norm_groups(channels: int) -> int:
    return 8 if channels % 8 == 0 and channels >= 16 else 1


class _UNetBlock(nn.Sequential):
    """PICASSSO's block: GroupNorm -> Conv 3x3 -> ReLU -> GroupNorm -> Conv 3x3 -> ReLU (``norm_input=False``:
    no GroupNorm on the block's input)."""

    def __init__(self, c_in: int, c_out: int, norm_input: bool = True):
        super().__init__(
            nn.GroupNorm(_norm_groups(c_in), c_in) if norm_input else nn.Identity(),
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(),
            nn.GroupNorm(_norm_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(),
        )  # fmt: skip


class _UpStep(nn.Module):
    """Bilinear x2 upsampling + 1x1 conv halving the channels (the paper's up step), concat skip, block."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.reduce = nn.Conv2d(c_in, c_out, 1)
        self.block = _UNetBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.reduce(nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        return self.block(torch.cat([x, skip], dim=1))


@register("property_unet")
class PropertyUNet(nn.Module):
    """The U-Net of PICASSSO (Buck & Wolf 2021) for resolved property maps, narrower than the paper's.

    ``depth`` max-pool steps down and bilinear steps up with skip connections; features ``width`` doubling
    per level (the paper: 64 -> 1024; here 16 -> 256 by default, so that a 64 px version trains on a CPU).
    A 1x1 head gives per map and pixel a mean (in physical log10 units: the standardisation of the targets,
    ``target_mean``/``target_std``, is part of the model), a log variance (Gaussian uncertainty head) and a
    logit that the pixel is empty. With ``emit_features`` a fourth output is the bottleneck averaged over the
    image (the trust score's input).

    Two departures from the paper, both because GroupNorm normalises each image by its own statistics and so
    removes the absolute surface brightness that sets every surface density: the first block does not
    normalise the raw input, and (``input_skip``) the 1x1 head also reads the input itself, so that a per-pixel
    relation such as colour-M/L (log Sigma* linear in log surface brightness and colour) is representable as is
    and the U-Net learns the corrections (PSF, noise, context).
    """

    emit_features = False

    def __init__(self, in_channels: int = 5, n_maps: int = 6, width: int = 16, depth: int = 4,
                 target_mean: list[float] | None = None, target_std: list[float] | None = None,
                 input_skip: bool = True):  # fmt: skip
        super().__init__()
        widths = [width * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList()
        c = in_channels
        for level, w in enumerate(widths[:-1]):
            self.down.append(_UNetBlock(c, w, norm_input=level > 0))
            c = w
        self.bottleneck = _UNetBlock(widths[-2], widths[-1])
        self.up = nn.ModuleList(_UpStep(widths[k + 1], widths[k]) for k in reversed(range(depth)))
        self.input_skip = input_skip
        self.head = nn.Conv2d(widths[0] + (in_channels if input_skip else 0), 3 * n_maps, 1)
        self.n_maps = n_maps
        for name, values, default in (("target_mean", target_mean, 0.0), ("target_std", target_std, 1.0)):
            values = list(values) if values is not None else [default] * n_maps
            if len(values) != n_maps:
                raise ValueError(f"{name} needs {n_maps} values, got {len(values)}")
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, n_maps, 1, 1),
                                 persistent=False)  # fmt: skip

    def forward_standardised(self, image: torch.Tensor):
        skips = []
        x = image
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottleneck(x)
        pooled = x.mean(dim=(-2, -1))
        for step, skip in zip(self.up, reversed(skips)):
            x = step(x, skip)
        out = self.head(torch.cat([x, image], dim=1) if self.input_skip else x)
        k = self.n_maps
        return out[:, :k], out[:, k : 2 * k].clamp(-10.0, 6.0), out[:, 2 * k :], pooled

    def forward(self, image: torch.Tensor):
        mean_std, log_var_std, empty_logit, pooled = self.forward_standardised(image)
        mean = self.target_mean + self.target_std * mean_std
        log_var = log_var_std + 2.0 * torch.log(self.target_std)  # of the physical log10 values
        return (mean, log_var, empty_logit, pooled) if self.emit_features else (mean, log_var, empty_logit)


from survey_infer import sfh_net as _sfh_net  # noqa: E402,F401  (registers the sfh architecture "sfh_conv1d")
