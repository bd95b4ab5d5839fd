"""`worldmodel distill`: few-step distillation of a trained world model into a 1-4 step student.

    worldmodel distill --teacher runs/dit/export --data data/train --val-data data/val \\
        --out runs/distill --steps-student 1,2,4

The student has the teacher's architecture and checkpoint format (it starts as a copy of the teacher);
only its `sample_steps` default changes, and `steps` stays a runtime setting of `WorldModel`.

Method (the regression objective): trajectory distillation, one round per student (progressive distillation collapsed into a
single round, as in TRACT). The student's k-step Euler schedule t_0 = 1 > t_1 > ... > t_k = 0 is
fixed; for a training clip (real context frames noised to the context level, as the engine commits
them, and a target frame), pick an interval [t_i, t_i+1], put the target frame at x_{t_i} (pure
noise for i = 0, the real frame noised to t_i otherwise), integrate the *teacher's* flow ODE across
the interval with m Euler sub-steps (`--teacher-steps` over the whole schedule; the context sits in
a KV cache, so each sub-step is a one-frame pass) and regress the student's velocity onto the
secant slope (x_teacher(t_i+1) - x_{t_i}) / (t_i+1 - t_i): one student step then lands where m
teacher steps land.

Why this and not sCM (what NFD uses) or consistency distillation: at our scale, on 2 CPU cores,
continuous-time consistency models need a JVP through attention every step (forward-mode AD: slow
on CPU, and unstable without TrigFlow's re-parametrisation and tangent normalisation), and discrete
consistency distillation bootstraps from an EMA of the student and needs many thousands of
iterations to converge. Trajectory distillation regresses onto deterministic targets computed by the
frozen teacher, converges in a few hundred iterations, has no extra hyper-parameters beyond the
schedule, and needs no change to the architecture (shortcut models would need a step-size input).
Its cost is m teacher passes per target, which the KV cache makes one-frame passes.

Objectives (`--objective`). A regression student draws the mean of the possible next frames, so
whatever is uncertain turns to fog; two objectives add a term that does not average, each beside the
regression loss (which keeps the student on the teacher's trajectories) with its own weight:
- "adversarial" (`--adv-weight`; as in ADD / adversarial post-training): a small critic on latent
  frames (`LatentCritic`) sees the candidate next frame beside the previous frame's latent and the
  action, so it judges "a plausible next frame here" rather than "any Doom frame"; trained with the
  hinge loss on real next frames against the student's samples, and its score is the student's
  generator loss;
- "dmd" (distribution matching distillation, as in DMD, CausVid and Self Forcing; `--dmd-weight`): a
  fake-score model (a copy of the teacher) is trained online by flow matching on the student's
  samples, beside the frozen teacher as the real score; the student's sample is noised to a random
  level and moved along the difference of the two denoised estimates (the gradient of the reverse KL
  between the two distributions), which pulls it towards a mode instead of the mean.
The student's sample is drawn as the engine draws it (its k Euler steps after the context); the
gradient goes through its last step only. Each objective sees the same batches and noise for a seed,
so a list (`--objective regression,adversarial`) compares them in one run.

Reported (in `OUT/distill_report.json` and in each student's config.json `info.distill`): PSNR
against the real game on validation-map clips -- one frame ahead from real context (teacher-forced),
and an autoregressive rollout of `--rollout` frames fed the real actions -- for each student at its
steps, the teacher at its default steps and the undistilled teacher at the student's steps, with a
sharpness ratio beside each (PSNR alone rewards blur: an undistilled 1-step sample is the blurry mean
of the futures and can score a higher PSNR than a sharp many-step sample), and the same as a table
on stdout.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.metrics import psnr_frames
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.files import atomic_write_json, check_output_path
from worldmodel.model.checkpoint import load_pretrained, save_pretrained
from worldmodel.provenance import command_line
from worldmodel.model.diffusion import add_noise, predict_x0, timesteps, velocity_target
from worldmodel.errors import UserError
from worldmodel.model.transformer import ModelConfig, WorldTransformer
from worldmodel.inference.sampler import FrameSampler
from worldmodel.training.train import add_amp_argument

OBJECTIVES = ("regression", "adversarial", "dmd")
METHODS = {
    "regression": "trajectory distillation (single-round progressive / TRACT-style): student Euler step regressed "
                  "onto the teacher's m-sub-step ODE solution over the same interval",
    "adversarial": "trajectory distillation + adversarial: a latent critic (previous frame and action as its "
                   "condition) trained with the hinge loss on real next frames against the student's samples",
    "dmd": "trajectory distillation + distribution matching (DMD): the student's samples moved along the "
           "difference of a fake score (trained online on them) and the teacher's score",
}
DEFAULT_OBJECTIVE = "regression"  # what `distill` trains unless told: the shipped method, until another measures better
DMD_T_MIN, DMD_T_MAX = 0.02, 0.98  # noise levels DMD scores the student's samples at (DMD2's range)


# --------------------------------------------------------------------------------------------------
# One batch, laid out as the engine sees it
# --------------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """A batch of training clips as the engine sees them: K context frames committed at the context
    noise level, then the target frame with its action."""
    ctx: torch.Tensor  # (B, K, C, h, w) context latents, noised to cfg.context_noise
    t_ctx: torch.Tensor  # (B, K) their noise levels
    actions: torch.Tensor  # (B, K + 1, A) the context's actions, then the target's
    target: torch.Tensor  # (B, 1, C, h, w) the real next frame (clean)
    prev: torch.Tensor  # (B, C, h, w) the real previous frame (clean): what the critic conditions on

    @classmethod
    def of(cls, cfg: ModelConfig, x0: torch.Tensor, actions: torch.Tensor, g: torch.Generator) -> "Clip":
        """Latent clips (B, K+1, C, h, w) with their actions (B, K+1, A): the last frame is the target."""
        B, F_ = x0.shape[:2]
        t_ctx = torch.full((B, F_ - 1), cfg.context_noise, device=x0.device)
        ctx = add_noise(x0[:, :-1], torch.randn(x0[:, :-1].shape, generator=g).to(x0), t_ctx)
        return cls(ctx, t_ctx, actions, x0[:, -1:], x0[:, -2])

    def student_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's input for the whole clip with the target frame at x (B, 1, C, h, w), level t (B,)."""
        return torch.cat((self.ctx, x), 1), torch.cat((self.t_ctx, t[:, None].to(self.t_ctx)), 1), self.actions


def velocity(model: WorldTransformer, clip: Clip, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's velocity (B, 1, C, h, w) at the target frame x (level t (B,)) after the clip's
    context: one pass over the whole clip (what autograd goes through; with `prev_frame` the target
    sees the last context frame as its previous frame, as it does against the KV cache)."""
    return model(*clip.student_input(x, t))[:, -1:]


def commit_context(model: WorldTransformer, cfg: ModelConfig, ctx: torch.Tensor, t_ctx: torch.Tensor,
                   a_ctx: torch.Tensor) -> None:
    """A new KV cache of the model's holding (already noised) context frames (B, K, C, h, w), K <= sink + window."""
    B, K = ctx.shape[:2]
    model.setup_cache(B, dtype=ctx.dtype)
    chunk = min(cfg.window_frames, cfg.max_draft)
    for i in range(0, K, chunk):
        model.forward_cached(ctx[:, i:i + chunk], t_ctx[:, i:i + chunk], a_ctx[:, i:i + chunk],
                             commit=ctx[:, i:i + chunk].shape[1])


@torch.inference_mode()
def teacher_targets(teacher: WorldTransformer, cfg: ModelConfig, ctx, t_ctx, a_ctx, x_a, a_tgt, t_a, t_b,
                    substeps: int) -> torch.Tensor:
    """The teacher's secant velocity over [t_a, t_b] (per sample, (B,)) from x_a (B, 1, C, h, w):
    `substeps` Euler steps of its flow with the context in a KV cache."""
    commit_context(teacher, cfg, ctx, t_ctx, a_ctx)
    x = x_a
    for j in range(substeps):
        s0 = t_a + (t_b - t_a) * (j / substeps)
        s1 = t_a + (t_b - t_a) * ((j + 1) / substeps)
        v = teacher.forward_cached(x, s0[:, None], a_tgt, commit=0)
        x = x + (s1 - s0).view(-1, 1, 1, 1, 1).to(x.dtype) * v
    return ((x - x_a) / (t_b - t_a).view(-1, 1, 1, 1, 1).to(x.dtype)).clone()


def schedule(cfg: ModelConfig, steps: int) -> torch.Tensor:
    """The student's Euler schedule: steps + 1 noise levels from 1 to 0 (float32, on the host)."""
    return torch.tensor(timesteps(steps, cfg.sample_shift).tolist(), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# The student's objectives
# --------------------------------------------------------------------------------------------------


def regression_loss(student: WorldTransformer, teacher: WorldTransformer, cfg: ModelConfig, clip: Clip, steps: int,
                    substeps: int, g: torch.Generator) -> torch.Tensor:
    """Trajectory distillation: for a random interval [t_i, t_i+1] of the student's schedule, the
    target frame at x_{t_i} (pure noise for i = 0, the real frame noised to t_i otherwise), the
    student's velocity MSE against the teacher's `substeps`-step secant over the interval."""
    B, dev = clip.target.shape[0], clip.target.device
    ts = schedule(cfg, steps)
    i = torch.randint(0, steps, (B,), generator=g)
    t_a, t_b = ts[i].to(dev), ts[i + 1].to(dev)
    x_a = add_noise(clip.target, torch.randn(clip.target.shape, generator=g).to(clip.target), t_a[:, None])
    target = teacher_targets(teacher, cfg, clip.ctx, clip.t_ctx, clip.actions[:, :-1], x_a, clip.actions[:, -1:],
                             t_a, t_b, substeps)
    return (velocity(student, clip, x_a, t_a).float() - target.float()).pow(2).mean()


def student_sample(student: WorldTransformer, cfg: ModelConfig, clip: Clip, steps: int,
                   g: torch.Generator) -> torch.Tensor:
    """The student's next frame (B, 1, C, h, w) as the engine samples it: `steps` Euler steps from
    noise after the clip's context. The gradient goes through the last step (its pass over the whole
    clip); the steps before it run without gradient against a KV cache (Self Forcing's truncation)."""
    ts = schedule(cfg, steps).tolist()
    x = torch.randn(clip.target.shape, generator=g).to(clip.target)
    B = x.shape[0]
    if steps > 1:
        with torch.no_grad():
            commit_context(student, cfg, clip.ctx, clip.t_ctx, clip.actions[:, :-1])
            for i in range(steps - 1):
                v = student.forward_cached(x, x.new_full((B, 1), ts[i]), clip.actions[:, -1:], commit=0)
                x = x + (ts[i + 1] - ts[i]) * v
    t = x.new_full((B,), ts[-2])
    return x - ts[-2] * velocity(student, clip, x, t)  # the last step lands on t = 0


def dmd_loss(sample: torch.Tensor, teacher: WorldTransformer, fake: WorldTransformer, clip: Clip,
             g: torch.Generator) -> torch.Tensor:
    """Distribution matching (DMD): the student's sample noised to a random level, denoised by the
    teacher (the real score) and by the fake-score model (trained on the student's samples); the
    sample is moved along fake - real, normalised per sample as in DMD. As a loss whose gradient
    with respect to the sample is that difference (divided by its size)."""
    B = sample.shape[0]
    t = DMD_T_MIN + (DMD_T_MAX - DMD_T_MIN) * torch.rand(B, generator=g).to(sample.device)
    with torch.no_grad():
        x_t = add_noise(sample.detach(), torch.randn(sample.shape, generator=g).to(sample), t[:, None])
        real = predict_x0(x_t, velocity(teacher, clip, x_t, t), t[:, None])
        fake_x0 = predict_x0(x_t, velocity(fake, clip, x_t, t), t[:, None])
        scale = (sample.detach() - real).float().abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = ((fake_x0 - real).float() / scale).nan_to_num()
    return 0.5 * F.mse_loss(sample.float(), (sample.detach().float() - grad))


def fake_score_loss(fake: WorldTransformer, clip: Clip, sample: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flow matching of the fake-score model on the student's (detached) samples after the clip's
    context, at noise levels drawn as DMD queries them."""
    B = sample.shape[0]
    t = DMD_T_MIN + (DMD_T_MAX - DMD_T_MIN) * torch.rand(B, generator=g).to(sample.device)
    noise = torch.randn(sample.shape, generator=g).to(sample)
    x_t = add_noise(sample.detach(), noise, t[:, None])
    return (velocity(fake, clip, x_t, t).float() - velocity_target(sample.detach(), noise).float()).pow(2).mean()


class LatentCritic(nn.Module):
    """Training only (never shipped): a PatchGAN-style critic on latent frames that judges "a plausible
    next frame here": it sees the candidate (B, C, h, w) beside the previous frame's latent and the
    action taken, and scores every patch, logits (B, 1, h/2, w/2). Spectral norm keeps it smooth
    enough for its hinge-loss gradient to be a useful signal to the student."""

    def __init__(self, cfg: ModelConfig, width: int = 128):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        C = cfg.latent_channels
        self.stem = sn(nn.Conv2d(2 * C, width, 3, padding=1))  # [candidate, previous frame]
        self.action = nn.Linear(cfg.action_dim, width)
        self.body = nn.Sequential(nn.LeakyReLU(0.2), sn(nn.Conv2d(width, width, 3, stride=2, padding=1)),
                                  nn.LeakyReLU(0.2), sn(nn.Conv2d(width, width, 3, padding=1)), nn.LeakyReLU(0.2),
                                  sn(nn.Conv2d(width, 1, 1)))

    def forward(self, x: torch.Tensor, prev: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        h = self.stem(torch.cat((x, prev), 1).float()) + self.action(action.float())[:, :, None, None]
        return self.body(h)


def critic_hinge_loss(critic: LatentCritic, clip: Clip, sample: torch.Tensor) -> torch.Tensor:
    """The critic's hinge loss: the real next frame scored above +1, the student's (detached) below -1."""
    a = clip.actions[:, -1]
    return (F.relu(1 - critic(clip.target[:, 0], clip.prev, a)).mean()
            + F.relu(1 + critic(sample[:, 0].detach(), clip.prev, a)).mean())


# --------------------------------------------------------------------------------------------------
# Distillation: the student, its critic, their updates
# --------------------------------------------------------------------------------------------------


class Distillation:
    """One `steps`-step student distilled from a frozen teacher with one objective:
    - "regression": its velocity regressed onto the teacher's secant (`regression_loss`);
    - "adversarial": that plus `adv_weight` times the hinge generator loss of a `LatentCritic`
      trained beside it on the real next frames against its samples;
    - "dmd": that plus `dmd_weight` times the distribution-matching loss (`dmd_loss`), with a
      fake-score model (a copy of the teacher) trained beside it on its samples by flow matching.
    `student_step` moves the student only, `critic_step` the critic only; the teacher never moves.
    The saved student is an EMA of the student's weights (`avg`)."""

    def __init__(self, teacher: WorldTransformer, cfg: ModelConfig, steps: int, objective: str = "regression", *,
                 teacher_steps: int = 8, lr: float = 1e-4, critic_lr: float = 1e-4, adv_weight: float = 0.1,
                 dmd_weight: float = 1.0, grad_clip: float = 1.0):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.cfg, self.steps, self.objective = cfg, steps, objective
        self.substeps = max(1, math.ceil(teacher_steps / steps))
        self.adv_weight, self.dmd_weight, self.grad_clip = adv_weight, dmd_weight, grad_clip
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = copy.deepcopy(teacher).train().requires_grad_(True)
        self.avg = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.critic: nn.Module | None = None
        if objective == "adversarial":
            device = next(teacher.parameters()).device
            self.critic = LatentCritic(cfg).to(device).train()
        elif objective == "dmd":
            self.critic = copy.deepcopy(teacher).train().requires_grad_(True)  # the fake score
        # no first moment for the adversarial critic (a GAN's usual Adam); the fake score trains as the student
        betas = (0.0, 0.99) if objective == "adversarial" else (0.9, 0.99)
        self.critic_opt = None if self.critic is None else torch.optim.AdamW(
            self.critic.parameters(), lr=critic_lr, weight_decay=0.0, betas=betas)

    def student_step(self, clip: Clip, g: torch.Generator, lr: float | None = None,
                     extra_weight: float = 1.0) -> tuple[dict[str, float], torch.Tensor | None]:
        """One update of the student (the teacher and the critic stay as they are). Returns its
        losses and, for the adversarial and DMD objectives, its samples (detached) for the critic.
        `extra_weight` scales the adversarial / DMD term (a warm-up)."""
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        loss = regression_loss(self.student, self.teacher, self.cfg, clip, self.steps, self.substeps, g)
        out, sample = {"regression": loss.item()}, None
        if self.critic is not None:
            self.critic.eval().requires_grad_(False)  # eval: no power iteration of its spectral norm
            sample = student_sample(self.student, self.cfg, clip, self.steps, g)
            if self.objective == "adversarial":
                extra = -self.critic(sample[:, 0], clip.prev, clip.actions[:, -1]).mean()
                weight = self.adv_weight
            else:
                extra = dmd_loss(sample, self.teacher, self.critic, clip, g)
                weight = self.dmd_weight
            self.critic.train().requires_grad_(True)
            out[self.objective] = extra.item()
            loss = loss + extra_weight * weight * extra
            sample = sample.detach()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.opt.step()
        out["loss"] = loss.item()
        return out, sample

    def critic_step(self, clip: Clip, sample: torch.Tensor, g: torch.Generator, lr: float | None = None) -> dict:
        """One update of the critic on the student's samples (the student and the teacher stay)."""
        if self.critic is None:
            return {}
        if lr is not None:
            for group in self.critic_opt.param_groups:
                group["lr"] = lr
        if self.objective == "adversarial":
            loss = critic_hinge_loss(self.critic, clip, sample)
        else:
            loss = fake_score_loss(self.critic, clip, sample, g)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.critic.parameters(), self.grad_clip)
        self.critic_opt.step()
        return {"critic": loss.item()}

    @torch.no_grad()
    def update_average(self, decay: float) -> None:
        ema_update(self.avg, self.student, decay)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def distill_student(teacher: WorldTransformer, cfg: ModelConfig, clips, steps: int, objective: str = "regression", *,
                    teacher_steps: int = 8, iters: int = 300, batch: int = 8, lr: float = 1e-4,
                    critic_lr: float = 1e-4, adv_weight: float = 0.1, dmd_weight: float = 1.0, ema: float = 0.99,
                    seed: int = 0, grad_clip: float = 1.0, amp: bool = False, progress: bool = True,
                    log=None) -> tuple[WorldTransformer, dict[str, list[float]]]:
    """Train a `steps`-step student (a copy of the teacher) with `objective` (see `Distillation`) on
    `clips` (train.LatentClips: `.batch(step, batch, lo, hi, seed)` -> latents (B, F, C, h, w), actions
    (B, F, A)); `amp`: bf16 autocast. Every objective sees the same batches and noise for the same
    seed. Returns the EMA student and the loss curves (by name, one value per iteration)."""
    device = next(teacher.parameters()).device
    d = Distillation(teacher, cfg, steps, objective, teacher_steps=teacher_steps, lr=lr, critic_lr=critic_lr,
                     adv_weight=adv_weight, dmd_weight=dmd_weight, grad_clip=grad_clip)
    curves: dict[str, list[float]] = {}
    warmup = max(1, iters // 10)
    bar = None
    if progress:
        from worldmodel.progress import progress_bar
        bar = progress_bar(total=iters, desc=f"distill {steps}-step {objective}", unit="it", disable=None)
    for it in range(iters):
        g = torch.Generator().manual_seed(seed * 1_000_003 + it)
        x0, a = clips.batch(it, batch, 0, batch, seed)
        ramp = min(1.0, (it + 1) / warmup)  # short warm-up of the learning rates and of the critic's say
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            clip = Clip.of(cfg, x0.to(device), a.to(device), g)
            losses, sample = d.student_step(clip, g, lr=lr * ramp, extra_weight=ramp)
            if sample is not None:
                losses.update(d.critic_step(clip, sample, g, lr=critic_lr * ramp))
        d.update_average(ema if it >= iters // 10 else 0.0)  # the average starts after the warm-up
        if not all(math.isfinite(v) for v in losses.values()):
            raise RuntimeError(f"distillation diverged at iteration {it + 1}: losses {losses}")
        for k, v in losses.items():
            curves.setdefault(k, []).append(v)
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
            bar.update(1)
        if log is not None:
            log(it + 1, losses)
    if bar is not None:
        bar.close()
    return d.avg, curves


# --------------------------------------------------------------------------------------------------
# Evaluation against the real game
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: WorldTransformer, ae: Autoencoder, cfg: ModelConfig, frames: torch.Tensor, actions: torch.Tensor,
             context: int, steps: int, seed: int = 0, batch: int = 16) -> dict:
    """Real clips (B, context + R, H, W, 3) uint8 with their actions (B, context + R, A): PSNR (dB) of
    one frame ahead from the real context (teacher-forced), and of an R-frame autoregressive rollout fed
    the real actions (mean over its frames, and at its last frame), against the real frames."""
    device = next(model.parameters()).device
    one, roll, last, sharp_gen, sharp_real = [], [], [], [], []
    for s in range(0, frames.shape[0], batch):
        fr, ac = frames[s:s + batch], actions[s:s + batch].to(device)
        B, F_ = fr.shape[:2]
        lat = torch.cat([ae.encode(f.to(device)) for f in fr.flatten(0, 1).split(256)]).view(B, F_, -1, *cfg.latent_size)
        sampler = FrameSampler(model, cfg, steps, seed=seed, batch_size=B)
        sampler.reset(lat[:, :context], ac[:, :context])
        gen = []
        for j in range(context, F_):
            gen.append(ae.decode_uint8(sampler.next(ac[:, j:j + 1])[:, 0]).cpu())
        gen = torch.stack(gen, 1)  # (B, R, H, W, 3)
        real = fr[:, context:]
        p = psnr_frames(gen, real)  # (B, R)
        one.append(p[:, 0])
        roll.append(p.mean(1))
        last.append(p[:, -1])
        sharp_gen.append(sharpness(gen))
        sharp_real.append(sharpness(real))
    one, roll, last = torch.cat(one), torch.cat(roll), torch.cat(last)
    return {"psnr_1": round(one.mean().item(), 3), "psnr_rollout": round(roll.mean().item(), 3),
            "psnr_last": round(last.mean().item(), 3),
            "sharpness_ratio": round(sum(sharp_gen) / max(sum(sharp_real), 1e-9), 3),
            "rollout_frames": frames.shape[1] - context, "clips": frames.shape[0], "steps": steps}


def sharpness(frames: torch.Tensor) -> float:
    """Mean absolute horizontal + vertical pixel difference of uint8 frames (..., H, W, 3). PSNR rewards
    blur (the mean of the possible futures scores best), so the report gives generated / real
    sharpness beside it: 1 = as detailed as the game, < 1 = blurrier."""
    f = frames.float()
    return ((f[..., 1:, :, :] - f[..., :-1, :, :]).abs().mean() + (f[..., :, 1:, :] - f[..., :, :-1, :]).abs().mean()).item()


def baselines(ae: Autoencoder, frames: torch.Tensor, context: int) -> dict:
    real = frames[:, context:]
    copy_last = frames[:, context - 1:context].expand_as(real)
    with torch.no_grad():
        device = ae.latent_mean.device
        recon = torch.stack([ae.reconstruct(f.to(device)).cpu() for f in real], 0)
    return {"copy_last_psnr_1": round(psnr_frames(copy_last[:, 0], real[:, 0]).mean().item(), 3),
            "copy_last_psnr_rollout": round(psnr_frames(copy_last, real).mean().item(), 3),
            "autoencoder_psnr": round(psnr_frames(recon, real).mean().item(), 3)}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


STUDENT_STEPS = (1, 2, 4)  # each divides the default --teacher-steps 8: a student step is whole teacher steps


def parse_steps(spec: str) -> list[int]:
    try:
        out = sorted({int(s) for s in str(spec).split(",") if s.strip()})
    except ValueError:
        raise UserError(f"--steps-student: expected integers like 1,2,4, got {spec!r}") from None
    if not out or any(k not in STUDENT_STEPS for k in out):
        raise UserError(f"--steps-student: each value must be 1, 2 or 4, got {spec!r}")
    return out


def parse_objectives(spec: str) -> list[str]:
    out = list(dict.fromkeys(s.strip() for s in str(spec).split(",") if s.strip()))
    bad = [o for o in out if o not in OBJECTIVES]
    if not out or bad:
        raise UserError(f"--objective: each value must be one of {', '.join(OBJECTIVES)} (or a list of them, "
                        f"compared in one run), got {spec!r}")
    return out


def check_arguments(args) -> None:
    """One clear line for a rate, weight or decay out of range (before anything is loaded); counts are
    `train.check_sizes`'."""
    positive = {"--lr": args.lr, "--critic-lr": args.critic_lr, "--adv-weight": args.adv_weight,
                "--dmd-weight": args.dmd_weight}
    for name, v in positive.items():
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"{name} must be a positive number, got {v:g}")
    if not 0.0 <= args.ema < 1.0:
        raise UserError(f"--ema must be within [0, 1), got {args.ema:g}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="trained checkpoint folder (or Hub id) to distil")
    parser.add_argument("--data", required=True, help="dataset folder (its training maps MAP01-MAP20 are used)")
    parser.add_argument("--val-data", default=None, help="dataset with validation maps MAP21-MAP24 (default: --data)")
    parser.add_argument("--out", required=True, help="output folder: the student checkpoint (one objective and one "
                                                     "value of --steps-student), else OUT/OBJECTIVE and/or "
                                                     "OUT/steps-K for each")
    parser.add_argument("--steps-student", default="2", help="student sampling steps: 1, 2 or 4, or a list 1,2,4")
    parser.add_argument("--objective", default=DEFAULT_OBJECTIVE,
                        help="the student's loss: regression (its velocity regressed onto the teacher's ODE), "
                             "adversarial (that + a latent critic's hinge loss, --adv-weight), dmd (that + "
                             "distribution matching against a fake score trained on its samples, --dmd-weight); "
                             "a list (regression,adversarial) trains and reports each on the same batches "
                             "(default %(default)s)")
    parser.add_argument("--adv-weight", type=float, default=0.1,
                        help="adversarial objective: weight of the critic's loss beside the regression loss "
                             "(default %(default)s)")
    parser.add_argument("--dmd-weight", type=float, default=1.0,
                        help="dmd objective: weight of the distribution-matching loss beside the regression loss "
                             "(default %(default)s)")
    parser.add_argument("--critic-lr", type=float, default=1e-4,
                        help="learning rate of the critic (adversarial) or of the fake-score model (dmd) "
                             "(default %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=8,
                        help="teacher Euler steps over the whole schedule that one student schedule imitates")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per student")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay of the student weights that are saved")
    parser.add_argument("--max-clips", type=int, default=4000,
                        help="training clips (evenly spaced over the data; a large dataset is read from shards "
                             "spread over it, not whole)")
    parser.add_argument("--latents", default=None,
                        help="reuse a `train model` latent cache (RUN/cache/train_latents.safetensors, made with the "
                             "teacher's autoencoder) instead of encoding --data's training maps")
    parser.add_argument("--eval-clips", type=int, default=32, help="validation clips for the PSNR report")
    parser.add_argument("--rollout", type=int, default=8, help="frames of the autoregressive rollout in the report")
    parser.add_argument("--half", action="store_true",
                        help="store the student's transformer weights in float16 (half the size; the engine "
                             "computes in its own dtype)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    add_amp_argument(parser)
    parser.add_argument("--no-progress", action="store_true")


def student_table(report: dict) -> str:
    """The report's evaluations as a text table: the teacher at each steps, then each student."""
    rows = [("teacher", f"{k}", e) for k, e in report["teacher_eval"].items()]
    rows += [(e["objective"], f"{e['steps']}", e["eval"]) for e in report["students"].values()]
    lines = [f"{'model':<12} {'steps':>5} {'PSNR 1 ahead':>12} {'PSNR rollout':>12} {'PSNR last':>9} {'sharpness':>9}"]
    lines += [f"{name:<12} {k:>5} {e['psnr_1']:>12.2f} {e['psnr_rollout']:>12.2f} {e['psnr_last']:>9.2f} "
              f"{e['sharpness_ratio']:>9.3f}" for name, k, e in rows]
    return "\n".join(lines)


def run(args) -> int:
    from worldmodel.device import resolve_device
    from worldmodel.training.train import amp_enabled, check_sizes, encode_dataset, hardware

    check_sizes(args, at_least_1=("teacher_steps", "iters", "batch", "max_clips", "eval_clips", "rollout"),
                at_least_0=("threads",))
    check_arguments(args)
    ks = parse_steps(args.steps_student)
    objectives = parse_objectives(args.objective)
    check_output_path(args.out, folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = amp_enabled(not args.no_amp, device)
    cfg, ae, teacher, config, folder = load_pretrained(args.teacher, device=device)
    teacher.attention = "sdpa" if device.type != "cuda" else teacher.attention
    progress = not args.no_progress
    context = cfg.cache_frames  # sinks + window: the context fits the cache without wrapping
    t0 = time.time()
    if args.latents:
        from worldmodel.training.train import LatentClips
        train = LatentClips.load(Path(args.latents), {})
        if train is None:
            raise UserError(f"{args.latents}: not a readable latent cache")
        if tuple(train.latents.shape[1:]) != (cfg.latent_channels, *cfg.latent_size) or train.clip_frames < context + 1:
            raise UserError(f"{args.latents}: latents {tuple(train.latents.shape[1:])} in clips of {train.clip_frames} "
                            f"frames do not fit this teacher ({cfg.latent_channels}, {cfg.latent_size}, {context + 1} frames)")
        train = train.with_clip_frames(context + 1)
    else:
        train, _ = encode_dataset(ae, args.data, "train", context + 1, max_clips=args.max_clips, progress=progress)
    val_source = args.val_data or args.data
    _, val = encode_dataset(ae, val_source, "val", context + args.rollout, max_clips=args.eval_clips,
                            keep_frames=args.eval_clips, progress=progress)
    vf, va = val.clip(torch.arange(len(val)))
    print(f"distill: {len(train)} training clips, {len(val)} validation clips ({time.time() - t0:.0f} s to encode)",
          file=sys.stderr)

    report = {"teacher": str(args.teacher), "objectives": objectives,
              "methods": {o: METHODS[o] for o in objectives}, "data": str(args.data), "val_data": str(val_source),
              "train_clips": len(train), "teacher_steps": args.teacher_steps, "iters": args.iters,
              "batch": args.batch, "lr": args.lr, "critic_lr": args.critic_lr, "adv_weight": args.adv_weight,
              "dmd_weight": args.dmd_weight, "ema": args.ema, "seed": args.seed, "device": str(device),
              "hardware": hardware(device), "amp_bf16": amp, "command": command_line(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "baselines": baselines(ae, vf, context),
              "teacher_eval": {}, "students": {}}
    teacher_default = cfg.sample_steps
    for k in sorted({teacher_default, *ks}):
        report["teacher_eval"][str(k)] = evaluate(teacher, ae, cfg, vf, va, context, k, seed=args.seed)
        print(f"teacher at {k} steps: {report['teacher_eval'][str(k)]}", file=sys.stderr)
    out = Path(args.out)
    for objective in objectives:
        for k in ks:
            t1 = time.time()
            student, curves = distill_student(teacher, cfg, train, k, objective, teacher_steps=args.teacher_steps,
                                              iters=args.iters, batch=args.batch, lr=args.lr, critic_lr=args.critic_lr,
                                              adv_weight=args.adv_weight, dmd_weight=args.dmd_weight, ema=args.ema,
                                              seed=args.seed, amp=amp, progress=progress)
            train_s = time.time() - t1
            res = evaluate(student, ae, cfg, vf, va, context, k, seed=args.seed)
            n = max(1, args.iters // 10)
            losses = {name: {"first": round(sum(c[:n]) / n, 5), "last": round(sum(c[-n:]) / n, 5)}
                      for name, c in curves.items()}
            entry = {"objective": objective, "steps": k, "eval": res, "losses": losses, "train_s": round(train_s, 1),
                     "teacher_same_steps": report["teacher_eval"][str(k)],
                     "teacher_default": report["teacher_eval"][str(teacher_default)]}
            dest = out / objective if len(objectives) > 1 else out
            dest = dest / f"steps-{k}" if len(ks) > 1 else dest
            scfg = ModelConfig.from_dict({**cfg.to_dict(), "sample_steps": k})
            info = {**(config.get("info") or {}),
                    "distill": {k_: v for k_, v in report.items() if k_ != "students"}
                    | {"objective": objective, "method": METHODS[objective], "student_steps": k, "eval": res,
                       "losses": losses}}
            save_pretrained(dest, scfg, ae, copy.deepcopy(student).half() if args.half else student, info)
            if (Path(folder) / "start_clips").is_dir() and not (dest / "start_clips").exists():
                shutil.copytree(Path(folder) / "start_clips", dest / "start_clips")
            entry["checkpoint"] = str(dest)
            report["students"][f"{objective}-{k}"] = entry
            print(f"student {objective} {k}-step -> {dest}: {res} (teacher at {k} steps: "
                  f"{report['teacher_eval'][str(k)]['psnr_1']} dB one ahead)", file=sys.stderr)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "distill_report.json", report)
    print(student_table(report))
    return 0
