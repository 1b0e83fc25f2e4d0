"""eps_theta(x_t, t, y): a small DDPM UNet (Ho et al. 2020, appendix B) for C x H x W images
(ModelConfig.image_shape: 1x28x28 for MNIST).

The timestep embedding is always computed in float32 (fp16 sinusoids lose accuracy at large t) and cast to the
weights' dtype afterwards, so a half-precision copy of the network (and its ONNX export) keeps it exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim), in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32, whatever the activations' dtype (fp16-safe)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus a projection of the time+class embedding, GroupNorm-SiLU-dropout-conv, residual.

    emb_silu: SiLU on the embedding before its projection (ModelConfig.block "diffusers": the block of Ho et al.'s
    code and of diffusers' ResnetBlock2D); without it the embedding is projected as it is (block "ddpm")."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float, emb_silu: bool = False):
        super().__init__()
        self.emb_silu = emb_silu
        self.norm1 = GroupNorm32(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = GroupNorm32(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb) if self.emb_silu else emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * (c ** -0.5), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """Noise predictor eps_theta(x_t, t, y) -> eps, with a class embedding (index num_classes = no label)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch, emb_dim, g, p = cfg.base_channels, cfg.time_dim, cfg.groups, cfg.dropout
        silu = cfg.block == "diffusers"   # SiLU on the embedding in every residual block
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, emb_dim, g, p, silu))
                cur = ch * mult
                skips.append(cur)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)

        self.mid1 = ResBlock(cur, cur, emb_dim, g, p, silu)
        self.mid_attn = SelfAttention(cur, g) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(cur, cur, emb_dim, g, p, silu)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, emb_dim, g, p, silu))
                cur = ch * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(cur, cur, 3, padding=1)))

        self.norm_out = GroupNorm32(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # 1. conditioning: float32 sinusoids -> weights' dtype, plus the class embedding
        temb = timestep_embedding(t, self.cfg.base_channels).to(self.conv_in.weight.dtype)
        emb = self.time_mlp(temb) + self.label_emb(y)
        # 2. down path, remembering every intermediate for the skips
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        # 3. middle, at the lowest resolution
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        # 4. up path, consuming the skips in reverse
        for m in self.up:
            h = m(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(m, ResBlock) else m(h)
        return self.conv_out(F.silu(self.norm_out(h)))
