"""The world model's diffusion transformer, top to bottom: config and presets, the model, its blocks.
Beside it: rotary positions over (time, row, column) (rope.py), the static KV cache (kv_cache.py) and
the linear layers at inference speed (linear.py).

Frames enter as latent grids from the autoencoder (worldmodel/model/autoencoder.py), are cut into tokens,
and every frame carries its own noise level and its own action (the action that produced it), which
modulate every block through adaLN-Zero. Attention is block-causal: bidirectional inside a frame,
causal across frames (Next-Frame Diffusion). It runs through `kernels/`, whose backend is resolved to
its functions once, when `attention` is set (`kernels.resolve_backend`), not on every call.

With `prev_frame` on (the level models), every frame's tokens also carry the previous frame's latent
at the same grid position (channel concatenation, as DIAMOND and GameNGen feed past frames), so that
copying what was there is one linear map away and the model learns the change. The previous frame is
the previous position's input as the model sees it: in a training clip the frame before (at its own
noise level; zeros for the first), at inference the last frame committed to the cache (kept in the
cache beside its keys and values) or, for a speculative draft, the draft before it. With `prev_skip` also
on, copying costs nothing: the output is the velocity x_t - prev0 plus the network's, where prev0 =
c(t') prev is the previous frame's clean estimate from its own noise level t' (`clean_estimate`), so at
pure noise (t = 1) the clean estimate x_t - t v is the previous frame minus the network's correction, and
a model whose output layer is still at zero (a new DiT) already samples a copy of the last frame in one
step. Scaling by the previous frame's level matters: a training clip's previous frame is often noisy
(Diffusion Forcing), and a skip that passed that noise on would teach the network to cancel the previous
frame, detail and all.

Two ways in:
- `forward(x, t, actions)`: a whole clip, positions 0..F-1 (training, full recompute).
- `forward_cached(x, t, actions, commit)`: F new frames against the KV cache of clean past frames
  (inference). The first `commit` of them are attended against the cache as it is and their keys
  and values written into it; the other frames then attend against the cache *with* them in it,
  exactly as if a separate commit pass had run first. So one pass can commit the finished frame and
  take the first denoising step of the next (or of N speculative drafts) at the cost of one pass.

The KV cache belongs to the model, as in gpt-fast: `setup_cache(batch_size)` gives each attention
layer its own keys and values (`Attention.kv_cache`, a `KVCache`) and the model the frame bookkeeping
they share (`self.slots`, `FrameSlots`: which frame each slot holds, the frame counter). Both are
preallocated once and only written in place, so `torch.compile(model.forward_cached)` sees one module
with static buffers (worldmodel/model/sampler.py compiles it that way).

On CPU without autograd the linear layers run through oneDNN (`linear`, linear.py), about twice as fast
as the default BLAS path on the AMD CPUs this was tuned on; training (with autograd) uses F.linear.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel import kernels
from worldmodel.game.action import ACTION_DIM
from worldmodel.model.autoencoder import AutoencoderConfig
from worldmodel.model.kv_cache import FrameSlots, KVCache
from worldmodel.model.linear import linear
from worldmodel.model.rope import apply_rope, rope_freqs, rope_split, rope_tables

# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------


# the sampling defaults as configs written before `SamplingDefaults` (worldmodel/model/sampler.py) hold them
LEGACY_SAMPLING_FIELDS = ("sample_steps", "sample_shift")


@dataclass
class ModelConfig:
    # frames and the autoencoder
    frame_size: tuple[int, int] = (96, 128)  # (H, W), 4:3
    fps: int = 35  # one frame per Doom tic
    latent_channels: int = 16
    ae_channels: tuple[int, ...] = (16, 32, 64, 128)
    ae_res_blocks: tuple[int, ...] = (0, 0, 1, 1)
    ae_p_frame: bool = False  # the decoder also sees the previous displayed frame (autoencoder.py: MotionBlend)
    # the transformer
    patch_size: int = 1  # latent pixels per token side
    prev_frame: bool = False  # each frame's tokens also carry the previous frame's latent (channel concat)
    prev_skip: bool = False  # the output is a velocity from the previous frame: at t = 1 a copy of it (needs prev_frame)
    dim: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    action_dim: int = ACTION_DIM
    rope_theta: float = 100.0
    # context: what the KV cache holds and how long training clips are
    sink_frames: int = 1  # first frames of a rollout, kept for ever (Self Forcing / StreamingLLM)
    window_frames: int = 7  # most recent clean frames
    max_draft: int = 8  # most frames generated in one pass (speculative sampling)
    context_noise: float = 0.05  # noise level of committed context frames (GameNGen augmentation)
    # how the model is best sampled is not architecture: `SamplingDefaults` (worldmodel/model/sampler.py)

    def __post_init__(self):
        self.frame_size = tuple(self.frame_size)
        self.ae_channels = tuple(self.ae_channels)
        self.ae_res_blocks = tuple(self.ae_res_blocks)
        for f in fields(self):  # `--set prev_frame=yes` is not a switch
            if isinstance(f.default, bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} is true or false, got {getattr(self, f.name)!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary positions")
        h, w = self.latent_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"latent grid {h}x{w} is not divisible by patch size {self.patch_size}")
        if self.prev_skip and not self.prev_frame:
            raise ValueError("prev_skip needs prev_frame")
        if self.window_frames < 1 or self.sink_frames < 0 or self.max_draft < 1:
            raise ValueError("window_frames >= 1, sink_frames >= 0 and max_draft >= 1 are required")

    @property
    def autoencoder(self) -> AutoencoderConfig:
        return AutoencoderConfig(frame_size=self.frame_size, latent_channels=self.latent_channels,
                                 channels=self.ae_channels, res_blocks=self.ae_res_blocks, p_frame=self.ae_p_frame)

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.autoencoder.latent_size

    @property
    def grid(self) -> tuple[int, int]:  # token rows, columns
        h, w = self.latent_size
        return h // self.patch_size, w // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def cache_frames(self) -> int:
        return self.sink_frames + self.window_frames

    @property
    def clip_frames(self) -> int:
        """Training clip length: every position a cached rollout or a speculative draft can use."""
        return self.sink_frames + self.window_frames + self.max_draft

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: "ModelConfig") -> dict[str, tuple]:
        """The fields where `other` differs from this config: name -> (other's value, this one's)."""
        theirs = other.to_dict()
        return {k: (theirs[k], v) for k, v in self.to_dict().items() if theirs[k] != v}

    @staticmethod
    def describe(differences: dict[str, tuple]) -> str:
        """`differences()` in an error message: "name (theirs vs ours), ..."."""
        return ", ".join(f"{k} ({theirs} vs {ours})" for k, (theirs, ours) in differences.items())

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The config of `to_dict()`. The sampling defaults that configs written before they left it
        carry (`sample_steps`, `sample_shift`) are dropped: the checkpoint reads them
        (checkpoint.sampling_defaults)."""
        d = {k: v for k, v in d.items() if k not in LEGACY_SAMPLING_FIELDS}
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config field(s): {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # plays at 30+ FPS on 2 CPU cores: 128x96 frames, 6x8 = 48 tokens a frame
    "tiny": ModelConfig(),
    # GPU quality tier: 256x192 frames, 12x16 = 192 tokens a frame
    "small": ModelConfig(frame_size=(192, 256), ae_channels=(32, 64, 128, 256), ae_res_blocks=(0, 1, 1, 2),
                         dim=512, depth=12, heads=8, window_frames=15),
    # NFD+ 310M's shape class: 384x224 frames, 14x24 = 336 tokens a frame, 32-frame context; random
    # weights, for engine benchmarks
    "nfd-310m": ModelConfig(frame_size=(224, 384), ae_channels=(32, 64, 128, 256), ae_res_blocks=(0, 1, 1, 2),
                            dim=1024, depth=16, heads=16, window_frames=23),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())  # a fresh copy


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclass
class _AttnContext:
    """What attention needs for one forward pass, built once by the model and read by all blocks.
    Without a cache: cos, sin rotate the whole clip. With a cache (`cached`), the new frames are two
    groups: the first `commit` frames (rotated by commit_cos/sin, attending the cache as it is, then
    written into it) and the rest (rotated by cos/sin, attending the cache with the committed frames in it)."""
    cos: torch.Tensor  # (L, D) rotation of the new (non-committed) tokens
    sin: torch.Tensor
    attend: kernels.Backend  # the model's attention backend, resolved
    tokens_per_frame: int
    cached: bool = False
    valid: torch.Tensor | None = None  # (B, S*T) bool: cache slots the non-committed frames see
    commit: int = 0  # frames committed by this pass (the first ones)
    commit_cos: torch.Tensor | None = None  # (commit*T, D)
    commit_sin: torch.Tensor | None = None
    commit_valid: torch.Tensor | None = None  # (B, S*T) bool: cache slots the committed frames see
    commit_index: torch.Tensor | None = None  # (commit*T,) the cache rows the committed frames go to
    key_cos: torch.Tensor | None = None  # (S*T, D) rotation of the cache slots after the commit
    key_sin: torch.Tensor | None = None


class WorldTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.latent_channels * cfg.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim * (2 if cfg.prev_frame else 1), cfg.dim)  # [frame, previous frame]
        self.noise_embed = NoiseLevelEmbedding(cfg.dim)
        self.action_embed = nn.Sequential(nn.Linear(cfg.action_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.final = FinalLayer(cfg.dim, patch_dim)
        nt, nr, nc = rope_split(cfg.head_dim)
        self.register_buffer("freq_t", rope_freqs(nt, cfg.rope_theta), persistent=False)
        self.register_buffer("freq_r", rope_freqs(nr, cfg.rope_theta), persistent=False)
        self.register_buffer("freq_c", rope_freqs(nc, cfg.rope_theta), persistent=False)
        gh, gw = cfg.grid
        rows = torch.arange(gh, dtype=torch.float32).repeat_interleave(gw)  # (T,)
        cols = torch.arange(gw, dtype=torch.float32).repeat(gh)
        self.register_buffer("spatial_angles", torch.cat(
            (rows[:, None] * self.freq_r, cols[:, None] * self.freq_c), dim=-1), persistent=False)  # (T, nr+nc)
        # rotation tables for every position a clip, a cached rollout or a draft can use: (P, T, D)
        cos, sin = self._rope(torch.arange(cfg.clip_frames))
        self.register_buffer("rope_cos", cos.view(cfg.clip_frames, cfg.tokens_per_frame, -1), persistent=False)
        self.register_buffer("rope_sin", sin.view(cfg.clip_frames, cfg.tokens_per_frame, -1), persistent=False)
        self.attention = "sdpa"  # backend in kernels/: "torch", "sdpa", "flex" or "triton"
        self.slots: FrameSlots | None = None  # the KV cache's bookkeeping, from `setup_cache`
        self.initialize_weights()

    # -- attention backend and KV cache ------------------------------------------------------------
    @property
    def attention(self) -> str:
        return self._attend.name

    @attention.setter
    def attention(self, backend: str) -> None:
        """Resolve the backend for the device the weights are on, once: ValueError for an unknown name,
        RuntimeError (one line) if it cannot run there. Set it again after moving the model."""
        self._attend = kernels.resolve_backend(backend, self.freq_t.device)

    def setup_cache(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> None:
        """Preallocate the KV cache for `batch_size` rollouts on the weights' device (dtype: the
        weights', unless given): each attention layer's keys and values and the frame bookkeeping. The
        cache is empty after it; one of the same shape, device and dtype is reused (emptied in place),
        unless it was made under torch.inference_mode and this call is outside it."""
        p = self.patch_embed.weight
        dtype = dtype or p.dtype
        kv = self.blocks[0].attn.kv_cache
        if (self.slots is not None and self.slots.batch_size == batch_size and kv.k.device == p.device
                and kv.k.dtype == dtype and (torch.is_inference_mode_enabled() or not kv.k.is_inference())):
            self.reset_cache()
            return
        self.slots = FrameSlots(self.cfg, batch_size, device=p.device, dtype=dtype)
        for block in self.blocks:
            block.attn.kv_cache = KVCache(self.cfg, batch_size, device=p.device, dtype=dtype)

    def reset_cache(self) -> None:
        """Empty the cache (no frame in it), in place."""
        self.slots.reset()
        for block in self.blocks:
            for b in block.attn.kv_cache.buffers():
                b.zero_()

    def cache_snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the cache: the bookkeeping's buffers and k, k_rot, v stacked over layers (L, B, H,
        S*T, D) (tests compare them bitwise)."""
        out = {name: b.clone() for name, b in self.slots.named_buffers()}
        for name in ("k", "k_rot", "v"):
            out[name] = torch.stack([getattr(block.attn.kv_cache, name) for block in self.blocks])
        return out

    def initialize_weights(self):
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        nn.init.normal_(self.noise_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.noise_embed.mlp[2].weight, std=0.02)
        nn.init.normal_(self.action_embed[0].weight, std=0.02)
        nn.init.normal_(self.action_embed[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts as the identity
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        nn.init.zeros_(self.final.modulation.weight)
        nn.init.zeros_(self.final.modulation.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    # -- positions ---------------------------------------------------------------------------------
    def _rope(self, time_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """time_pos: (F,) frame positions -> cos, sin: (F*T, D) for all their tokens (`rope_tables`)."""
        T = self.cfg.tokens_per_frame
        t_ang = time_pos.float()[:, None, None] * self.freq_t  # (F, 1, nt)
        angles = torch.cat((t_ang.expand(-1, T, -1), self.spatial_angles.expand(len(time_pos), -1, -1)), dim=-1)
        return rope_tables(angles.flatten(0, 1))  # angles (F*T, D/2)

    def _rope_at(self, time_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `_rope` (same values), from the tables; positions must be < clip_frames."""
        return self.rope_cos[time_pos].flatten(0, 1), self.rope_sin[time_pos].flatten(0, 1)

    # -- tokens ------------------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, C, h, w) -> (B, F, T, C*p*p)"""
        B, Fr, C, h, w = x.shape
        p = self.cfg.patch_size
        x = x.reshape(B, Fr, C, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(B, Fr, (h // p) * (w // p), C * p * p)

    def _untokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, T, C*p*p) -> (B, F, C, h, w)"""
        B, Fr = x.shape[:2]
        p, C = self.cfg.patch_size, self.cfg.latent_channels
        gh, gw = self.cfg.grid
        x = x.reshape(B, Fr, gh, gw, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, Fr, C, gh * p, gw * p)

    def _run(self, x, t, actions, ctx: _AttnContext, first_prev: torch.Tensor | None,
             first_prev_t: torch.Tensor | None) -> torch.Tensor:
        tokens = self._tokens(x)  # (B, F, T, c)
        if self.cfg.prev_frame:  # frame f also gets frame f-1 (the first: `first_prev` (B, C, h, w))
            prev = torch.cat((first_prev[:, None].to(x.dtype), x[:, :-1]), dim=1)  # (B, F, C, h, w)
            tokens = torch.cat((tokens, self._tokens(prev)), dim=-1)  # (B, F, T, 2c)
        h = linear(tokens, self.patch_embed)  # (B, F, T, C)
        c = F.silu(self.noise_embed(t) + self.action_embed(actions.to(h.dtype)))  # (B, F, C), activated once
        for block in self.blocks:
            h = block(h, c, ctx)
        v = self._untokens(self.final(h, c))  # (B, F, C, h, w)
        if self.cfg.prev_skip:  # + x_t - prev0: the clean estimate x_t - t v = (1-t) x_t + t prev0 - t net
            prev_t = torch.cat((first_prev_t[:, None].to(t.dtype), t[:, :-1]), dim=1)  # (B, F)
            v = v + (x - clean_estimate(prev, prev_t)).to(v.dtype)
        return v

    # -- entry points ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """A whole clip. x: (B, F, C, h, w) noisy latents; t: (B, F) noise levels; actions: (B, F, A).
        Returns the predicted velocity (B, F, C, h, w). Frame f sees frames <= f only."""
        Fr = x.shape[1]
        pos = torch.arange(Fr, device=x.device)
        cos, sin = self._rope_at(pos) if Fr <= self.cfg.clip_frames else self._rope(pos)
        ctx = _AttnContext(cos=cos, sin=sin, attend=self._attend, tokens_per_frame=self.cfg.tokens_per_frame)
        first_prev = x.new_zeros((x.shape[0], *x.shape[2:])) if self.cfg.prev_frame else None
        first_prev_t = t.new_ones(x.shape[0]) if self.cfg.prev_skip else None  # the zeros count as pure noise
        return self._run(x, t, actions, ctx, first_prev, first_prev_t)

    def forward_cached(self, x: torch.Tensor, t: torch.Tensor, actions: torch.Tensor, commit: int = 0) -> torch.Tensor:
        """F new frames after the frames in the KV cache (`setup_cache`; same shapes as `forward`;
        returns all F velocities). The first `commit` frames attend the cache as it is, block-causally among
        themselves, and their keys and values are written into it (the counter advances by
        `commit`); the other F - commit frames attend the cache with those frames committed, as a
        separate pass after the commit would. commit <= min(window_frames, max_draft) and
        F - commit <= max_draft (the positions training covered). No host sync."""
        B, Fr = x.shape[:2]
        n, cfg = commit, self.cfg
        if not 0 <= n <= min(cfg.window_frames, cfg.max_draft) or Fr - n > cfg.max_draft or Fr < 1:
            raise ValueError(f"forward_cached: commit must be within 0..{min(cfg.window_frames, cfg.max_draft)} "
                             f"and F - commit within 0..{cfg.max_draft}, got F={Fr}, commit={n}")
        slots = self.slots
        if slots is None:
            raise RuntimeError("forward_cached: no KV cache; call setup_cache(batch_size) first")
        if slots.batch_size != B:
            raise ValueError(f"forward_cached: the cache holds batch size {slots.batch_size}, got {B}")
        T = cfg.tokens_per_frame
        ctx = _AttnContext(cos=None, sin=None, attend=self._attend, tokens_per_frame=T, cached=True, commit=n)
        slot_frame, count = slots.slot_frame, slots.count
        if n:
            commit_slots = slots.slots_for(n)
            ctx.commit_index = slots.token_index(commit_slots)
            ctx.commit_cos, ctx.commit_sin = self._rope_at(slots.query_positions(n))
            ctx.commit_valid = (slot_frame >= 0).repeat_interleave(T)[None].expand(B, -1)
            slot_frame, count = slots.after_commit(commit_slots)
            ctx.key_cos, ctx.key_sin = self._rope_at(slots.key_positions(slot_frame, count)[0])
        if Fr > n:
            ctx.cos, ctx.sin = self._rope_at(slots.query_positions(Fr - n, count))
            ctx.valid = (slot_frame >= 0).repeat_interleave(T)[None].expand(B, -1)
        out = self._run(x, t, actions, ctx, slots.last, slots.last_t)
        if n:
            slots.advance(slot_frame, count)
            if cfg.prev_frame:
                slots.last.copy_(x[:, n - 1])
            if cfg.prev_skip:
                slots.last_t.copy_(t[:, n - 1])
        return out


class NoiseLevelEmbedding(nn.Module):
    """Per-frame noise level t in [0, 1] -> (B, F, dim): sinusoidal features of 1000 t, then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[..., None] * freqs
        emb = torch.cat((args.cos(), args.sin()), dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def clean_estimate(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent's linear least-squares estimate from its noisy version x = (1-t) x0 + t noise
    (B, F, C, h, w) at levels t (B, F), for unit-variance latents (the autoencoder normalises them):
    (1-t) / ((1-t)^2 + t^2) x; x itself at t = 0, zero at t = 1."""
    s = (1 - t) / ((1 - t) ** 2 + t ** 2)
    return s[..., None, None, None].to(x.dtype) * x


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift


class Block(nn.Module):
    """DiT block with adaLN-Zero; x: (B, F, T, C), c: (B, F, C) one conditioning vector a frame (after
    its SiLU, which every block shares)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(cfg, index)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.modulation = nn.Linear(cfg.dim, 6 * cfg.dim)

    def forward(self, x, c, ctx: _AttnContext):
        mod = linear(c, self.modulation).unsqueeze(2)  # (B, F, 1, 6C)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = torch.addcmul(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), ctx))  # x + gate1 * attn
        h = linear(modulate(self.norm2(x), shift2, scale2), self.mlp[0], gelu=True)
        return torch.addcmul(x, gate2, linear(h, self.mlp[2]))  # x + gate2 * mlp


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with its weight cast to the input's dtype: under bf16 autocast q and k arrive in
    bf16, and a float32 weight would send them to the slower unfused path (PyTorch warns "Cannot
    dispatch to fused implementation"). The weight itself stays float32 for the optimizer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Layer `index` of the model's attention; at inference it owns its keys and values (`kv_cache`,
    a KVCache from WorldTransformer.setup_cache; None before)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.kv_cache: KVCache | None = None

    def extra_repr(self) -> str:
        return f"index={self.index}"

    def forward(self, x: torch.Tensor, ctx: _AttnContext) -> torch.Tensor:
        B, Fr, T, C = x.shape
        qkv = linear(x, self.qkv).view(B, Fr * T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]  # (B, H, F*T, D)
        if not ctx.cached:
            out = ctx.attend.block_causal(apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), v,
                                          ctx.tokens_per_frame)
        else:
            out = self.cached_attention(q, k, v, ctx)
        out = out.transpose(1, 2).reshape(B, Fr, T, C)
        return linear(out, self.proj)

    def cached_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: _AttnContext) -> torch.Tensor:
        """New frames' queries, keys (unrotated) and values (B, H, F*T, D) against this layer's KV cache.
        The first ctx.commit frames see the cache as it is and are then written into it; the rest see
        the cache with them in it (sinks and window at their post-commit positions), as a separate pass
        would."""
        cache, T = self.kv_cache, ctx.tokens_per_frame
        n = ctx.commit * T
        outs = []
        if n:
            qa, ka = apply_rope(q[:, :, :n], ctx.commit_cos, ctx.commit_sin), apply_rope(k[:, :, :n], ctx.commit_cos,
                                                                                        ctx.commit_sin)
            outs.append(ctx.attend.cached(qa, ka, v[:, :, :n], cache.k_rot, cache.v, ctx.commit_valid, T))
            cache.write(k[:, :, :n], v[:, :, :n], ctx.commit_index, ctx.key_cos, ctx.key_sin)
        if q.shape[2] > n:
            qb, kb = apply_rope(q[:, :, n:], ctx.cos, ctx.sin), apply_rope(k[:, :, n:], ctx.cos, ctx.sin)
            outs.append(ctx.attend.cached(qb, kb, v[:, :, n:], cache.k_rot, cache.v, ctx.valid, T))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):  # (B, F, T, C), (B, F, C) after SiLU -> (B, F, T, out)
        shift, scale = linear(c, self.modulation).unsqueeze(2).chunk(2, dim=-1)
        return linear(modulate(self.norm(x), shift, scale), self.linear)
