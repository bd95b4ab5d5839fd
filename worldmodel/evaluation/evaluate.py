"""`worldmodel eval`: the world model against the real game, on held-out episodes of its level (a level
model) or on validation maps.

    worldmodel eval --level MAP01 --checkpoint checkpoints/doom-map01 --compare checkpoints/doom-tiny \
        --generalisation MAP21-MAP24 --out eval/doom-map01
    worldmodel eval --maps MAP21-MAP24 --episodes 6 --horizons 1,8,35,175 --out eval/doom-tiny

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
`comparison` puts the models side by side and the plots show them all. `--generalisation MAPS` (level
mode) adds the same fidelity and controllability on maps the level model never saw, as a section of its
own: generalisation, reported and not tuned for.

Writes DIR/eval.json (rewritten after each stage, "complete": true once all are done) and PNGs:
fidelity.png (PSNR, SSIM and sharpness against horizon), controllability.png, stability.png, and
generalisation_fidelity.png, generalisation_controllability.png with --generalisation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodel.game.action import NOOP, Action
from worldmodel.files import check_output_path
from worldmodel.inference.loading import add_model_arguments, load_model, model_name
from worldmodel.inference.settings import add_engine_arguments, settings_from_args
from worldmodel.parsing import parse_int_list
from worldmodel.provenance import provenance
from worldmodel.errors import UserError
from worldmodel.game.maps import add_wad_argument
from worldmodel.game.level import EVAL_STARTS
from worldmodel.metrics import (PSNR_CAP, STATS, flow_cosine, frame_stats, mean_psnr, motion, optical_flow, psnr,
                                ssim)
from worldmodel.game.policy import POLICY_VERSION

# probe name -> (action held, motion field looked at, expected sign)
PROBES = {
    "turn_right": (Action(turn=5.0), "tx", -1),
    "turn_left": (Action(turn=-5.0), "tx", +1),
    "forward": (Action(move=1), "zoom", +1),
    "backward": (Action(move=-1), "zoom", -1),
    "strafe_right": (Action(strafe=1), "tx", -1),  # the camera slides right: the scene moves left
    "strafe_left": (Action(strafe=-1), "tx", +1),
}
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
    add_engine_arguments(parser, ("seed", "steps", "speculative", "attention"),
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


# --------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------
class Episode:
    """A start point in the real game: the env, the actions that led there (replayable), the context, and
    the real side of the evaluation (the game played on from the context, the probes), played once and
    shared by every model scored on the episode. `start`: (x, y, heading) to warp to after the reset (a
    level's start place), or None (the map's player start)."""

    def __init__(self, wad, map_name, seed, frame_size, context, warmup, policy_seed, start=None):
        from worldmodel.game.doom import DoomEnv
        from worldmodel.game.policy import ExplorerPolicy

        self.seed, self.start = seed, start
        self.env = DoomEnv(wad=wad, map=map_name, seed=seed, frame_size=frame_size, depth=True)
        self.policy = ExplorerPolicy(policy_seed)
        rng = np.random.default_rng([seed, policy_seed])
        n = int(rng.integers(min(35, warmup), warmup + 1)) + context
        frames, actions = [self._begin()], [NOOP]
        self.path: list[Action] = []  # every action since the reset (and the warp)
        for _ in range(n):
            a = self.policy.act(self.env.position, self.env.depth)
            f = self.env.step(a)
            self.path.append(a)
            if self.env.restarted:  # left the level: start over (the replay starts from the reset)
                frames, actions, self.path = [self._begin()], [NOOP], []
                continue
            frames.append(f)
            actions.append(a)
        self.real_stats = [frame_stats(f) for f in frames]  # of every real frame seen (the real range)
        self.ctx_frames = np.stack(frames[-context:])
        self.ctx_actions = actions[-context:]
        self.position = self.env.position  # (x, y, angle) at the end of the context
        self._at_context = True  # the game stands at the end of the context
        self._rollout: dict | None = None
        self._probes: dict = {}

    def _begin(self) -> np.ndarray:
        f = self.env.reset(seed=self.seed)
        if self.start is not None:
            f = self.env.warp(*self.start)
        self.start_position = self.env.position  # (x, y, angle) where the episode began
        return f

    def replay(self) -> np.ndarray:
        """Put the game back at the end of the context; returns that frame."""
        f = self._begin()
        for a in self.path:
            f = self.env.step(a)
        self._at_context = True
        return f

    def context(self, n: int | None = None) -> tuple[np.ndarray, list[Action]]:
        """The last n context frames and their actions (all of them: None)."""
        n = n or len(self.ctx_frames)
        return self.ctx_frames[-n:], self.ctx_actions[-n:]

    def rollout(self, horizon: int) -> dict:
        """The real game played on from the context by the policy for `horizon` frames (the first call
        plays it; later calls share it): actions, frames, and per frame the copy-last baseline's PSNR and
        SSIM and the frame's sharpness. Shorter where the level was left (the game cut to a new start)."""
        if self._rollout is not None:
            if horizon > self._rollout["horizon"]:
                raise ValueError(f"the real rollout was played for {self._rollout['horizon']} frames, not {horizon}")
            return self._rollout
        if not self._at_context:
            self.replay()
        last = self.ctx_frames[-1]
        r = {"horizon": horizon, **{k: [] for k in ("actions", "frames", "psnr_copy", "ssim_copy", "sharpness_real")}}
        self._at_context = False
        for _ in range(horizon):
            a = self.policy.act(self.env.position, self.env.depth)
            real = self.env.step(a)
            if self.env.restarted:
                break
            st = frame_stats(real)
            self.real_stats.append(st)
            r["actions"].append(a)
            r["frames"].append(real)
            r["psnr_copy"].append(psnr(last, real))
            r["ssim_copy"].append(ssim(last, real))
            r["sharpness_real"].append(st["sharpness"])
        self._rollout = r
        return r

    def probe(self, name: str, frames: int) -> dict:
        """The real game with probe `name`'s action held for `frames` frames from the context (played once,
        then shared): its frames and the optical flow between consecutive ones."""
        key = (name, frames)
        if key not in self._probes:
            prev = self.replay()
            if not np.array_equal(prev, self.ctx_frames[-1]):
                raise RuntimeError("the real game did not replay deterministically to the context")
            self._at_context = False
            out = {"frames": [], "flows": []}
            for _ in range(frames):
                real = self.env.step(PROBES[name][0])
                if self.env.restarted:
                    break
                out["frames"].append(real)
                out["flows"].append(optical_flow(prev, real))
                prev = real
            self._probes[key] = out
        return self._probes[key]

    def digest(self) -> str:
        """SHA-256 of every real frame the models are scored against: context, rollout, probes."""
        h = hashlib.sha256(np.ascontiguousarray(self.ctx_frames).tobytes())
        for f in (self._rollout or {}).get("frames", []):
            h.update(f.tobytes())
        for key in sorted(self._probes):
            for f in self._probes[key]["frames"]:
                h.update(f.tobytes())
        return h.hexdigest()

    def close(self):
        self.env.close()


def fidelity(wm, ep: Episode, horizon: int, context: int | None = None, frames_out: list | None = None) -> dict:
    """Per-frame PSNR/SSIM of the model and of copy-last against the real game, and the sharpness of the
    generated and of the real frame, t = 1..horizon. The model sees the last `context` frames of the
    episode's context (all: None); its frames are appended to `frames_out` if given."""
    real = ep.rollout(horizon)
    wm.reset(*ep.context(context))
    out = {k: [] for k in ("psnr", "ssim", "sharpness")}
    for a, f in zip(real["actions"][:horizon], real["frames"][:horizon]):
        gen = wm.step(a)
        out["psnr"].append(psnr(gen, f))
        out["ssim"].append(ssim(gen, f))
        out["sharpness"].append(frame_stats(gen)["sharpness"])
        if frames_out is not None:
            frames_out.append(gen)
    n = len(out["psnr"])
    out.update({k: real[k][:n] for k in ("psnr_copy", "ssim_copy", "sharpness_real")})
    return out


def probe(wm, ep: Episode, frames: int, context: int | None = None) -> dict:
    """Each probe action held from the context, in the game and in the model: motion from optical flow."""
    out = {}
    for name, (action, field, sign) in PROBES.items():
        real = ep.probe(name, frames)
        if not real["frames"]:
            continue
        ctx_frames, ctx_actions = ep.context(context)
        wm.reset(ctx_frames, ctx_actions)
        gen_prev = ctx_frames[-1]
        rm, gm, cos = [], [], []
        for fr in real["flows"]:
            gen = wm.step(action)
            fg = optical_flow(gen_prev, gen)
            rm.append(motion(fr))
            gm.append(motion(fg))
            cos.append(flow_cosine(fg, fr))
            gen_prev = gen
        # the motion of the second half of the probe: Doom's player accelerates over a few tics and may
        # still carry momentum from the context when the probe starts
        mean = lambda ms, k: float(np.mean([m[k] for m in ms[len(ms) // 2:]]))  # noqa: E731
        out[name] = {"field": field, "expected_sign": sign,
                     "real": {k: mean(rm, k) for k in ("tx", "ty", "zoom", "magnitude")},
                     "model": {k: mean(gm, k) for k in ("tx", "ty", "zoom", "magnitude")},
                     "flow_cosine": float(np.mean(cos)), "frames": len(rm)}
    return out


def _sign(x: float, eps: float) -> int:
    return 0 if abs(x) < eps else (1 if x > 0 else -1)


# motion smaller than this is "no motion": pixels/frame for tx, relative expansion per frame for zoom
SIGN_EPS = {"tx": 0.25, "zoom": 0.004}


def score_controllability(probes: list[dict]) -> dict:
    per = {}
    for name, (_, field, sign) in PROBES.items():
        rows = [p[name] for p in probes if name in p]
        if not rows:
            continue
        eps = SIGN_EPS[field]
        m = [r["model"][field] for r in rows]
        r_ = [r["real"][field] for r in rows]
        ratio = [a / b for a, b in zip(m, r_) if abs(b) >= eps]
        # the probes where the real game moved the expected way (not blocked by a wall, say): there
        # the action's effect is unambiguous, and the model's sign is scored against it
        moved = [a for a, b in zip(m, r_) if _sign(b, eps) == sign]
        per[name] = {
            "field": field, "expected_sign": sign, "n": len(rows),
            "model_mean": float(np.mean(m)), "real_mean": float(np.mean(r_)),
            "model_direction_correct": float(np.mean([_sign(x, eps) == sign for x in m])),
            "real_direction_correct": float(np.mean([_sign(x, eps) == sign for x in r_])),
            "n_real_moved": len(moved),
            "model_correct_where_real_moved": float(np.mean([_sign(x, eps) == sign for x in moved])) if moved else None,
            "agreement_with_real": float(np.mean([_sign(a, eps) == _sign(b, eps) for a, b in zip(m, r_)])),
            "flow_cosine": float(np.mean([r["flow_cosine"] for r in rows])),
            "magnitude_ratio": float(np.median(ratio)) if ratio else None,
        }
    keys = ("model_direction_correct", "real_direction_correct", "agreement_with_real", "flow_cosine",
            "model_correct_where_real_moved")
    overall = {}
    for k in keys:
        vals = [v[k] for v in per.values() if v[k] is not None]
        overall[k] = float(np.mean(vals)) if vals else None
    return {"overall": overall, "probes": per}


def stability(wm, ep: Episode, frames: int, every: int, seed: int, real_stats: dict, progress=None,
              context: int | None = None) -> dict:
    from worldmodel.device import memory_mb, synchronize
    from worldmodel.game.policy import ExplorerPolicy

    policy = ExplorerPolicy(seed + 7919)  # blind: the dream has no depth buffer
    wm.reset(*ep.context(context))
    wm.reset_stats()
    samples = {"frame": [], "latency_ms": [], "memory_mb": [], **{k: [] for k in STATS}}
    lat_bin = []
    t_all = time.perf_counter()
    for i in range(1, frames + 1):
        a = policy.act()
        t = time.perf_counter()
        f = wm.step(a)
        synchronize(wm.device)
        lat_bin.append((time.perf_counter() - t) * 1000)
        if i % every == 0 or i == frames:
            s = frame_stats(f)
            samples["frame"].append(i)
            samples["latency_ms"].append(float(np.median(lat_bin)))
            samples["memory_mb"].append(memory_mb(wm.device))
            for k in STATS:
                samples[k].append(s[k])
            lat_bin = []
        if progress is not None:
            progress.update(1)
    total = time.perf_counter() - t_all
    n = len(samples["frame"])
    res = {"frames": frames, "seconds": total, "fps": frames / total, "sample_every": every, "samples": samples,
           "memory": "cuda_allocated" if wm.device.type == "cuda" else "process_rss",
           "engine_stats": wm.stats}
    in_range = {}
    for k in STATS:
        lo, hi = real_stats[k]["p1"], real_stats[k]["p99"]
        v = np.asarray(samples[k])
        inside = (v >= lo) & (v <= hi)
        seg = np.array_split(inside, min(10, n)) if n else []
        in_range[k] = {"fraction": float(inside.mean()) if n else None,
                       "by_tenth": [float(s.mean()) for s in seg if len(s)],
                       "first_tenth_mean": float(np.mean(np.array_split(v, min(10, n))[0])) if n else None,
                       "last_tenth_mean": float(np.mean(np.array_split(v, min(10, n))[-1])) if n else None}
    res["in_real_range"] = in_range
    res["in_real_range_all"] = float(np.mean([in_range[k]["fraction"] for k in STATS])) if n else None

    def flat(values):
        v = np.asarray([x for x in values if x is not None], dtype=np.float64)
        if v.size < 2:
            return None
        q = max(1, v.size // 10)
        first, last = float(np.median(v[:q])), float(np.median(v[-q:]))
        return {"first_tenth": first, "last_tenth": last, "ratio_last_first": last / first if first else None,
                "min": float(v.min()), "max": float(v.max())}

    res["memory_flat"] = flat(samples["memory_mb"])
    res["latency_flat"] = flat(samples["latency_ms"])
    return res


def real_ranges(stats: list[dict]) -> dict:
    out = {}
    for k in STATS:
        v = np.asarray([s[k] for s in stats])
        out[k] = {"p1": float(np.percentile(v, 1)), "p50": float(np.percentile(v, 50)),
                  "p99": float(np.percentile(v, 99)), "min": float(v.min()), "max": float(v.max())}
    return {"frames": len(stats), **out}


def summarise_fidelity(per_episode: list[dict], horizons: list[int], real: dict) -> dict:
    """At each t, over the episodes (those cut short by a level exit count while they last): mean PSNR
    (+inf capped) and SSIM of the model and of copy-last, median sharpness of the generated and of the
    real frames; at each horizon also the means over frames 1..h, and whether the generated frames'
    median sharpness lies in the real frames' range (`real`: real_ranges(), 1st..99th percentile)."""
    hmax = max(horizons)
    curve = {}
    for key in ("psnr", "ssim", "psnr_copy", "ssim_copy", "sharpness", "sharpness_real"):
        vals = []
        for t in range(hmax):
            col = [ep[key][t] for ep in per_episode if len(ep[key]) > t]
            agg = mean_psnr if key.startswith("psnr") else (np.mean if key.startswith("ssim") else np.median)
            vals.append(None if not col else float(agg(col)))
        curve[key] = vals
    lo, hi = real["sharpness"]["p1"], real["sharpness"]["p99"]
    hz = {}
    for h in horizons:
        rows = [ep for ep in per_episode if len(ep["psnr"]) >= h]
        hz[str(h)] = row = {"n": len(rows)}
        if not rows:
            continue
        at = lambda k: [r[k][h - 1] for r in rows]  # noqa: E731
        upto = lambda k: [x for r in rows for x in r[k][:h]]  # noqa: E731
        row.update({
            "psnr": mean_psnr(at("psnr")), "psnr_copy": mean_psnr(at("psnr_copy")),
            "ssim": float(np.mean(at("ssim"))), "ssim_copy": float(np.mean(at("ssim_copy"))),
            "psnr_mean_1_to_h": mean_psnr(upto("psnr")), "psnr_copy_mean_1_to_h": mean_psnr(upto("psnr_copy")),
            "ssim_mean_1_to_h": float(np.mean(upto("ssim"))), "ssim_copy_mean_1_to_h": float(np.mean(upto("ssim_copy"))),
            "sharpness": float(np.median(at("sharpness"))), "sharpness_real": float(np.median(at("sharpness_real"))),
        })
        row["psnr_gain_over_copy"] = row["psnr"] - row["psnr_copy"]
        row["ssim_gain_over_copy"] = row["ssim"] - row["ssim_copy"]
        row["psnr_mean_gain_over_copy"] = row["psnr_mean_1_to_h"] - row["psnr_copy_mean_1_to_h"]
        row["sharpness_in_real_range"] = bool(lo <= row["sharpness"] <= hi)
    return {"episodes": len(per_episode), "horizons": hz, "curve": curve, "sharpness_real_range": [lo, hi],
            "per_episode": per_episode}


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


COMPARED = ("psnr", "psnr_copy", "psnr_gain_over_copy", "psnr_mean_1_to_h", "psnr_copy_mean_1_to_h",
            "psnr_mean_gain_over_copy", "ssim", "ssim_copy", "sharpness", "sharpness_real", "sharpness_in_real_range")


def comparison(sections: list[dict]) -> list[dict]:
    """The headline numbers of each model (--checkpoint's first) side by side: fidelity at each horizon,
    controllability (right direction where the real game moved as expected), stability."""
    rows = []
    for s in sections:
        c = s["controllability"]
        st = s.get("stability")
        rows.append({"model": s["model"]["name"],
                     "horizons": {h: {k: r.get(k) for k in COMPARED} for h, r in s["fidelity"]["horizons"].items()},
                     "controllability_where_real_moved": {
                         "overall": c["overall"]["model_correct_where_real_moved"],
                         **{n: p["model_correct_where_real_moved"] for n, p in c["probes"].items()}},
                     "stability_in_real_range": st["in_real_range_all"] if st else None})
    return rows


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def _nan(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _fidelity_plot(plt, sections: list[dict], horizons: list[int], title: str, path: Path) -> bool:
    import matplotlib.ticker

    first = sections[0]["fidelity"]
    t = np.arange(1, len(first["curve"]["psnr"]) + 1)
    if not len(t):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("sharpness", "sharpness (Laplacian variance, median)"))
    for ax, (key, label) in zip(axes, panels):
        for i, sec in enumerate(sections):
            ax.plot(t, _nan(sec["fidelity"]["curve"][key]), "-", color=f"C{i}", label=sec["model"]["name"])
            for h in horizons:
                row = sec["fidelity"]["horizons"].get(str(h))
                if row and row["n"]:
                    ax.plot([h], [row[key]], "o", color=f"C{i}")
        if key == "sharpness":
            ax.plot(t, _nan(first["curve"]["sharpness_real"]), "-", color="k", label="real game")
            lo, hi = first["sharpness_real_range"]
            ax.axhspan(lo, hi, color="k", alpha=0.08, label="real frames, 1st-99th percentile")
            ax.set_yscale("log")
        else:
            ax.plot(t, _nan(first["curve"][key + "_copy"]), "--", color="k", label="copy last frame")
        ax.set_xscale("log")
        ax.set_xticks(horizons, [str(h) for h in horizons])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("frames ahead (horizon)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _controllability_plot(plt, sections: list[dict], title: str, path: Path) -> bool:
    names = [n for n in PROBES if n in sections[0]["controllability"]["probes"]]
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(names) * (len(sections) + 1) / 2), 4.8))
    x = np.arange(len(names))
    width = 0.8 / (len(sections) + 1)
    probes0 = sections[0]["controllability"]["probes"]
    scale = [1.0 if probes0[n]["field"] == "tx" else 100.0 for n in names]
    ax.bar(x - 0.4 + width / 2, [probes0[n]["real_mean"] * s for n, s in zip(names, scale)], width,
           color="0.55", label="real game")
    for i, sec in enumerate(sections):
        ps = sec["controllability"]["probes"]
        pos = x - 0.4 + width * (i + 1.5)
        vals = [ps[n]["model_mean"] * s for n, s in zip(names, scale)]
        ax.bar(pos, vals, width, color=f"C{i}", label=sec["model"]["name"])
        for xp, v, n in zip(pos, vals, names):
            right = ps[n]["model_correct_where_real_moved"]
            ax.annotate("-" if right is None else f"{right:.0%}", (xp, v), ha="center", fontsize=7,
                        va="bottom" if v >= 0 else "top")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [f"{n}\n({'tx px/frame' if probes0[n]['field'] == 'tx' else 'zoom %/frame'})\n"
                      f"game moved in {probes0[n]['n_real_moved']}/{probes0[n]['n']}" for n in names], fontsize=8)
    ax.set_ylabel("mean flow motion")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{title}\n(over each model's bar: its direction right where the real game moved as expected)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _stability_plot(plt, sections: list[dict], real: dict, fps: float, path: Path) -> bool:
    runs = [(i, s) for i, s in enumerate(sections) if s.get("stability") and s["stability"]["samples"]["frame"]]
    if not runs:
        return False
    fig, axes = plt.subplots(5, 1, figsize=(9, 11), sharex=True)
    for k_i, k in enumerate(STATS):
        axes[k_i].axhspan(real[k]["p1"], real[k]["p99"], color="0.5", alpha=0.2,
                          label="real frames, 1st-99th percentile")
        axes[k_i].set_ylabel(k)
    for i, sec in runs:
        st = sec["stability"]
        s = st["samples"]
        minutes = np.asarray(s["frame"]) / fps / 60
        for ax, k in zip(axes[:3], STATS):
            ax.plot(minutes, s[k], "-", color=f"C{i}", lw=1, label=sec["model"]["name"])
        axes[3].plot(minutes, s["latency_ms"], color=f"C{i}")
        axes[4].plot(minutes, s["memory_mb"], color=f"C{i}")
        axes[4].set_ylabel(f"memory MB\n({st['memory']})")
    for ax in axes[:3]:
        ax.legend(fontsize=8, loc="upper right")
    axes[3].set_ylabel("latency ms\n(median)")
    axes[3].set_ylim(bottom=0)
    axes[4].ticklabel_format(axis="y", useOffset=False, style="plain")
    axes[4].set_xlabel("game time (minutes)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"stability: {runs[0][1]['stability']['frames']} frames in one rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _all_sections(res: dict) -> list[dict]:
    """The per-model results of a result (the top level, or its generalisation section)."""
    return [res] + res["compared"]


def _plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = _all_sections(res)
    where = f"{res['wad']} {res['maps'][0]}, {len(res['episode_list'])} held-out episodes spread over the level" \
        if res["mode"] == "level" else f"{res['wad']} {','.join(res['maps'])}, {len(res['episode_list'])} episodes"
    models = ", ".join(s["model"]["name"] for s in secs)
    plots = [("fidelity.png", lambda p: _fidelity_plot(plt, secs, res["horizons"],
                                                        f"{models}: fidelity against the real game, {where}", p)),
             ("controllability.png", lambda p: _controllability_plot(
                 plt, secs, f"controllability: image motion under held actions (optical flow), {where}", p)),
             ("stability.png", lambda p: _stability_plot(plt, secs, res["real_frame_stats"], res["fps"], p))]
    gen = res.get("generalisation")
    if gen:
        gsecs = _all_sections(gen)
        gwhere = f"generalisation: {gen['wad']} {','.join(gen['maps'])} (never trained on), {len(gen['episode_list'])} episodes"
        plots += [("generalisation_fidelity.png", lambda p: _fidelity_plot(plt, gsecs, res["horizons"],
                                                                            f"{models}: {gwhere}", p)),
                  ("generalisation_controllability.png",
                   lambda p: _controllability_plot(plt, gsecs, f"controllability, {gwhere}", p))]
    return [name for name, draw in plots if draw(out / name)]


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

    res["comparison"] = comparison(_all_sections(res))
    if res.get("generalisation"):
        res["generalisation"]["comparison"] = comparison(_all_sections(res["generalisation"]))
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
        for entry, sec in zip(entries, _all_sections(res)):
            with progress_bar(total=args.stability_frames, unit="frame", desc=f"stability {entry.name}",
                              disable=args.no_progress) as bar:
                entry.wm.seed = args.seed
                sec["stability"] = stability(entry.wm, first, args.stability_frames, args.sample_every, args.seed,
                                             real, bar, entry.context)
            _write(res, out)
    res["plots"] = _plots(res, out)
    res["complete"] = True
    _write(res, out)
    _summary(res)
    print(f"wrote {out / 'eval.json'}" + "".join(f", {p}" for p in res["plots"]))
    return 0


def _summary(res: dict) -> None:
    f = lambda v, s=".2f": "-" if v is None else format(v, s)  # noqa: E731
    parts = [(res, f"{res['wad']} {','.join(res['maps'])}" + (" (held-out episodes of the level)"
                                                                 if res["mode"] == "level" else ""))]
    if res.get("generalisation"):
        g = res["generalisation"]
        parts.append((g, f"generalisation: {g['wad']} {','.join(g['maps'])}, maps never trained on"))
    for part, where in parts:
        secs = _all_sections(part)
        print(f"\n{len(part['episode_list'])} episodes on {where}; {res['device']['name']}")
        w = max(len(sec["model"]["name"]) for sec in secs) + 2
        print(f"{'model':>{w}}{'horizon':>8}{'n':>4}{'PSNR':>8}{'copy':>8}{'1..h':>8}{'copy':>8}{'SSIM':>8}"
              f"{'copy':>8}{'sharp':>8}{'real':>8}")
        for sec in secs:
            for h, r in sec["fidelity"]["horizons"].items():
                print(f"{sec['model']['name']:>{w}}{h:>8}{r['n']:>4}{f(r.get('psnr')):>8}"
                      f"{f(r.get('psnr_copy')):>8}{f(r.get('psnr_mean_1_to_h')):>8}"
                      f"{f(r.get('psnr_copy_mean_1_to_h')):>8}{f(r.get('ssim'), '.3f'):>8}"
                      f"{f(r.get('ssim_copy'), '.3f'):>8}{f(r.get('sharpness'), '.0f'):>8}"
                      f"{f(r.get('sharpness_real'), '.0f'):>8}")
        for sec in secs:
            c = sec["controllability"]
            print(f"{sec['model']['name']}: controllability: model direction right {f(c['overall']['model_direction_correct'])}"
                  f" (where the real game moved {f(c['overall']['model_correct_where_real_moved'])}), real game "
                  f"{f(c['overall']['real_direction_correct'])}, agreement with real "
                  f"{f(c['overall']['agreement_with_real'])}, flow cosine {f(c['overall']['flow_cosine'])}")
            print("  per probe (model right / real right / model right where the real game moved as expected): "
                  + ", ".join(f"{n} {f(p['model_direction_correct'], '.0%')}/{f(p['real_direction_correct'], '.0%')}/"
                              f"{f(p['model_correct_where_real_moved'], '.0%')} of {p['n_real_moved']}"
                              for n, p in c["probes"].items()))
    for sec in _all_sections(res):
        st = sec.get("stability")
        if st:
            lat, mem = st["latency_flat"] or {}, st["memory_flat"] or {}
            print(f"{sec['model']['name']}: stability: {st['frames']} frames at {st['fps']:.1f} fps; frame statistics "
                  f"within the real range {f(st['in_real_range_all'])}; latency last/first tenth "
                  f"{f(lat.get('ratio_last_first'))}, memory last/first {f(mem.get('ratio_last_first'), '.3f')}")
