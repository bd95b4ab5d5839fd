"""`worldmodel distill`: few-step distillation of a trained world model into 1-4 step students (the
method in `training.distill`).

    worldmodel distill --teacher runs/dit/export --data data/train --val-data data/val \\
        --out runs/distill --steps-student 1,2,4

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
import dataclasses
import datetime
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from worldmodel.device import resolve_device
from worldmodel.errors import UserError
from worldmodel.game.action import FIELDS
from worldmodel.files import atomic_write_json, check_output_path
from worldmodel.model.checkpoint import load_pretrained, sampling_defaults, save_pretrained
from worldmodel.model.transformer import ModelConfig
from worldmodel.provenance import command_line
from worldmodel.training.clips import LatentClips, encode_dataset
from worldmodel.training.config import check_sizes
from worldmodel.training.distill import (DEFAULT_OBJECTIVE, OBJECTIVES, DistillConfig, baselines, check_self_forcing,
                                         distill_student, evaluate, method_of)
from worldmodel.training.steps import add_amp_argument, amp_enabled, hardware

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


def parse_guide(spec: str) -> tuple[str, ...]:
    """`--guide`: the action fields guidance amplifies the response to, in `FIELDS` order."""
    names = {s.strip() for s in str(spec).split(",") if s.strip()}
    if not names or names - set(FIELDS):
        raise UserError(f"--guide: each value must be one of {', '.join(FIELDS)} (a list: move,strafe), got {spec!r}")
    return tuple(f for f in FIELDS if f in names)


def parse_interval(spec: str | None) -> tuple[float, float] | None:
    """`--guidance-interval LO,HI`: the noise levels guided, 0 <= LO < HI <= 1 (None: all)."""
    if spec is None:
        return None
    try:
        lo, hi = (float(v) for v in str(spec).split(","))
    except ValueError:
        lo = hi = math.nan
    if not 0.0 <= lo < hi <= 1.0:
        raise UserError(f"--guidance-interval: two noise levels LO,HI with 0 <= LO < HI <= 1 (0.5,1: the first "
                        f"half of the schedule, from pure noise), got {spec!r}")
    return lo, hi


def check_arguments(args) -> None:
    """One clear line for a rate, weight, decay or list out of range (before anything is loaded); counts are
    `config.check_sizes`' (`args.guide` becomes its tuple of fields)."""
    positive = {"--lr": args.lr, "--critic-lr": args.critic_lr, "--adv-weight": args.adv_weight,
                "--dmd-weight": args.dmd_weight, "--guidance": args.guidance}
    if args.guidance_back is not None:
        positive["--guidance-back"] = args.guidance_back
    for name, v in positive.items():
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"{name} must be a positive number, got {v:g}")
    if not 0.0 <= args.ema < 1.0:
        raise UserError(f"--ema must be within [0, 1), got {args.ema:g}")
    objectives = parse_objectives(args.objective)
    for objective in objectives:
        check_self_forcing(args.self_forcing, objective)
    args.guide = parse_guide(args.guide)
    if args.guidance_back is not None and "move" not in args.guide:
        raise UserError(f"--guidance-back guides backing off, a value of move: --guide must include move, "
                        f"got {','.join(args.guide)}")
    args.guidance_interval = parse_interval(args.guidance_interval)
    for flag, given in (("--guidance-centred", args.guidance_centred),
                        ("--guidance-interval", args.guidance_interval is not None)):
        if given and args.guidance == 1.0 and args.guidance_back in (None, 1.0):
            raise UserError(f"{flag} shapes action guidance, and there is none: give --guidance W or "
                            "--guidance-back W (other than 1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    D = DistillConfig()  # the defaults
    parser.add_argument("--teacher", required=True, help="trained checkpoint folder (or Hub id) to distil")
    parser.add_argument("--data", required=True,
                        help="dataset folder (its training maps MAP01-MAP20 are used; a level's dataset: its level)")
    parser.add_argument("--val-data", default=None,
                        help="dataset with validation maps MAP21-MAP24, or a level's held-out episodes "
                             "(default: --data)")
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
    parser.add_argument("--adv-weight", type=float, default=D.adv_weight,
                        help="adversarial objective: weight of the critic's loss beside the regression loss "
                             "(default %(default)s)")
    parser.add_argument("--dmd-weight", type=float, default=D.dmd_weight,
                        help="dmd objective: weight of the distribution-matching loss beside the regression loss "
                             "(default %(default)s)")
    parser.add_argument("--guidance", type=float, default=D.guidance, metavar="W",
                        help="action guidance of the teacher (its ODE targets, and its score in dmd), v_still + W "
                             "(v_action - v_still): its response to each action (against standing still) amplified W "
                             "times, as classifier-free guidance guides by a prompt; the student learns it at no cost "
                             "per frame (default %(default)s: none)")
    parser.add_argument("--guide", default=",".join(D.guide), metavar="FIELDS",
                        help="the action fields --guidance amplifies the response to, the others kept on both "
                             "sides (move,strafe: walking guided, turning not; default: all, against standing "
                             "still)")
    parser.add_argument("--guidance-back", type=float, default=D.guidance_back, metavar="W",
                        help="the guidance of the frames that back off (move < 0) instead of --guidance's, for a "
                             "teacher that responds to backing off far less than to walking forward (default: "
                             "--guidance's)")
    parser.add_argument("--guidance-centred", action="store_true",
                        help="amplify the response to the action without its mean over the frame (per latent "
                             "channel): guidance moves what is in the frame, not its overall brightness and colour")
    parser.add_argument("--guidance-interval", default=D.guidance_interval, metavar="LO,HI",
                        help="guide only at the noise levels t with LO < t <= HI (1: pure noise, 0: the clean "
                             "frame; 0.5,1: the first half of the schedule), the teacher unguided elsewhere "
                             "(default: every level)")
    parser.add_argument("--critic-lr", type=float, default=D.critic_lr,
                        help="learning rate of the critic (adversarial) or of the fake-score model (dmd) "
                             "(default %(default)s)")
    parser.add_argument("--critic-steps", type=int, default=D.critic_steps,
                        help="updates of the critic or fake score per student update, on the same samples, so it "
                             "keeps up with the student (DMD2's two time-scale rule uses 5; default %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=D.teacher_steps,
                        help="teacher Euler steps over the whole schedule that one student schedule imitates")
    parser.add_argument("--self-forcing", type=int, default=D.self_forcing, metavar="K",
                        help="Self Forcing: the last K context frames of every training clip are the student's own "
                             "rollout (the engine's sampler), so it learns from the contexts it makes when it plays; "
                             "with dmd, the teacher judges its next frame after them (regression and dmd; default "
                             "%(default)s: all real)")
    parser.add_argument("--init-student", default=None, metavar="CHECKPOINT",
                        help="train a student of this teacher further: it (and its average) starts from this "
                             "checkpoint, e.g. an earlier run's --out, instead of from the teacher; the fake score or "
                             "critic starts afresh; its card counts all the iterations (one --steps-student: its own)")
    parser.add_argument("--iters", type=int, default=D.iters, help="training iterations per student")
    parser.add_argument("--batch", type=int, default=D.batch)
    parser.add_argument("--lr", type=float, default=D.lr)
    parser.add_argument("--ema", type=float, default=D.ema, help="EMA decay of the student weights that are saved")
    parser.add_argument("--max-clips", type=int, default=4000,
                        help="training clips (evenly spaced over the data; without --latents they come from whole "
                             "shards spread over it holding about this many clips' frames, not from all of it)")
    parser.add_argument("--latents", default=None,
                        help="reuse a `train model` latent cache (RUN/cache/train_latents.safetensors, made with the "
                             "teacher's autoencoder) instead of encoding --data's training maps")
    parser.add_argument("--eval-clips", type=int, default=32, help="validation clips for the PSNR report")
    parser.add_argument("--rollout", type=int, default=8, help="frames of the autoregressive rollout in the report")
    parser.add_argument("--half", action="store_true",
                        help="store the student's transformer weights in float16 (half the size; the engine "
                             "computes in its own dtype)")
    parser.add_argument("--seed", type=int, default=D.seed)
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


def load_init_student(path, cfg, ae, ks: list[int], device) -> tuple[torch.nn.Module, int]:
    """`--init-student`: a student trained before from this teacher, to be trained further. It must be the
    teacher's model with the teacher's autoencoder (a student keeps its teacher's latent space) and sample
    in the one `--steps-student` asked for. -> (its transformer, the distillation iterations it has had)."""
    icfg, iae, student, iconfig, ifolder = load_pretrained(path, device=device)
    differ = cfg.differences(icfg)
    if differ:
        raise UserError(f"--init-student {path}: its model is not the teacher's (it differs in "
                        f"{ModelConfig.describe(differ)})")
    mine, theirs = iae.state_dict(), ae.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k]) for k in mine):
        raise UserError(f"--init-student {path}: its autoencoder is not the teacher's (a student keeps its teacher's "
                        f"latent space)")
    steps = sampling_defaults(iconfig, ifolder).steps
    if ks != [steps]:
        raise UserError(f"--init-student {path} samples in {steps} steps: train it further with "
                        f"--steps-student {steps}")
    prior = (iconfig.get("info") or {}).get("distill") or {}
    return student, int(prior.get("iters_total", prior.get("iters", 0)))


def run(args) -> int:
    check_sizes(args, at_least_0=("threads",), at_least_1=("teacher_steps", "critic_steps", "iters", "batch",
                                                            "max_clips", "eval_clips", "rollout"))
    check_arguments(args)
    ks = parse_steps(args.steps_student)
    dconfig = DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
                               if hasattr(args, f.name)})
    objectives = parse_objectives(args.objective)
    check_output_path(args.out, folder=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = amp_enabled(not args.no_amp, device)
    cfg, ae, teacher, config, folder = load_pretrained(args.teacher, device=device)
    sampling = sampling_defaults(config, folder)  # the teacher's; a student's steps are its own
    check_self_forcing(args.self_forcing, objectives[0], cfg.cache_frames)
    teacher.attention = "sdpa" if device.type != "cuda" else teacher.attention
    init, init_iters = load_init_student(args.init_student, cfg, ae, ks, device) if args.init_student else (None, 0)
    if init is not None:
        init.attention = teacher.attention
    progress = not args.no_progress
    context = cfg.cache_frames  # sinks + window: the context fits the cache without wrapping
    t0 = time.time()
    if args.latents:
        train = LatentClips.load(Path(args.latents), {})
        if train is None:
            raise UserError(f"{args.latents}: not a readable latent cache")
        if tuple(train.latents.shape[1:]) != (cfg.latent_channels, *cfg.latent_size) or train.clip_frames < context + 1:
            raise UserError(f"{args.latents}: latents {tuple(train.latents.shape[1:])} in clips of {train.clip_frames} "
                            f"frames do not fit this teacher ({cfg.latent_channels}, {cfg.latent_size}, {context + 1} frames)")
        train = train.with_clip_frames(context + 1)
    else:
        # whole shards spread over the data, about as many frames as the clips hold: a million-frame level
        # dataset is not encoded whole (hours on a CPU) for 4,000 clips
        train, _ = encode_dataset(ae, args.data, "train", context + 1, max_clips=args.max_clips, progress=progress,
                                  max_frames=args.max_clips * (context + 1))
    val_source = args.val_data or args.data
    _, val = encode_dataset(ae, val_source, "val", context + args.rollout, max_clips=args.eval_clips,
                            keep_frames=args.eval_clips, progress=progress)
    vf, va = val.clip(torch.arange(len(val)))
    print(f"distill: {len(train)} training clips from {len(train.latents)} frames, {len(val)} validation clips "
          f"({time.time() - t0:.0f} s to encode)", file=sys.stderr)

    guidance = dconfig.action_guidance()
    report = {"teacher": str(args.teacher), "objectives": objectives,
              "methods": {o: method_of(o, args.self_forcing, guidance) for o in objectives},
              "data": str(args.data),
              "val_data": str(val_source),
              "train_clips": len(train), "train_frames": len(train.latents), "teacher_steps": args.teacher_steps,
              "iters": args.iters,
              "init_student": args.init_student, "iters_total": init_iters + args.iters,
              "batch": args.batch, "lr": args.lr, "critic_lr": args.critic_lr, "critic_steps": args.critic_steps,
              "adv_weight": args.adv_weight,
              "dmd_weight": args.dmd_weight, "guidance": args.guidance,
              "guide": list(args.guide), "guidance_back": args.guidance_back,
              "guidance_centred": args.guidance_centred,
              "guidance_interval": None if args.guidance_interval is None else list(args.guidance_interval),
              "ema": args.ema,
              "self_forcing": args.self_forcing, "seed": args.seed,
              "device": str(device),
              "hardware": hardware(device), "amp_bf16": amp, "command": command_line(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "baselines": baselines(ae, vf, context),
              "teacher_eval": {}, "students": {}}
    teacher_default = sampling.steps
    for k in sorted({teacher_default, *ks}):
        report["teacher_eval"][str(k)] = evaluate(teacher, ae, cfg, vf, va, context, k, seed=args.seed,
                                                  shift=sampling.shift)
        print(f"teacher at {k} steps: {report['teacher_eval'][str(k)]}", file=sys.stderr)
    out = Path(args.out)
    for objective in objectives:
        for k in ks:
            t1 = time.time()
            student, curves = distill_student(teacher, cfg, train, k, objective, shift=sampling.shift,
                                              config=dconfig, amp=amp, progress=progress, init=init)
            train_s = time.time() - t1
            res = evaluate(student, ae, cfg, vf, va, context, k, seed=args.seed, shift=sampling.shift)
            n = max(1, args.iters // 10)
            losses = {name: {"first": round(sum(c[:n]) / n, 5), "last": round(sum(c[-n:]) / n, 5)}
                      for name, c in curves.items()}
            entry = {"objective": objective, "steps": k, "eval": res, "losses": losses, "train_s": round(train_s, 1),
                     "teacher_same_steps": report["teacher_eval"][str(k)],
                     "teacher_default": report["teacher_eval"][str(teacher_default)]}
            dest = out / objective if len(objectives) > 1 else out
            dest = dest / f"steps-{k}" if len(ks) > 1 else dest
            info = {**(config.get("info") or {}),
                    "distill": {k_: v for k_, v in report.items() if k_ != "students"}
                    | {"objective": objective, "student_steps": k, "eval": res, "losses": losses,
                       "method": method_of(objective, args.self_forcing, guidance)}}
            save_pretrained(dest, cfg, ae, copy.deepcopy(student).half() if args.half else student, info,
                            dataclasses.replace(sampling, steps=k, context_noise=None))  # its own level: measured anew
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
