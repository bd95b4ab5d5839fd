"""The sampler (worldmodel/model/sampler.py) and the engine's speculation (WorldModel.step_latent)
alone, against a stand-in transformer: a tiny deterministic fake with the transformer's cached-forward
interface (setup_cache, reset_cache, forward_cached) that logs every pass and keeps the frames committed
to its "cache" as a list. So these tests check the steps, commits and rollbacks, not the network (as
nanochat tests its engine against a mock model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from worldmodel.game.action import Action
from worldmodel.inference.engine import WorldModel
from worldmodel.model.sampler import FrameSampler
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.diffusion import timesteps
from worldmodel.model.transformer import ModelConfig

CFG = dict(frame_size=(32, 48), latent_channels=4, ae_channels=(8, 8, 8, 8), ae_res_blocks=(0, 0, 0, 0),
           dim=32, depth=1, heads=2, sink_frames=1, window_frames=3, max_draft=4, context_noise=0.0)
HELD = Action(move=1, turn=2.0)


class StandIn(nn.Module):
    """forward_cached(x, t, actions, commit): the first `commit` frames are appended to `committed` (with
    their actions and noise levels); the velocity of frame i is x_i - (the number of frames committed
    before it + its action's move): it depends on the cache, the frame and its action only, so a frame's
    result does not depend on the frames batched with it. Every pass is logged as (F, commit, t)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(1))  # the sampler takes device and dtype from the parameters
        self.attention = "sdpa"
        self.committed: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        self.passes: list[tuple[int, int, list[float]]] = []
        self.batch_size = None

    def setup_cache(self, batch_size: int = 1) -> None:
        self.batch_size = batch_size
        self.reset_cache()

    def reset_cache(self) -> None:
        self.committed = []

    def forward_cached(self, x, t, actions, commit: int = 0):
        assert x.shape[0] == self.batch_size
        self.passes.append((x.shape[1], commit, [round(float(v), 6) for v in t[0]]))
        for i in range(commit):
            self.committed.append((x[:, i].clone(), actions[:, i].clone(), float(t[0, i])))
        n = len(self.committed)
        return x - (n + actions[..., :1])[..., None, None]


def sampler(steps=2, fused=True, seed=0) -> tuple[FrameSampler, StandIn]:
    cfg = ModelConfig(**CFG)
    model = StandIn(cfg)
    return FrameSampler(model, cfg, steps, shift=1.0, seed=seed, fused=fused), model


def latents(n: int, seed: int = 0) -> torch.Tensor:
    cfg = ModelConfig(**CFG)
    return torch.randn(1, n, cfg.latent_channels, *cfg.latent_size, generator=torch.Generator().manual_seed(seed))


def actions(n: int, move: int = 1) -> torch.Tensor:
    return torch.tensor([[move, 0, 0.0, 0, 0]] * n).view(1, n, 5)


def test_steps_are_passes_on_the_schedule_and_the_fused_commit_rides_the_first():
    s, m = sampler(steps=3)
    s.reset(latents(6), actions(6))
    # the context: sinks + window kept (frames 0, 3, 4, 5), committed in chunks of at most min(window, max_draft)
    assert [(f, c) for f, c, _ in m.passes] == [(3, 3), (1, 1)] and len(m.committed) == 4
    m.passes.clear()
    x = s.next(actions(1))
    ts = [round(float(v), 6) for v in timesteps(3, s.shift)]
    assert [p[:2] for p in m.passes] == [(1, 0)] * 3  # 3 steps, nothing pending yet
    assert [p[2] for p in m.passes] == [[ts[0]], [ts[1]], [ts[2]]]
    assert s.pending == 1 and len(m.committed) == 4  # the frame waits for the next pass
    m.passes.clear()
    s.next(actions(1))
    # the first pass commits the finished frame (at the context noise level) and takes the first step
    assert m.passes[0] == (2, 1, [CFG["context_noise"], ts[0]]) and [p[:2] for p in m.passes[1:]] == [(1, 0)] * 2
    assert torch.equal(m.committed[-1][0], x[:, 0])  # context_noise 0: the latent itself


def test_unfused_sampler_commits_in_a_pass_of_its_own_and_gives_the_same_frames():
    fused, mf = sampler(fused=True)
    plain, mp = sampler(fused=False)
    for s in (fused, plain):
        s.reset(latents(4), actions(4))
    out_f = [fused.next(actions(1, move=i % 2)) for i in range(5)]
    out_p = [plain.next(actions(1, move=i % 2)) for i in range(5)]
    assert all(torch.allclose(a, b) for a, b in zip(out_f, out_p))
    assert sum(c for _, c, _ in mp.passes) == sum(c for _, c, _ in mf.passes) + 1  # the last one: pending
    assert all(c == 0 or f == c for f, c, _ in mp.passes)  # a commit pass commits, and nothing else


def test_drafts_enter_nothing_and_a_rejected_batch_rolls_back_to_the_served_frame():
    """generate(N) commits nothing; `accept` of the first draft only: the next pass commits exactly it,
    and the noise of the next frame is the noise a plain rollout uses (counter-based)."""
    s, m = sampler(steps=2)
    s.reset(latents(4), actions(4))
    before = len(m.committed)
    drafts = s.generate(actions(4))  # 4 frames in one batch per step
    assert drafts.shape[1] == 4 and len(m.committed) == before and s.pending == 0
    s.accept(drafts[:, :1], actions(1))  # the first was served, the other three thrown away
    nxt = s.next(actions(1, move=0))
    assert len(m.committed) == before + 1 and torch.equal(m.committed[-1][0], drafts[:, 0])
    # the same rollout without drafts: the same frames (frame numbers, hence noise, are reused)
    t, mt = sampler(steps=2)
    t.reset(latents(4), actions(4))
    first = t.next(actions(1))
    assert torch.allclose(first, drafts[:, :1]) and torch.allclose(t.next(actions(1, move=0)), nxt)
    assert s.frame_index == t.frame_index


def test_generate_refuses_more_frames_than_max_draft():
    s, _ = sampler()
    s.reset(latents(2), actions(2))
    with pytest.raises(ValueError, match="1..4"):
        s.generate(actions(5))


def engine_on_stand_in(**settings) -> tuple[WorldModel, StandIn]:
    cfg = ModelConfig(**CFG)
    model = StandIn(cfg)
    return WorldModel(cfg, Autoencoder(cfg.autoencoder), model, device="cpu", dtype="float32", **settings), model


def test_speculation_serves_held_drafts_and_commits_exactly_what_was_served():
    wm, m = engine_on_stand_in(steps=2, speculative=3)
    H, W = wm.frame_size
    wm.reset(np.zeros((2, H, W, 3), np.uint8), [HELD, HELD])
    base, passes = len(m.committed), len(m.passes)
    served = [wm.step_latent(a) for a in (HELD, HELD, HELD, Action(move=-1), Action(move=-1))]
    s = wm.stats
    # frame 1: held (as the context's last action) -> 1 + 2 drafts, 2 passes of 3; frames 2, 3 served from
    # them with no pass; frame 4 changed: no drafts, its first pass commits frames 1-3; frame 5 held
    # again: 1 + 2 drafts (still pending), its first pass commits frame 4
    assert (s["drafted"], s["accepted"], s["discarded"], s["pending_drafts"]) == (4, 2, 0, 2)
    assert [(f, c) for f, c, _ in m.passes[passes:]] == [(3, 0), (3, 0), (3 + 1, 3), (1, 0), (1 + 3, 1), (3, 0)]
    wm.sampler.flush()  # commit what is pending now: frames 1..5 in the order served, with their actions
    committed = m.committed[base:]
    assert len(committed) == 5
    for (lat, act, level), frame, a in zip(committed, served, (HELD, HELD, HELD, Action(move=-1), Action(move=-1))):
        assert torch.equal(lat, frame) and level == CFG["context_noise"]
        assert torch.equal(act, a.to_tensor().view(1, -1))
    wm.step_latent(Action(move=1))  # not the drafts' action: they are discarded, never committed
    assert wm.stats["discarded"] == 2 and len(m.committed) == base + 5


def test_configure_checks_everything_before_changing_anything():
    wm, _ = engine_on_stand_in(steps=2)
    before = wm.settings
    with pytest.raises(ValueError, match="speculative"):
        wm.configure(steps=3, speculative=99)  # beyond max_draft
    assert wm.settings == before and wm.sampler.steps == 2
    with pytest.raises(ValueError, match="dtype"):
        wm.configure(dtype="bfloat16")
    wm.configure(steps=3, speculative=2)
    assert (wm.steps, wm.speculative, wm.sampler.steps) == (3, 2, 3)


@pytest.mark.parametrize("fused", [True, False])
def test_frames_enter_the_context_at_the_engines_context_noise_which_can_change_between_frames(fused):
    """The level frames are committed at: the setting, else the checkpoint's sampling default, else the
    model's training level; the fused commit (riding the next frame's first pass) and a commit pass of
    its own both use it, and configure() changes it for the frames committed after."""
    from worldmodel.model.sampler import SamplingDefaults
    cfg = ModelConfig(**CFG)
    model = StandIn(cfg)
    wm = WorldModel(cfg, Autoencoder(cfg.autoencoder), model, device="cpu", dtype="float32", fused=fused,
                    sampling=SamplingDefaults(steps=2, context_noise=0.25))
    assert wm.context_noise == 0.25  # the checkpoint's, over the training level (CFG: 0.0)
    H, W = wm.frame_size
    wm.reset(np.zeros((2, H, W, 3), np.uint8), [HELD, HELD])
    wm.step_latent(HELD)
    wm.configure(context_noise=0.1)
    wm.step_latent(HELD)
    wm.step_latent(HELD)
    wm.sampler.flush()
    levels = [round(level, 6) for _, _, level in model.committed]
    # the 2 context frames at 0.25; frame 1 at 0.25 committed unfused, at 0.1 fused (its commit rode frame 2's pass)
    assert levels == [0.25, 0.25] + ([0.1] if fused else [0.25]) + [0.1, 0.1]
    for _, _, t in model.passes:  # every pass: the committed frames at a context level, the new at the schedule's
        assert set(t) <= {0.25, 0.1, 1.0, 0.5}
    wm.configure(context_noise=None)  # back to the checkpoint's
    assert wm.context_noise == 0.25 and wm.sampler.context_noise == 0.25
    plain = WorldModel(cfg, Autoencoder(cfg.autoencoder), StandIn(cfg), device="cpu", dtype="float32")
    assert plain.context_noise == CFG["context_noise"]  # no sampling default: the training level
    with pytest.raises(ValueError, match=r"context noise must be a number in \[0, 1\)"):
        wm.configure(context_noise=1.0)
    assert wm.context_noise == 0.25
