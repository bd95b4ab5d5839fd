"""`worldmodel train autoencoder`, `worldmodel train model`, `worldmodel train throughput` and
`worldmodel train attach-decoder`.

    worldmodel train autoencoder --data data/train --val-data data/val --out runs/ae
    worldmodel train model --data data/train --val-data data/val --autoencoder runs/ae --out runs/dit
    worldmodel train autoencoder --init CKPT --decoder-only --set ae_p_frame=true ... --out runs/dec
    worldmodel train attach-decoder --checkpoint CKPT --autoencoder runs/dec --out checkpoints/NEW
    torchrun --nproc_per_node 8 -m worldmodel.cli train model ...      # DDP, the same command

The autoencoder is trained first (`training.autoencoder`), then the transformer on latent clips of the
frozen autoencoder (`training.clips`, `training.transformer`); the run folder is described in
`training.runs`, determinism and resuming in `training.steps`. `train throughput` times training steps
of the transformer on random latents (no data needed). `attach-decoder` gives a checkpoint a decoder
fine-tuned alone (its encoder bit-identical), e.g. the P-frame decoder."""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from worldmodel.errors import UserError
from worldmodel.files import atomic_folder, atomic_write_json, check_output_path
from worldmodel.device import resolve_device
from worldmodel.model import diffusion
from worldmodel.model.checkpoint import CONFIG_FILE, WEIGHT_FILES, read_config, resolve, save_tensors
from worldmodel.model.transformer import ModelConfig, WorldTransformer
from worldmodel.parsing import parse_hw
from worldmodel.provenance import git_commit
from worldmodel.training.autoencoder import P_FRAME_VAL_CLIP, ae_shape, load_autoencoder, train_autoencoder
from worldmodel.training.clips import (OnlineClips, file_digest, level_dataset, prepare_latents, read_clips,
                                       read_eval_clips, read_frames, split_maps)
from worldmodel.training.config import (AutoencoderTrainConfig, ModelTrainConfig, check_sizes, parse_overrides,
                                        resolve_config, resolve_sampling)
from worldmodel.training.runs import AE_FILE, claim_run_folder
from worldmodel.training.steps import add_amp_argument, amp_enabled, ema_update, hardware, setup_distributed
from worldmodel.training.transformer import cfg_latent, train_model


def _add_common(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--data", required=True,
                   help="dataset folder (training maps MAP01-MAP20 are used; a level's dataset: its level)")
    p.add_argument("--val-data", default=None,
                   help="dataset folder with validation maps MAP21-MAP24, or a level's held-out episodes "
                        "(default: --data, its validation maps)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, nfd-310m)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model config field, or the sampling defaults sample_steps / sample_shift "
                        "(repeatable)")
    p.add_argument("--maps", default=None, help="training maps to use, e.g. MAP01-MAP05 (default: all in the data)")
    p.add_argument("--max-frames", type=int, default=None,
                   help="use about this many training frames, spread over the dataset (reading, or for the model "
                        "encoding, every frame of a large dataset takes long on a CPU)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch, help="global batch (split over torchrun processes)")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--val-every", type=int, default=defaults.val_every)
    p.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    again = p.add_mutually_exclusive_group()  # a run folder that holds a run is refused without one of these
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest checkpoint (the same settings; steps may grow)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out: its checkpoints, metrics, samples and export are deleted")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    a = sub.add_parser("autoencoder", help="train the frame autoencoder",
                       description="Train the frame autoencoder; PSNR on validation maps; calibrates latent statistics.")
    ad = AutoencoderTrainConfig()
    _add_common(a, ad)
    a.add_argument("--val-frames", type=int, default=ad.val_frames, help="validation frames for PSNR")
    a.add_argument("--crop", default=None, metavar="HxW",
                   help="train on random crops of this size (e.g. 48x64: about 4x faster per frame)")
    a.add_argument("--adv-weight", type=float, default=ad.adv_weight,
                   help="> 0: train a PatchGAN critic beside it and add this weight times the adversarial loss "
                        "(sharper reconstructions; default 0: L1 + MSE only)")
    a.add_argument("--adv-start", type=int, default=ad.adv_start, help="step from which the adversarial loss applies")
    a.add_argument("--init", default=None, metavar="AUTOENCODER",
                   help="start from this autoencoder's weights (a run folder, its .safetensors or a checkpoint folder)")
    a.add_argument("--decoder-only", action="store_true",
                   help="with --init: train the decoder alone (the encoder and its latents stay exactly as they "
                        "are, so a transformer trained on them still fits); e.g. a sharper decoder with --adv-weight")
    a.add_argument("--clip-frames", type=int, default=ad.clip_frames,
                   help="a P-frame decoder (--set ae_p_frame=true) trains on clips of this many consecutive frames: "
                        "the first is shown, each next one decoded against the one decoded before it")
    a.set_defaults(_train=run_autoencoder)
    m = sub.add_parser("model", help="train the diffusion transformer",
                       description="Train the block-causal diffusion transformer on latents of the frozen autoencoder.")
    d = ModelTrainConfig()
    _add_common(m, d)
    m.add_argument("--autoencoder", required=True, help="`train autoencoder` run folder, its .safetensors file, "
                                                        "or a checkpoint folder")
    m.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start a new run from this checkpoint's transformer weights (e.g. checkpoints/doom-tiny); "
                        "on another autoencoder or --set patch_size, its blocks, with the token layers afresh; "
                        "onto --set prev_skip, all but the output layer")
    m.add_argument("--ema-decay", type=float, default=d.ema_decay)
    m.add_argument("--grad-clip", type=float, default=d.grad_clip)
    m.add_argument("--weight-decay", type=float, default=d.weight_decay)
    m.add_argument("--clip-frames", type=int, default=d.clip_frames, help="training clip length (default: the model's clip_frames)")
    m.add_argument("--self-forcing", type=int, default=d.self_forcing, metavar="K",
                   help="Self Forcing: on a share of the steps (--self-forcing-prob), K context frames are the "
                        "model's own rollout (the engine's sampler and KV cache, from real frames, fed the real "
                        "actions) and the frames after them are trained against the real game (default 0: off)")
    m.add_argument("--self-forcing-prob", type=float, default=d.self_forcing_prob,
                   help="share of self-forced steps (default %(default)s)")
    m.add_argument("--context-prob", type=float, default=d.context_prob)
    m.add_argument("--context-max", type=float, default=d.context_max)
    m.add_argument("--noise-shift", type=float, default=d.noise_shift,
                   help="bias training noise levels towards pure noise (SD3 shift; 1 = none)")
    m.add_argument("--val-clips", type=int, default=d.val_clips)
    m.add_argument("--eval-clips", type=int, default=d.eval_clips,
                   help="validation clips for teacher-forced PSNR (one frame ahead of a full context)")
    m.add_argument("--rollout-frames", type=int, default=8,
                   help="frames generated after the context in the sample strip")
    m.add_argument("--max-clips", type=int, default=None, help="use at most this many training clips (evenly spaced)")
    m.add_argument("--clip-stride", type=int, default=1, help="frames between the starts of training clips")
    m.add_argument("--no-cache", action="store_true",
                   help="encode clips from the dataset loader at every step instead of caching latents")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("--max-time", type=float, default=d.max_time, metavar="SECONDS",
                   help="stop after this many seconds of training (checkpointed and exported; --resume continues): "
                        "a run that uses the time there is, e.g. a lent GPU's minutes")
    add_amp_argument(m)
    m.set_defaults(_train=run_model)
    b = sub.add_parser("throughput", help="measure training throughput (clips/s) on random latents",
                       description="Time full training steps of the transformer on random latents of the "
                                   "preset's shape (no data needed) and report clips/s.")
    b.add_argument("--preset", default="tiny")
    b.add_argument("--set", action="append", metavar="KEY=VALUE")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=10, help="timed steps")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--clip-frames", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--compile", action="store_true")
    add_amp_argument(b)
    b.add_argument("--out", default=None, help="write the result as JSON here")
    b.set_defaults(_train=run_throughput)
    x = sub.add_parser("attach-decoder", help="give a checkpoint the decoder of a `train autoencoder --decoder-only` run",
                       description="Write a copy of a checkpoint whose autoencoder is a decoder-only fine-tune of its "
                                   "own (e.g. a P-frame decoder, --set ae_p_frame=true): the transformer, sampling "
                                   "defaults and start clips as they are; refused unless the encoder and the latent "
                                   "statistics are bit-identical, so that the transformer's latents keep their meaning.")
    x.add_argument("--checkpoint", required=True, help="the checkpoint folder")
    x.add_argument("--autoencoder", required=True, help="the decoder-only run folder (or its .safetensors)")
    x.add_argument("--out", required=True, help="the new checkpoint folder (must not exist)")
    x.set_defaults(_train=run_attach_decoder, threads=0)


def measure_throughput(cfg: ModelConfig, batch: int, steps: int = 10, warmup: int = 3, device: str = "auto",
                       compile: bool = False, amp: bool = True, clip_frames: int = 0, device_data: bool = False,
                       on_step=None) -> dict:
    """Training throughput of the transformer in clips/s: full steps (noise levels, forward, backward,
    clipping, AdamW, EMA) on random latents of the model's shape -- the same work as on real data,
    where each step's noise levels and noise are drawn on the host and copied over, as in `train
    model`. `device_data`: draw them on the device instead (the device's work alone). `on_step(i)` is
    called after each step (a profiler's step)."""
    dev = resolve_device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    F_ = clip_frames or cfg.clip_frames
    torch.manual_seed(0)
    model = WorldTransformer(cfg).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
    net = torch.compile(model) if compile else model
    use_amp = amp_enabled(amp, dev)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, F_, *cfg_latent(cfg), generator=g).to(dev)
    a = torch.randn(batch, F_, cfg.action_dim, generator=g).to(dev)
    data_dev = dev if device_data else torch.device("cpu")
    g_data = torch.Generator(device=data_dev).manual_seed(1)
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = diffusion.sample_training_noise_levels(batch, F_, g_data, device=data_dev).to(dev)
        noise = torch.randn(x0.shape, generator=g_data, device=data_dev).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = diffusion.flow_matching_loss(net, x0, a, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, 0.999, i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step(i)
    times.sort()
    med = times[len(times) // 2]
    return {"clips_per_s": batch / med, "clips_per_s_mean": batch * len(times) / sum(times),
            "step_s_median": med, "step_s_min": times[0], "batch": batch, "clip_frames": F_,
            "tokens_per_clip": F_ * cfg.tokens_per_frame, "steps_timed": steps, "warmup_steps": warmup,
            "params": sum(p.numel() for p in model.parameters()), "device": hardware(dev),
            "device_type": dev.type, "threads": torch.get_num_threads(), "compile": compile,
            "amp_bf16": use_amp, "data": "device" if device_data else "host", "torch": torch.__version__,
            "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count()}


def run_throughput(args) -> int:
    check_sizes(args, at_least_1=("batch", "steps"), at_least_0=("warmup", "clip_frames"))
    if args.out:
        check_output_path(args.out)
    cfg = resolve_config(args.preset, parse_overrides(args.set))
    r = measure_throughput(cfg, args.batch, args.steps, args.warmup, args.device, args.compile, not args.no_amp,
                           args.clip_frames)
    r = {"preset": args.preset, "overrides": parse_overrides(args.set), **r, "commit": git_commit(),
         "command": "worldmodel " + " ".join(sys.argv[1:]) if sys.argv and "worldmodel" in sys.argv[0]
         else None, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"{args.preset}: {r['clips_per_s']:.2f} clips/s ({r['batch']} clips of {r['clip_frames']} frames, "
          f"{r['step_s_median']:.3f} s a step) on {r['device']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out), r)
    return 0


def run(args) -> int:
    check_sizes(args, at_least_0=("threads",))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args._train(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _maps(args) -> list[str] | None:
    if not args.maps:
        return None
    from worldmodel.game.maps import parse_maps
    return parse_maps(args.maps)


def _val_source(args) -> str:
    return args.val_data or args.data


def run_autoencoder(args) -> int:
    cfg = resolve_config(args.preset, parse_overrides(args.set))
    tcfg = AutoencoderTrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                                  val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
                                  val_frames=args.val_frames, device=args.device, progress=not args.no_progress,
                                  crop=parse_hw(args.crop, "48x64") if args.crop else None, adv_weight=args.adv_weight,
                                  adv_start=args.adv_start, init=args.init, decoder_only=args.decoder_only,
                                  clip_frames=args.clip_frames)
    if tcfg.adv_weight < 0 or tcfg.adv_start < 0:
        raise UserError("--adv-weight and --adv-start must not be negative")
    check_sizes(args, at_least_1=("max_frames",))
    main = int(os.environ.get("RANK", "0")) == 0
    claim_run_folder(Path(args.out), "autoencoder", cfg, tcfg, args.resume, args.overwrite, main)
    progress = tcfg.progress and main

    def read(path, split, maps, n, clip_frames):  # frames (N, H, W, 3), or a P-frame decoder's clips (N, F, H, W, 3)
        if not cfg.autoencoder.p_frame:
            return read_frames(path, split, maps, n, progress)
        return read_clips(path, split, clip_frames, max(1, n // clip_frames) if n else None, maps, progress)

    frames, maps = read(args.data, "train", _maps(args), args.max_frames, tcfg.clip_frames)
    val_frames = None
    try:
        val_frames, _ = read(_val_source(args), "val", None, tcfg.val_frames, P_FRAME_VAL_CLIP)
    except UserError as e:
        if main:
            print(f"worldmodel train: no validation frames ({e}); PSNR is not measured", file=sys.stderr)
    info = {"data": str(args.data), "maps": maps, "val_data": _val_source(args) if val_frames is not None else None}
    s = train_autoencoder(frames, args.out, cfg, tcfg, val_frames, resume=args.resume, info=info)
    if main:
        n = f"{len(frames)} clips of {tcfg.clip_frames} frames" if frames.ndim == 5 else f"{len(frames)} frames"
        where = f"autoencoder: {Path(args.out) / AE_FILE} ({n}, {tcfg.steps} steps)"
        if "val_psnr" in s:
            print(f"{where}; validation PSNR {s['val_psnr']:.2f} dB on {s['val_frames']} frames, sharpness "
                  f"(median Laplacian variance) {s['val_sharpness']:.0f} vs {s['val_sharpness_real']:.0f} real")
        else:
            print(f"{where}; no validation frames")
    return 0


def run_attach_decoder(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out}: already exists (a new checkpoint folder is written there)")
    check_output_path(out, folder=True)
    folder = resolve(args.checkpoint)
    config = read_config(folder)
    old, _ = load_autoencoder(folder)
    new, new_config = load_autoencoder(args.autoencoder)
    a, b = old.state_dict(), new.state_dict()
    same = ae_shape(old.cfg) == ae_shape(new.cfg) and all(
        k in b and torch.equal(v, b[k]) for k, v in a.items() if not k.startswith("decoder."))
    if not same:
        raise UserError(f"{args.autoencoder}: its encoder is not the one of {args.checkpoint} (train it with "
                        f"--init {args.checkpoint} --decoder-only): the transformer's latents would change meaning")
    trained = new_config.get("info") or {}
    config["model"] = {**config["model"], "ae_p_frame": new.cfg.p_frame}
    config["info"] = {**(config.get("info") or {}), "decoder": {
        "autoencoder": str(args.autoencoder), "p_frame": new.cfg.p_frame,
        **{k: trained[k] for k in ("steps", "val_psnr", "val_sharpness", "val_sharpness_real", "data") if k in trained}}}
    with atomic_folder(out) as tmp:
        for f in folder.iterdir():  # the transformer's weights byte for byte (in their stored precision)
            if f.name in (CONFIG_FILE, WEIGHT_FILES["autoencoder"], "README.md"):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        save_tensors(tmp / WEIGHT_FILES["autoencoder"], new.state_dict(), {"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, config)
    print(f"{out}: {args.checkpoint} with the decoder of {args.autoencoder}"
          f"{' (P-frame)' if new.cfg.p_frame else ''}; write its model card (README.md)")
    return 0


def run_model(args) -> int:
    if args.max_time < 0:
        raise UserError(f"--max-time must not be negative, got {args.max_time:g}")
    if args.self_forcing < 0 or not 0.0 <= args.self_forcing_prob <= 1.0:
        raise UserError(f"--self-forcing must be >= 0 and --self-forcing-prob within 0..1, got {args.self_forcing} "
                        f"and {args.self_forcing_prob:g}")
    overrides = parse_overrides(args.set)
    sampling = resolve_sampling(overrides)  # `--set sample_steps=N`, `sample_shift=X`: the export's sampling defaults
    ae, ae_config = load_autoencoder(args.autoencoder)
    ae_model = ae_config.get("model")
    base = {}
    if isinstance(ae_model, dict):  # the autoencoder's shape, unless --set overrides it
        base = {k: ae_model[k] for k in ("frame_size", "latent_channels", "ae_channels", "ae_res_blocks", "ae_p_frame")
                if k in ae_model}
    cfg = resolve_config(args.preset, overrides, base)
    if ae_shape(cfg.autoencoder) != ae_shape(ae.cfg):
        raise UserError(f"{args.autoencoder}: the autoencoder {ae_shape(ae.cfg)} does not match the model config "
                        f"{ae_shape(cfg.autoencoder)}")
    rank = int(os.environ.get("RANK", "0"))
    tcfg = ModelTrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                            val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
                            ema_decay=args.ema_decay, grad_clip=args.grad_clip, weight_decay=args.weight_decay,
                            clip_frames=args.clip_frames, init=args.init, context_prob=args.context_prob, context_max=args.context_max,
                            noise_shift=args.noise_shift, self_forcing=args.self_forcing,
                            self_forcing_prob=args.self_forcing_prob,
                            val_clips=args.val_clips, eval_clips=args.eval_clips, compile=args.compile,
                            max_time=args.max_time,
                            amp=not args.no_amp, device=args.device, progress=not args.no_progress)
    check_sizes(args, at_least_1=("max_clips", "clip_stride", "rollout_frames"))
    claim_run_folder(Path(args.out), "model", cfg, tcfg, args.resume, args.overwrite, rank == 0, sampling)
    if rank == 0 and bool((ae.latent_std == 1).all() and (ae.latent_mean == 0).all()):
        print("worldmodel train: warning: the autoencoder's latent statistics are not calibrated", file=sys.stderr)
    F_ = tcfg.frames(cfg)
    progress = tcfg.progress and rank == 0
    dist = setup_distributed(tcfg.device)  # the cache step needs the process group; train_model reuses it
    ae_file = Path(args.autoencoder) / AE_FILE if Path(args.autoencoder).is_dir() else Path(args.autoencoder)
    if not ae_file.is_file():  # a checkpoint folder
        ae_file = Path(args.autoencoder) / WEIGHT_FILES["autoencoder"]
    ae = ae.to(dist.device)
    maps = split_maps("train", _maps(args), args.data)
    if args.no_cache:
        train = OnlineClips(args.data, ae, F_, maps, args.seed, args.clip_stride)
    else:
        train, _ = prepare_latents(ae, file_digest(ae_file), args.data, "train", F_, _maps(args), args.clip_stride,
                                   args.max_clips, Path(args.out), rank, progress, args.max_frames)
    val, val_frames = None, None
    try:
        val, _ = prepare_latents(ae, file_digest(ae_file), _val_source(args), "val", F_, None, 1,
                                 tcfg.val_clips, Path(args.out), rank, progress)
        if rank == 0 and tcfg.eval_clips:  # context + the next frames, for PSNR and the sample strip
            val_frames = read_eval_clips(_val_source(args), tcfg.eval_clips,
                                         cfg.cache_frames + args.rollout_frames, seed=args.seed)
    except UserError as e:
        if rank == 0:
            print(f"worldmodel train: no validation data ({e}); no validation loss or samples", file=sys.stderr)
    info = {"data": str(args.data), "val_data": _val_source(args) if val is not None else None,
            "autoencoder": str(args.autoencoder), "autoencoder_info": ae_config.get("info", {})}
    level = level_dataset(args.data)
    if level is not None:  # a level model: play, record, bench and eval default to its level
        info["level"] = {"wad": level["wad"], "map": level["map"]}
    s = train_model(train, args.out, cfg, tcfg, ae, val, val_frames, resume=args.resume, info=info, sampling=sampling)
    if rank == 0:
        v = s["validation"]
        line = f"model: {Path(args.out) / 'export'} after {s['steps']} steps"
        if "psnr_tf" in v:
            line += (f"; teacher-forced next-frame PSNR on validation maps {v['psnr_tf']:.2f} dB "
                     f"({v['sample_steps']} steps), {v['psnr_tf_1step']:.2f} dB (1 step); copy-last-frame "
                     f"{v['psnr_copy_last']:.2f} dB; autoencoder {v['psnr_ae']:.2f} dB")
        print(line)
    return 0
