"""The `sfh` network: a 1-D convolutional + self-attention spectrum branch, a dense photometry branch, a shared
latent space and two heads (SFH in 16 age bins, summing to 1; metallicity in the same 16 bins), plus the
log-uncertainties of the four derived mean quantities. Registered as architecture ``sfh_conv1d``.

Inputs: ``spectrum`` (N, 2, P) = normalised rest-frame flux and S/N / 100 (0 where masked), ``photometry``
(N, 12) = 5 log10(band f_lambda / spectrum norm), 5 band masks, log10 S/N / 2, 20 z
(``survey_infer.tasks.sfh.spectrum_inputs``). Outputs: ``sfh`` (N, 16) mass fractions (softmax),
``metallicity`` (N, 16) log10 Z/Zsun, ``log_sigma`` (N, 4) and, when asked, ``features`` (the shared latent).

The attention is written out (linear q, k, v, softmax(q k^T / sqrt(d)) v) rather than taken from
``nn.MultiheadAttention``, whose fused inference path does not export to ONNX.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from survey_infer.models import register


class _SelfAttention(nn.Module):
    """One pre-norm transformer block over the conv tokens: multi-head self-attention + feed-forward."""

    def __init__(self, dim: int, heads: int, positions: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.position = nn.Parameter(torch.zeros(1, positions, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D)
        n, t, d = x.shape
        x = x + self.position
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.ff(self.norm2(x))


@register("sfh_conv1d")
class SfhNet(nn.Module):
    emit_features = False

    def __init__(self, pixels: int = 1024, n_phot: int = 12, width: int = 16, dim: int = 64, heads: int = 4,
                 latent: int = 128, n_bins: int = 16, age_centres: list[float] | None = None):  # fmt: skip
        super().__init__()
        w = width
        self.conv = nn.Sequential(
            nn.Conv1d(2, w, 7, stride=2, padding=3), nn.BatchNorm1d(w), nn.GELU(),
            nn.Conv1d(w, 2 * w, 5, stride=2, padding=2), nn.BatchNorm1d(2 * w), nn.GELU(),
            nn.Conv1d(2 * w, 4 * w, 5, stride=2, padding=2), nn.BatchNorm1d(4 * w), nn.GELU(),
            nn.Conv1d(4 * w, dim, 3, stride=2, padding=1), nn.BatchNorm1d(dim), nn.GELU(),
        )  # fmt: skip
        tokens = pixels // 16
        self.attention = _SelfAttention(dim, heads, tokens)
        self.pool_query = nn.Parameter(torch.zeros(1, 1, dim))
        self.phot = nn.Sequential(nn.Linear(n_phot, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.latent = nn.Sequential(nn.Linear(2 * dim + 64, latent), nn.GELU(), nn.Linear(latent, latent), nn.GELU())
        self.sfh_head = nn.Linear(latent, n_bins)
        self.z_head = nn.Linear(latent, n_bins)
        self.sigma_head = nn.Linear(latent, 4)
        self.n_bins = n_bins

    def forward(self, spectrum: torch.Tensor, photometry: torch.Tensor):
        tokens = self.attention(self.conv(spectrum).transpose(1, 2))  # (N, T, D)
        weights = torch.softmax((tokens * self.pool_query).sum(-1), dim=1).unsqueeze(-1)
        pooled = torch.cat([(tokens * weights).sum(1), tokens.mean(1)], dim=1)
        latent = self.latent(torch.cat([pooled, self.phot(photometry)], dim=1))
        sfh = torch.softmax(self.sfh_head(latent), dim=1)
        metallicity = self.z_head(latent)
        log_sigma = self.sigma_head(latent).clamp(-6.0, 2.0)
        return (sfh, metallicity, log_sigma, latent) if self.emit_features else (sfh, metallicity, log_sigma)
