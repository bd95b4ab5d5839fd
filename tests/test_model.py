"""The transformer: block-causal across frames, and it can learn (overfits one small batch)."""
import pytest
import torch

from worldmodel.model import diffusion
from worldmodel.model.transformer import ModelConfig, WorldTransformer



def tiny_config(**kw) -> ModelConfig:
    """32x32 frames -> 4x4 latents (16 tokens a frame), dim 64, 2 blocks; clips of 1 + 3 + 2 = 6 frames."""
    d = dict(frame_size=(32, 32), latent_channels=4, ae_channels=(8, 8, 16), ae_res_blocks=(0, 0, 0),
             dim=64, depth=2, heads=2, sink_frames=1, window_frames=3, max_draft=2)
    d.update(kw)
    return ModelConfig(**d)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """adaLN-Zero starts every block as the identity and the output at zero: give the zero-initialised
    weights values so that the test exercises attention across frames."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(cfg: ModelConfig, B: int = 2, F: int | None = None, seed: int = 0):
    F = F or cfg.clip_frames
    g = torch.Generator().manual_seed(seed)
    C, (h, w) = cfg.latent_channels, cfg.latent_size
    return (torch.randn(B, F, C, h, w, generator=g), torch.rand(B, F, generator=g),
            torch.randn(B, F, cfg.action_dim, generator=g))


@pytest.mark.parametrize("t_changed", [0, 2, 5])
@pytest.mark.parametrize("what", ["latent", "noise_level", "action"])
@pytest.mark.parametrize("prev_frame", [False, True])
def test_block_causal_future_frames_do_not_change_the_past(t_changed, what, prev_frame):
    cfg = tiny_config(prev_frame=prev_frame)
    torch.manual_seed(0)
    model = WorldTransformer(cfg).eval()
    _randomize(model)
    x, t, a = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, a)
        x2, t2, a2 = x.clone(), t.clone(), a.clone()
        if what == "latent":
            x2[:, t_changed] += torch.randn_like(x2[:, t_changed])
        elif what == "noise_level":
            t2[:, t_changed] = 1.0 - t2[:, t_changed]
        else:
            a2[:, t_changed] = -a2[:, t_changed] + 1.0
        out = model(x2, t2, a2)
    # frames before the changed one: unchanged (to float tolerance)
    torch.testing.assert_close(out[:, :t_changed], ref[:, :t_changed], atol=1e-5, rtol=1e-5)
    # the changed frame itself (and, through attention, the later ones): changed
    assert (out[:, t_changed] - ref[:, t_changed]).abs().max() > 1e-3
    if t_changed + 1 < cfg.clip_frames:
        assert (out[:, t_changed + 1:] - ref[:, t_changed + 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("prev_skip", [False, True])
def test_prev_skip_makes_a_new_model_estimate_a_copy_of_the_previous_frame(prev_skip):
    """A new model's output layer is zero: without the skip its clean estimate x_t - t v is x_t itself;
    with `prev_skip` it is (1 - t) x_t + t prev0, prev0 the previous frame's clean estimate from its own
    noise level: at pure noise after a clean frame, a copy of it; the first frame (no previous) gets
    (1 - t) x_t."""
    cfg = tiny_config(prev_frame=True, prev_skip=prev_skip)
    model = WorldTransformer(cfg).eval()
    x, t, a = _inputs(cfg)
    t[:, -2], t[:, -1] = 0.0, 1.0
    with torch.no_grad():
        x0 = diffusion.predict_x0(x, model(x, t, a), t)
    if not prev_skip:
        torch.testing.assert_close(x0, x)
        return
    tt, tp = t[:, 1:, None, None, None], t[:, :-1, None, None, None]
    prev0 = (1 - tp) / ((1 - tp) ** 2 + tp ** 2) * x[:, :-1]
    torch.testing.assert_close(x0[:, 1:], (1 - tt) * x[:, 1:] + tt * prev0)
    torch.testing.assert_close(x0[:, 0], (1 - t[:, 0, None, None, None]) * x[:, 0])
    torch.testing.assert_close(x0[:, -1], x[:, -2])


@torch.no_grad()
def test_a_new_prev_skip_model_samples_a_copy_of_the_last_frame_in_one_step():
    """Through the engine's sampler (the KV cache, context committed at its noise level): one step of a
    new model with `prev_skip` gives the last context frame as committed, cleaned from its noise level."""
    from worldmodel.model.sampler import FrameSampler
    from worldmodel.model.transformer import clean_estimate

    cfg = tiny_config(prev_frame=True, prev_skip=True)
    model = WorldTransformer(cfg).eval()
    x, _, a = _inputs(cfg, B=1, F=4)
    s = FrameSampler(model, cfg, 1, shift=1.0, seed=0, batch_size=1)
    s.reset(x, a)
    last, last_t = model.slots.last.clone(), model.slots.last_t.clone()
    assert torch.equal(last_t, torch.full((1,), cfg.context_noise))
    assert (last - x[:, -1]).abs().max() > 1e-3  # committed with its context noise
    out = s.next(a[:, -1:])
    torch.testing.assert_close(out[:, 0], clean_estimate(last[:, None], last_t[:, None])[:, 0])
    torch.testing.assert_close(out[:, 0], x[:, -1], atol=0.3, rtol=0)  # the last frame, up to that noise


def test_prev_skip_refuses_bad_values():
    with pytest.raises(ValueError, match="prev_skip needs prev_frame"):
        tiny_config(prev_skip=True)
    with pytest.raises(ValueError, match="prev_skip is true or false, got 'maybe'"):
        tiny_config(prev_frame=True, prev_skip="maybe")


def test_within_a_frame_attention_is_bidirectional():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = WorldTransformer(cfg).eval()
    _randomize(model)
    x, t, a = _inputs(cfg, B=1)
    with torch.no_grad():
        ref = model(x, t, a)
        x2 = x.clone()
        x2[:, 1, :, -1, -1] += 3.0  # the last token of frame 1
        out = model(x2, t, a)
    # the first token of frame 1 sees the last one
    assert (out[:, 1, :, 0, 0] - ref[:, 1, :, 0, 0]).abs().max() > 1e-4
    torch.testing.assert_close(out[:, 0], ref[:, 0], atol=1e-5, rtol=1e-5)


def test_a_token_carries_its_own_patch_of_the_latent():
    """patch_size 2: each token holds the 2x2 latent pixels at its grid place (all channels), and the
    output maps back to the latent grid the same way."""
    cfg = tiny_config(ae_channels=(8, 16), ae_res_blocks=(0, 0), patch_size=2)  # 8x8 latent, 4x4 tokens
    model = WorldTransformer(cfg)
    C, (h, w), p = cfg.latent_channels, cfg.latent_size, cfg.patch_size
    x = torch.randn(2, 3, C, h, w)
    tokens = model._tokens(x)  # (B, F, T, C*p*p)
    assert tokens.shape == (2, 3, cfg.tokens_per_frame, C * p * p)
    gw = cfg.grid[1]
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        patch = x[:, :, :, r * p:(r + 1) * p, c * p:(c + 1) * p].flatten(2)  # (B, F, C*p*p)
        assert torch.equal(tokens[:, :, r * gw + c].sort(-1).values, patch.sort(-1).values)
    assert torch.equal(model._untokens(tokens), x)


def test_overfits_one_small_batch():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = WorldTransformer(cfg)
    x0, _, a = _inputs(cfg, B=2, seed=1)
    g = torch.Generator().manual_seed(2)
    t = diffusion.sample_training_noise_levels(2, cfg.clip_frames, g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        loss = diffusion.flow_matching_loss(model, x0, a, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20, (losses[0], losses[-1])


def test_training_noise_levels():
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_training_noise_levels(4000, 8, g, context_prob=0.5, context_max=0.3)
    assert t.shape == (4000, 8) and t.min() >= 0 and t.max() <= 1
    # frame 0 is a (noise-augmented) context frame in about half of the clips
    assert 0.4 < (t[:, 0] <= 0.3).float().mean() < 0.7
    # Diffusion Forcing alone: independent levels, no prefix structure
    t = diffusion.sample_training_noise_levels(4000, 8, g, context_prob=0.0)
    assert abs(torch.corrcoef(t[:, :2].T)[0, 1]) < 0.05


def test_bf16_autocast_keeps_the_fused_qk_norm_and_the_float32_weights():
    """Under bf16 autocast (how CUDA training runs; CPU autocast takes the same path) the q/k RMSNorm
    gets bf16 input: its weight must follow, or PyTorch falls back to the unfused kernel with a warning."""
    import warnings

    cfg = tiny_config()
    model = WorldTransformer(cfg)
    _randomize(model)
    x, t, a = _inputs(cfg)
    ref = model(x, t, a)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fused implementation.*")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, a)
        out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=0.1, rtol=0.05)
    norm = model.blocks[0].attn.q_norm
    assert norm.weight.dtype == torch.float32 and norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_attention_backend_is_resolved_once_not_checked_per_call(monkeypatch):
    """Setting `attention` resolves the backend (name and device checked there); the passes call its
    functions and check nothing per call (kernels.check_backend is not reached from forward_cached)."""
    from worldmodel import kernels

    cfg = tiny_config()
    model = WorldTransformer(cfg).eval()
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.attention = "nope"
    model.attention = "torch"
    assert model.attention == "torch" and model._attend.cached is kernels.reference_cached_attention
    checks = []
    monkeypatch.setattr(kernels, "check_backend", lambda *a: checks.append(a))
    x, t, a = _inputs(cfg, B=1, F=2)
    model.setup_cache(1)
    with torch.inference_mode():
        model.forward_cached(x[:, :1], t[:, :1], a[:, :1], commit=1)
        model.forward_cached(x[:, :2], t[:, :2], a[:, :2], commit=1)
        model(x, t, a)
    assert checks == []
    model.attention = "sdpa"  # setting it is where the check happens
    assert len(checks) == 1 and model.attention == "sdpa"
