"""Flow matching, shared by training and sampling (the scheduler half of a diffusers-style split).

A noise level t in [0, 1] per frame: x_t = (1 - t) * x_0 + t * noise, t = 1 is pure noise. The model
predicts the velocity v = noise - x_0; a sampler walks t from 1 to 0 with Euler steps
x_{t'} = x_t + (t' - t) * v.
"""
from __future__ import annotations

import torch


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0, noise: (B, F, C, h, w); t: (B, F) -> x_t."""
    t = t.to(x0.dtype)[..., None, None, None]
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predict_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean estimate implied by a velocity prediction: x_0 = x_t - t * v."""
    return x_t - t.to(x_t.dtype)[..., None, None, None] * v


def sample_noise_levels(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Independent per-frame noise levels (Diffusion Forcing), logit-normal: most mass at mid noise,
    which is where flow matching learns the most; the tails still reach both ends."""
    u = torch.randn(shape, generator=generator, device=device)
    return torch.sigmoid(u)


def timesteps(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 noise levels from 1 down to 0. shift > 1 spends more steps at high noise (SD3-style)."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1 + (shift - 1) * t)
