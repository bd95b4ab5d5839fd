"""Few-step distillation of a trained world model into a 1-4 step student (`worldmodel distill`, in
`training.distill_cli`; the objectives in `training.distill_objectives`).

The student has the teacher's architecture and checkpoint format (it starts as a copy of the teacher);
only its sampling defaults' steps change (config.json's "sampling"), and `steps` stays a runtime
setting of `WorldModel`.

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
Action guidance (`--guidance W`, any objective): the teacher is guided by the action wherever it is
asked, its flow in the regression targets and its score in DMD: standing still + W times its response
to the action taken, as classifier-free guidance guides by a prompt (guided distillation, as Meng et
al. distil a guided teacher). `--guide FIELDS` rests only those fields on the unconditional side
(move,strafe: walking amplified, the turn not); `--guidance-back W` guides the frames that back off
(move < 0) at their own weight, for a teacher that responds to backing off far less than to walking
forward; `--guidance-centred` amplifies the response without its mean over the frame (per latent
channel), so that guidance moves what is in the frame and leaves its overall brightness and colour to
the teacher; `--guidance-interval LO,HI` guides only at the noise levels t with LO < t <= HI. The
student learns to follow the controls more strongly at no cost per frame; the teacher needs no training
without actions, standing still is its unconditional side.
The student's sample is drawn as the engine draws it (its k Euler steps after the context); the
gradient goes through its last step only. Each objective sees the same batches and noise for a seed,
so a list (`--objective regression,adversarial`) compares them in one run.

Self Forcing (`--self-forcing K`, regression and dmd): the last K context frames of every clip are the
student's own rollout from the real frames before them, made by the engine's sampler with its KV
cache (`training.transformer.self_forced_clip`), so the student is trained on the contexts it makes
itself when it plays. With dmd this is Self Forcing's own recipe: the student's next frame after its
own frames is judged by the teacher's score *given that context* -- what a plausible next frame is
there -- instead of being regressed onto the real game's next frame, which a drifted rollout no
longer predicts (what `train model --self-forcing` does, and why it learns to hedge). The adversarial
critic judges a frame beside the real previous frame, so it does not take self-forced clips.

`evaluate` measures a model against the real game (PSNR one frame ahead and over a rollout, with a
sharpness ratio beside it): what `worldmodel distill` reports for the teacher and each student.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import math

import torch
import torch.nn as nn

from worldmodel.errors import UserError
from worldmodel.game.action import FIELDS
from worldmodel.model.sampler import FrameSampler
from worldmodel.metrics import psnr_frames
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.transformer import ModelConfig, WorldTransformer
from worldmodel.training.distill_objectives import (Clip, Guidance, LatentCritic, critic_hinge_loss, dmd_loss,
                                                    fake_score_loss, regression_loss, schedule, student_sample)
from worldmodel.training.steps import ema_update
from worldmodel.training.transformer import self_forced_clip

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


@dataclass(frozen=True)
class DistillConfig:
    """How one student is trained: the one place for distillation's defaults (`worldmodel distill`'s
    flags take theirs from here)."""
    teacher_steps: int = 8  # teacher Euler steps over the whole schedule that one student schedule imitates
    iters: int = 300  # training iterations per student
    batch: int = 8
    lr: float = 1e-4
    critic_lr: float = 1e-4  # the critic's (adversarial) or the fake score's (dmd)
    critic_steps: int = 1  # updates of the critic or fake score per student update (DMD2's two time-scale rule: 5)
    adv_weight: float = 0.1  # adversarial: the critic's loss beside the regression loss
    dmd_weight: float = 1.0  # dmd: the distribution-matching loss beside the regression loss
    guidance: float = 1.0  # action guidance of the teacher, its ODE targets and its score (1: none)
    guide: tuple[str, ...] = FIELDS  # the action fields guided (the rest kept on both sides)
    guidance_back: float | None = None  # the guidance of frames that back off (move < 0); None: `guidance`'s
    guidance_centred: bool = False  # the amplified response without its mean over the frame (per channel)
    guidance_interval: tuple[float, float] | None = None  # guided only at noise levels lo < t <= hi; None: all
    ema: float = 0.99  # decay of the averaged student weights that are saved
    self_forcing: int = 0  # > 0: the last K context frames are the student's own rollout (regression, dmd)
    grad_clip: float = 1.0
    seed: int = 0

    def action_guidance(self) -> Guidance:
        """The teacher's action guidance these settings ask for (inactive at guidance 1)."""
        return Guidance(self.guidance, self.guide, self.guidance_back, self.guidance_centred, self.guidance_interval)


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
    The student's schedule is the engine's for `steps` and `shift` (the teacher's SamplingDefaults.shift).
    `clip` lays a batch out, self-forced with `config.self_forcing`. The saved student is an EMA of the
    student's weights (`avg`). The student (and its average) starts as a copy of the teacher, or of `init`
    (a student of this teacher trained before: training it further); the critic always starts afresh."""

    def __init__(self, teacher: WorldTransformer, cfg: ModelConfig, steps: int, objective: str = DEFAULT_OBJECTIVE, *,
                 shift: float, config: DistillConfig = DistillConfig(), init: WorldTransformer | None = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        check_self_forcing(config.self_forcing, objective, cfg.cache_frames)
        self.cfg, self.steps, self.objective, self.config, self.shift = cfg, steps, objective, config, shift
        self.schedule = schedule(steps, shift)
        self.substeps = max(1, math.ceil(config.teacher_steps / steps))
        self.adv_weight, self.dmd_weight, self.grad_clip = config.adv_weight, config.dmd_weight, config.grad_clip
        self.guidance = config.action_guidance()
        lr, critic_lr = config.lr, config.critic_lr
        self.teacher = teacher.eval().requires_grad_(False)
        start = teacher if init is None else init
        self.student = copy.deepcopy(start).train().requires_grad_(True)
        self.avg = copy.deepcopy(start).eval().requires_grad_(False)
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

    def clip(self, x0: torch.Tensor, actions: torch.Tensor, g: torch.Generator, seed: int) -> Clip:
        """Latent clips (B, K+1, C, h, w) and their actions laid out for a step (`Clip.of`); with
        self-forcing, their last `config.self_forcing` context frames first replaced by the student's
        own rollout (the engine's sampler at the student's steps, its noise seeded by `seed`)."""
        k = self.config.self_forcing
        if k:
            x0 = self_forced_clip(self.student, self.cfg, x0, actions, x0.shape[1] - 1 - k, k, self.steps, seed,
                                  shift=self.shift)
        return Clip.of(self.cfg, x0, actions, g)

    def student_step(self, clip: Clip, g: torch.Generator, lr: float | None = None,
                     extra_weight: float = 1.0) -> tuple[dict[str, float], torch.Tensor | None]:
        """One update of the student (the teacher and the critic stay as they are). Returns its
        losses and, for the adversarial and DMD objectives, its samples (detached) for the critic.
        `extra_weight` scales the adversarial / DMD term (a warm-up)."""
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        loss = regression_loss(self.student, self.teacher, self.cfg, clip, self.schedule, self.substeps, g,
                               self.guidance)
        out, sample = {"regression": loss.item()}, None
        if self.critic is not None:
            self.critic.eval().requires_grad_(False)  # eval: no power iteration of its spectral norm
            sample = student_sample(self.student, self.cfg, clip, self.schedule, g)
            if self.objective == "adversarial":
                extra = -self.critic(sample[:, 0], clip.prev, clip.actions[:, -1]).mean()
                weight = self.adv_weight
            else:
                extra = dmd_loss(sample, self.teacher, self.critic, clip, g, self.guidance)
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


def method_of(objective: str, self_forcing: int = 0, guidance: Guidance = Guidance()) -> str:
    """What a student's report and card say of how it was trained."""
    forced = f"; Self Forcing: the last {self_forcing} context frames of each clip are the student's own rollout"
    return METHODS[objective] + (forced if self_forcing else "") + (f"; {guidance}" if guidance.active else "")


def check_self_forcing(k: int, objective: str, cache_frames: int | None = None) -> None:
    """Self-forced frames take the place of context frames: at least one real frame must start the
    rollout (`cache_frames`: the model's context, when known), and the adversarial critic's condition
    (the real previous frame) does not exist."""
    if k < 0:
        raise UserError(f"--self-forcing must be at least 0, got {k}")
    if cache_frames is not None and k >= cache_frames:
        raise UserError(f"--self-forcing must be below {cache_frames} (this model's context holds {cache_frames} "
                        f"frames, at least one of them real), got {k}")
    if k and objective == "adversarial":
        raise UserError("--self-forcing works with the regression and dmd objectives, not adversarial (its critic "
                        "judges a frame beside the real previous one)")


def distill_student(teacher: WorldTransformer, cfg: ModelConfig, clips, steps: int,
                    objective: str = DEFAULT_OBJECTIVE, *, shift: float, config: DistillConfig = DistillConfig(),
                    amp: bool = False, progress: bool = True, log=None, init: WorldTransformer | None = None
                    ) -> tuple[WorldTransformer, dict[str, list[float]]]:
    """Train a `steps`-step student (a copy of the teacher, or of `init`) with `objective` (see
    `Distillation`) on `clips` (clips.LatentClips: `.batch(step, batch, lo, hi, seed)` -> latents
    (B, F, C, h, w), actions (B, F, A)); `shift`: the schedule's (the teacher's SamplingDefaults.shift);
    `amp`: bf16 autocast. Every objective sees the same batches and noise for the same seed. Returns the
    EMA student and the loss curves (by name, one value per iteration)."""
    device = next(teacher.parameters()).device
    d = Distillation(teacher, cfg, steps, objective, shift=shift, config=config, init=init)
    iters, batch, lr, critic_lr, ema, seed = config.iters, config.batch, config.lr, config.critic_lr, config.ema, config.seed
    curves: dict[str, list[float]] = {}
    warmup = max(1, iters // 10)
    bar = None
    if progress:
        from worldmodel.progress import progress_bar
        bar = progress_bar(total=iters, desc=f"distill {steps}-step {objective}", unit="it")
    for it in range(iters):
        it_seed = seed * 1_000_003 + it  # this iteration's noise, and its self-forced rollout's
        g = torch.Generator().manual_seed(it_seed)
        x0, a = clips.batch(it, batch, 0, batch, seed)
        ramp = min(1.0, (it + 1) / warmup)  # short warm-up of the learning rates and of the critic's say
        clip = d.clip(x0.to(device), a.to(device), g, it_seed)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses, sample = d.student_step(clip, g, lr=lr * ramp, extra_weight=ramp)
            if sample is not None:
                for _ in range(config.critic_steps):  # the critic keeps up with the student (the last loss is logged)
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
             context: int, steps: int, seed: int = 0, batch: int = 16, *, shift: float) -> dict:
    """Real clips (B, context + R, H, W, 3) uint8 with their actions (B, context + R, A): PSNR (dB) of
    one frame ahead from the real context (teacher-forced), and of an R-frame autoregressive rollout fed
    the real actions (mean over its frames, and at its last frame), against the real frames. The model
    samples in `steps` steps of the schedule of `shift`."""
    device = next(model.parameters()).device
    one, roll, last, sharp_gen, sharp_real = [], [], [], [], []
    for s in range(0, frames.shape[0], batch):
        fr, ac = frames[s:s + batch], actions[s:s + batch].to(device)
        B, F_ = fr.shape[:2]
        lat = torch.cat([ae.encode(f.to(device)) for f in fr.flatten(0, 1).split(256)]).view(B, F_, -1, *cfg.latent_size)
        sampler = FrameSampler(model, cfg, steps, shift=shift, seed=seed, batch_size=B)
        sampler.reset(lat[:, :context], ac[:, :context])
        rollout = torch.stack([sampler.next(ac[:, j:j + 1])[:, 0] for j in range(context, F_)], 1)
        gen = ae.decode_sequence(rollout, fr[:, context - 1]).cpu()  # (B, R, H, W, 3)
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
        recon = torch.stack([ae.reconstruct(f.to(device), shown).cpu()
                             for f, shown in zip(real, frames[:, context - 1:-1])], 0)
    return {"copy_last_psnr_1": round(psnr_frames(copy_last[:, 0], real[:, 0]).mean().item(), 3),
            "copy_last_psnr_rollout": round(psnr_frames(copy_last, real).mean().item(), 3),
            "autoencoder_psnr": round(psnr_frames(recon, real).mean().item(), 3)}
