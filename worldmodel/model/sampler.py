"""The sampler: turns the transformer into a frame-by-frame generator over a static KV cache.

One frame, in numbered steps:
  1. denoise: start from noise at t = 1 and take `steps` Euler steps of the flow to t = 0, the new
     frame attending to the cached clean past (one pass per step). `generate` does this for N frames
     at once (speculative drafts, block-causal among themselves, all assuming given actions);
  2. commit: the finished frame is written into the cache by one clean pass at the context noise
     level used in training. With `fused=True` (the default) that pass is the first denoising pass
     of the next frame: the finished frame waits in `pending` and the next pass commits it
     (`forward_cached(commit=1)`), which gives the same result as a separate commit pass (the new
     frames attend the cache *after* the commit) for the cost of one pass with one more frame;
  3. decode: the autoencoder turns the latent into pixels (the engine does this, see engine.py).

Noise is counter-based: the noise of frame n (and of its commit) is drawn from a generator seeded
with (seed, n), so a frame's noise does not depend on how many frames were drafted or discarded
before it. That makes speculation with N = 1 identical to plain sampling, a rejected draft leave no
trace, and the same seed give the same frames whatever was drafted.

`SamplingDefaults` is what a checkpoint says about how it is best sampled (config.json's "sampling",
worldmodel/model/checkpoint.py): the steps an engine takes when its settings name none, the shift
of the noise schedule, and the noise level frames are committed at. They are not architecture: a
distilled student has its teacher's architecture and its own step count.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch

from worldmodel.model.diffusion import add_noise, timesteps
from worldmodel.model.transformer import LEGACY_SAMPLING_FIELDS, ModelConfig, WorldTransformer

_DENOISE, _COMMIT = 0, 1  # noise streams of a frame


def check_context_noise(t) -> float:
    """A context noise level: a number in [0, 1) (1 would be pure noise: no context), as a float."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 <= t < 1:
        raise ValueError(f"context noise must be a number in [0, 1), got {t!r}")
    return float(t)


@dataclass(frozen=True)
class SamplingDefaults:
    """How a checkpoint is best sampled: `steps` Euler steps (the engine's when EngineSettings.steps is
    None; a distilled student's is its own step count) over the schedule `diffusion.timesteps(steps,
    shift)`; `context_noise`, the noise level frames enter the context at (the engine's when
    EngineSettings.context_noise is None; None: the level the model was trained to read its context at,
    ModelConfig.context_noise). Training teaches the model levels from 0 to 0.3 and tells it which
    (diffusion.sample_training_noise_levels), so a model may read its own imperfect frames best at a
    level other than its training one: measured, and written here. ValueError (one line) for a value
    out of range."""
    steps: int = 4
    shift: float = 1.0
    context_noise: float | None = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampling steps must be an integer >= 1, got {self.steps!r}")
        if (isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not math.isfinite(self.shift)
                or self.shift <= 0):
            raise ValueError(f"sampling shift must be a positive number, got {self.shift!r}")
        object.__setattr__(self, "shift", float(self.shift))
        if self.context_noise is not None:
            object.__setattr__(self, "context_noise", check_context_noise(self.context_noise))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingDefaults":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling field(s): {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_model_keys(cls, d: dict) -> "SamplingDefaults":
        """From the `sample_steps` / `sample_shift` keys of a model config dict, as configs written before
        the sampling defaults left the model config hold them and as `train --set` names them (other
        keys ignored; absent ones: the defaults)."""
        return cls(**{name.removeprefix("sample_"): d[name] for name in LEGACY_SAMPLING_FIELDS if name in d})


class FrameSampler:
    """`generate(actions (B, N, A)) -> latents (B, N, C, h, w)`: the next N frames, each assuming its
    action, nothing committed; `accept(latents, actions)`: those frames happened (they are committed
    by the next pass); `next(actions (B, 1, A))`: both for one frame. `reset(latents, actions)` seeds
    the context. `flush()` commits what is pending now (not needed for sampling). `shift` is the noise
    schedule's (the model's SamplingDefaults.shift); `context_noise` the level frames are committed at
    (the model's training level, cfg.context_noise, unless set; it may change between frames).

    The KV cache is the transformer's (`setup_cache`, done here for `batch_size`): one sampler at a time
    runs a transformer. `forward` runs a pass (`transformer.forward_cached`, or its compiled form
    after `compile(options)`); `steps` is checked by the engine's settings (worldmodel/inference/settings.py)."""

    def __init__(self, transformer: WorldTransformer, cfg: ModelConfig, steps: int, *, shift: float, seed: int = 0,
                 batch_size: int = 1, fused: bool = True):
        self.model, self.cfg = transformer, cfg
        self.context_noise = cfg.context_noise  # the level frames are committed at (the engine sets its own)
        p = next(transformer.parameters())
        self.device, self.dtype = p.device, p.dtype
        transformer.setup_cache(batch_size)
        self.batch_size = batch_size
        self.generator = torch.Generator(device=self.device)
        self.seed = int(seed)
        self.fused = fused
        self.shift = shift
        self.steps = steps
        C, (h, w) = cfg.latent_channels, cfg.latent_size
        self.frame_shape = (batch_size, 1, C, h, w)
        self.max_commit = min(cfg.window_frames, cfg.max_draft)  # frames one pass may commit
        self.forward = transformer.forward_cached  # what runs a pass (see `compile`)
        self.frame_index = 0  # number of the next frame (context frames count), for the noise
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # finished, not yet committed

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, n: int) -> None:
        self._steps = n = int(n)
        t = timesteps(n, self.shift)  # (steps + 1,) on the host: python floats, no syncs later
        self._t = [float(x) for x in t]

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)

    def compile(self, options: dict | None) -> None:
        """Run the passes through `torch.compile(transformer.forward_cached, dynamic=False, **options)`
        (the transformer with its cache: one module, static buffers; each (frames, commit) shape compiles
        once, on first use), or eagerly again (options None)."""
        fn = self.model.forward_cached
        self.forward = fn if options is None else torch.compile(fn, dynamic=False, **options)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _noise(self, frame: int, stream: int) -> torch.Tensor:
        """(B, 1, C, h, w) standard normal noise of frame number `frame` (counter-based)."""
        self.generator.manual_seed((self.seed * 0x9E3779B1 + frame * 2 + stream) % (2 ** 63))
        return torch.randn(self.frame_shape, generator=self.generator, device=self.device, dtype=self.dtype)

    def _full(self, value: float, n: int) -> torch.Tensor:
        return torch.full((self.batch_size, n), value, device=self.device, dtype=self.dtype)

    # -- 2. commit ----------------------------------------------------------------------------------
    def _take_pending(self, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Up to `limit` pending frames, oldest first, noised to the context level: (x, actions)."""
        take, self._pending = self._pending[:limit], self._pending[limit:]
        if not take:
            return None
        first = self.frame_index - len(take) - len(self._pending)
        x = torch.cat([add_noise(lat, self._noise(first + i, _COMMIT), self._full(self.context_noise, 1))
                       for i, (lat, _) in enumerate(take)], dim=1)
        return x, torch.cat([a for _, a in take], dim=1)

    @torch.inference_mode()
    def flush(self, keep: int = 0) -> None:
        """Commit pending frames with plain commit passes until at most `keep` are left."""
        while len(self._pending) > keep:
            x, a = self._take_pending(min(self.max_commit, len(self._pending) - keep))
            self.forward(x, self._full(self.context_noise, x.shape[1]), a, commit=x.shape[1])

    @torch.inference_mode()
    def accept(self, latents: torch.Tensor, actions: torch.Tensor) -> None:
        """Frames (B, F, C, h, w) that happened, with the actions that produced them (B, F, A), in
        order after what is already there. They are committed by the next pass (or now, unfused)."""
        for i in range(latents.shape[1]):
            self._pending.append((latents[:, i:i + 1].to(self.device, self.dtype),
                                  actions[:, i:i + 1].to(self.device, self.dtype)))
            self.frame_index += 1
        if not self.fused:
            self.flush()

    @torch.inference_mode()
    def commit(self, latents: torch.Tensor, actions: torch.Tensor) -> None:
        """Write clean frames (B, F, C, h, w) with their actions (B, F, A) into the cache now."""
        self.accept(latents, actions)
        self.flush()

    @torch.inference_mode()
    def reset(self, latents: torch.Tensor, actions: torch.Tensor) -> None:
        """Seed the context with clean frames (B, N, C, h, w) and the actions that produced them
        (B, N, A): the first `sink_frames` become the sinks, the last `window_frames` the window."""
        self.model.reset_cache()
        self._pending = []
        self.frame_index = 0
        keep = self.context_frames(latents.shape[1])
        self.commit(latents[:, keep], actions[:, keep])

    def context_frames(self, n: int) -> list[int]:
        """Which of n context frames `reset` keeps: the first `sink_frames` and the last `window_frames`."""
        S, W = self.cfg.sink_frames, self.cfg.window_frames
        return list(range(n)) if n <= S + W else list(range(S)) + list(range(n - W, n))

    # -- 1. denoise ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, actions: torch.Tensor) -> torch.Tensor:
        """The next N frames' latents (B, N, C, h, w) for actions (B, N, A) (N <= max_draft), denoised
        together in `steps` passes, block-causal among themselves; the first pass also commits what is
        pending. Nothing new is committed: pass the frames that happened to `accept`."""
        N = actions.shape[1]
        if not 1 <= N <= self.cfg.max_draft:
            raise ValueError(f"generate: 1..{self.cfg.max_draft} frames at once, got {N}")
        self.flush(keep=self.max_commit)
        a = actions.to(self.device, self.dtype)
        x = torch.cat([self._noise(self.frame_index + i, _DENOISE) for i in range(N)], dim=1)
        ts = self._t
        for i in range(self._steps):
            pending = self._take_pending(self.max_commit) if i == 0 else None
            if pending is None:
                v = self.forward(x, self._full(ts[i], N), a, commit=0)
            else:
                xp, ap = pending
                P = xp.shape[1]
                t = torch.cat((self._full(self.context_noise, P), self._full(ts[i], N)), dim=1)
                v = self.forward(torch.cat((xp, x), dim=1), t, torch.cat((ap, a), dim=1), commit=P)[:, P:]
            x = x + (ts[i + 1] - ts[i]) * v
        return x

    @torch.inference_mode()
    def next(self, actions: torch.Tensor) -> torch.Tensor:
        """1. denoise, 2. commit (now or, fused, with the next pass); returns the new frame's clean
        latent (B, 1, C, h, w)."""
        x = self.generate(actions)
        self.accept(x, actions)
        return x
