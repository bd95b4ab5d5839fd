"""The static KV cache of the world model's transformer (worldmodel/model/transformer.py), as gpt-fast
lays it out: each attention layer owns its keys and values (`KVCache`), the model owns the frame
bookkeeping the layers share (`FrameSlots`); `WorldTransformer.setup_cache` makes both, once."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from worldmodel.model.rope import apply_rope

if TYPE_CHECKING:
    from worldmodel.model.transformer import ModelConfig


class FrameSlots(nn.Module):
    """The KV cache's bookkeeping, shared by all layers: `sink_frames + window_frames` frame slots of
    `tokens_per_frame` tokens. Frame n goes to slot n while n < sinks, then to the window slots in
    ring order. Each slot has a logical time position (sinks first, then the window oldest to newest,
    then the new frames), so the model only ever sees positions 0..clip_frames-1 that it was trained
    on, however long the rollout.

    Shapes and addresses never change; all bookkeeping is tensors (no host sync), so a rollout runs for
    hours at constant memory and speed and the per-frame work can be captured in a CUDA graph."""

    def __init__(self, cfg: ModelConfig, batch_size: int = 1, device=None, dtype=torch.float32):
        super().__init__()
        self.sinks, self.window, self.T = cfg.sink_frames, cfg.window_frames, cfg.tokens_per_frame
        self.batch_size = batch_size
        n_slots = cfg.cache_frames
        self.register_buffer("slot_frame", torch.full((n_slots,), -1, dtype=torch.long, device=device),
                             persistent=False)  # frame number held by each slot, -1 = empty
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        # with `prev_frame`: the input latent of the last committed frame, the next frame's previous
        # frame (B, C, h, w); None without
        self.register_buffer("last", torch.zeros((batch_size, cfg.latent_channels, *cfg.latent_size), device=device,
                                                 dtype=dtype) if cfg.prev_frame else None, persistent=False)
        # with `prev_skip`: the noise level that frame was committed at (B,); None without
        self.register_buffer("last_t", torch.ones((batch_size,), device=device, dtype=dtype) if cfg.prev_skip else None,
                             persistent=False)

    @property
    def n_slots(self) -> int:
        return self.sinks + self.window

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()
        self.slot_frame.fill_(-1)
        if self.last_t is not None:
            self.last_t.fill_(1.0)  # no frame yet: the zero previous frame counts as pure noise

    # -- bookkeeping: pure functions of (slot_frame, count), nothing is written --------------------
    def slots_for(self, n_frames: int) -> torch.Tensor:
        """Slots that frames count .. count+n_frames-1 are committed to. (n_frames,)"""
        frame = self.count + torch.arange(n_frames, device=self.count.device)
        ring = self.sinks + (frame - self.sinks).remainder(self.window)
        return torch.where(frame < self.sinks, frame, ring)

    def token_index(self, slots: torch.Tensor) -> torch.Tensor:
        """The cache rows (tokens) of `slots` (F,): (F*T,)."""
        return (slots[:, None] * self.T + torch.arange(self.T, device=slots.device)).flatten()

    def after_commit(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_frame, count) once frames count.. are committed to `slots`."""
        n = slots.shape[0]
        return (self.slot_frame.index_copy(0, slots, self.count + torch.arange(n, device=slots.device)),
                self.count + n)

    def key_positions(self, slot_frame: torch.Tensor | None = None, count: torch.Tensor | None = None):
        """Logical time position of each slot (n_slots,) and which slots hold a frame (n_slots,), for
        the cache as it is or as (slot_frame, count) describe it."""
        f = self.slot_frame if slot_frame is None else slot_frame
        count = self.count if count is None else count
        first_window = torch.clamp(count - self.window, min=self.sinks)
        pos = torch.where(f < self.sinks, f, self.sinks + f - first_window)
        valid = f >= 0
        return torch.where(valid, pos, torch.zeros_like(pos)), valid

    def query_positions(self, n_frames: int, count: torch.Tensor | None = None) -> torch.Tensor:
        """Logical time positions of n_frames new frames after the cached ones. (n_frames,)"""
        count = self.count if count is None else count
        return torch.clamp(count, max=self.n_slots) + torch.arange(n_frames, device=count.device)

    def advance(self, slot_frame: torch.Tensor, count: torch.Tensor) -> None:
        self.slot_frame.copy_(slot_frame)
        self.count.copy_(count)


class KVCache(nn.Module):
    """One attention layer's preallocated keys and values (B, H, S*T, D), S = sink + window frame slots
    (FrameSlots says which frame each holds). `k` holds keys without their temporal rotation; `k_rot`
    the same keys rotated to the slots' current positions, refreshed when frames are committed (once a
    frame, not once a pass)."""

    def __init__(self, cfg: ModelConfig, batch_size: int = 1, device=None, dtype=torch.float32):
        super().__init__()
        shape = (batch_size, cfg.heads, cfg.cache_frames * cfg.tokens_per_frame, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("k_rot", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def write(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> None:
        """k (unrotated), v: (B, H, F*T, D) of F new frames, into their rows `index` (F*T,); then the
        rotated keys are refreshed for the positions after the commit (cos, sin: (S*T, D))."""
        self.k.index_copy_(2, index, k.to(self.k.dtype))
        self.v.index_copy_(2, index, v.to(self.v.dtype))
        self.k_rot.copy_(apply_rope(self.k, cos, sin))
