"""Shared test helpers: a tiny randomised model saved as a checkpoint."""

import dataclasses

import torch

from ddpm.model import PRESETS, UNet
from ddpm.model.io import load_model, save_model

TINY = dataclasses.replace(PRESETS["tiny"], timesteps=100)


def randomised_unet(cfg=TINY, seed=0, scale=0.05) -> UNet:
    """A UNet whose zero-initialised output layers are perturbed, so that t and y visibly matter."""
    torch.manual_seed(seed)
    m = UNet(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale)
    return m


def tiny_checkpoint(folder, seed=0, cfg=TINY):
    m = randomised_unet(cfg, seed)
    save_model(folder / "model.safetensors", cfg, m.state_dict(), step=1)
    return load_model(folder)
