"""Distillation's objectives (`training.distill`): one batch laid out as the engine sees it (`Clip`),
the teacher's targets, the regression loss, the student's sample, distribution matching (DMD) with its
fake score, and the latent critic of the adversarial objective with its hinge loss."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.game.action import FIELDS, NOOP
from worldmodel.model.diffusion import add_noise, predict_x0, timesteps, velocity_target
from worldmodel.model.transformer import ModelConfig, WorldTransformer

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

    def without_action(self, guidance: "Guidance") -> "Clip":
        """The same clip with the target frame's guided action fields at rest: the unconditional side of
        action guidance."""
        return replace(self, actions=torch.cat((self.actions[:, :-1], guidance.still(self.actions[:, -1:])), 1))

    def student_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's input for the whole clip with the target frame at x (B, 1, C, h, w), level t (B,)."""
        return torch.cat((self.ctx, x), 1), torch.cat((self.t_ctx, t[:, None].to(self.t_ctx)), 1), self.actions


@dataclass(frozen=True)
class Guidance:
    """Action guidance, as classifier-free guidance guides by a prompt: v_still + weight (v_action - v_still),
    the model's response to the action taken amplified `weight` times against the same action with
    `fields` at rest (all of them: standing still, `NOOP`; ("move", "strafe"): the turn kept, only the
    response to walking amplified). `back`: the weight of the frames whose action backs off (move < 0)
    instead, for a teacher that responds to backing off far less than to walking forward (None: `weight`).
    `centred`: the amplified part of the response loses its mean over the frame, channel by channel, so
    that guidance moves what is in the frame without shifting its overall brightness and colour.
    `interval` (lo, hi): guided only at noise levels t with lo < t <= hi, unguided elsewhere (a guidance
    interval, as Kynkaanniemi et al. limit classifier-free guidance; None: at every level).
    The teacher needs no training without actions."""
    weight: float = 1.0  # 1: none
    fields: tuple[str, ...] = FIELDS
    back: float | None = None
    centred: bool = False
    interval: tuple[float, float] | None = None

    def __post_init__(self):
        if self.back is not None and "move" not in self.fields:
            raise ValueError("a backing-off weight guides the move field: fields must include 'move'")
        if self.interval is not None and not 0.0 <= self.interval[0] < self.interval[1] <= 1.0:
            raise ValueError(f"a guidance interval (lo, hi) needs 0 <= lo < hi <= 1, got {self.interval}")

    @property
    def active(self) -> bool:
        return self.weight != 1.0 or self.back not in (None, 1.0)

    def still(self, actions: torch.Tensor) -> torch.Tensor:
        """The actions (..., A) with the guided fields at rest: the unconditional side."""
        rest = torch.tensor(NOOP.to_vector(), dtype=actions.dtype, device=actions.device)
        mask = torch.tensor([f in self.fields for f in FIELDS], device=actions.device)
        return torch.where(mask, rest, actions)

    def __call__(self, v_action: torch.Tensor, v_still: torch.Tensor, actions: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """v_action, v_still (B, 1, C, h, w) of the target frame at noise level t (B,), whose actions are (B, 1, A)."""
        w = torch.full(actions.shape[:1], self.weight, dtype=v_action.dtype, device=v_action.device)
        if self.back is not None:
            w = torch.where(actions[:, -1, FIELDS.index("move")] < 0, self.back, w)
        if self.interval is not None:
            lo, hi = self.interval
            w = torch.where((t > lo) & (t <= hi), w, 1.0)
        response = v_action - v_still  # v_still + w response = v_action + (w - 1) response
        if self.centred:
            response = response - response.mean(dim=(-2, -1), keepdim=True)
        return v_action + (w.view(-1, 1, 1, 1, 1) - 1) * response

    def __str__(self) -> str:
        """What a student's card says of it ("" when inactive)."""
        which = "" if tuple(self.fields) == FIELDS else f" ({', '.join(self.fields)})"
        back = "" if self.back is None else f", backing off w = {self.back:g}"
        centred = ", centred" if self.centred else ""
        interval = "" if self.interval is None else f", at noise levels ({self.interval[0]:g}, {self.interval[1]:g}]"
        return (f"the teacher guided by the action{which}, w = {self.weight:g}{back}{centred}{interval}"
                if self.active else "")


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
                    substeps: int, guidance: Guidance = Guidance()) -> torch.Tensor:
    """The teacher's secant velocity over [t_a, t_b] (per sample, (B,)) from x_a (B, 1, C, h, w):
    `substeps` Euler steps of its flow with the context in a KV cache (of its flow guided by the action
    if `guidance` is active: one more pass a sub-step)."""
    commit_context(teacher, cfg, ctx, t_ctx, a_ctx)
    x = x_a
    for j in range(substeps):
        s0 = t_a + (t_b - t_a) * (j / substeps)
        s1 = t_a + (t_b - t_a) * ((j + 1) / substeps)
        v = teacher.forward_cached(x, s0[:, None], a_tgt, commit=0)
        if guidance.active:
            v = guidance(v, teacher.forward_cached(x, s0[:, None], guidance.still(a_tgt), commit=0), a_tgt, s0)
        x = x + (s1 - s0).view(-1, 1, 1, 1, 1).to(x.dtype) * v
    return ((x - x_a) / (t_b - t_a).view(-1, 1, 1, 1, 1).to(x.dtype)).clone()


def schedule(steps: int, shift: float) -> torch.Tensor:
    """The student's Euler schedule: steps + 1 noise levels from 1 to 0 (float32, on the host), as the
    engine's sampler spaces them for `shift` (the model's SamplingDefaults.shift)."""
    return torch.tensor(timesteps(steps, shift).tolist(), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# The student's objectives
# --------------------------------------------------------------------------------------------------


def regression_loss(student: WorldTransformer, teacher: WorldTransformer, cfg: ModelConfig, clip: Clip,
                    ts: torch.Tensor, substeps: int, g: torch.Generator,
                    guidance: Guidance = Guidance()) -> torch.Tensor:
    """Trajectory distillation: for a random interval [t_i, t_i+1] of the student's schedule `ts`, the
    target frame at x_{t_i} (pure noise for i = 0, the real frame noised to t_i otherwise), the
    student's velocity MSE against the teacher's `substeps`-step secant over the interval (of its flow
    guided by the action if `guidance` is active: guided distillation, the guidance baked into the student)."""
    B, dev = clip.target.shape[0], clip.target.device
    i = torch.randint(0, len(ts) - 1, (B,), generator=g)
    t_a, t_b = ts[i].to(dev), ts[i + 1].to(dev)
    x_a = add_noise(clip.target, torch.randn(clip.target.shape, generator=g).to(clip.target), t_a[:, None])
    target = teacher_targets(teacher, cfg, clip.ctx, clip.t_ctx, clip.actions[:, :-1], x_a, clip.actions[:, -1:],
                             t_a, t_b, substeps, guidance)
    return (velocity(student, clip, x_a, t_a).float() - target.float()).pow(2).mean()


def student_sample(student: WorldTransformer, cfg: ModelConfig, clip: Clip, ts: torch.Tensor,
                   g: torch.Generator) -> torch.Tensor:
    """The student's next frame (B, 1, C, h, w) as the engine samples it: the Euler steps of its
    schedule `ts` from noise after the clip's context. The gradient goes through the last step (its
    pass over the whole clip); the steps before it run without gradient against a KV cache (Self
    Forcing's truncation)."""
    steps, ts = len(ts) - 1, ts.tolist()
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
             g: torch.Generator, guidance: Guidance = Guidance()) -> torch.Tensor:
    """Distribution matching (DMD): the student's sample noised to a random level, denoised by the
    teacher (the real score) and by the fake-score model (trained on the student's samples); the
    sample is moved along fake - real, normalised per sample as in DMD. As a loss whose gradient
    with respect to the sample is that difference (divided by its size). An active `guidance`: the real
    score is guided by the action, as DMD guides it by the prompt."""
    B = sample.shape[0]
    t = DMD_T_MIN + (DMD_T_MAX - DMD_T_MIN) * torch.rand(B, generator=g).to(sample.device)
    with torch.no_grad():
        x_t = add_noise(sample.detach(), torch.randn(sample.shape, generator=g).to(sample), t[:, None])
        v_real = velocity(teacher, clip, x_t, t)
        if guidance.active:
            v_real = guidance(v_real, velocity(teacher, clip.without_action(guidance), x_t, t), clip.actions[:, -1:], t)
        real = predict_x0(x_t, v_real, t[:, None])
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

