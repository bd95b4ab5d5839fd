"""`worldmodel distill`: few-step distillation of a trained world model into a 1-4 step student.

    worldmodel distill --teacher runs/dit/export --data data/train --val-data data/val \\
        --out runs/distill --steps-student 1,2,4

The student has the teacher's architecture and checkpoint format (it starts as a copy of the teacher);
only its `sample_steps` default changes, and `steps` stays a runtime setting of `WorldModel`.

Method: trajectory distillation, one round per student (progressive distillation collapsed into a
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

Reported (in `OUT/distill_report.json` and in each student's config.json `info.distill`): PSNR
against the real game on validation-map clips -- one frame ahead from real context (teacher-forced),
and an autoregressive rollout of `--rollout` frames fed the real actions -- for each student at its
steps, the teacher at its default steps and the undistilled teacher at the student's steps, with a
sharpness ratio beside each (PSNR alone rewards blur: an undistilled 1-step sample is the blurry mean
of the futures and can score a higher PSNR than a sharp many-step sample).
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
from pathlib import Path

import torch
import torch.nn as nn

from worldmodel.autoencoder import Autoencoder, psnr
from worldmodel.checkpoint import atomic_write_json, load_pretrained, save_pretrained
from worldmodel.diffusion import add_noise, timesteps
from worldmodel.errors import UserError
from worldmodel.model import KVCache, ModelConfig, WorldTransformer
from worldmodel.sampler import FrameSampler

METHOD = "trajectory distillation (single-round progressive / TRACT-style): student Euler step regressed onto " \
         "the teacher's m-sub-step ODE solution over the same interval"


# --------------------------------------------------------------------------------------------------
# The distillation step
# --------------------------------------------------------------------------------------------------


def commit_context(model: WorldTransformer, cfg: ModelConfig, ctx: torch.Tensor, t_ctx: torch.Tensor,
                   a_ctx: torch.Tensor) -> KVCache:
    """A KV cache holding (already noised) context frames (B, K, C, h, w), K <= sink + window."""
    B, K = ctx.shape[:2]
    cache = KVCache(cfg, B, device=ctx.device, dtype=ctx.dtype)
    chunk = min(cfg.window_frames, cfg.max_draft)
    for i in range(0, K, chunk):
        model.forward_cached(ctx[:, i:i + chunk], t_ctx[:, i:i + chunk], a_ctx[:, i:i + chunk], cache,
                             commit=ctx[:, i:i + chunk].shape[1])
    return cache


@torch.inference_mode()
def teacher_targets(teacher: WorldTransformer, cfg: ModelConfig, ctx, t_ctx, a_ctx, x_a, a_tgt, t_a, t_b,
                    substeps: int) -> torch.Tensor:
    """The teacher's secant velocity over [t_a, t_b] (per sample, (B,)) from x_a (B, 1, C, h, w):
    `substeps` Euler steps of its flow with the context in a KV cache."""
    cache = commit_context(teacher, cfg, ctx, t_ctx, a_ctx)
    x = x_a
    for j in range(substeps):
        s0 = t_a + (t_b - t_a) * (j / substeps)
        s1 = t_a + (t_b - t_a) * ((j + 1) / substeps)
        v = teacher.forward_cached(x, s0[:, None], a_tgt, cache, commit=0)
        x = x + (s1 - s0).view(-1, 1, 1, 1, 1).to(x.dtype) * v
    return ((x - x_a) / (t_b - t_a).view(-1, 1, 1, 1, 1).to(x.dtype)).clone()


def distill_loss(student: WorldTransformer, teacher: WorldTransformer, cfg: ModelConfig, x0: torch.Tensor,
                 actions: torch.Tensor, steps: int, substeps: int, g: torch.Generator) -> torch.Tensor:
    """One batch of clips (B, K+1, C, h, w) latents, (B, K+1, A) actions: the last frame is the target,
    the first K the context. Returns the student's velocity MSE against the teacher's secant."""
    B, F_ = x0.shape[:2]
    dev, dt = x0.device, x0.dtype
    ts = torch.tensor(timesteps(steps, cfg.sample_shift).tolist(), dtype=torch.float32)
    t_ctx = torch.full((B, F_ - 1), cfg.context_noise)
    ctx = add_noise(x0[:, :-1], torch.randn(x0[:, :-1].shape, generator=g).to(dev, dt), t_ctx.to(dev))
    i = torch.randint(0, steps, (B,), generator=g)
    t_a, t_b = ts[i], ts[i + 1]
    x_a = add_noise(x0[:, -1:], torch.randn(x0[:, -1:].shape, generator=g).to(dev, dt), t_a[:, None].to(dev))
    t_ctx, t_a, t_b = t_ctx.to(dev), t_a.to(dev), t_b.to(dev)
    target = teacher_targets(teacher, cfg, ctx, t_ctx, actions[:, :-1], x_a, actions[:, -1:], t_a, t_b, substeps)
    v = student(torch.cat((ctx, x_a), 1), torch.cat((t_ctx, t_a[:, None]), 1), actions)[:, -1:]
    return (v.float() - target.float()).pow(2).mean()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def distill_student(teacher: WorldTransformer, cfg: ModelConfig, clips, steps: int, *, teacher_steps: int = 8,
                    iters: int = 300, batch: int = 8, lr: float = 1e-4, ema: float = 0.99, seed: int = 0,
                    grad_clip: float = 1.0, progress: bool = True, log=None) -> tuple[WorldTransformer, list[float]]:
    """Train a `steps`-step student (a copy of the teacher) on `clips` (train.LatentClips: `.batch(step,
    batch, lo, hi, seed)` -> latents (B, F, C, h, w), actions (B, F, A)). Returns the EMA student and
    the loss curve."""
    device = next(teacher.parameters()).device
    substeps = max(1, math.ceil(teacher_steps / steps))
    teacher = teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    avg = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses: list[float] = []
    bar = None
    if progress:
        from worldmodel.progress import progress_bar
        bar = progress_bar(total=iters, desc=f"distill {steps}-step", unit="it", disable=None)
    for it in range(iters):
        g = torch.Generator().manual_seed(seed * 1_000_003 + it)
        x0, a = clips.batch(it, batch, 0, batch, seed)
        lr_now = lr * min(1.0, (it + 1) / max(1, iters // 10))  # short warm-up
        for group in opt.param_groups:
            group["lr"] = lr_now
        loss = distill_loss(student, teacher, cfg, x0.to(device), a.to(device), steps, substeps, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        opt.step()
        ema_update(avg, student, ema if it >= iters // 10 else 0.0)
        lv = loss.item()
        if not math.isfinite(lv):
            raise RuntimeError(f"distillation diverged at iteration {it + 1}: loss {lv}")
        losses.append(lv)
        if bar is not None:
            bar.set_postfix(loss=f"{lv:.4f}", refresh=False)
            bar.update(1)
        if log is not None:
            log(it + 1, lv)
    if bar is not None:
        bar.close()
    return avg, losses


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
        p = psnr(gen, real)  # (B, R)
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
    return {"copy_last_psnr_1": round(psnr(copy_last[:, 0], real[:, 0]).mean().item(), 3),
            "copy_last_psnr_rollout": round(psnr(copy_last, real).mean().item(), 3),
            "autoencoder_psnr": round(psnr(recon, real).mean().item(), 3)}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="trained checkpoint folder (or Hub id) to distil")
    parser.add_argument("--data", required=True, help="dataset folder (its training maps MAP01-MAP20 are used)")
    parser.add_argument("--val-data", default=None, help="dataset with validation maps MAP21-MAP24 (default: --data)")
    parser.add_argument("--out", required=True, help="output folder: the student checkpoint (one value of "
                                                     "--steps-student) or OUT/steps-K for each K")
    parser.add_argument("--steps-student", default="2", help="student sampling steps: 1, 2 or 4, or a list 1,2,4")
    parser.add_argument("--teacher-steps", type=int, default=8,
                        help="teacher Euler steps over the whole schedule that one student schedule imitates")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per student")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.99, help="EMA decay of the student weights that are saved")
    parser.add_argument("--max-clips", type=int, default=4000, help="training clips (evenly spaced over the data)")
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
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from worldmodel.cli_common import check_output_path
    from worldmodel.engine import resolve_device
    from worldmodel.train import check_sizes, encode_dataset

    check_sizes(args, at_least_1=("teacher_steps", "iters", "batch", "max_clips", "eval_clips", "rollout"),
                at_least_0=("threads",))
    ks = parse_steps(args.steps_student)
    check_output_path(args.out, folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg, ae, teacher, config, folder = load_pretrained(args.teacher, device=device)
    teacher.attention = "sdpa" if device.type != "cuda" else teacher.attention
    progress = not args.no_progress
    context = cfg.cache_frames  # sinks + window: the context fits the cache without wrapping
    t0 = time.time()
    if args.latents:
        from worldmodel.train import LatentClips
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

    report = {"teacher": str(args.teacher), "method": METHOD, "data": str(args.data), "val_data": str(val_source),
              "train_clips": len(train), "teacher_steps": args.teacher_steps, "iters": args.iters,
              "batch": args.batch, "lr": args.lr, "ema": args.ema, "seed": args.seed, "device": str(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "baselines": baselines(ae, vf, context),
              "teacher_eval": {}, "students": {}}
    teacher_default = cfg.sample_steps
    for k in sorted({teacher_default, *ks}):
        report["teacher_eval"][str(k)] = evaluate(teacher, ae, cfg, vf, va, context, k, seed=args.seed)
        print(f"teacher at {k} steps: {report['teacher_eval'][str(k)]}", file=sys.stderr)
    out = Path(args.out)
    for k in ks:
        t1 = time.time()
        student, losses = distill_student(teacher, cfg, train, k, teacher_steps=args.teacher_steps, iters=args.iters,
                                          batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed,
                                          progress=progress)
        res = evaluate(student, ae, cfg, vf, va, context, k, seed=args.seed)
        n = max(1, len(losses) // 10)
        entry = {"steps": k, "eval": res, "loss_first": sum(losses[:n]) / n, "loss_last": sum(losses[-n:]) / n,
                 "time_s": round(time.time() - t1, 1),
                 "teacher_same_steps": report["teacher_eval"][str(k)],
                 "teacher_default": report["teacher_eval"][str(teacher_default)]}
        dest = out if len(ks) == 1 else out / f"steps-{k}"
        scfg = ModelConfig.from_dict({**cfg.to_dict(), "sample_steps": k})
        info = {**(config.get("info") or {}), "distill": {k_: v for k_, v in report.items() if k_ != "students"}
                | {"student_steps": k, "eval": res, "loss_first": entry["loss_first"], "loss_last": entry["loss_last"]}}
        save_pretrained(dest, scfg, ae, copy.deepcopy(student).half() if args.half else student, info)
        if (Path(folder) / "start_clips").is_dir() and not (dest / "start_clips").exists():
            shutil.copytree(Path(folder) / "start_clips", dest / "start_clips")
        entry["checkpoint"] = str(dest)
        report["students"][str(k)] = entry
        print(f"student {k}-step -> {dest}: {res} (teacher at {k} steps: {report['teacher_eval'][str(k)]['psnr_1']} dB "
              f"one ahead)", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "distill_report.json", report)
    print(json.dumps({k: v["eval"] for k, v in report["students"].items()}, indent=1))
    return 0
