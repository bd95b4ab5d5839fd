"""The sampler: turns the transformer into a frame-by-frame generator over a static KV cache.

One frame, in numbered steps:
  1. denoise: start from noise at t = 1 and take `steps` Euler steps of the flow to t = 0, the new
     frame attending to the cached clean past (one pass per step);
  2. commit: write the finished frame into the cache with one clean pass at the context noise level
     used in training;
  3. decode: the autoencoder turns the latent into pixels (the engine does this, see engine.py).
"""
from __future__ import annotations

import torch

from worldmodel.diffusion import add_noise, timesteps
from worldmodel.model import KVCache, ModelConfig, WorldTransformer


class FrameSampler:
    def __init__(self, transformer: WorldTransformer, cfg: ModelConfig, steps: int, seed: int = 0,
                 batch_size: int = 1):
        self.model, self.cfg = transformer, cfg
        p = next(transformer.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(cfg, batch_size, device=self.device, dtype=self.dtype)
        self.batch_size = batch_size
        self.generator = torch.Generator(device=self.device)
        self.seed = seed
        self.steps = steps
        self.generator.manual_seed(seed)
        C, (h, w) = cfg.latent_channels, cfg.latent_size
        self.latent_shape = (batch_size, 1, C, h, w)

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, n: int) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"steps must be a positive integer, got {n!r}")
        self._steps = n
        self._t = timesteps(n, self.cfg.sample_shift, device=self.device)  # (steps + 1,)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.generator.manual_seed(seed)

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def commit(self, latents: torch.Tensor, actions: torch.Tensor) -> None:
        """Write clean frames (B, F, C, h, w) with their actions (B, F, A) into the cache, at the
        context noise level, in chunks the window can take."""
        B, n = latents.shape[:2]
        chunk = self.cfg.window_frames
        for i in range(0, n, chunk):
            x = latents[:, i:i + chunk].to(self.device, self.dtype)
            f = x.shape[1]
            t = torch.full((B, f), self.cfg.context_noise, device=self.device, dtype=self.dtype)
            x = add_noise(x, self._noise(x.shape), t)
            self.model.forward_cached(x, t, actions[:, i:i + chunk].to(self.device, self.dtype), self.cache, commit=f)

    @torch.inference_mode()
    def reset(self, latents: torch.Tensor, actions: torch.Tensor) -> None:
        """Seed the context with clean frames (B, N, C, h, w) and the actions that produced them
        (B, N, A): the first `sink_frames` become the sinks, the last `window_frames` the window."""
        self.cache.reset()
        self.generator.manual_seed(self.seed)
        n, S, W = latents.shape[1], self.cfg.sink_frames, self.cfg.window_frames
        keep = list(range(n)) if n <= S + W else list(range(S)) + list(range(n - W, n))
        self.commit(latents[:, keep], actions[:, keep])

    @torch.inference_mode()
    def denoise(self, actions: torch.Tensor) -> torch.Tensor:
        """Generate the next frame's latent (B, 1, C, h, w) for actions (B, 1, A); nothing is committed."""
        x = self._noise(self.latent_shape)
        a = actions.to(self.device, self.dtype)
        for i in range(self._steps):
            t = self._t[i].expand(self.batch_size, 1).to(self.dtype)
            v = self.model.forward_cached(x, t, a, self.cache, commit=0)
            x = x + (self._t[i + 1] - self._t[i]).to(self.dtype) * v
        return x

    @torch.inference_mode()
    def next(self, actions: torch.Tensor) -> torch.Tensor:
        """1. denoise, 2. commit; returns the new frame's clean latent (B, 1, C, h, w)."""
        x = self.denoise(actions)
        self.commit(x, actions)
        return x
