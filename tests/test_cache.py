"""The static KV cache (worldmodel/model/transformer.py: WorldTransformer.setup_cache and forward_cached;
each attention layer's KVCache, the model's FrameSlots).

Tolerances: float64 throughout, so that a mismatch in positions, masks or bookkeeping shows as an
O(1e-2) error while correct code agrees to ~1e-12 (we assert 1e-9).

- While the rolling window has not wrapped (at most sink + window frames), a cached rollout equals a
  full recompute of the same frames with `forward` (block-causal over the whole clip).
- After it wraps the two differ by design: a cached frame's keys were computed when older frames were
  still visible (inherent to sliding-window caches). There the reference is an independent,
  deliberately naive sliding-window implementation (a python list of per-frame keys/values, each
  computed once from the context its frame had; queries see the sinks and the last `window` frames
  at logical positions), which the ring buffer must match.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from worldmodel.model.rope import apply_rope
from worldmodel.model.transformer import ModelConfig, WorldTransformer, modulate

TOL = 1e-9



def small_cfg(**kw) -> ModelConfig:
    d = dict(frame_size=(32, 48), latent_channels=4, ae_channels=(8, 8, 8, 8), ae_res_blocks=(0, 0, 0, 0),
             dim=32, depth=2, heads=2, sink_frames=1, window_frames=3, max_draft=3)  # 2x3 = 6 tokens a frame
    d.update(kw)
    return ModelConfig(**d)


def random_model(cfg: ModelConfig, seed: int = 0) -> WorldTransformer:
    """float64 transformer with every weight random (adaLN-Zero would make the blocks identities)."""
    torch.manual_seed(seed)
    m = WorldTransformer(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.3 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1))
    return m


def clip(cfg: ModelConfig, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    C, (h, w) = cfg.latent_channels, cfg.latent_size
    x = torch.randn(1, n, C, h, w, generator=g, dtype=torch.float64)
    t = torch.rand(1, n, generator=g, dtype=torch.float64)
    a = torch.randn(1, n, cfg.action_dim, generator=g, dtype=torch.float64)
    return x, t, a


# a 4x6 latent, 2x2 latent pixels a token: the same 2x3 tokens a frame
PATCH2 = dict(ae_channels=(8, 8, 8), ae_res_blocks=(0, 0, 0), patch_size=2)


# what a frame's tokens carry of the previous frame: nothing, its latent, its latent and the output skip
PREV = {"no-prev": {}, "prev": dict(prev_frame=True), "prev-skip": dict(prev_frame=True, prev_skip=True)}


@pytest.mark.parametrize("latent", [{}, PATCH2], ids=["patch1", "patch2"])
@pytest.mark.parametrize("prev", PREV.values(), ids=PREV.keys())
@torch.inference_mode()
def test_cached_rollout_equals_full_recompute_before_the_window_wraps(prev, latent):
    cfg = small_cfg(**prev, **latent)
    m = random_model(cfg)
    n = cfg.cache_frames  # sinks + window: nothing is evicted yet
    x, t, a = clip(cfg, n + 1)
    full = m(x, t, a)  # (1, n+1, C, h, w)

    m.setup_cache(1)
    one_by_one = torch.cat([m.forward_cached(x[:, i:i + 1], t[:, i:i + 1], a[:, i:i + 1], commit=1)
                            for i in range(n + 1)], dim=1)
    assert (one_by_one - full).abs().max() < TOL

    # chunked commits, and a pass that commits one frame and runs the next (the fused commit)
    m.reset_cache()
    out = [m.forward_cached(x[:, :3], t[:, :3], a[:, :3], commit=3),
           m.forward_cached(x[:, 3:5], t[:, 3:5], a[:, 3:5], commit=1)]
    assert (torch.cat(out, 1) - full[:, :5]).abs().max() < TOL
    assert int(m.slots.count) == 4

    # commit=0 leaves the cache untouched and sees it whole: F new frames block-causal among themselves
    m.reset_cache()
    m.forward_cached(x[:, :3], t[:, :3], a[:, :3], commit=3)
    before = m.cache_snapshot()
    draft = m.forward_cached(x[:, 3:6], t[:, 3:6], a[:, 3:6], commit=0)
    assert (draft - full[:, 3:6]).abs().max() < TOL
    for name, b in m.cache_snapshot().items():
        assert torch.equal(b, before[name]), name


class SlidingWindowReference:
    """Naive sliding-window attention cache, written independently of the model's: per committed frame a
    list of per-layer (unrotated k, v); a new frame sees the sinks and the last `window` frames,
    placed at logical time positions 0..S-1, S..S+w-1, then itself."""

    def __init__(self, model: WorldTransformer):
        self.m, self.cfg = model, model.cfg
        self.frames: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def visible(self):
        S, W = self.cfg.sink_frames, self.cfg.window_frames
        return self.frames[:S] + self.frames[S:][-W:]

    def step(self, x, t, a, commit: bool):
        """One frame (1, 1, C, h, w) -> its velocity; commit: remember its keys and values."""
        m, cfg = self.m, self.cfg
        ctx = self.visible()
        p = len(ctx)  # logical position of the new frame
        h = m.patch_embed(m._tokens(x))[0, 0]  # (T, dim)
        c = (m.noise_embed(t) + m.action_embed(a))[0, 0]  # (dim,)
        cos_all, sin_all = m._rope(torch.arange(p + 1))
        T, H, D = cfg.tokens_per_frame, cfg.heads, cfg.head_dim
        cos_all, sin_all = cos_all.double(), sin_all.double()
        mine = []
        for layer, blk in enumerate(m.blocks):
            s1, sc1, g1, s2, sc2, g2 = blk.modulation(F.silu(c)).chunk(6)
            y = modulate(blk.norm1(h), s1, sc1)
            q, k, v = blk.attn.qkv(y).view(T, 3, H, D).permute(1, 2, 0, 3)  # (H, T, D) each
            q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
            mine.append((k, v))
            keys = [apply_rope(f[layer][0], cos_all[i * T:(i + 1) * T], sin_all[i * T:(i + 1) * T])
                    for i, f in enumerate(ctx)] + [apply_rope(k, cos_all[p * T:], sin_all[p * T:])]
            vals = [f[layer][1] for f in ctx] + [v]
            qr = apply_rope(q, cos_all[p * T:], sin_all[p * T:])
            att = torch.softmax(qr @ torch.cat(keys, 1).transpose(-1, -2) / math.sqrt(D), dim=-1) @ torch.cat(vals, 1)
            h = h + g1 * blk.attn.proj(att.transpose(0, 1).reshape(T, H * D))
            h = h + g2 * blk.mlp(modulate(blk.norm2(h), s2, sc2))
        out = m._untokens(m.final(h[None, None], F.silu(c)[None, None]))
        if commit:
            self.frames.append(mine)
        return out


@torch.inference_mode()
@pytest.mark.parametrize("sinks,window", [(1, 3), (0, 2), (2, 2)])
def test_cached_rollout_after_wrapping_matches_a_naive_sliding_window(sinks, window):
    cfg = small_cfg(sink_frames=sinks, window_frames=window)
    m = random_model(cfg, seed=sinks * 10 + window)
    n = 4 * cfg.cache_frames + 3  # wraps the ring several times
    x, t, a = clip(cfg, n, seed=2)
    ref = SlidingWindowReference(m)
    m.setup_cache(1)
    for i in range(n):
        fi, ti, ai = x[:, i:i + 1], t[:, i:i + 1], a[:, i:i + 1]
        if i % 3 == 2:  # a denoising pass now and then: sees the cache, commits nothing
            probe = m.forward_cached(fi, ti, ai, commit=0)
            assert (probe - ref.step(fi, ti, ai, commit=False)).abs().max() < TOL, i
        got = m.forward_cached(fi, ti, ai, commit=1)
        want = ref.step(fi, ti, ai, commit=True)
        assert (got - want).abs().max() < TOL, f"frame {i}"
    # the naive full recompute over only the window frames differs after wrapping (documented property)
    S, W = cfg.sink_frames, cfg.window_frames
    keep = list(range(S)) + list(range(n - W, n))
    naive = m(x[:, keep], t[:, keep], a[:, keep])[:, -1]
    assert (naive - got[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("prev", PREV.values(), ids=PREV.keys())
@torch.inference_mode()
def test_fused_commit_pass_equals_a_separate_commit_pass_after_wrapping(prev):
    """forward_cached(commit=1) on [finished frame, next frame] == commit pass, then a pass for the next."""
    cfg = small_cfg(**prev)
    m1 = random_model(cfg, seed=3)
    m2 = copy.deepcopy(m1)  # the same weights, a cache of its own
    n = 3 * cfg.cache_frames
    x, t, a = clip(cfg, n + 1, seed=4)
    m1.setup_cache(1), m2.setup_cache(1)
    m1.forward_cached(x[:, :1], t[:, :1], a[:, :1], commit=1)
    m2.forward_cached(x[:, :1], t[:, :1], a[:, :1], commit=1)
    for i in range(1, n):
        fused = m1.forward_cached(x[:, i:i + 2], t[:, i:i + 2], a[:, i:i + 2], commit=1)[:, 1]
        m2.forward_cached(x[:, i:i + 1], t[:, i:i + 1], a[:, i:i + 1], commit=1)
        separate = m2.forward_cached(x[:, i + 1:i + 2], t[:, i + 1:i + 2], a[:, i + 1:i + 2], commit=0)[:, 0]
        assert (fused - separate).abs().max() < TOL, i
    s1, s2 = m1.cache_snapshot(), m2.cache_snapshot()
    for name in s1:
        assert (s1[name].double() - s2[name].double()).abs().max() < TOL, name


@torch.inference_mode()
def test_cache_is_static_and_positions_stay_in_the_trained_range():
    cfg = small_cfg()
    m = WorldTransformer(cfg).eval()
    m.setup_cache(1)

    def cache_buffers():
        return {name: (b.data_ptr(), tuple(b.shape)) for name, b in m.named_buffers()
                if name.startswith("slots.") or ".kv_cache." in name}

    addresses = cache_buffers()
    assert len(addresses) == 2 + 3 * cfg.depth  # slot_frame, count; k, k_rot, v in each layer
    m.setup_cache(1)  # the same shape again: the same buffers, emptied
    assert cache_buffers() == addresses
    x, t, a = (v.float() for v in clip(cfg, 1))
    for i in range(5 * cfg.cache_frames):
        m.forward_cached(x, t, a, commit=1)
        kpos, valid = m.slots.key_positions()
        qpos = m.slots.query_positions(cfg.max_draft)
        assert int(kpos.max()) < cfg.cache_frames and int(qpos.max()) < cfg.clip_frames
        assert int(valid.sum()) == min(i + 1, cfg.cache_frames)
        # positions of the slots are distinct: sinks first, window oldest to newest
        assert sorted(kpos[valid].tolist()) == list(range(int(valid.sum())))
    assert int(m.slots.count) == 5 * cfg.cache_frames
    assert cache_buffers() == addresses


def test_forward_cached_rejects_shapes_it_was_not_trained_for():
    cfg = small_cfg()
    m = WorldTransformer(cfg).eval()
    x, t, a = (v.float() for v in clip(cfg, cfg.max_draft + 1))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="setup_cache"):
        m.forward_cached(x[:, :1], t[:, :1], a[:, :1], commit=1)  # no cache yet
    m.setup_cache(1)
    with torch.inference_mode(), pytest.raises(ValueError, match="commit"):
        m.forward_cached(x, t, a, commit=0)  # more new frames than max_draft
    with torch.inference_mode(), pytest.raises(ValueError, match="commit"):
        m.forward_cached(x, t, a, commit=cfg.window_frames + 1)
