"""The real-time engine: WorldModel.step over the sampler and the static KV cache, speculative
next-frame sampling, seeds, long rollouts, bad input. CPU, tiny shapes (a few ms a frame)."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from worldmodel.game.action import Action, encode_actions
from worldmodel.model.checkpoint import CheckpointError
from worldmodel.inference.engine import WorldModel, load_start_clips, speculative_match
from worldmodel.device import resolve_dtype
from worldmodel.inference.pipeline import FramePipeline

SMALL = dict(frame_size=(32, 48), latent_channels=4, ae_channels=(8, 8, 8, 8), ae_res_blocks=(0, 0, 0, 0),
             dim=32, depth=2, heads=2, sink_frames=1, window_frames=4, max_draft=4)
HELD = Action(move=1, turn=2.0)



def small_model(seed: int = 0, dtype="float32", cfg=None, **settings) -> WorldModel:
    """A WorldModel in a tiny shape with every transformer weight random (adaLN-Zero would otherwise
    make the velocity exactly zero and every test trivially pass)."""
    wm = WorldModel.from_preset("tiny", device="cpu", seed=seed, dtype=dtype, cfg_overrides={**SMALL, **(cfg or {})},
                                **settings)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in wm.transformer.parameters():
            scale = 1.0 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return wm


def context(wm: WorldModel, n: int = 6, seed: int = 0, action: Action = Action(move=1)):
    H, W = wm.frame_size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8), [action] * n


def rollout(wm: WorldModel, actions, seed_context: int = 0, context_action: Action = Action(move=1)) -> np.ndarray:
    wm.reset(*context(wm, seed=seed_context, action=context_action))
    return np.stack([wm.step(a) for a in actions])


def changing_actions(n: int) -> list[Action]:
    """Every action differs from the one before: no action is held, nothing is drafted."""
    return [Action(move=1 - i % 3, turn=float((i * 7) % 11 - 5)) for i in range(n)]


def held_once_actions(n: int) -> list[Action]:
    """Each action twice, then another: drafts are made on every second frame and all rejected."""
    return [Action(move=-1 + (i // 2) % 3, turn=float((i // 2 * 7) % 11 - 5)) for i in range(n)]


# -- determinism ----------------------------------------------------------------------------------
def test_same_seed_gives_the_same_frames_and_another_seed_other_frames():
    acts = changing_actions(12)
    a = rollout(small_model(steps=2, seed=3), acts)
    b = rollout(small_model(steps=2, seed=3), acts)
    c = rollout(small_model(steps=2, seed=3), acts[:5])
    assert a.dtype == np.uint8 and a.shape == (12, 32, 48, 3)
    assert np.array_equal(a, b)
    assert np.array_equal(a[:5], c)
    wm = small_model(steps=2, seed=3)
    wm.seed = 4
    assert not np.array_equal(a, rollout(wm, acts))
    wm.seed = 3  # reseeding and resetting replays the rollout
    assert np.array_equal(a, rollout(wm, acts))


def test_fused_commit_gives_the_same_frames_as_a_separate_commit_pass():
    acts = changing_actions(15)  # wraps the 4-frame window several times
    fused = rollout(small_model(steps=2, dtype="float64"), acts)
    separate = rollout(small_model(steps=2, dtype="float64", fused=False), acts)
    assert np.array_equal(fused, separate)
    f32 = rollout(small_model(steps=2), acts)
    f32_separate = rollout(small_model(steps=2, fused=False), acts)
    assert np.abs(f32.astype(int) - f32_separate).max() <= 1  # float32 rounding, uint8 steps


# -- speculative sampling -----------------------------------------------------------------------------
def test_speculation_off_is_plain_sampling():
    """speculative=1 is the plain sampler: frames equal to FrameSampler.next + decode by hand."""
    acts = changing_actions(6) + [HELD] * 6
    wm = small_model(steps=2, speculative=1)
    frames = rollout(wm, acts)
    assert wm.stats["drafted"] == wm.stats["accepted"] == wm.stats["discarded"] == 0
    ref = small_model(steps=2)
    ref.reset(*context(ref))
    with torch.inference_mode():
        for i, a in enumerate(acts):
            latent = ref.sampler.next(a.to_tensor().view(1, 1, -1))
            assert np.array_equal(ref.autoencoder.decode_uint8(latent[:, 0].contiguous(
                memory_format=torch.channels_last))[0].numpy(), frames[i])


@pytest.mark.parametrize("n", [2, 4])
def test_speculation_whose_drafts_are_all_rejected_equals_plain_sampling(n):
    acts = held_once_actions(10)
    plain = rollout(small_model(steps=2, dtype="float64"), acts)
    wm = small_model(steps=2, dtype="float64", speculative=n)
    spec = rollout(wm, acts)
    assert np.array_equal(plain, spec)
    s = wm.stats
    assert s["accepted"] == 0 and s["drafted"] == 5 * (n - 1) and s["discarded"] == 4 * (n - 1)
    assert s["acceptance_rate"] == 0.0 and s["pending_drafts"] == n - 1
    # an action that changes every frame is never "held": nothing is drafted
    wm.reset_stats()
    rollout(wm, changing_actions(6))
    assert wm.stats["drafted"] == 0


def test_rejected_speculation_leaves_the_cache_exactly_as_before():
    """Drafts never enter the ring buffer: drafting and then discarding them leaves every cache buffer
    bitwise as it was; the next pass commits only the frame that was served (the rollback point)."""
    wm = small_model(steps=2, speculative=4)
    wm.reset(*context(wm, action=HELD))
    before = wm.transformer.cache_snapshot()
    wm.step(HELD)  # held: one frame served, 3 drafted; nothing enters the cache
    assert wm.stats["drafted"] == 3 and wm.sampler.pending == 1
    after = wm.transformer.cache_snapshot()
    assert all(torch.equal(after[k], before[k]) for k in before)
    wm._discard_drafts()  # what a rejection does to the drafts
    assert all(torch.equal(b, before[k]) for k, b in wm.transformer.cache_snapshot().items())
    assert wm.stats["discarded"] == 3 and wm.sampler.pending == 1
    # the next action differs: a new batch, whose first pass commits exactly the served frame -- what a
    # model that never drafted holds after committing the same frame (to float32 rounding: the passes
    # batch different numbers of frames, and BLAS rounds a row differently for different batch sizes)
    latent_served = wm.sampler._pending[0][0].clone()
    wm.step(Action(move=-1))
    assert wm.stats["discarded"] == 3 and wm.stats["accepted"] == 0 and wm.stats["drafted"] == 3  # not held: no drafts
    twin = small_model(steps=2, speculative=1)
    twin.reset(*context(twin, action=HELD))
    twin.sampler.accept(latent_served, HELD.to_tensor().view(1, 1, -1))
    twin.step(Action(move=-1))
    mine, theirs = wm.transformer.cache_snapshot(), twin.transformer.cache_snapshot()
    assert torch.equal(mine["slot_frame"], theirs["slot_frame"]) and torch.equal(mine["count"], theirs["count"])
    assert all((mine[k] - theirs[k]).abs().max() < 1e-5 for k in ("k", "k_rot", "v"))
    # the rejected drafts' frame numbers are reused: the same noise a plain rollout would use
    assert wm.sampler.frame_index == twin.sampler.frame_index


def test_held_action_serves_drafts_without_model_passes():
    wm = small_model(steps=2, speculative=4)
    passes = []
    forward = wm.sampler.forward
    wm.sampler.forward = lambda *a, **k: passes.append(a[0].shape[1]) or forward(*a, **k)
    rollout(wm, [HELD] * 8, context_action=HELD)
    s = wm.stats
    assert (s["frames"], s["drafted"], s["accepted"], s["discarded"]) == (8, 6, 6, 0)
    assert s["acceptance_rate"] == 1.0
    # context: sink + last 4 of 6 frames (passes of 4 + 1), then 2 batches x 2 steps of 4 frames; the
    # 2nd batch's first pass also commits the 4 frames served so far
    assert passes == [4, 1, 4, 4, 8, 4]
    wm.reset_stats()
    assert wm.stats == {"frames": 0, "drafted": 0, "accepted": 0, "discarded": 0, "acceptance_rate": None,
                        "pending_drafts": 0}


def test_speculative_match_rule():
    a = Action(move=1, strafe=-1, turn=3.0, attack=True)
    assert speculative_match(a, a, 0.0)
    assert speculative_match(a, Action(move=1, strafe=-1, turn=3.5, attack=True), 0.5)
    assert not speculative_match(a, Action(move=1, strafe=-1, turn=3.6, attack=True), 0.5)
    assert not speculative_match(a, Action(move=1, strafe=-1, turn=3.0, attack=False), 15.0)
    assert not speculative_match(a, Action(move=0, strafe=-1, turn=3.0, attack=True), 15.0)
    wm = small_model(steps=1, speculative=3, speculative_tolerance=1.0)
    rollout(wm, [Action(turn=2.0), Action(turn=2.9), Action(turn=1.5)], context_action=Action(turn=2.0))
    assert wm.stats["accepted"] == 2  # within 1 degree of 2.0: served
    rollout(wm, [Action(turn=2.0), Action(turn=2.0)], context_action=Action(turn=4.0))
    assert wm.stats["accepted"] == 2 and wm.stats["drafted"] == 4  # 2.0 after 4.0 is not held: no drafts


# -- long rollouts ------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc for RSS")
def test_ten_thousand_frames_at_constant_memory():
    wm = small_model(steps=1, cfg=dict(dim=16, depth=1, heads=1, frame_size=(16, 16), window_frames=3))
    wm.reset(*context(wm, n=4))
    buffers = {name: (b.data_ptr(), tuple(b.shape)) for name, b in wm.transformer.named_buffers()}
    acts = changing_actions(50)
    rss, times = {}, []
    for i in range(10_000):
        t0 = time.perf_counter()
        frame = wm.step(acts[i % 50])
        times.append(time.perf_counter() - t0)
        if i in (999, 9_999):
            rss[i] = _rss_mb()
    assert frame.shape == (16, 16, 3) and frame.dtype == np.uint8
    assert {name: (b.data_ptr(), tuple(b.shape)) for name, b in wm.transformer.named_buffers()} == buffers
    assert int(wm.transformer.slots.count) == 4 + 10_000 - 1  # the last frame waits to be committed by the next pass
    assert wm.sampler.pending == 1 and wm.stats["frames"] == 10_000
    assert rss[9_999] - rss[999] < 25, rss  # MB over 9,000 frames
    assert all(math.isfinite(v) for v in wm.sampler._pending[0][0].flatten().tolist())
    # no slowdown: the last thousand frames are not slower than the second thousand (generous: shared CPU)
    assert np.median(times[-1000:]) < 3 * np.median(times[1000:2000])


# -- settings, compile ----------------------------------------------------------------------------------
def test_settings_are_attributes_and_validated():
    wm = small_model(steps=3, speculative=2, seed=5)
    assert (wm.steps, wm.speculative, wm.seed, wm.attention, wm.compile) == (3, 2, 5, "sdpa", False)
    wm.steps, wm.speculative, wm.attention, wm.speculative_tolerance = 1, 4, "torch", 0.0
    assert (wm.steps, wm.speculative, wm.attention) == (1, 4, "torch")
    for name, bad in [("steps", 0), ("steps", 1.5), ("speculative", 0), ("speculative", 5), ("speculative", True),
                      ("speculative_tolerance", -1.0), ("speculative_tolerance", float("nan")), ("seed", "x")]:
        with pytest.raises(ValueError):
            setattr(wm, name, bad)
    with pytest.raises(ValueError):
        wm.attention = "nope"
    with pytest.raises(ValueError):
        small_model(speculative=9)
    auto = WorldModel.from_preset("tiny", device="auto", cfg_overrides=SMALL)
    assert wm.device.type == "cpu" and auto.device.type == ("cuda" if torch.cuda.is_available() else
                                                            "mps" if torch.backends.mps.is_available() else "cpu")


def test_compile_modes_are_settings():
    """compile: False/True or a mode's name; each on-mode wraps the passes (compiled on first use, not
    here), off restores the eager ones; a mode this device lacks is refused and changes nothing."""
    wm = small_model()
    eager = wm.sampler.forward
    wm.compile = "inductor"
    assert wm.compile == "inductor" and wm.sampler.forward is not eager
    wm.compile = True
    assert wm.compile is True
    wm.compile = "off"
    assert wm.compile is False and wm.sampler.forward == wm.transformer.forward_cached
    assert wm._decode == wm._decode_eager
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            wm.compile = "graphs"
        assert wm.compile is False
    with pytest.raises(ValueError, match="off, on, inductor, graphs"):
        wm.compile = "fast"


@pytest.mark.slow
def test_compiled_step_matches_eager_on_cpu():
    """torch.compile (inductor) of the per-frame passes and the decoder gives the eager frames to a uint8
    level. Compiled from the second frame on, at one step: only the steady-state graphs (a pass that
    commits one frame and denoises one, and the decoder) are built, which keeps the C++ compile short."""
    torch._dynamo.reset()
    acts = changing_actions(5)
    eager = rollout(small_model(steps=1, cfg=dict(depth=1)), acts)
    wm = small_model(steps=1, cfg=dict(depth=1))
    wm.reset(*context(wm))
    frames = [wm.step(acts[0])]
    wm.compile = True
    frames += [wm.step(a) for a in acts[1:]]
    assert wm.compile
    assert np.abs(np.stack(frames).astype(int) - eager).max() <= 1
    assert not np.array_equal(frames[1], frames[2])  # the frames move: the comparison is not trivial
    wm.compile = False
    assert np.abs(rollout(wm, acts).astype(int) - eager).max() <= 1


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors():
    wm = small_model()
    with pytest.raises(RuntimeError, match="before reset"):
        wm.step(HELD)
    frames, actions = context(wm, n=3)
    with pytest.raises(ValueError, match="uint8"):
        wm.reset(frames.astype(np.float32), actions)
    with pytest.raises(ValueError, match=r"\(N, 32, 48, 3\)"):
        wm.reset(frames[:, :16], actions)
    with pytest.raises(ValueError, match="single frame"):
        wm.reset(frames[0], actions[:1])
    with pytest.raises(ValueError, match="one Action per frame"):
        wm.reset(frames, actions[:2])
    with pytest.raises(ValueError, match="one Action per frame"):
        wm.reset(frames, [{"move": 1}] * 3)
    for bad in [dict(move=2), dict(turn=float("nan")), dict(turn=20.0), dict(attack=3)]:
        with pytest.raises(ValueError):
            Action(**bad)
    wm.reset(frames, actions)
    with pytest.raises(ValueError, match="needs an Action"):
        wm.step({"move": 1})
    assert wm.step(HELD).shape == (32, 48, 3)


# -- start clips ----------------------------------------------------------------------------------------
def test_load_start_clips(tmp_path):
    (tmp_path / "start_clips").mkdir()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    acts = [Action(move=1, turn=1.5), Action(), Action(strafe=-1), Action(use=True), Action(attack=True)]
    np.savez(tmp_path / "start_clips" / "a.npz", frames=frames, actions=encode_actions(acts).numpy())
    clips = load_start_clips(tmp_path, frame_size=(32, 48))
    assert len(clips) == 1 and np.array_equal(clips[0][0], frames) and clips[0][1] == acts
    assert load_start_clips(tmp_path / "nothing") == []
    np.savez(tmp_path / "start_clips" / "b.npz", frames=frames.astype(np.float32), actions=encode_actions(acts).numpy())
    with pytest.raises(CheckpointError, match="b.npz"):
        load_start_clips(tmp_path)
    (tmp_path / "start_clips" / "b.npz").unlink()
    np.savez(tmp_path / "start_clips" / "c.npz", frames=frames, actions=np.array([object()] * 5))
    with pytest.raises(CheckpointError, match="c.npz"):  # object arrays need pickle: refused
        load_start_clips(tmp_path)


def test_pretrained_round_trip_with_settings(tmp_path):
    wm = small_model(seed=2)
    wm.save_pretrained(tmp_path / "ckpt")
    wm2 = WorldModel.from_pretrained(tmp_path / "ckpt", device="cpu", steps=1, speculative=2, seed=2, dtype="float32")
    assert (wm2.steps, wm2.speculative, wm2.seed) == (1, 2, 2)
    wm.steps = 1
    wm.speculative = 2
    acts = changing_actions(4)
    assert np.array_equal(rollout(wm, acts), rollout(wm2, acts))


# -- few-step distillation ------------------------------------------------------------------------------
def test_distillation_brings_a_one_step_student_to_the_teachers_many_step_result():
    """The machinery of `worldmodel distill` on a tiny random teacher and random clips: the 1-step
    student's sample lands ~10x closer to the teacher's 16-step sample than the teacher's own 1 step."""
    from worldmodel.model.diffusion import add_noise
    from worldmodel.training.distill import DistillConfig, distill_student
    from worldmodel.training.distill_objectives import commit_context, teacher_targets
    from worldmodel.model.transformer import ModelConfig, WorldTransformer

    cfg = ModelConfig(**{**SMALL, "window_frames": 3})
    torch.manual_seed(0)
    teacher = WorldTransformer(cfg).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn_like(p) * (1 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1))
    K, shape = cfg.cache_frames, (cfg.latent_channels, *cfg.latent_size)

    class Clips:  # clips.LatentClips' interface
        def batch(self, step, b, lo, hi, seed):
            g = torch.Generator().manual_seed(step % 16)
            return torch.randn(b, K + 1, *shape, generator=g), torch.randn(b, K + 1, 5, generator=g).clamp(-1, 1)

    def gap(model, n=16):  # mean squared distance of a 1-step sample from the teacher's 16-step one
        g = torch.Generator().manual_seed(999)
        x0, a = Clips().batch(100, n, 0, n, 0)
        t_ctx = torch.full((n, K), cfg.context_noise)
        ctx = add_noise(x0[:, :-1], torch.randn(x0[:, :-1].shape, generator=g), t_ctx)
        z = torch.randn(n, 1, *shape, generator=g)
        one, zero = torch.ones(n), torch.zeros(n)
        ref = z - teacher_targets(teacher, cfg, ctx, t_ctx, a[:, :-1], z, a[:, -1:], one, zero, 16)
        with torch.inference_mode():
            commit_context(model, cfg, ctx, t_ctx, a[:, :-1])
            x = z - model.forward_cached(z, torch.ones(n, 1), a[:, -1:])
        return (x - ref).pow(2).mean().item()

    student, curves = distill_student(teacher, cfg, Clips(), 1, shift=1.0, progress=False,
                                      config=DistillConfig(teacher_steps=16, iters=60, batch=8, lr=1e-3, ema=0.9))
    losses = curves["regression"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    before, after = gap(teacher), gap(student)
    assert after < 0.25 * before, (before, after)
    assert sorted(student.state_dict()) == sorted(teacher.state_dict())  # same architecture, same format


def test_bfloat16_engine_runs_and_stays_close_to_float32():
    acts = changing_actions(6)
    f32 = rollout(small_model(steps=2), acts)
    wm = small_model(steps=2, dtype="bfloat16")
    assert wm.transformer.blocks[0].attn.kv_cache.k.dtype == torch.bfloat16 and wm.autoencoder.decoder.stem.weight.dtype == torch.float32
    bf16 = rollout(wm, acts)
    assert bf16.dtype == np.uint8 and np.abs(bf16.astype(int) - f32).mean() < 2.0


def test_auto_dtype_is_bfloat16_only_on_cpus_with_native_bf16(monkeypatch):
    import worldmodel.device as engine  # where the engine's device choices live

    monkeypatch.setattr(engine, "native_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # still overridable
    monkeypatch.setattr(engine, "native_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    wm = small_model(dtype="auto")
    assert wm.dtype == torch.float32 and wm.transformer.blocks[0].attn.kv_cache.k.dtype == torch.float32


def test_packed_linear_weights_give_the_plain_linears_result():
    """The engine keeps oneDNN-packed copies of the linear weights on CPU; a pass with them equals one
    without, and a weight changed afterwards is used as it is now (the stale copy is ignored)."""
    import copy

    from worldmodel.model.linear import _PACKED, linear, pack_linears

    layer = torch.nn.Linear(32, 48)
    x = torch.randn(2, 5, 32)
    with torch.inference_mode():
        plain = linear(x, layer, gelu=True)
        assert pack_linears(layer) == 1 and layer in _PACKED
        packed = linear(x, layer, gelu=True)
        assert torch.allclose(packed, torch.nn.functional.gelu(layer(x), approximate="tanh"), atol=1e-5)
        assert torch.allclose(packed, plain, atol=1e-6)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    with torch.inference_mode():
        assert torch.allclose(linear(x, layer), layer(x), atol=1e-5)
        twin = copy.deepcopy(layer)  # a deep copy (gymnasium's checker makes one) has no packed copy, and works
        assert twin not in _PACKED and torch.allclose(linear(x, twin), layer(x), atol=1e-5)
        pack_linears(layer)
        layer.weight.data = torch.randn(48, 32)  # a replaced weight (same version counter): not the stale copy
        assert torch.allclose(linear(x, layer), layer(x), atol=1e-5)
    acts = changing_actions(5)
    wm = WorldModel.from_preset("tiny", device="cpu", cfg_overrides=SMALL)  # packed at construction
    assert all(m in _PACKED for m in wm.transformer.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():  # nonzero adaLN weights (zero-initialised), the same way in both models
        for m in wm.transformer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(0.05)
    pack_linears(wm.transformer)
    unpacked = WorldModel.from_preset("tiny", device="cpu", cfg_overrides=SMALL)
    with torch.no_grad():
        for m in unpacked.transformer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(0.05)  # and now its packed copies are stale: the plain path
    assert np.abs(rollout(wm, acts).astype(int) - rollout(unpacked, acts)).max() <= 1


# -- the two-stage pipeline ----------------------------------------------------------------------------
def test_pipelined_loop_gives_exactly_the_frames_of_the_plain_loop():
    """step = decode(step_latent): decoding frame t on another thread while frame t+1 is generated
    gives the same frames in the same order, drafts and all (the render thread is made slow so that
    the generator runs ahead of it)."""
    acts = changing_actions(5) + [HELD] * 7 + held_once_actions(6)
    plain = rollout(small_model(steps=2, speculative=3), acts)
    wm = small_model(steps=2, speculative=3)
    wm.reset(*context(wm))
    got, threads = [], set()

    def slow_decode(latent):
        time.sleep(0.01)
        threads.add(__import__("threading").get_ident())
        return wm.decode(latent)

    with FramePipeline(wm.step_latent, slow_decode, lambda f, i, t: got.append((i, f)), threaded=True) as pipe:
        for i, a in enumerate(acts):
            pipe.submit(a, tag=i)
        assert pipe.flush(timeout=30)
    assert [i for i, _ in got] == list(range(len(acts)))
    assert np.array_equal(np.stack([f for _, f in got]), plain)
    assert wm.stats["accepted"] > 0 and __import__("threading").get_ident() not in threads


def test_pipeline_hands_errors_over_and_leaves_no_thread_behind():
    import threading

    before = set(threading.enumerate())

    def render(x):
        if x == 3:
            raise ValueError("bad frame")
        return x * 10

    out = []
    pipe = FramePipeline(lambda x: x, render, lambda f, i, t: out.append(f), threaded=True)
    for x in range(5):
        pipe.submit(x)
    pipe.flush(timeout=10)
    assert out[:3] == [0, 10, 20] and isinstance(out[3], ValueError) and out[4] == 40
    pipe.close()
    with pytest.raises(ZeroDivisionError):  # stage 1 fails in the caller's thread
        FramePipeline(lambda x: 1 / x, render, lambda *a: None, threaded=False).submit(0)
    assert set(threading.enumerate()) == before
    with pytest.raises(RuntimeError, match="after close"):
        pipe.submit(1)


def test_engine_chooses_threads_and_pipeline_and_they_are_settable(monkeypatch):
    import worldmodel.device as engine  # where the engine's device choices live

    n = torch.get_num_threads()
    try:
        monkeypatch.setattr(engine, "cpu_cores", lambda: 2)
        wm = small_model()
        assert wm.threads == 1 and torch.get_num_threads() == 1 and wm.pipeline is True
        wm.threads, wm.pipeline = 2, False
        assert torch.get_num_threads() == 2 and wm.pipeline is False
        monkeypatch.setattr(engine, "cpu_cores", lambda: 1)
        wm.threads, wm.pipeline = "auto", "auto"
        assert wm.threads == 1 and wm.pipeline is False  # one core: nothing to overlap with
        for bad in (("threads", 0), ("threads", "many"), ("pipeline", "yes")):
            with pytest.raises(ValueError, match=bad[0]):
                setattr(wm, *bad)
    finally:
        torch.set_num_threads(n)
