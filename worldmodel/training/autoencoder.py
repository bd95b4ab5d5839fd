"""Training the autoencoder (`worldmodel train autoencoder`): reconstruction loss (L1 + MSE, and with
`--adv-weight` a PatchGAN critic's hinge loss) on frames of the training maps, optionally on random
crops; PSNR and sharpness on the validation maps; the latent statistics calibrated at the end. Writes
RUN/autoencoder.safetensors + RUN/config.json, which `train model` reads back (`load_autoencoder`)."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.errors import UserError
from worldmodel.files import atomic_write_json
from worldmodel.metrics import psnr_frames
from worldmodel.model.autoencoder import (Autoencoder, AutoencoderConfig, PatchDiscriminator, motion_loss,
                                         reconstruction_loss)
from worldmodel.model.checkpoint import (CONFIG_FILE, FORMAT_VERSION, check_state_dict, load_tensors, read_config,
                                         save_tensors)
from worldmodel.model.transformer import ModelConfig
from worldmodel.training.config import AutoencoderTrainConfig
from worldmodel.training.runs import (AE_FILE, MetricsLog, checkpoint_dirs, load_checkpoint, save_checkpoint,
                                      save_png, trim_metrics)
from worldmodel.training.steps import (Dist, StepRecord, batch_indices, hardware, set_lr, setup_distributed,
                                       step_bar, step_generator)


def save_autoencoder(run: Path, cfg: ModelConfig, autoencoder: Autoencoder, info: dict) -> Path:
    run = Path(run)
    save_tensors(run / AE_FILE, autoencoder.state_dict())
    atomic_write_json(run / CONFIG_FILE, {"format_version": FORMAT_VERSION, "kind": "autoencoder",
                                          "model": cfg.to_dict(), "autoencoder": autoencoder.cfg.to_dict(),
                                          "info": info})
    return run / AE_FILE


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, dict]:
    """An autoencoder from a `train autoencoder` run folder, its `autoencoder.safetensors` file, or a
    checkpoint folder (config.json + autoencoder.safetensors). Returns it (eval mode) and its config."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such autoencoder run folder or file")
    folder, f = (p, p / AE_FILE) if p.is_dir() else (p.parent, p)
    config = read_config(folder)
    if "autoencoder" in config:
        ae_cfg = AutoencoderConfig(**config["autoencoder"])
    else:
        ae_cfg = ModelConfig.from_dict(config["model"]).autoencoder
    ae = Autoencoder(ae_cfg)
    tensors = load_tensors(f)
    check_state_dict(tensors, ae, f)
    ae.load_state_dict(tensors)
    return ae.eval(), config


P_FRAME_VAL_CLIP = 8  # a P-frame decoder's validation clips: the first frame shown, 7 decoded in a chain


def ae_shape(c: AutoencoderConfig) -> tuple:
    return (tuple(c.frame_size), c.latent_channels, tuple(c.channels), tuple(c.res_blocks))


def train_autoencoder(frames: torch.Tensor, out: str | Path, cfg: ModelConfig, tcfg: AutoencoderTrainConfig,
                      val_frames: torch.Tensor | None = None, resume: bool = False, info: dict | None = None,
                      on_step=None) -> dict:
    """Train the autoencoder of `cfg` on uint8 frames (N, H, W, 3); PSNR on `val_frames`; calibrate the
    latent statistics at the end; write RUN/autoencoder.safetensors + RUN/config.json.
    Returns a summary (losses of the steps run, validation PSNR, ...)."""
    out = Path(out)
    # under torchrun the process group stays up for the rest of the process (the CLI closes it)
    return _train_autoencoder(frames, out, cfg, tcfg, val_frames, resume, info or {}, on_step,
                              setup_distributed(tcfg.device))


def _check_frames(frames: torch.Tensor, cfg: ModelConfig, what: str) -> None:
    """uint8 frames (N, H, W, 3), or for a P-frame decoder clips (N, F, H, W, 3)."""
    H, W = cfg.frame_size
    ndim, shape = (5, "(N, F, ") if cfg.autoencoder.p_frame else (4, "(N, ")
    if frames.ndim != ndim or tuple(frames.shape[-3:]) != (H, W, 3) or frames.dtype != torch.uint8:
        raise UserError(f"{what}: frames are {tuple(frames.shape)} {frames.dtype}; the model expects uint8 "
                        f"{shape}{H}, {W}, 3) (change the frame size with --set frame_size={H},{W})")


def _train_autoencoder(frames, out, cfg, tcfg, val_frames, resume, info, on_step, dist: Dist) -> dict:
    _check_frames(frames, cfg, "training data")
    if val_frames is not None:
        _check_frames(val_frames, cfg, "validation data")
    if tcfg.crop:
        h, w = tcfg.crop
        d = cfg.autoencoder.downsample
        if h % d or w % d or h > cfg.frame_size[0] or w > cfg.frame_size[1]:
            raise UserError(f"--crop {h}x{w}: must fit in {cfg.frame_size[0]}x{cfg.frame_size[1]} and be divisible by {d}")
    if tcfg.batch % dist.world:
        raise UserError(f"--batch {tcfg.batch} is not divisible by the {dist.world} processes")
    out.mkdir(parents=True, exist_ok=True)
    device = dist.device
    torch.manual_seed(tcfg.seed)
    ae = Autoencoder(cfg.autoencoder).to(device)
    if tcfg.decoder_only and not tcfg.init:
        raise UserError("--decoder-only needs --init: the autoencoder whose encoder stays as it is")
    if tcfg.init:
        init, _ = load_autoencoder(tcfg.init)
        if ae_shape(init.cfg) != ae_shape(ae.cfg):
            raise UserError(f"--init {tcfg.init}: the autoencoder {ae_shape(init.cfg)} does not match this run's "
                            f"{ae_shape(ae.cfg)}")
        # a P-frame decoder may start from a decoder without: its MotionBlend starts as initialised
        missing, unexpected = ae.load_state_dict(init.state_dict(), strict=False)
        if unexpected or any(not k.startswith("decoder.p_frame.") for k in missing):
            raise UserError(f"--init {tcfg.init}: its weights do not fit this autoencoder "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    ae.encoder.requires_grad_(not tcfg.decoder_only)
    critic = PatchDiscriminator().to(device) if tcfg.adv_weight > 0 else None
    modules: dict[str, nn.Module] = {"autoencoder": ae, **({"discriminator": critic} if critic else {})}
    trained = [ae.decoder if tcfg.decoder_only else ae, *([critic] if critic else [])]
    opt = torch.optim.AdamW([{"params": m.parameters()} for m in trained], lr=tcfg.lr,
                            weight_decay=tcfg.weight_decay)
    start, elapsed = 0, 0.0
    ckpts = checkpoint_dirs(out) if resume else []
    if ckpts:
        if (ckpts[-1] / "discriminator.safetensors").is_file() != (critic is not None):
            raise UserError(f"{out}: the run was started {'with' if critic is None else 'without'} --adv-weight; "
                            f"resume it the same way")
        state = load_checkpoint(ckpts[-1], modules, opt)
        start, elapsed = state["step"], state.get("elapsed_s", 0.0)
        if dist.main:
            trim_metrics(out, start)
            print(f"resuming from {ckpts[-1]} (step {start})", file=sys.stderr)
    elif dist.main:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        atomic_write_json(out / "train_config.json", {"kind": "autoencoder", "model": cfg.to_dict(),
                                                      "autoencoder": cfg.autoencoder.to_dict(),
                                                      "train": asdict(tcfg), "world_size": dist.world, **info})
    net: nn.Module = AutoencoderLoss(ae, critic)
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    log = MetricsLog(out, dist.main)
    b = tcfg.batch // dist.world
    val = {}

    def eval_psnr() -> dict:
        if val_frames is None or not len(val_frames):
            return {}
        ae.eval()
        if val_frames.ndim == 5:  # clips: the first frame shown, the others decoded one after the other
            clips = val_frames[:max(1, tcfg.val_frames // val_frames.shape[1])]
            with torch.no_grad():
                rec = torch.cat([ae.decode_sequence(_encode_clips(ae, c[:, 1:].to(device)), c[:, 0].to(device)).cpu()
                                 for c in clips.split(16)])
            v, rec = clips[:, 1:].flatten(0, 1), rec.flatten(0, 1)
        else:
            v = val_frames[:tcfg.val_frames]
            rec = torch.cat([ae.reconstruct(c.to(device)).cpu() for c in v.split(64)])
        ae.train()
        pick = torch.linspace(0, len(v) - 1, min(8, len(v))).round().long()  # real above, reconstruction below
        H, W = v.shape[1:3]
        strip = torch.stack((v[pick], rec[pick])).permute(0, 2, 1, 3, 4).reshape(2 * H, len(pick) * W, 3)
        save_png(out / "samples" / "autoencoder_latest.png", strip)
        return {"val_psnr": psnr_frames(rec, v).mean().item(), "val_frames": len(v),
                "val_sharpness": median_sharpness(rec), "val_sharpness_real": median_sharpness(v)}

    bar = step_bar(tcfg, dist, start, "autoencoder")
    record = StepRecord(tcfg, elapsed, on_step)
    ae.train()
    for step in range(start, tcfg.steps):
        t_step = time.perf_counter()
        lr = set_lr(opt, tcfg, step)
        idx = batch_indices(step, tcfg.batch, len(frames), tcfg.seed)[dist.rank * b:(dist.rank + 1) * b]
        g = step_generator(tcfg.seed, step, stream=2 + dist.rank)
        adv_weight = tcfg.adv_weight if step >= tcfg.adv_start else 0.0
        total, parts = net(random_crops(frames[idx], tcfg.crop, g).to(device), g, adv_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gnorm = nn.utils.clip_grad_norm_(trained[0].parameters(), tcfg.grad_clip) if tcfg.grad_clip else torch.zeros(())
        if critic is not None and tcfg.grad_clip:
            nn.utils.clip_grad_norm_(critic.parameters(), tcfg.grad_clip)
        opt.step()
        loss_v = dist.mean(parts["loss"]).item()  # the reconstruction loss: comparable with and without a critic
        done = record.done(step, loss_v, t_step)
        rate = record.rate(done)
        if rate is not None:
            adv = {k: dist.mean(v).item() for k, v in parts.items() if k != "loss"}
            log.write(step=done, loss=loss_v, lr=lr, grad_norm=float(gnorm), frames_per_s=rate, **adv)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_v:.4f}", fps=f"{rate:.1f}",
                                refresh=False, **({"psnr": f"{val['val_psnr']:.2f}", "sharp": f"{val['val_sharpness']:.0f}"} if val else {}))
        if bar is not None:
            bar.update(1)
        if dist.main and (done % tcfg.val_every == 0 or done == tcfg.steps):
            val = eval_psnr()
            if val:
                log.write(step=done, **val)
                log.plot()
        if done % tcfg.ckpt_every == 0 or done == tcfg.steps:
            if dist.main:
                save_checkpoint(out, done, modules, opt, {"elapsed_s": record.elapsed, "kind": "autoencoder",
                                                                      "data_position": done * tcfg.batch},
                                tcfg.keep_checkpoints)
            dist.barrier()
    if bar is not None:
        bar.close()
    ae.eval()
    summary = {}
    if dist.main:
        if not tcfg.decoder_only:  # a new encoder: measure its latents' statistics
            g = step_generator(tcfg.seed, 0, stream=5)
            pool = frames.flatten(0, 1) if frames.ndim == 5 else frames
            calib = pool[torch.randperm(len(pool), generator=g)[:tcfg.calibrate_frames]]
            ae.calibrate(calib.to(device), batch_size=128)
        val = eval_psnr() or val
        n_frames = frames.shape[0] * (frames.shape[1] if frames.ndim == 5 else 1)
        summary = {"steps": tcfg.steps, "frames": n_frames, "batch": tcfg.batch, "time_s": round(record.elapsed, 1),
                   "hardware": hardware(device), "world_size": dist.world, **val, **info}
        save_autoencoder(out, cfg, ae, summary)
        log.write(step=tcfg.steps, final=True, **val)
    dist.barrier()
    return {**summary, "losses": record.losses, "start_step": start}


def median_sharpness(frames: torch.Tensor) -> float:
    """Median Laplacian variance of uint8 frames (N, H, W, 3): the sharpness statistic of `worldmodel
    eval`'s stability check, so an autoencoder's floor on it shows while it trains."""
    from worldmodel.metrics import frame_stats

    return float(np.median([frame_stats(f)["sharpness"] for f in frames.numpy()]))


def _encode_clips(ae: Autoencoder, clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, F, H, W, 3) -> normalised latents (B, F, C, h, w)."""
    z = ae.encode(clips.flatten(0, 1))
    return z.view(*clips.shape[:2], *z.shape[1:])


def random_crops(frames: torch.Tensor, crop: tuple[int, int] | None, g: torch.Generator) -> torch.Tensor:
    """A random (h, w) window of each frame (B, H, W, 3), or of each clip (B, F, H, W, 3) (the same
    window for all its frames); the frames as they are without `crop`."""
    if not crop:
        return frames
    h, w = crop
    B, H, W = frames.shape[0], frames.shape[-3], frames.shape[-2]
    if (h, w) == (H, W):
        return frames
    ys = torch.randint(0, H - h + 1, (B,), generator=g).tolist()
    xs = torch.randint(0, W - w + 1, (B,), generator=g).tolist()
    return torch.stack([f[..., y:y + h, x:x + w, :] for f, y, x in zip(frames, ys, xs)])


class AutoencoderLoss(nn.Module):
    """The autoencoder's training loss as one forward pass (what DistributedDataParallel syncs gradients
    through): L1 + MSE reconstruction and, with a critic, the hinge GAN losses. One backward trains
    both sides: the critic's loss sees detached reconstructions, and the autoencoder's adversarial term
    goes through a detached copy of the critic's weights, so neither loss moves the other's weights.
    A P-frame decoder's clips add the motion loss (`motion_loss`) of each frame's warped predecessor.
    Returns (the total to backpropagate, {"loss": reconstruction, "motion_loss", "critic_loss", "adv_loss"}
    detached)."""

    def __init__(self, autoencoder: Autoencoder, critic: PatchDiscriminator | None = None):
        super().__init__()
        self.autoencoder, self.critic = autoencoder, critic

    def forward(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                adv_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if frames.ndim == 5:  # a P-frame decoder's clips (B, F, H, W, 3): frame 0 is shown, the others
            # decoded in a chain, each against the reconstruction before it (gradients through the chain)
            ae = self.autoencoder
            prev, xs, recons, warps = ae.to_float(frames[:, 0]).to(ae.latent_mean.device), [], [], []
            for j in range(1, frames.shape[1]):
                x, prev, warped = ae.reconstruct_noisy(frames[:, j], generator, prev)
                xs.append(x)
                recons.append(prev)
                warps.append(warped)
            x, recon = torch.cat(xs), torch.cat(recons)
            motion = motion_loss(torch.cat(warps), x)
        else:
            x, recon, _ = self.autoencoder.reconstruct_noisy(frames, generator)
            motion = None
        rec = reconstruction_loss(recon, x)
        parts = {"loss": rec.detach()}
        if motion is not None:  # the motion estimate's own signal (see `motion_loss`)
            parts["motion_loss"] = motion.detach()
            rec = rec + motion
        if self.critic is None:
            return rec, parts
        critic_loss = F.relu(1 - self.critic(x)).mean() + F.relu(1 + self.critic(recon.detach())).mean()
        frozen = {k: v.detach() for k, v in self.critic.named_parameters()}
        adv = -torch.func.functional_call(self.critic, frozen, (recon,)).mean()
        total = rec + critic_loss + (adv_weight * adv if adv_weight else 0.0)
        return total, {**parts, "critic_loss": critic_loss.detach(), "adv_loss": adv.detach()}
