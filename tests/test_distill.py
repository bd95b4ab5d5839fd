"""`worldmodel distill`'s student objectives (regression, adversarial, dmd): each update moves only its own
model (the teacher never; the student's loss never the critic or the fake score; the critic's loss never
the student), the distillation's two paths (a pass over the whole clip, the KV cache the engine uses)
agree for models with and without the previous frame as input, each new flag refuses a bad value with
one line, and a short run of every objective gives finite losses and checkpoints that load and play.
Tiny shapes throughout (32x32 frames, 16 tokens a frame, dim 64, 2 blocks)."""
import json
import math

import numpy as np
import pytest
import torch

from worldmodel.training.distill import OBJECTIVES, DistillConfig, Distillation, distill_student
from worldmodel.training.distill_objectives import (Clip, Guidance, commit_context, schedule, student_sample,
                                                    teacher_targets, velocity)
from worldmodel.model.transformer import WorldTransformer

from test_model import tiny_config
from test_train import make_dataset


def active_teacher(cfg, seed=0) -> WorldTransformer:
    torch.manual_seed(seed)
    model = WorldTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero would make the blocks identities and the output zero
            p.normal_(0.0, 0.05)
    return model.eval()


def batch(cfg, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = cfg.cache_frames
    return (torch.randn(n, K + 1, cfg.latent_channels, *cfg.latent_size, generator=g),
            torch.randn(n, K + 1, cfg.action_dim, generator=g).clamp(-1, 1))


def scene(prev_frame: bool, seed: int):
    """A teacher, a clip laid out as the engine sees it, its actions, a noisy target frame x and three
    intervals [t_a, t_b] of the flow, all from `seed` on."""
    cfg = tiny_config(prev_frame=prev_frame)
    model = active_teacher(cfg, seed=seed)
    x0, a = batch(cfg, seed=seed + 1)
    clip = Clip.of(cfg, x0, a, torch.Generator().manual_seed(seed + 2))
    x = torch.randn(clip.target.shape, generator=torch.Generator().manual_seed(seed + 3))
    return cfg, model, a, clip, x, torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.4, 0.1, 0.0])


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("objective, self_forcing", [(o, 0) for o in OBJECTIVES] + [("regression", 2), ("dmd", 2)])
def test_each_update_moves_only_its_own_model(objective, self_forcing):
    """The student's step leaves the teacher and the critic (the adversarial critic with its spectral-norm
    state, or DMD's fake score) bit-identical; the critic's step leaves the student and the teacher.
    Self-forced clips too: the student's rollout that makes them moves nothing."""
    cfg = tiny_config(prev_frame=True)
    d = Distillation(active_teacher(cfg), cfg, 2, objective, shift=1.0,
                     config=DistillConfig(lr=1e-3, critic_lr=1e-3, self_forcing=self_forcing))
    x0, a = batch(cfg)
    g = torch.Generator().manual_seed(1)
    teacher, student = state(d.teacher), state(d.student)
    clip = d.clip(x0, a, g, seed=9)
    assert same(state(d.teacher), teacher) and same(state(d.student), student)
    critic = None if d.critic is None else state(d.critic)
    losses, sample = d.student_step(clip, g)
    assert all(math.isfinite(v) for v in losses.values())
    assert same(state(d.teacher), teacher)
    assert not same(state(d.student), student)
    if objective == "regression":
        assert d.critic is None and sample is None
        return
    assert objective in losses and sample.shape == clip.target.shape and not sample.requires_grad
    assert same(state(d.critic), critic)
    teacher, student = state(d.teacher), state(d.student)
    assert math.isfinite(d.critic_step(clip, sample, g)["critic"])
    assert same(state(d.teacher), teacher) and same(state(d.student), student)
    assert not same(state(d.critic), critic)


def test_self_forced_clips_hold_the_students_own_rollout():
    """With --self-forcing K the last K context frames are what the engine's sampler makes from the real
    frames before them with the student (its steps, the given seed), committed at the context noise
    level like the real ones; the real frames before them and the real target are left as they were."""
    from worldmodel.model.sampler import FrameSampler

    cfg = tiny_config(prev_frame=True)
    k, steps, seed = 2, 2, 9
    d = Distillation(active_teacher(cfg), cfg, steps, "dmd", shift=1.0, config=DistillConfig(self_forcing=k))
    with torch.no_grad():  # the student has moved off the teacher: its own rollout, not the teacher's
        for p in d.student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x0, a = batch(cfg)
    real = cfg.cache_frames - k
    clip = d.clip(x0, a, torch.Generator().manual_seed(1), seed)
    sampler = FrameSampler(d.student.eval(), cfg, steps, shift=1.0, seed=seed, batch_size=x0.shape[0])
    sampler.reset(x0[:, :real], a[:, :real])
    own = torch.cat([sampler.next(a[:, real + i:real + i + 1]) for i in range(k)], 1)
    expected = Clip.of(cfg, torch.cat((x0[:, :real], own, x0[:, real + k:]), 1), a, torch.Generator().manual_seed(1))
    plain = Clip.of(cfg, x0, a, torch.Generator().manual_seed(1))
    torch.testing.assert_close(clip.ctx, expected.ctx, atol=1e-5, rtol=1e-4)
    assert torch.equal(clip.ctx[:, :real], plain.ctx[:, :real]) and torch.equal(clip.target, plain.target)
    assert (clip.ctx[:, real:] - plain.ctx[:, real:]).abs().mean() > 0.1  # not the real frames
    assert torch.equal(clip.t_ctx, plain.t_ctx) and torch.equal(clip.actions, a)


@pytest.mark.parametrize("objective", ["adversarial", "dmd"])
def test_the_critics_say_reaches_the_student_through_its_sample(objective):
    """The adversarial / DMD term moves the student (its gradient flows back through the student's sample):
    the same step on the same batch and noise lands elsewhere with the term than with its weight at 0.
    DMD's fake score starts as the teacher (no signal yet), so it is moved off it first, alike in both."""
    cfg = tiny_config(prev_frame=True)
    teacher = active_teacher(cfg)
    x0, a = batch(cfg)
    after = []
    for weight in (0.0, 1.0):
        torch.manual_seed(2)  # the same critic in both
        d = Distillation(teacher, cfg, 2, objective, shift=1.0, config=DistillConfig(lr=1e-3, critic_lr=1e-3))
        if objective == "dmd":
            with torch.no_grad():
                for p in d.critic.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        g = torch.Generator().manual_seed(1)
        losses, _ = d.student_step(Clip.of(cfg, x0, a, g), g, extra_weight=weight)
        assert losses[objective] != 0.0
        after.append(state(d.student))
    assert not same(*after)


def test_action_guidance_amplifies_only_what_the_action_changes():
    """DMD's guided teacher score, v_still + w (v_action - v_still): for a frame whose action is standing
    still it is the plain score whatever w is; for a moving one, w moves the student's gradient; and a
    teacher that ignores actions (its action embedding zeroed) is not guided at all."""
    from worldmodel.training.distill_objectives import dmd_loss

    cfg = tiny_config(prev_frame=True)
    teacher, fake = active_teacher(cfg, seed=0), active_teacher(cfg, seed=1)
    x0, a = batch(cfg)
    sample = torch.randn(x0[:, -1:].shape, generator=torch.Generator().manual_seed(5))

    def loss(model, actions, w):
        clip = Clip.of(cfg, x0, actions, torch.Generator().manual_seed(1))
        return dmd_loss(sample, model, fake, clip, torch.Generator().manual_seed(3), Guidance(w)).item()

    from worldmodel.game.action import NOOP

    still = a.clone()
    still[:, -1] = torch.tensor(NOOP.to_vector())
    assert loss(teacher, still, 1.0) == loss(teacher, still, 3.0)
    moving = [loss(teacher, a, w) for w in (1.0, 2.0, 3.0)]
    assert all(math.isfinite(v) for v in moving) and len(set(moving)) == 3
    blind = active_teacher(cfg, seed=0)
    with torch.no_grad():
        blind.action_embed[2].weight.zero_()
    assert loss(blind, a, 1.0) == loss(blind, a, 3.0)


def test_guided_regression_targets_are_the_guided_teachers_flow():
    """The regression objective's targets under action guidance w: one sub-step's secant is exactly
    v_still + w (v_action - v_still) from the teacher's own passes (the standing-still pass leaves the KV
    cache as it was); over several sub-steps, a standing-still frame's targets do not depend on w, a
    moving frame's do, and a teacher blind to actions is not guided at all. Guiding only some fields
    keeps the others on both sides: a frame that only turns is not guided by ("move", "strafe")."""
    from worldmodel.game.action import FIELDS, NOOP

    cfg, teacher, a, clip, x, t_a, t_b = scene(prev_frame=True, seed=0)

    def targets(model, actions, w, substeps=1, fields=FIELDS):
        return teacher_targets(model, cfg, clip.ctx, clip.t_ctx, actions[:, :-1], x, actions[:, -1:], t_a, t_b,
                               substeps, Guidance(w, fields))

    with torch.no_grad():
        v_action = velocity(teacher, clip, x, t_a)
        v_still = velocity(teacher, clip.without_action(Guidance(2.5)), x, t_a)
    assert (v_action - v_still).abs().mean() > 1e-3
    torch.testing.assert_close(targets(teacher, a, 2.5), v_still + 2.5 * (v_action - v_still), atol=1e-5, rtol=1e-4)
    still = a.clone()
    still[:, -1] = torch.tensor(NOOP.to_vector())
    torch.testing.assert_close(targets(teacher, still, 3.0, 4), targets(teacher, still, 1.0, 4))
    moving = [targets(teacher, a, w, 4) for w in (1.0, 2.0)]
    assert (moving[0] - moving[1]).abs().mean() > 1e-3
    turning = still.clone()
    turning[:, -1, FIELDS.index("turn")] = 0.5
    walking = ("move", "strafe")
    torch.testing.assert_close(targets(teacher, turning, 3.0, 4, walking), targets(teacher, turning, 1.0, 4))
    assert (targets(teacher, turning, 3.0, 4) - targets(teacher, turning, 1.0, 4)).abs().mean() > 1e-3
    assert (targets(teacher, a, 3.0, 4, walking) - targets(teacher, a, 1.0, 4)).abs().mean() > 1e-3
    blind = active_teacher(cfg, seed=0)
    with torch.no_grad():
        blind.action_embed[2].weight.zero_()
    torch.testing.assert_close(targets(blind, a, 3.0, 4), targets(blind, a, 1.0, 4))


def test_centred_guidance_amplifies_the_response_but_not_its_mean_over_the_frame():
    """`Guidance(centred=True)`: one sub-step's target has, channel by channel, the frame mean of the
    unguided target (the overall brightness and colour are the teacher's own) while what varies over the
    frame is amplified as plain guidance amplifies it."""
    cfg, teacher, a, clip, x, t_a, t_b = scene(prev_frame=True, seed=0)

    def targets(guidance):
        return teacher_targets(teacher, cfg, clip.ctx, clip.t_ctx, a[:, :-1], x, a[:, -1:], t_a, t_b, 1, guidance)

    plain, guided, centred = targets(Guidance()), targets(Guidance(3.0)), targets(Guidance(3.0, centred=True))
    mean = lambda v: v.mean(dim=(-2, -1))  # noqa: E731
    torch.testing.assert_close(mean(centred), mean(plain), atol=1e-5, rtol=1e-4)
    assert (mean(guided) - mean(plain)).abs().max() > 1e-3
    torch.testing.assert_close(centred - mean(centred)[..., None, None], guided - mean(guided)[..., None, None],
                               atol=1e-5, rtol=1e-4)
    assert str(Guidance(3.0, centred=True)).endswith("w = 3, centred")


def test_backing_off_is_guided_by_its_own_weight():
    """`Guidance(back=...)`: in one batch, the frame that backs off (move < 0) gets the regression targets
    of guidance at the backing-off weight, the frames that walk forward or stand still those of the plain
    weight; the card says both; a backing-off weight without the move field guided is refused."""
    from worldmodel.game.action import FIELDS

    cfg, teacher, a, clip, x, t_a, t_b = scene(prev_frame=True, seed=0)
    a = a.clone()
    move = FIELDS.index("move")
    a[:, -1, move] = torch.tensor([-1.0, 1.0, 0.0])  # backs off, walks forward, stands (turns, strafes) still
    walking = ("move", "strafe")

    def targets(guidance):
        return teacher_targets(teacher, cfg, clip.ctx, clip.t_ctx, a[:, :-1], x, a[:, -1:], t_a, t_b, 4, guidance)

    both, plain, hard = targets(Guidance(2.0, walking, back=5.0)), targets(Guidance(2.0, walking)), \
        targets(Guidance(5.0, walking))
    torch.testing.assert_close(both[0], hard[0])
    torch.testing.assert_close(both[1:], plain[1:])
    assert (hard[0] - plain[0]).abs().mean() > 1e-3
    assert Guidance(1.0, walking, back=3.0).active and not Guidance(1.0, walking, back=1.0).active
    assert str(Guidance(2.0, walking, back=4.0)) == "the teacher guided by the action (move, strafe), w = 2, " \
                                                    "backing off w = 4"
    with pytest.raises(ValueError, match="move"):
        Guidance(2.0, ("strafe",), back=4.0)


def test_a_guidance_interval_guides_only_the_noise_levels_inside_it():
    """`Guidance(interval=(lo, hi))`: over four sub-steps, the sample whose sub-steps all start at noise
    levels inside (lo, hi] gets plain guidance's targets, the one whose sub-steps are all below lo the
    unguided teacher's, and the one that starts inside and ends below lo neither; the card says which
    levels; an empty or out-of-range interval is refused."""
    cfg, teacher, a, clip, x, t_a, t_b = scene(prev_frame=True, seed=0)  # t_a 0.9, 0.5, 0.2; t_b 0.4, 0.1, 0

    def targets(guidance):
        return teacher_targets(teacher, cfg, clip.ctx, clip.t_ctx, a[:, :-1], x, a[:, -1:], t_a, t_b, 4, guidance)

    # sub-steps start at 0.9 .. 0.525 (inside), 0.5 (inside) then 0.4 .. 0.2, and 0.2 .. 0.05 (all below)
    limited, guided, plain = targets(Guidance(3.0, interval=(0.45, 1.0))), targets(Guidance(3.0)), targets(Guidance())
    torch.testing.assert_close(limited[0], guided[0])
    torch.testing.assert_close(limited[2], plain[2])
    assert (guided[2] - plain[2]).abs().mean() > 1e-3
    assert (limited[1] - guided[1]).abs().mean() > 1e-4 and (limited[1] - plain[1]).abs().mean() > 1e-4
    assert str(Guidance(3.0, interval=(0.5, 1.0))).endswith("w = 3, at noise levels (0.5, 1]")
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(ValueError, match="interval"):
            Guidance(3.0, interval=bad)


@pytest.mark.parametrize("prev_frame", [False, True])
def test_the_whole_clip_pass_is_the_cached_pass(prev_frame):
    """What the student is trained through (one pass over context + target frame) is what the teacher's
    targets and the engine use (the context committed into the KV cache, which with `prev_frame` also
    carries the last context frame as the target's previous frame): the same velocity, and the same
    2-step sample as two cached Euler steps from the same noise."""
    cfg, model, a, clip, x, t_a, t_b = scene(prev_frame, seed=3)
    secant = teacher_targets(model, cfg, clip.ctx, clip.t_ctx, a[:, :-1], x, a[:, -1:], t_a, t_b, 1)
    with torch.no_grad():
        v = velocity(model, clip, x, t_a)
    assert v.abs().mean() > 0.05
    torch.testing.assert_close(v, secant, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        sample = student_sample(model, cfg, clip, schedule(2, 1.0), torch.Generator().manual_seed(7))
        z = torch.randn(clip.target.shape, generator=torch.Generator().manual_seed(7))
        commit_context(model, cfg, clip.ctx, clip.t_ctx, a[:, :-1])
        ts = schedule(2, 1.0).tolist()
        for i in range(2):
            z = z + (ts[i + 1] - ts[i]) * model.forward_cached(z, torch.full((3, 1), ts[i]), a[:, -1:])
    torch.testing.assert_close(sample, z, atol=1e-5, rtol=1e-4)


def test_one_ema_serves_training_and_distillation():
    """`steps.ema_update`, the one EMA: without a step (distillation's average) d is the decay as given,
    bit for bit the per-parameter lerp distillation had; with a step (the transformer's EMA) d warms up
    as (1 + step) / (10 + step) up to the decay; decay 0 copies the model."""
    from worldmodel.training.steps import ema_update

    cfg = tiny_config()
    model, avg = active_teacher(cfg, seed=1), active_teacher(cfg, seed=2)
    for decay, step, d in ((0.99, None, 0.99), (0.999, 0, 0.1), (0.999, 5, 6 / 15), (0.5, 1000, 0.5)):
        want = [pa.clone().lerp_(pm, 1 - d) for pa, pm in zip(avg.parameters(), model.parameters())]
        got = active_teacher(cfg, seed=2)
        ema_update(got, model, decay, step)
        assert all(torch.equal(g, w) for g, w in zip(got.parameters(), want)), (decay, step)
    ema_update(avg, model, 0.0)
    assert same(state(avg), state(model))


class FixedClips:
    """`LatentClips`' `batch` for a test: the same latent clips every step."""
    def __init__(self, cfg):
        self.x0, self.actions = batch(cfg, n=2)

    def batch(self, step, n, lo, hi, seed):
        return self.x0[lo:hi], self.actions[lo:hi]


@pytest.mark.parametrize("objective, critic_steps", [("dmd", 3), ("adversarial", 2), ("regression", 3)])
def test_the_critic_takes_critic_steps_updates_per_student_update(monkeypatch, objective, critic_steps):
    """`--critic-steps N`: N critic (or fake-score) updates on each student update's samples, each a
    real optimizer step; none for the regression objective, which has no critic."""
    cfg = tiny_config(prev_frame=True)
    updates = []
    original = Distillation.critic_step

    def counted(self, clip, sample, g, lr=None):
        before = state(self.critic)
        out = original(self, clip, sample, g, lr)
        updates.append(not same(state(self.critic), before))
        return out

    monkeypatch.setattr(Distillation, "critic_step", counted)
    iters = 2
    _, curves = distill_student(active_teacher(cfg), cfg, FixedClips(cfg), 2, objective, shift=1.0, progress=False,
                                config=DistillConfig(iters=iters, batch=2, lr=1e-3, critic_lr=1e-3,
                                                     critic_steps=critic_steps))
    if objective == "regression":
        assert updates == [] and "critic" not in curves
    else:
        assert updates == [True] * (iters * critic_steps) and len(curves["critic"]) == iters


@pytest.mark.parametrize("flag, value, more", [
    ("--objective", "gan", []), ("--objective", "regression,gan", []), ("--objective", ",", []),
    ("--adv-weight", "0", []), ("--adv-weight", "-1", []), ("--adv-weight", "nan", []),
    ("--dmd-weight", "0", []), ("--dmd-weight", "inf", []), ("--critic-lr", "0", []), ("--critic-lr", "-1e-4", []),
    ("--iters", "0", []), ("--ema", "1", []), ("--self-forcing", "-1", []), ("--critic-steps", "0", []),
    ("--self-forcing", "2", ["--objective", "dmd,adversarial"]),
    ("--guidance", "0", ["--objective", "dmd"]), ("--guidance", "-2", ["--objective", "dmd"]),
    ("--guidance", "nan", ["--objective", "dmd"]), ("--guidance", "inf", []),
    ("--guide", "jump", ["--guidance", "2"]), ("--guide", ",", ["--guidance", "2"]), ("--guide", "move,fly", []),
    ("--guidance-back", "0", ["--guidance", "2"]), ("--guidance-back", "nan", []), ("--guidance-back", "-4", []),
    ("--guidance-back", "4", ["--guide", "strafe"]), ("--guidance-centred", None, ["--guidance", "1"]),
    ("--guidance-interval", "0.5,1", []), ("--guidance-interval", "1,0.5", ["--guidance", "2"]),
    ("--guidance-interval", "0.5", ["--guidance", "2"]), ("--guidance-interval", "0,2", ["--guidance", "2"]),
    ("--guidance-interval", "a,b", ["--guidance", "2"]),
])
def test_bad_flag_values_are_refused_with_one_line(tmp_path, capsys, flag, value, more):
    from worldmodel.cli import main
    rc = main(["distill", "--teacher", str(tmp_path / "none"), "--data", str(tmp_path / "none"), "--out",
               str(tmp_path / "out"), flag if value is None else f"{flag}={value}", *more])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_short_run_of_each_objective_gives_finite_losses_and_checkpoints_that_play(tmp_path, capsys):
    """All three objectives in one run, on a level-style teacher (previous frame as input): the report
    holds each student's losses and evaluation beside the teacher's, and each checkpoint loads, samples
    in its own number of steps and plays."""
    from worldmodel.game.action import Action
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.cli import main
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.sampler import SamplingDefaults

    cfg = tiny_config(prev_frame=True)
    torch.manual_seed(0)
    WorldModel(cfg, Autoencoder(cfg.autoencoder), active_teacher(cfg), device="cpu",
               sampling=SamplingDefaults(steps=2, context_noise=0.2)).save_pretrained(tmp_path / "t")
    data = make_dataset(tmp_path / "data", frames=40)
    out = tmp_path / "out"
    rc = main(["distill", "--teacher", str(tmp_path / "t"), "--data", str(data), "--out", str(out),
               "--objective", "regression,adversarial,dmd", "--steps-student", "1", "--iters", "3", "--batch", "2",
               "--teacher-steps", "2", "--max-clips", "16", "--eval-clips", "2", "--rollout", "2", "--threads", "1",
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "sharpness" in captured.out and "adversarial" in captured.out  # the comparison table
    report = json.loads((out / "distill_report.json").read_text())
    assert sorted(report["students"]) == ["adversarial-1", "dmd-1", "regression-1"]
    assert report["teacher_eval"].keys() == {"1", "2"}
    for name, entry in report["students"].items():
        objective = name.split("-")[0]
        expected = {"regression", "loss"} | (set() if objective == "regression" else {objective, "critic"})
        assert set(entry["losses"]) == expected
        assert all(math.isfinite(v) for c in entry["losses"].values() for v in c.values())
        assert all(math.isfinite(entry["eval"][k]) for k in ("psnr_1", "psnr_rollout", "sharpness_ratio"))
        wm = WorldModel.from_pretrained(out / objective, device="cpu")
        # the student's steps, not the teacher's 2; not the teacher's context noise: its own is measured anew
        assert wm.sampling == SamplingDefaults(steps=1) and wm.steps == 1 and wm.context_noise == cfg.context_noise
        assert wm.info["distill"]["objective"] == objective and wm.info["distill"]["losses"] == entry["losses"]
        assert wm.cfg.prev_frame
        frames = np.zeros((cfg.cache_frames, 32, 32, 3), np.uint8)
        wm.reset(frames, [Action()] * cfg.cache_frames)
        frame = wm.step(Action(move=1))
        assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8


def test_without_a_latent_cache_only_shards_spread_over_the_data_are_encoded(tmp_path, capsys):
    """A large dataset is not encoded whole for a few training clips: --max-clips N reads whole shards
    spread over it holding about N clips' frames, and the report says how many frames it read."""
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.cli import main
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.sampler import SamplingDefaults

    cfg = tiny_config()
    torch.manual_seed(0)
    WorldModel(cfg, Autoencoder(cfg.autoencoder), active_teacher(cfg), device="cpu",
               sampling=SamplingDefaults(steps=2)).save_pretrained(tmp_path / "t")
    train_maps = [f"MAP{i:02d}" for i in range(1, 9)]  # one 40-frame shard each
    data = make_dataset(tmp_path / "data", maps=(*train_maps, "MAP21"), frames=40)
    clip = cfg.cache_frames + 1
    rc = main(["distill", "--teacher", str(tmp_path / "t"), "--data", str(data), "--out", str(tmp_path / "out"),
               "--steps-student", "2", "--iters", "1", "--batch", "2", "--teacher-steps", "2", "--max-clips", "8",
               "--eval-clips", "2", "--rollout", "2", "--threads", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "distill_report.json").read_text())
    assert report["train_clips"] == 8 and 8 * clip <= report["train_frames"] < 40 * len(train_maps)


def test_a_self_forced_dmd_run_reports_it_and_plays(tmp_path, capsys):
    """`--self-forcing K` with dmd: refused in one line when K leaves no real context frame for this
    teacher; otherwise the run's report and the student's card say so (and the action guidance of the
    teacher), and the student plays."""
    from worldmodel.game.action import Action
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.cli import main
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.sampler import SamplingDefaults

    cfg = tiny_config(prev_frame=True)
    torch.manual_seed(0)
    WorldModel(cfg, Autoencoder(cfg.autoencoder), active_teacher(cfg), device="cpu",
               sampling=SamplingDefaults(steps=2)).save_pretrained(tmp_path / "t")
    data = make_dataset(tmp_path / "data", frames=40)
    args = ["distill", "--teacher", str(tmp_path / "t"), "--data", str(data), "--objective", "dmd",
            "--steps-student", "2", "--iters", "2", "--batch", "2", "--teacher-steps", "2", "--max-clips", "8",
            "--eval-clips", "2", "--rollout", "2", "--threads", "1", "--no-progress"]
    rc = main([*args, "--out", str(tmp_path / "bad"), "--self-forcing", str(cfg.cache_frames)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--self-forcing" in err, err
    assert main([*args, "--out", str(tmp_path / "out"), "--self-forcing", "2", "--guidance", "2.5",
                 "--guide", "strafe, move", "--guidance-back", "4", "--guidance-centred",
                 "--guidance-interval", "0.25,1"]) == 0
    report = json.loads((tmp_path / "out" / "distill_report.json").read_text())
    assert report["self_forcing"] == 2 and "Self Forcing" in report["methods"]["dmd"]
    assert report["guidance"] == 2.5 and report["guide"] == ["move", "strafe"] and report["guidance_back"] == 4
    assert report["guidance_centred"] is True and report["guidance_interval"] == [0.25, 1.0]
    assert "guided by the action (move, strafe), w = 2.5, backing off w = 4, centred, at noise levels (0.25, 1]" \
        in report["methods"]["dmd"]
    entry = report["students"]["dmd-2"]
    assert all(math.isfinite(v) for c in entry["losses"].values() for v in c.values())
    wm = WorldModel.from_pretrained(tmp_path / "out", device="cpu")
    assert wm.info["distill"]["self_forcing"] == 2 and "Self Forcing" in wm.info["distill"]["method"]
    frames = np.zeros((cfg.cache_frames, 32, 32, 3), np.uint8)
    wm.reset(frames, [Action()] * cfg.cache_frames)
    assert wm.step(Action(move=1)).shape == (32, 32, 3)


def test_a_student_trained_further_starts_from_itself_and_counts_all_its_iterations(tmp_path, capsys):
    """`--init-student`: the student and its average start from the earlier student's weights (not the
    teacher's), the teacher stays; the new card counts both runs' iterations. A student of another model,
    of another autoencoder or with other steps is refused in one line, before any training."""
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.cli import main
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.sampler import SamplingDefaults

    cfg = tiny_config(prev_frame=True)
    teacher, other = active_teacher(cfg), active_teacher(cfg, seed=3)
    d = Distillation(teacher, cfg, 2, "dmd", shift=1.0, init=other)
    assert same(state(d.student), state(other)) and same(state(d.avg), state(other))
    assert same(state(d.critic), state(teacher)) and not same(state(d.student), state(teacher))

    torch.manual_seed(0)
    ae = Autoencoder(cfg.autoencoder)
    WorldModel(cfg, ae, teacher, device="cpu", sampling=SamplingDefaults(steps=2)).save_pretrained(tmp_path / "t")
    data = make_dataset(tmp_path / "data", frames=40)
    args = ["distill", "--teacher", str(tmp_path / "t"), "--data", str(data), "--objective", "dmd",
            "--iters", "2", "--batch", "2", "--teacher-steps", "2", "--max-clips", "8",
            "--eval-clips", "2", "--rollout", "2", "--threads", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "first"), "--steps-student", "2", "--self-forcing", "2"]) == 0
    first = WorldModel.from_pretrained(tmp_path / "first", device="cpu")
    assert first.info["distill"]["iters_total"] == 2 and first.info["distill"]["init_student"] is None

    torch.manual_seed(1)
    WorldModel(cfg, Autoencoder(cfg.autoencoder), teacher, device="cpu").save_pretrained(tmp_path / "other-ae")
    bigger = tiny_config(prev_frame=True, depth=cfg.depth + 1)
    WorldModel(bigger, ae, WorldTransformer(bigger), device="cpu").save_pretrained(tmp_path / "other-model")
    capsys.readouterr()
    for init, steps, says in ((tmp_path / "first", "1", "--steps-student 2"),
                              (tmp_path / "other-ae", "2", "autoencoder"), (tmp_path / "other-model", "2", "depth")):
        rc = main([*args, "--out", str(tmp_path / "bad"), "--steps-student", steps, "--init-student", str(init)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "--init-student" in err and says in err, err
        assert not (tmp_path / "bad").exists()

    assert main([*args, "--out", str(tmp_path / "second"), "--steps-student", "2", "--self-forcing", "2",
                 "--init-student", str(tmp_path / "first")]) == 0
    report = json.loads((tmp_path / "second" / "distill_report.json").read_text())
    assert report["init_student"] == str(tmp_path / "first") and report["iters_total"] == 4
    second = WorldModel.from_pretrained(tmp_path / "second", device="cpu")
    assert second.info["distill"]["iters_total"] == 4 and second.steps == 2
    assert all(math.isfinite(v) for c in report["students"]["dmd-2"]["losses"].values() for v in c.values())
