"""Training the diffusion transformer (`worldmodel train model`) on clips of `clip_frames` frames whose
latents come from the frozen autoencoder (`clips`): flow matching with an independent noise level per
frame (Diffusion Forcing) and noisy context prefixes (GameNGen), see
`diffusion.sample_training_noise_levels`; with `--self-forcing K`, on a share of the steps K context
frames are the model's own rollout (Self Forcing). Validation: the loss on validation clips,
teacher-forced next-frame PSNR and a sample strip (real / teacher-forced / autoregressive) with the
engine's sampler; each checkpoint also exports a ready-to-play checkpoint of the EMA weights."""
from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from worldmodel.errors import UserError
from worldmodel.files import atomic_write_json
from worldmodel.model.sampler import FrameSampler, SamplingDefaults
from worldmodel.metrics import psnr_frames, psnr_pooled
from worldmodel.model import diffusion
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.transformer import ModelConfig, WorldTransformer
from worldmodel.training.clips import FrameClips, LatentClips, encode_frames
from worldmodel.training.config import ModelTrainConfig
from worldmodel.training.runs import (MetricsLog, checkpoint_dirs, export, load_checkpoint, save_checkpoint, save_png,
                                      trim_metrics)
from worldmodel.training.steps import (Dist, StepRecord, amp_enabled, ema_update, hardware, rank0_flag, set_lr,
                                       setup_distributed, step_bar, step_generator)


# the fields that shape the latent a token carries (`init_from`: where they differ, the token layers start afresh)
LATENT_FIELDS = ("latent_channels", "ae_channels", "ae_res_blocks", "patch_size")


def init_from(model: WorldTransformer, path: str | Path, cfg: ModelConfig) -> dict:
    """Copy the transformer weights of the checkpoint at `path` into `model` and return the checkpoint's
    config.json: a new run that continues a trained model (its optimizer state is not in a checkpoint
    folder; `--resume` continues a run exactly). The model configs must agree except for the context
    noise (the sampling defaults are the run's own, not part of the model config), and
    - `prev_frame` may be switched on: the previous frame's input weights start at zero, so the new model
      computes exactly what the checkpoint's did and learns to use the previous frame from there;
    - the latent may change (`LATENT_FIELDS`: another autoencoder, another patch size): the blocks, the
      noise and action embeddings and the output layer's modulation carry over; the patch embedding and
      the output projection keep this model's fresh initialisation (the output at zero, as in a new DiT),
      since the tokens they read and write mean something else now;
    - `prev_skip` may change: the output means something else, so the output projection starts afresh
      (at zero: with the skip on, the new model starts by copying the previous frame)."""
    from worldmodel.model.checkpoint import load_pretrained

    icfg, _, transformer, config, _ = load_pretrained(path)
    differences = cfg.differences(icfg)
    free = ("context_noise", "prev_skip") + LATENT_FIELDS
    diff = {k: v for k, v in differences.items() if k not in free and not (k == "prev_frame" and cfg.prev_frame)}
    if diff:
        raise UserError(f"--init {path}: its model config differs from this run's in {ModelConfig.describe(diff)}")
    state, fresh = transformer.state_dict(), model.state_dict()
    new_layers = (("patch_embed", "final.linear") if any(k in LATENT_FIELDS for k in differences) else
                  ("final.linear",) if "prev_skip" in differences else ())
    for name in (f"{layer}.{p}" for layer in new_layers for p in ("weight", "bias")):
        state[name] = fresh[name]
    w = state["patch_embed.weight"]
    if model.patch_embed.weight.shape != w.shape:  # prev_frame switched on: [old weights, zeros]
        state["patch_embed.weight"] = torch.cat((w, torch.zeros_like(w)), dim=1)
    model.load_state_dict(state)
    return config


# --------------------------------------------------------------------------------------------------
# Evaluation: validation loss, teacher-forced PSNR, sample strips
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def self_forced_clip(model: WorldTransformer, cfg: ModelConfig, x0: torch.Tensor, actions: torch.Tensor,
                     real: int, k: int, steps: int, seed: int, *, shift: float) -> torch.Tensor:
    """Self Forcing's context, the training path being the inference path: from the first `real` frames
    of real clips x0 (B, F, C, h, w) (their actions (B, F, A)), the model rolls out the next k frames
    with the engine's own sampler (`FrameSampler`: the KV cache, the fused commit, counter-based noise
    seeded by `seed`, `steps` Euler steps of the schedule of `shift`), fed the real actions. Returns x0
    with frames real..real+k-1 replaced by the model's own (no gradient flows into them)."""
    was_training = model.training
    model.eval()
    sampler = FrameSampler(model, cfg, steps, shift=shift, seed=seed, batch_size=x0.shape[0])
    sampler.reset(x0[:, :real], actions[:, :real])
    own = [sampler.next(actions[:, real + i:real + i + 1]) for i in range(k)]
    model.train(was_training)
    return torch.cat((x0[:, :real], *[o.to(x0.dtype) for o in own], x0[:, real + k:]), dim=1)


def self_forcing_layout(batch: int, frames: int, real: int, k: int, context_max: float, g: torch.Generator,
                        shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels (batch, frames) and loss weights (batch, frames) of a self-forced clip: the real and
    the self-made context (the first real + k frames) at context levels in [0, context_max] as the
    engine commits them, the frames after it at independent levels (Diffusion Forcing); the loss counts
    every frame but the self-made ones (their clean values are the model's own, not the game's)."""
    t = diffusion.shift_noise_levels(diffusion.sample_noise_levels((batch, frames), generator=g), shift)
    ctx = torch.rand((batch, real + k), generator=g) * context_max
    t = torch.cat((ctx, t[:, real + k:]), dim=1)
    w = torch.ones(batch, frames)
    w[:, real:real + k] = 0.0
    return t, w


@torch.no_grad()
def validation_loss(model: nn.Module, clips: LatentClips, n: int, batch: int, seed: int, device,
                    context_prob: float, context_max: float) -> float:
    """Mean flow-matching loss over the first n clips with fixed noise (comparable across steps)."""
    n = min(n, len(clips))
    if n == 0:
        return float("nan")
    total = 0.0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch))
        x0, a = clips.clip(idx)
        g = step_generator(seed, i, stream=7)
        t = diffusion.sample_training_noise_levels(len(idx), x0.shape[1], g, context_prob=context_prob,
                                                   context_max=context_max)
        noise = torch.randn(x0.shape, generator=g)
        total += diffusion.flow_matching_loss(model, x0.to(device), a.to(device), t.to(device),
                                              noise.to(device)).item() * len(idx)
    return total / n


def _context_len(cfg: ModelConfig, clip_frames: int) -> int:
    return max(1, min(cfg.cache_frames, clip_frames - 1))


@torch.no_grad()
def teacher_forced(model: WorldTransformer, autoencoder: Autoencoder, cfg: ModelConfig, frames: torch.Tensor,
                   actions: torch.Tensor, steps: int, seed: int = 0, k: int | None = None, *, shift: float) -> dict:
    """One frame ahead from real context, for a batch of real clips (B, F, H, W, 3) uint8: the first k
    frames are the context (encoded and committed as the engine does), frame k is generated with the
    sampler and compared with the real one. Returns mean PSNRs: model, copy-last-frame baseline and the
    autoencoder's reconstruction of frame k (a ceiling)."""
    device = next(model.parameters()).device
    B, Fr = frames.shape[:2]
    k = k or _context_len(cfg, Fr)
    ctx = encode_frames(autoencoder, frames[:, :k].flatten(0, 1), device=device).view(B, k, *cfg_latent(cfg))
    sampler = FrameSampler(model, cfg, steps, shift=shift, seed=seed, batch_size=B)
    sampler.reset(ctx.to(device), actions[:, :k].to(device))
    latent = sampler.generate(actions[:, k:k + 1].to(device))[:, 0]
    shown = frames[:, k - 1]  # the frame before: a P-frame decoder's reference
    pred = autoencoder.decode_uint8(latent, shown).cpu()
    real = frames[:, k]
    recon = autoencoder.reconstruct(real.to(device), shown).cpu()
    return {"psnr": psnr_frames(pred, real).mean().item(), "psnr_copy_last": psnr_frames(frames[:, k - 1], real).mean().item(),
            "psnr_ae": psnr_frames(recon, real).mean().item(), "psnr_pooled": psnr_pooled(pred, real),
            "psnr_pooled_copy_last": psnr_pooled(frames[:, k - 1], real), "clips": B, "context": k}


def cfg_latent(cfg: ModelConfig) -> tuple[int, int, int]:
    return (cfg.latent_channels, *cfg.latent_size)


@torch.no_grad()
def sample_strip(model: WorldTransformer, autoencoder: Autoencoder, cfg: ModelConfig, frames: torch.Tensor,
                 actions: torch.Tensor, steps: int, seed: int = 0, *, shift: float) -> tuple[torch.Tensor, dict]:
    """For real clips (B, F, H, W, 3): rows per clip = real frames k..F-1, teacher-forced predictions
    (each from all real frames before it), and an autoregressive rollout from the first k real frames
    fed the real actions. Returns the image (uint8 (rows*H, cols*W, 3)) and rollout PSNRs."""
    device = next(model.parameters()).device
    B, Fr, H, W, _ = frames.shape
    k = _context_len(cfg, Fr)
    lat = encode_frames(autoencoder, frames.flatten(0, 1), device=device).view(B, Fr, *cfg_latent(cfg)).to(device)
    act = actions.to(device)
    tf = []
    for j in range(k, Fr):
        s = FrameSampler(model, cfg, steps, shift=shift, seed=seed, batch_size=B)
        s.reset(lat[:, :j], act[:, :j])
        tf.append(autoencoder.decode_uint8(s.generate(act[:, j:j + 1])[:, 0], frames[:, j - 1]).cpu())
    s = FrameSampler(model, cfg, steps, shift=shift, seed=seed, batch_size=B)
    s.reset(lat[:, :k], act[:, :k])
    rollout = torch.stack([s.next(act[:, j:j + 1])[:, 0] for j in range(k, Fr)], 1)  # (B, R, C, h, w)
    ar = autoencoder.decode_sequence(rollout, frames[:, k - 1]).cpu()
    tf, real = torch.stack(tf, 1), frames[:, k:]  # (B, R, H, W, 3), as ar
    rows = torch.stack((real, tf, ar), 1).flatten(0, 1)  # (3B, R, H, W, 3)
    image = rows.permute(0, 2, 1, 3, 4).reshape(rows.shape[0] * H, rows.shape[1] * W, 3)
    stats = {"psnr_rollout": psnr_frames(ar, real).mean().item(),
             "psnr_rollout_copy": psnr_frames(frames[:, k - 1:k].expand_as(real), real).mean().item(),
             "rollout_frames": Fr - k}
    return image, stats


def train_model(train: LatentClips, out: str | Path, cfg: ModelConfig, tcfg: ModelTrainConfig,
                autoencoder: Autoencoder | None = None, val: LatentClips | None = None,
                val_frames: FrameClips | None = None, resume: bool = False, info: dict | None = None,
                on_step=None, sampling: SamplingDefaults | None = None) -> dict:
    """Train the transformer of `cfg` on cached latent clips. `autoencoder` (frozen) is needed for the
    teacher-forced PSNR / sample strips on `val_frames` and for the export; `val` gives the validation
    loss. `sampling`: the run's sampling defaults (default SamplingDefaults()), written into the export
    and used by validation and self-forcing unless `tcfg.sample_steps` names the steps. Works as one
    process or under torchrun (DDP). `on_step(step, loss)` is called after every step (tests use it to
    kill a run). Returns a summary with the losses of the steps run."""
    out = Path(out)
    # under torchrun the process group stays up for the rest of the process (the CLI closes it)
    return _train_model(train, out, cfg, tcfg, autoencoder, val, val_frames, resume, info or {}, on_step,
                        sampling or SamplingDefaults(), setup_distributed(tcfg.device))


def _fit_clips(train, val, cfg: ModelConfig, tcfg: ModelTrainConfig, dist: Dist):
    """The training and validation clips cut to the run's clip length, checked against the model and the
    processes, before anything is built. Returns (train, val, clip length)."""
    F_ = tcfg.frames(cfg)
    if train.clip_frames != F_:
        train = train.with_clip_frames(F_)
    if val is not None and val.clip_frames != F_:
        val = val.with_clip_frames(F_)
    for clips in (train, val):
        if isinstance(clips, LatentClips) and tuple(clips.latents.shape[1:]) != cfg_latent(cfg):
            raise UserError(f"latents are {tuple(clips.latents.shape[1:])}, the model expects {cfg_latent(cfg)}")
    if tcfg.batch % dist.world:
        raise UserError(f"--batch {tcfg.batch} is not divisible by the {dist.world} processes")
    if F_ < 2:
        raise UserError("clips need at least 2 frames")
    return train, val, F_


def _optimizer(model: WorldTransformer, tcfg: ModelTrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, tcfg.beta2),
                             fused=device.type == "cuda" or None)


def _start(out: Path, model: WorldTransformer, ema: WorldTransformer, opt: torch.optim.Optimizer, cfg: ModelConfig,
           tcfg: ModelTrainConfig, resume: bool, dist: Dist) -> tuple[int, float, dict]:
    """The run's newest checkpoint loaded (with `resume`), else a fresh start (from `tcfg.init`'s weights
    if given). Returns (first step, training time so far, the last validation)."""
    start, elapsed, last_val = 0, 0.0, {}
    ckpts = checkpoint_dirs(out) if resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], {"model": model, "ema": ema}, opt)
        start, elapsed = state["step"], state.get("elapsed_s", 0.0)
        last_val = state.get("last_val") or {}
        if dist.main:
            trim_metrics(out, start)
            print(f"resuming from {ckpts[-1]} (step {start})", file=sys.stderr)
    else:
        if tcfg.init:
            distilled = "distill" in (init_from(model, tcfg.init, cfg).get("info") or {})
            ema.load_state_dict(model.state_dict())
            if distilled and dist.main:  # measured: benchmarks/finetune_doom-tiny_map01_cpu
                print(f"note: --init {tcfg.init} is a distilled student; this training moves it back towards a "
                      "many-step teacher, so distil the result again (worldmodel distill) before playing it",
                      file=sys.stderr)
        if dist.main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
    return start, elapsed, last_val


def _step_inputs(train, model: WorldTransformer, cfg: ModelConfig, tcfg: ModelTrainConfig, step: int, F_: int,
                 lo: int, hi: int, sf_steps: int, sf_real_max: int, device: torch.device, amp: bool, shift: float):
    """This rank's inputs of training step `step`: its slice [lo:hi] of the step's global batch (data,
    noise levels, noise), on `device`. On a self-forced step, K context frames are the model's own
    rollout from `real` real ones (`sf_steps` steps of the schedule of `shift`), and the loss weights
    (else None) leave those frames out.
    Returns (x0, actions, noise levels, noise, weights)."""
    x0, a = train.batch(step, tcfg.batch, lo, hi, tcfg.seed)
    g = step_generator(tcfg.seed, step, stream=3)
    weight = None
    g_sf = step_generator(tcfg.seed, step, stream=4)
    if sf_steps and torch.rand((), generator=g_sf) < tcfg.self_forcing_prob:
        real = int(torch.randint(1, sf_real_max + 1, (), generator=g_sf))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x0 = self_forced_clip(model, cfg, x0.to(device), a.to(device), real, tcfg.self_forcing, sf_steps,
                                  seed=tcfg.seed * 1_000_003 + step, shift=shift)
        t, weight = self_forcing_layout(tcfg.batch, F_, real, tcfg.self_forcing, tcfg.context_max, g,
                                        tcfg.noise_shift)
        weight = weight[lo:hi].to(device)
    else:
        t = diffusion.sample_training_noise_levels(tcfg.batch, F_, g, context_prob=tcfg.context_prob,
                                                   context_max=tcfg.context_max, shift=tcfg.noise_shift)
    noise = torch.randn((tcfg.batch, *x0.shape[1:]), generator=g)[lo:hi]
    return x0.to(device), a.to(device), t[lo:hi].to(device), noise.to(device), weight


def validate(model: WorldTransformer, ema: WorldTransformer, autoencoder: Autoencoder | None,
             val: LatentClips | None, val_frames: FrameClips | None, cfg: ModelConfig, tcfg: ModelTrainConfig,
             batch: int, steps: int, amp: bool, samples: Path, step: int, shift: float) -> dict:
    """The validation of step `step`: the loss of the model and of its EMA on `val`; with the
    autoencoder, the EMA's teacher-forced PSNR (at `steps` sampling steps of the schedule of `shift`,
    and at 1) on `val_frames`, and
    a sample strip of its first 2 clips written to `samples`/step_XXXXXXXX.png and latest.png."""
    device = next(model.parameters()).device
    res: dict = {}
    if val is not None and len(val):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            res["val_loss"] = validation_loss(model.eval(), val, tcfg.val_clips, batch, tcfg.seed, device,
                                              tcfg.context_prob, tcfg.context_max)
            res["val_loss_ema"] = validation_loss(ema, val, tcfg.val_clips, batch, tcfg.seed, device,
                                                  tcfg.context_prob, tcfg.context_max)
        model.train()
    if autoencoder is not None and val_frames is not None and len(val_frames):
        ae = autoencoder.to(device).eval()
        n = min(tcfg.eval_clips, len(val_frames))
        fr, ac = val_frames.clip(torch.arange(n))
        tf = teacher_forced(ema, ae, cfg, fr, ac, steps, seed=tcfg.seed, shift=shift)
        tf1 = teacher_forced(ema, ae, cfg, fr, ac, 1, seed=tcfg.seed, shift=shift)
        res.update({"psnr_tf": tf["psnr"], "psnr_tf_1step": tf1["psnr"], "psnr_copy_last": tf["psnr_copy_last"],
                    "psnr_ae": tf["psnr_ae"], "psnr_pooled_tf": tf["psnr_pooled"],
                    "psnr_pooled_copy_last": tf["psnr_pooled_copy_last"], "eval_clips": n,
                    "sample_steps": steps})
        image, stats = sample_strip(ema, ae, cfg, fr[:2], ac[:2], steps, seed=tcfg.seed, shift=shift)
        save_png(samples / f"step_{step:08d}.png", image)
        save_png(samples / "latest.png", image)
        res.update(stats)
    return res


def _train_model(train, out, cfg, tcfg, autoencoder, val, val_frames, resume, info, on_step,
                 sampling: SamplingDefaults, dist: Dist) -> dict:
    device = dist.device
    train, val, F_ = _fit_clips(train, val, cfg, tcfg, dist)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)
    model = WorldTransformer(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = _optimizer(model, tcfg, device)
    start, elapsed, last_val = _start(out, model, ema, opt, cfg, tcfg, resume, dist)
    if dist.main:
        atomic_write_json(out / "config.json", {"kind": "model", "model": cfg.to_dict(),
                                                "sampling": sampling.to_dict(), "train": asdict(tcfg),
                                                "clip_frames": F_, "world_size": dist.world,
                                                "train_clips": len(train), "val_clips": len(val) if val else 0,
                                                **info})
    net: nn.Module = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tcfg.compile:
        net = torch.compile(net)
    amp = amp_enabled(tcfg.amp, device)
    log = MetricsLog(out, dist.main)
    b = tcfg.batch // dist.world
    lo, hi = dist.rank * b, (dist.rank + 1) * b
    steps_eval = tcfg.sample_steps or sampling.steps
    sf_steps = steps_eval if tcfg.self_forcing else 0  # the rollout samples as the engine does
    # 1..sf_real_max real frames start the rollout; at least one target frame follows the self-made ones
    sf_real_max = min(cfg.cache_frames, F_ - tcfg.self_forcing - 1)
    if tcfg.self_forcing and sf_real_max < 1:
        raise UserError(f"--self-forcing {tcfg.self_forcing}: a {F_}-frame clip has no room for a real frame, "
                        f"{tcfg.self_forcing} self-made ones and a target")
    hw = hardware(device)

    def do_export(step: int) -> None:
        if autoencoder is None:
            return
        summary = {"training": {"maps": train.maps, "frames": int(train.frames), "clips": len(train),
                                "clip_frames": F_, "frames_seen": step * tcfg.batch * F_, "steps": step, "batch": tcfg.batch, "world_size": dist.world,
                                "hardware": hw, "time_s": round(record.elapsed, 1), "lr": tcfg.lr, "ema_decay": tcfg.ema_decay,
                                "validation_maps": val.maps if val is not None else [],
                                **{k: v for k, v in info.items() if k != "level"}},
                   "validation": last_val, "steps": step}
        if "level" in info:  # a level model: what play, record, bench and eval read (`info.level`)
            summary["level"] = info["level"]
        export(out, cfg, autoencoder, ema, summary, sampling)

    bar = step_bar(tcfg, dist, start, "model")
    record = StepRecord(tcfg, elapsed, on_step)
    t_process = time.perf_counter()
    stopped = None
    model.train()
    for step in range(start, tcfg.steps):
        t_step = time.perf_counter()
        lr = set_lr(opt, tcfg, step)
        x0, a, t, noise, weight = _step_inputs(train, model, cfg, tcfg, step, F_, lo, hi, sf_steps, sf_real_max,
                                               device, amp, sampling.shift)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = diffusion.flow_matching_loss(net, x0, a, t, noise, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip) if tcfg.grad_clip else torch.zeros(())
        opt.step()
        ema_update(ema, model, tcfg.ema_decay, step)
        loss_v = dist.mean(loss.detach().float()).item()
        if not math.isfinite(loss_v):
            raise RuntimeError(f"training diverged at step {step + 1}: loss {loss_v}")
        done = record.done(step, loss_v, t_step)
        rate = record.rate(done)
        if rate is not None:
            log.write(step=done, loss=loss_v, lr=lr, grad_norm=float(gnorm), clips_per_s=rate)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.4f}", clips_s=f"{rate:.2f}",
                                refresh=False, **({"val": f"{last_val['val_loss']:.4f}"} if "val_loss" in last_val else {}))
        if bar is not None:
            bar.update(1)
        if done % tcfg.val_every == 0 or done == tcfg.steps:
            if dist.main:
                last_val = validate(model, ema, autoencoder, val, val_frames, cfg, tcfg, b * 2, steps_eval, amp,
                                    out / "samples", done, sampling.shift)
                if last_val:
                    log.write(step=done, **last_val)
                    log.plot()
                    if bar is not None:
                        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                              for k, v in last_val.items()))
            dist.barrier()
        out_of_time = bool(tcfg.max_time) and rank0_flag(time.perf_counter() - t_process >= tcfg.max_time)
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps or out_of_time:
            if dist.main:
                save_checkpoint(out, done, {"model": model, "ema": ema}, opt,
                                {"elapsed_s": record.elapsed, "kind": "model", "world_size": dist.world,
                                 "data_position": {"clips_seen": done * tcfg.batch, "epoch": done * tcfg.batch // len(train),
                                                   "seed": tcfg.seed}, "last_val": last_val},
                                tcfg.keep_checkpoints)
                do_export(done)
            dist.barrier()
        if out_of_time:
            stopped = done
            if dist.main:
                print(f"\nworldmodel train: --max-time {tcfg.max_time:g} s reached at step {done} of {tcfg.steps}; "
                      f"checkpointed and exported (--resume continues)", file=sys.stderr)
            break
    if bar is not None:
        bar.close()
    if start >= tcfg.steps and dist.main and resume:  # a finished run resumed: export it again
        do_export(start)
    return {"steps": stopped or tcfg.steps, "start_step": start, "losses": record.losses, "time_s": round(record.elapsed, 1),
            "validation": last_val, "world_size": dist.world, "export": str(out / "export") if autoencoder else None,
            "model": model, "ema": ema}
