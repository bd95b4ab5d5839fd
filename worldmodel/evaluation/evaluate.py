"""`worldmodel eval`: the world model against the real game, on held-out episodes of its level (a level
model) or on validation maps.

    worldmodel eval --level MAP01 --checkpoint checkpoints/doom-map01 --compare checkpoints/doom-tiny \
        --generalisation MAP21-MAP24 --out eval/doom-map01
    worldmodel eval --checkpoint checkpoints/doom-tiny --maps MAP21-MAP24 --episodes 6 --horizons 1,8,35,175 --out eval/doom-tiny

Episodes. *Level mode* (`--level MAP`; the default for a checkpoint whose config names its level,
`info.level = {"wad": ..., "map": ...}`): episode k starts at one of the level's EVAL_STARTS evaluation
start places (`Level.starts("eval")`, taken in farthest-point order, so that any first few are spread
over the level; more episodes than places go round them again), the engine seed is
`episode_seed("eval", --seed + k)` (odd; training seeds are even) and the player is warped there and
turned to a heading drawn from that seed. Those places and seeds are never a training episode's
(worldmodel/game/level.py), so a level model is evaluated on its own training level. *Validation-map mode*
(`--maps`, the default otherwise): --episodes per map from the map's player start, seed --seed + episode.
Held-out maps (freedoom2 MAP25-MAP32, every freedoom1 map) are refused either way.

For each episode:
1. the explorer policy plays the real game (`DoomEnv`, it sees depth and position) for a warm-up of
   35..--warmup frames; the last --context real frames and their actions are the context;
2. fidelity: from that context the policy keeps playing the real game, and the model is fed the same
   actions; PSNR and SSIM of model frame t against real frame t, t = 1..max(horizons), beside the
   copy-last-frame baseline (the last context frame held), and the sharpness (Laplacian variance) of
   the generated and of the real frame t (medians over the episodes);
3. controllability: from the same context (the game replayed to it, deterministically), each probe
   action is held for --probe-frames frames in the game and in the model: turn right / turn left and
   strafe right / strafe left (the image must move left / right: flow translation tx < 0 / > 0) and
   forward / backward (the image must expand / contract: flow zoom > 0 / < 0). Optical flow is Farneback
   (OpenCV) between consecutive frames, on the part of the frame above the weapon, averaged over the
   second half of the probe (the player accelerates over a few tics and may carry momentum from the
   context). Scored as: the model's direction right (sign as expected), right where the real game moved
   as expected (not blocked by a wall), agreeing with the real game's sign, cosine of the model's and
   the real flow fields, and the size of the model's motion relative to the real one;
4. stability: one long rollout (--stability-frames, default 21,000 = 10 minutes of game time) from the
   first episode's context (in level mode: the evaluation start place nearest the player start), the
   explorer acting blind; every --sample-every frames the frame's brightness, contrast and sharpness are
   compared with the range (1st..99th percentile) of the real frames seen in 1-2, and memory and latency
   are sampled: they must stay flat.

Several models (`--compare C`, repeatable, beside --checkpoint/--preset) are scored on exactly the same
episodes: the real game is played once per episode and its frames, the copy-last baseline and the real
optical flow are shared (`real_sha256` in `episode_list` names each episode's real frames); the JSON's
`comparison` puts the models side by side (with each one's PSNR gain over the first, episode by
episode: `eval_report.paired_gain`) and the plots show them all. `--generalisation MAPS` (level
mode) adds the same fidelity and controllability on maps the level model never saw, as a section of its
own: generalisation, reported and not tuned for.

Writes DIR/eval.json (rewritten after each stage, "complete": true once all are done) and PNGs:
fidelity.png (PSNR, SSIM and sharpness against horizon), controllability.png, stability.png, and
generalisation_fidelity.png, generalisation_controllability.png with --generalisation.

Code: the episodes' start scenes in worldmodel/game/scenes.py, the rollouts (1-4) in rollouts.py, the scores,
the comparison, the plots and the table in eval_report.py; this module plans the run and writes eval.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodel.evaluation.eval_report import (all_sections, comparison, print_summary, real_ranges,
                                               score_controllability, summarise_fidelity, write_plots)
from worldmodel.evaluation.rollouts import Episode, fidelity, probe, stability
from worldmodel.files import check_output_path
from worldmodel.inference.loading import add_model_arguments, load_model, model_name
from worldmodel.inference.settings import add_engine_arguments, settings_from_args
from worldmodel.parsing import parse_int_list
from worldmodel.provenance import provenance
from worldmodel.errors import UserError
from worldmodel.game.maps import add_wad_argument
from worldmodel.game.level import EVAL_STARTS
from worldmodel.metrics import PSNR_CAP
from worldmodel.game.policy import POLICY_VERSION

DEFAULT_HORIZONS = "1,8,35,175"
VAL_EPISODES = 6  # episodes per validation map (--episodes without a level, --generalisation-episodes)
GENERALISATION = ("maps the level model never saw (no training data there): how it generalises, reported and "
                  "not tuned for")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--compare", action="append", default=[], metavar="C",
                        help="another checkpoint (folder or Hub id) scored on exactly the same episodes, e.g. "
                             "checkpoints/doom-tiny; repeatable")
    parser.add_argument("--level", metavar="MAP",
                        help="level mode: held-out episodes spread over this training map, for a level model "
                             "(default: the checkpoint's own level, if its config names one)")
    parser.add_argument("--maps", help="validation-map mode: maps, e.g. MAP21,MAP22 or MAP21-MAP24 (the default "
                                       "without a level); held-out maps are refused")
    parser.add_argument("--generalisation", metavar="MAPS",
                        help="level mode: also evaluate on these maps the level model never saw, e.g. MAP21-MAP24, "
                             "reported as generalisation")
    add_wad_argument(parser, default=None, more="; default: the level model's own, else freedoom2")
    parser.add_argument("--episodes", type=int,
                        help=f"level mode: episodes, each from one of the level's {EVAL_STARTS} evaluation start "
                             f"places (default {EVAL_STARTS}; more go round them again with new seeds); "
                             f"validation maps: episodes per map (default {VAL_EPISODES})")
    parser.add_argument("--generalisation-episodes", type=int, default=VAL_EPISODES,
                        help=f"episodes per --generalisation map (default {VAL_EPISODES})")
    parser.add_argument("--horizons", default=DEFAULT_HORIZONS, help=f"frames ahead to report (default {DEFAULT_HORIZONS})")
    parser.add_argument("--context", type=int, help="real context frames (default: each model's cache size)")
    parser.add_argument("--warmup", type=int, default=140,
                        help="the policy plays 35..N real frames before the context (default 140)")
    parser.add_argument("--probe-frames", type=int, default=10, help="frames each controllability probe is held")
    parser.add_argument("--stability-frames", type=int, default=21000,
                        help="long-rollout length, per model (default 21000 = 10 min of game time; 0 skips it)")
    parser.add_argument("--sample-every", type=int, default=35, help="stability sampling interval in frames")
    add_engine_arguments(parser, ("seed", "steps", "context_noise", "speculative", "attention"),
                         helps={"seed": ": each episode's (--seed + episode), and its game's"})
    parser.add_argument("--videos", action="store_true",
                        help="also write DIR/<map>_ep<k> side-by-side recordings [model(s) | real]")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--no-progress", action="store_true")


@dataclass
class Plan:
    """What to evaluate on, from the flags (and a level model's config)."""

    mode: str  # "level": held-out episodes of one level; "maps": validation maps
    wad: str
    maps: list[str]  # level mode: [the level]
    episodes: int  # level mode: in all; validation maps: per map
    horizons: list[int]
    generalisation: list[str]  # level mode: maps for the generalisation section


def _check_level(wad: str, map_name: str) -> str:
    from worldmodel.game.maps import check_map, split_of

    m = check_map(wad, map_name, "val")  # held-out maps: HeldOutMapError, a clear line
    if split_of(wad, m) not in ("train", "user"):
        raise UserError(f"--level {m}: a level model is of a training map (freedoom2 MAP01-MAP20, or a map of your "
                        f"own .wad); {m} is a "
                        f"validation map: evaluate on it with --maps or --generalisation")
    return m


def _plan(args, model_level: dict | None = None, loaded: bool = True) -> Plan:
    """The plan the flags ask for; without --level or --maps, `model_level` (a level model's config
    `info.level`) makes it level mode. Every check on the flags is here, so that a call before the model
    is loaded (`loaded` False: its level is not known yet) refuses bad flags (held-out maps) at once."""
    from worldmodel.game.maps import check_map, parse_maps

    if args.level and args.maps:
        raise UserError("--level and --maps exclude each other (a level model on other maps: --generalisation MAPS)")
    level = args.level
    if not level and not args.maps and model_level:
        if not isinstance(model_level, dict) or not isinstance(model_level.get("map"), str):
            raise UserError(f"the checkpoint's config has a malformed info.level {model_level!r} "
                            f"(expected {{\"wad\": ..., \"map\": ...}}): pass --level MAP or --maps MAPS")
        level = model_level["map"]
    wad = args.wad or ((model_level or {}).get("wad") if level and not args.level else None) or "freedoom2"
    horizons = sorted(set(parse_int_list(args.horizons, "horizons")))
    if horizons[0] < 1:
        raise UserError(f"--horizons must be positive, got {args.horizons}")
    for name in ("episodes", "generalisation_episodes", "probe_frames", "sample_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.stability_frames < 0 or args.warmup < 0:
        raise UserError("--stability-frames and --warmup must be >= 0")
    # parse_maps and check_map raise ValueError / HeldOutMapError: one clear line in the CLI
    generalisation = [check_map("freedoom2", m, "val") for m in parse_maps(args.generalisation)] \
        if args.generalisation else []
    if level:
        level = _check_level(wad, level)
        if level in generalisation:
            raise UserError(f"--generalisation {level}: that is the level itself, not a map it never saw")
        return Plan("level", wad, [level], args.episodes or EVAL_STARTS, horizons, generalisation)
    maps = [check_map(wad, m, "val") for m in parse_maps(args.maps or "MAP21-MAP24")]
    if generalisation and (args.maps or loaded):
        raise UserError("--generalisation is for a level model (--level MAP): on validation maps every map is "
                        "evaluated alike")
    return Plan("maps", wad, maps, args.episodes or VAL_EPISODES, horizons, generalisation)


def level_episodes(level, n: int, seed: int = 0) -> list[dict]:
    """The held-out episodes of a level model's eval: episode k starts at the level's evaluation start
    place number k (mod EVAL_STARTS) in farthest-point order, engine (and policy) seed
    `episode_seed("eval", seed + k)`, heading drawn from that seed. Never a training start cell or seed."""
    from worldmodel.game.level import episode_seed, farthest_points

    cells = level.starts("eval")
    xy = level.centre(cells)
    order = farthest_points(level, xy, len(cells))
    out = []
    for k in range(n):
        i = order[k % len(order)]
        s = episode_seed("eval", seed + k)
        heading = float(np.random.default_rng(s).uniform(0.0, 360.0))
        out.append({"map": level.map, "episode": k, "seed": s, "policy_seed": s,
                    "start": {"cell": [int(v) for v in cells[i]], "x": float(xy[i, 0]), "y": float(xy[i, 1]),
                              "heading": heading}})
    return out


def map_episodes(maps: list[str], n: int, seed: int = 0) -> list[dict]:
    """Validation-map episodes: n a map from its player start, seed `seed` + episode."""
    return [{"map": m, "episode": e, "seed": seed + e, "policy_seed": (seed + e) * 100 + mi, "start": None}
            for mi, m in enumerate(maps) for e in range(n)]


@dataclass
class Entry:
    """A model under evaluation: its name in the outputs, the engine, the context frames it is given."""

    name: str
    wm: object
    context: int
    meta: dict


def _load_models(args) -> list[Entry]:
    """--checkpoint/--preset first, then each --compare; every one with the same sampling settings."""
    from worldmodel.data.recording import model_meta

    settings = settings_from_args(args, leave_out=("seed",))  # each episode reseeds; a --preset's weights: seed 0
    wms = [(model_name(args, wm), wm) for wm in [load_model(args, settings=settings)]]
    for c in args.compare:
        wm = load_model(argparse.Namespace(checkpoint=c, preset=None, device=args.device), settings=settings)
        wms.append((Path(wm.folder).name, wm))
    names = [n for n, _ in wms]
    if len(set(names)) < len(names):  # two folders of the same name: tell them apart by the path given
        names = [args.preset or str(args.checkpoint or wms[0][1].folder)] + list(args.compare)
    names = [n if names.index(n) == i else f"{n} #{i + 1}" for i, n in enumerate(names)]  # the same one twice
    out = []
    for name, (_, wm) in zip(names, wms):
        if tuple(wm.frame_size) != tuple(wms[0][1].frame_size) or wm.fps != wms[0][1].fps:
            raise UserError(f"{name} makes {wm.frame_size[0]}x{wm.frame_size[1]} frames at {wm.fps} fps, "
                            f"{names[0]} {wms[0][1].frame_size[0]}x{wms[0][1].frame_size[1]} at {wms[0][1].fps}: "
                            f"models compared on the same episodes must match")
        meta = {**model_meta(wm), "name": name, "random_weights": wm.folder is None}
        out.append(Entry(name, wm, args.context or wm.cfg.cache_frames, meta))
    return out


def evaluate_episodes(entries: list[Entry], specs: list[dict], wad: str, warmup: int, horizons: list[int],
                      probe_frames: int, bar=None, videos: Path | None = None):
    """Every model on the same episodes (`specs`: level_episodes or map_episodes): the real side of each
    episode is played once and shared. Returns (per model {"per_episode", "probes"}, the episodes with
    the hash of their real frames, the real frames' statistics, the first episode (closed))."""
    hmax = max(horizons)
    context = max(e.context for e in entries)
    results = [{"per_episode": [], "probes": []} for _ in entries]
    episodes, real_stats, first = [], [], None
    for spec in specs:
        st = spec["start"]
        ep = Episode(wad, spec["map"], spec["seed"], entries[0].wm.frame_size, context, warmup, spec["policy_seed"],
                     start=None if st is None else (st["x"], st["y"], st["heading"]))
        try:
            generated = []
            for entry, res in zip(entries, results):
                entry.wm.seed = spec["seed"]
                generated.append([] if videos else None)
                curves = fidelity(entry.wm, ep, hmax, entry.context, generated[-1])
                res["probes"].append(probe(entry.wm, ep, probe_frames, entry.context))
                res["per_episode"].append({"map": spec["map"], "episode": spec["episode"], "seed": spec["seed"],
                                           "frames": len(curves["psnr"]), **curves})
                if bar is not None:
                    bar.update(1)
            real = ep.rollout(hmax)
            episodes.append({**{k: spec[k] for k in ("map", "episode", "seed", "start")},
                             "start_position": list(ep.start_position), "context_end": list(ep.position),
                             "frames": len(real["frames"]),
                             "real_sha256": ep.digest()})
            real_stats.extend(ep.real_stats)
            if videos:
                _video(videos / f"{spec['map']}_ep{spec['episode']}", entries, generated, real, spec)
        finally:
            ep.close()
        first = first or ep
    return results, episodes, real_stats, first


def _video(prefix: Path, entries: list[Entry], generated: list[list], real: dict, spec: dict) -> None:
    """[model | ... | real game] side by side, one frame per tic of the fidelity rollout."""
    from worldmodel.data.recording import Recorder, model_meta

    H, W = entries[0].wm.frame_size
    meta = {**model_meta(entries[0].wm), "compared": [model_meta(e.wm) for e in entries[1:]],
            "layout": " | ".join([e.name for e in entries] + ["real game"]), "map": spec["map"], "seed": spec["seed"]}
    rec = Recorder(prefix, entries[0].wm.fps, (H, W * (len(entries) + 1)), meta)
    try:
        for t, (a, f) in enumerate(zip(real["actions"], real["frames"])):
            rec.add(np.concatenate([g[t] for g in generated] + [f], axis=1), a)
    finally:
        rec.close()


def _sections(entries: list[Entry], results: list[dict], horizons: list[int], real: dict, probe_frames: int) -> list[dict]:
    return [{"model": e.meta, "context": e.context,
             "fidelity": summarise_fidelity(r["per_episode"], horizons, real),
             "controllability": {**score_controllability(r["probes"]), "probe_frames": probe_frames,
                                 "raw": r["probes"]}}
            for e, r in zip(entries, results)]


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def _clean(o):
    """JSON has no infinity: PSNR of identical frames becomes the string "inf"."""
    if isinstance(o, float) and not math.isfinite(o):
        return "inf" if o > 0 else ("-inf" if o < 0 else "nan")
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _write(res: dict, out: Path) -> None:
    """eval.json, atomically: an interrupted run keeps the stages it finished ("complete": false)."""
    from worldmodel.files import atomic_write_bytes

    res["comparison"] = comparison(all_sections(res))
    if res.get("generalisation"):
        res["generalisation"]["comparison"] = comparison(all_sections(res["generalisation"]))
    atomic_write_bytes(out / "eval.json", (json.dumps(_clean(res), indent=1) + "\n").encode())


def run(args) -> int:
    from worldmodel.device import device_info
    from worldmodel.progress import progress_bar

    _plan(args, loaded=False)  # bad flags and held-out maps fail here, before anything loads
    check_output_path(args.out, folder=True)
    entries = _load_models(args)
    primary = entries[0].wm
    plan = _plan(args, primary.info.get("level"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.preset:
        print(f"worldmodel eval: note: --preset {args.preset} has random weights; the numbers only test the "
              f"pipeline", file=sys.stderr)

    level = None
    if plan.mode == "level":
        from worldmodel.game.level import load_level

        level = load_level(plan.wad, plan.maps[0])
        specs = level_episodes(level, plan.episodes, args.seed)
    else:
        specs = map_episodes(plan.maps, plan.episodes, args.seed)
    videos = out if args.videos else None

    def section(specs, wad, desc):
        with progress_bar(total=len(specs) * len(entries), unit="rollout", desc=desc, disable=args.no_progress) as bar:
            results, episodes, stats, first = evaluate_episodes(entries, specs, wad, args.warmup, plan.horizons,
                                                                args.probe_frames, bar, videos)
        real = real_ranges(stats)
        return _sections(entries, results, plan.horizons, real, args.probe_frames), episodes, real, first

    secs, episodes, real, first = section(specs, plan.wad, "level episodes" if level else "fidelity+control")
    res = {
        "tool": "worldmodel eval", **provenance(), "device": device_info(primary.device), "complete": False,
        "mode": plan.mode, "wad": plan.wad, "maps": plan.maps, "episodes": plan.episodes,
        "level": None if level is None else {**level.to_dict(), "eval_starts": level.starts("eval").tolist(),
                                             "about": "held-out episodes: evaluation start places and seeds "
                                                      "that training never uses (worldmodel/game/level.py)"},
        "episode_list": episodes, "policy": POLICY_VERSION, "horizons": plan.horizons, "fps": primary.fps,
        "psnr_cap_db": PSNR_CAP, **secs[0], "stability": None, "compared": secs[1:], "real_frame_stats": real,
        "generalisation": None,
    }
    for s in res["compared"]:
        s["stability"] = None
    _write(res, out)

    if plan.generalisation:
        gspecs = map_episodes(plan.generalisation, args.generalisation_episodes, args.seed)
        gsecs, gepisodes, greal, _ = section(gspecs, "freedoom2", "generalisation")
        res["generalisation"] = {"about": GENERALISATION, "wad": "freedoom2", "maps": plan.generalisation,
                                 "episodes": args.generalisation_episodes, "episode_list": gepisodes,
                                 **gsecs[0], "compared": gsecs[1:], "real_frame_stats": greal}
        _write(res, out)

    if args.stability_frames:
        for entry, sec in zip(entries, all_sections(res)):
            with progress_bar(total=args.stability_frames, unit="frame", desc=f"stability {entry.name}",
                              disable=args.no_progress) as bar:
                entry.wm.seed = args.seed
                sec["stability"] = stability(entry.wm, first, args.stability_frames, args.sample_every, args.seed,
                                             real, bar, entry.context)
            _write(res, out)
    res["plots"] = write_plots(res, out)
    res["complete"] = True
    _write(res, out)
    print_summary(res)
    print(f"wrote {out / 'eval.json'}" + "".join(f", {p}" for p in res["plots"]))
    return 0
