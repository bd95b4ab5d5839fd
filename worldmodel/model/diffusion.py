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


def shift_noise_levels(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t -> shift * t / (1 + (shift - 1) * t): shift > 1 moves levels towards pure noise (SD3), the
    same map `timesteps` uses for sampling."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def sample_training_noise_levels(batch: int, frames: int, generator: torch.Generator | None = None, device=None,
                                 context_prob: float = 0.5, context_max: float = 0.3,
                                 shift: float = 1.0) -> torch.Tensor:
    """Noise levels (batch, frames) for one training batch of clips.

    Every clip starts from Diffusion Forcing: an independent level per frame (`sample_noise_levels`).
    With probability `context_prob` a clip is laid out as at inference instead: a prefix of random
    length k in 1..frames-1 is *context*, each of its frames noised to its own low level drawn
    uniformly from [0, context_max] (GameNGen's noise augmentation; the model is told the level, and the
    sampler commits frames at `ModelConfig.context_noise`, inside that range), and the frames after it
    keep their independent levels. Without this the model would almost never see a nearly-clean past
    followed by a noisy frame, which is all it does when it plays. `shift` > 1 moves the independent
    levels towards pure noise, where the model has to rely on the context the most."""
    t = shift_noise_levels(sample_noise_levels((batch, frames), generator=generator, device=device), shift)
    if frames < 2 or context_prob <= 0:
        return t
    use = torch.rand(batch, generator=generator, device=device) < context_prob  # (B,)
    k = torch.randint(1, frames, (batch,), generator=generator, device=device)  # (B,) prefix length
    ctx = torch.rand((batch, frames), generator=generator, device=device) * context_max
    prefix = torch.arange(frames, device=device)[None] < k[:, None]  # (B, F)
    return torch.where(use[:, None] & prefix, ctx, t)


def flow_matching_loss(model, x0: torch.Tensor, actions: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the predicted velocity. x0, noise: (B, F, C, h, w) clean latents and
    their noise; actions: (B, F, A); t: (B, F) per-frame noise levels; weight: (B, F) per-frame loss
    weights (default: all 1), the mean taken over the weighted frames."""
    x_t = add_noise(x0, noise, t)
    v = model(x_t, t, actions)
    err = (v.float() - velocity_target(x0, noise).float()).pow(2)
    if weight is None:
        return err.mean()
    w = weight.float()[..., None, None, None].expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1e-8)
