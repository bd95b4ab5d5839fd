"""`worldmodel eval`: the world model against the real game, on validation maps.

    worldmodel eval --maps MAP21,MAP22,MAP23,MAP24 --episodes 6 --horizons 1,8,35,175 --out eval/doom-tiny

For each map and episode (seed = --seed + episode):
1. the explorer policy plays the real game (`DoomEnv`, it sees depth and position) for a warm-up of
   35..--warmup frames; the last --context real frames and their actions are the context;
2. fidelity: from that context the policy keeps playing the real game, and the model is fed the same
   actions; PSNR and SSIM of model frame t against real frame t, t = 1..max(horizons), beside the
   copy-last-frame baseline (the last context frame held);
3. controllability: from the same context (the game replayed to it, deterministically), each probe
   action is held for --probe-frames frames in the game and in the model: turn right / turn left (the
   image must move left / right: flow translation tx < 0 / > 0) and forward / backward (the image must
   expand / contract: flow zoom > 0 / < 0). Optical flow is Farneback (OpenCV) between consecutive frames,
   on the part of the frame above the weapon, averaged over the second half of the probe (the player
   accelerates over a few tics and may carry momentum from the context). Scored as: the model's direction right (sign as expected),
   agreeing with the real game's sign, cosine of the model's and the real flow fields, and the size of
   the model's motion relative to the real one;
4. stability: one long rollout (--stability-frames, default 21,000 = 10 minutes of game time) from the
   first map's context, the explorer acting blind; every --sample-every frames the frame's brightness,
   contrast and sharpness (Laplacian variance) are compared with the range (1st..99th percentile) of the
   real frames seen in 1-2, and memory and latency are sampled: they must stay flat.

Held-out maps (freedoom2 MAP25-MAP32, every freedoom1 map) are refused. Writes DIR/eval.json and PNGs:
fidelity.png (PSNR and SSIM against horizon), controllability.png, stability.png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from worldmodel.action import NOOP, Action
from worldmodel.cli_common import (add_model_arguments, check_output_path, load_model, model_name, parse_int_list,
                                   provenance)
from worldmodel.errors import UserError
from worldmodel.maps import add_wad_argument
from worldmodel.metrics import (PSNR_CAP, STATS, flow_cosine, frame_stats, mean_psnr, motion, optical_flow, psnr,
                                ssim)
from worldmodel.policy import POLICY_VERSION

# probe name -> (action held, motion field looked at, expected sign)
PROBES = {
    "turn_right": (Action(turn=5.0), "tx", -1),
    "turn_left": (Action(turn=-5.0), "tx", +1),
    "forward": (Action(move=1), "zoom", +1),
    "backward": (Action(move=-1), "zoom", -1),
}
DEFAULT_HORIZONS = "1,8,35,175"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--maps", default="MAP21-MAP24",
                        help="validation maps, e.g. MAP21,MAP22 or MAP21-MAP24 (default); held-out maps are refused")
    add_wad_argument(parser)
    parser.add_argument("--episodes", type=int, default=6, help="episodes (start points) per map (default 6)")
    parser.add_argument("--horizons", default=DEFAULT_HORIZONS, help=f"frames ahead to report (default {DEFAULT_HORIZONS})")
    parser.add_argument("--context", type=int, help="real context frames (default: the model's cache size)")
    parser.add_argument("--warmup", type=int, default=140,
                        help="the policy plays 35..N real frames before the context (default 140)")
    parser.add_argument("--probe-frames", type=int, default=10, help="frames each controllability probe is held")
    parser.add_argument("--stability-frames", type=int, default=21000,
                        help="long-rollout length (default 21000 = 10 min of game time; 0 skips it)")
    parser.add_argument("--sample-every", type=int, default=35, help="stability sampling interval in frames")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--speculative", type=int, help="speculative frames per pass (1 = off)")
    parser.add_argument("--attention", help="attention backend")
    parser.add_argument("--videos", action="store_true",
                        help="also write DIR/<map>_ep<k> side-by-side recordings [model | real]")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--no-progress", action="store_true")


def _check_args(args) -> tuple[list[str], list[int]]:
    from worldmodel.maps import check_map, parse_maps

    maps = [check_map(args.wad, m, "val") for m in parse_maps(args.maps)]  # HeldOutMapError: a clear line
    horizons = sorted(set(parse_int_list(args.horizons, "horizons")))
    if horizons[0] < 1:
        raise UserError(f"--horizons must be positive, got {args.horizons}")
    for name in ("episodes", "probe_frames", "sample_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.stability_frames < 0 or args.warmup < 0:
        raise UserError("--stability-frames and --warmup must be >= 0")
    return maps, horizons


# --------------------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------------------
class Episode:
    """A start point in the real game: the env, the actions that led there (replayable), the context."""

    def __init__(self, wad, map_name, seed, frame_size, context, warmup, policy_seed):
        from worldmodel.game import DoomEnv
        from worldmodel.policy import ExplorerPolicy

        self.seed = seed
        self.env = DoomEnv(wad=wad, map=map_name, seed=seed, frame_size=frame_size, depth=True)
        self.policy = ExplorerPolicy(policy_seed)
        rng = np.random.default_rng([seed, policy_seed])
        n = int(rng.integers(min(35, warmup), warmup + 1)) + context
        frames, actions = [self.env.reset(seed=seed)], [NOOP]
        self.path: list[Action] = []  # every action since the reset
        for _ in range(n):
            a = self.policy.act(self.env.position, self.env.depth)
            f = self.env.step(a)
            self.path.append(a)
            if self.env.restarted:  # left the level: start over (the replay starts from the reset)
                frames, actions, self.path = [self.env.reset(seed=seed)], [NOOP], []
                continue
            frames.append(f)
            actions.append(a)
        self.real_stats = [frame_stats(f) for f in frames]  # of every real frame seen (the real range)
        self.ctx_frames = np.stack(frames[-context:])
        self.ctx_actions = actions[-context:]

    def replay(self) -> np.ndarray:
        """Put the game back at the end of the context; returns that frame."""
        f = self.env.reset(seed=self.seed)
        for a in self.path:
            f = self.env.step(a)
        return f

    def close(self):
        self.env.close()


def fidelity(wm, ep: Episode, horizon: int, rec=None) -> dict:
    """Per-frame PSNR/SSIM of the model and of copy-last against the real game, t = 1..horizon."""
    wm.reset(ep.ctx_frames, ep.ctx_actions)
    last = ep.ctx_frames[-1]
    out = {k: [] for k in ("psnr", "ssim", "psnr_copy", "ssim_copy")}
    for t in range(horizon):
        a = ep.policy.act(ep.env.position, ep.env.depth)
        real = ep.env.step(a)
        if ep.env.restarted:  # left the level: the real game cut to a new start
            break
        gen = wm.step(a)
        ep.real_stats.append(frame_stats(real))
        out["psnr"].append(psnr(gen, real))
        out["ssim"].append(ssim(gen, real))
        out["psnr_copy"].append(psnr(last, real))
        out["ssim_copy"].append(ssim(last, real))
        if rec is not None:
            rec.add(np.concatenate([gen, real], axis=1), a)
    return out


def probe(wm, ep: Episode, frames: int) -> dict:
    """Each probe action held from the context, in the game and in the model: motion from optical flow."""
    out = {}
    for name, (action, field, sign) in PROBES.items():
        real_prev = ep.replay()
        if not np.array_equal(real_prev, ep.ctx_frames[-1]):
            raise RuntimeError("the real game did not replay deterministically to the context")
        wm.reset(ep.ctx_frames, ep.ctx_actions)
        gen_prev = ep.ctx_frames[-1]
        rm, gm, cos = [], [], []
        for _ in range(frames):
            real = ep.env.step(action)
            if ep.env.restarted:
                break
            gen = wm.step(action)
            fr, fg = optical_flow(real_prev, real), optical_flow(gen_prev, gen)
            rm.append(motion(fr))
            gm.append(motion(fg))
            cos.append(flow_cosine(fg, fr))
            real_prev, gen_prev = real, gen
        if not rm:
            continue
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


def stability(wm, ep: Episode, frames: int, every: int, seed: int, real_stats: dict, progress=None) -> dict:
    from worldmodel.bench import memory_mb, synchronize
    from worldmodel.policy import ExplorerPolicy

    policy = ExplorerPolicy(seed + 7919)  # blind: the dream has no depth buffer
    wm.reset(ep.ctx_frames, ep.ctx_actions)
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


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def _plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    fid = res["fidelity"]
    curve = fid["curve"]
    t = np.arange(1, len(curve["psnr"]) + 1)
    if len(t):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
            ax.plot(t, curve[key], "-", color="C0", label="model")
            ax.plot(t, curve[key + "_copy"], "--", color="C1", label="copy last frame")
            for h in res["horizons"]:
                row = fid["horizons"].get(str(h))
                if row and row["n"]:
                    ax.plot([h], [row[key]], "o", color="C0")
                    ax.plot([h], [row[key + "_copy"]], "s", color="C1")
            ax.set_xscale("log")
            ax.set_xticks(res["horizons"], [str(h) for h in res["horizons"]])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("frames ahead (horizon)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, which="both")
            ax.legend()
        fig.suptitle(f"{res['model']['name']}: fidelity against the real game, {res['wad']} "
                     f"{','.join(res['maps'])}, {fid['episodes']} episodes")
        fig.tight_layout()
        fig.savefig(out / "fidelity.png", dpi=100)
        plt.close(fig)
        written.append("fidelity.png")

    ctl = res["controllability"]["probes"]
    if ctl:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = list(ctl)
        x = np.arange(len(names))
        scale = [1.0 if ctl[n]["field"] == "tx" else 100.0 for n in names]
        ax.bar(x - 0.2, [ctl[n]["real_mean"] * s for n, s in zip(names, scale)], 0.4, label="real game")
        ax.bar(x + 0.2, [ctl[n]["model_mean"] * s for n, s in zip(names, scale)], 0.4, label="model")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [f"{n}\n({'tx px/frame' if ctl[n]['field'] == 'tx' else 'zoom %/frame'})\n"
                          f"model right {ctl[n]['model_direction_correct']:.0%}"
                          + (f", {ctl[n]['model_correct_where_real_moved']:.0%} of {ctl[n]['n_real_moved']}\nwhere the game moved"
                             if ctl[n]["n_real_moved"] else "") for n in names], fontsize=8)
        ax.set_ylabel("mean flow motion")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        ax.set_title("controllability: image motion under held actions (optical flow)")
        fig.tight_layout()
        fig.savefig(out / "controllability.png", dpi=100)
        plt.close(fig)
        written.append("controllability.png")

    st = res.get("stability")
    if st and st["samples"]["frame"]:
        s = st["samples"]
        minutes = np.asarray(s["frame"]) / res["fps"] / 60
        fig, axes = plt.subplots(5, 1, figsize=(9, 11), sharex=True)
        for ax, k in zip(axes[:3], STATS):
            r = res["real_frame_stats"][k]
            ax.axhspan(r["p1"], r["p99"], color="C2", alpha=0.2, label="real frames, 1st-99th percentile")
            ax.plot(minutes, s[k], "-", color="C0", lw=1, label="model")
            ax.set_ylabel(k)
            ax.legend(fontsize=8, loc="upper right")
        axes[3].plot(minutes, s["latency_ms"], color="C3")
        axes[3].set_ylabel("latency ms\n(median)")
        axes[3].set_ylim(bottom=0)
        axes[4].plot(minutes, s["memory_mb"], color="C4")
        axes[4].set_ylabel(f"memory MB\n({st['memory']})")
        axes[4].ticklabel_format(axis="y", useOffset=False, style="plain")
        axes[4].set_xlabel("game time (minutes)")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(f"stability: {st['frames']} frames in one rollout")
        fig.tight_layout()
        fig.savefig(out / "stability.png", dpi=100)
        plt.close(fig)
        written.append("stability.png")
    return written


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------
def run(args) -> int:
    from worldmodel.progress import progress_bar

    from worldmodel.bench import device_info
    from worldmodel.recording import Recorder, model_meta

    maps, horizons = _check_args(args)  # held-out maps fail here, before anything loads
    check_output_path(args.out, folder=True)
    wm = load_model(args, steps=args.steps, speculative=args.speculative, attention=args.attention)
    context = args.context or wm.cfg.cache_frames
    hmax = max(horizons)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = model_name(args, wm)
    if args.preset:
        print(f"worldmodel eval: note: --preset {args.preset} has random weights; the numbers only test the "
              f"pipeline", file=sys.stderr)

    per_episode, probes, real_stats, first_ep = [], [], [], None
    total = len(maps) * args.episodes
    with progress_bar(total=total, unit="episode", desc="fidelity+control", disable=args.no_progress) as bar:
        for mi, m in enumerate(maps):
            for e in range(args.episodes):
                seed = args.seed + e
                ep = Episode(args.wad, m, seed, wm.frame_size, context, args.warmup, policy_seed=seed * 100 + mi)
                wm.seed = seed
                rec = None
                if args.videos:
                    H, W = wm.frame_size
                    rec = Recorder(out / f"{m}_ep{e}", wm.fps, (H, 2 * W),
                                   {**model_meta(wm), "layout": "model | real game", "map": m, "seed": seed})
                try:
                    curves = fidelity(wm, ep, hmax, rec)
                finally:
                    if rec is not None:
                        rec.close()
                probes.append(probe(wm, ep, args.probe_frames))
                per_episode.append({"map": m, "episode": e, "seed": seed, "frames": len(curves["psnr"]), **curves})
                real_stats.extend(ep.real_stats)
                if first_ep is None:
                    first_ep = ep
                else:
                    ep.close()
                bar.update(1)

    # fidelity: mean over episodes at each t (episodes cut short by a level exit count while they last)
    curve = {}
    for key in ("psnr", "ssim", "psnr_copy", "ssim_copy"):
        vals = []
        for t in range(hmax):
            col = [ep[key][t] for ep in per_episode if len(ep[key]) > t]
            vals.append((mean_psnr(col) if key.startswith("psnr") else float(np.mean(col))) if col else None)
        curve[key] = vals
    hz = {}
    for h in horizons:
        rows = [ep for ep in per_episode if len(ep["psnr"]) >= h]
        hz[str(h)] = {"n": len(rows)}
        if rows:
            hz[str(h)].update({
                "psnr": mean_psnr([r["psnr"][h - 1] for r in rows]),
                "psnr_copy": mean_psnr([r["psnr_copy"][h - 1] for r in rows]),
                "ssim": float(np.mean([r["ssim"][h - 1] for r in rows])),
                "ssim_copy": float(np.mean([r["ssim_copy"][h - 1] for r in rows])),
                "psnr_mean_1_to_h": mean_psnr([x for r in rows for x in r["psnr"][:h]]),
                "ssim_mean_1_to_h": float(np.mean([x for r in rows for x in r["ssim"][:h]])),
            })
            hz[str(h)]["psnr_gain_over_copy"] = hz[str(h)]["psnr"] - hz[str(h)]["psnr_copy"]
            hz[str(h)]["ssim_gain_over_copy"] = hz[str(h)]["ssim"] - hz[str(h)]["ssim_copy"]

    res = {
        "tool": "worldmodel eval", **provenance(), "device": device_info(wm.device),
        "model": {**model_meta(wm), "name": name, "random_weights": bool(args.preset)},
        "wad": args.wad, "maps": maps, "episodes": args.episodes, "policy": POLICY_VERSION, "context": context,
        "horizons": horizons,
        "fps": wm.fps, "psnr_cap_db": PSNR_CAP,
        "fidelity": {"episodes": len(per_episode), "horizons": hz, "curve": curve,
                     "per_episode": [{k: v for k, v in ep.items()} for ep in per_episode]},
        "controllability": {**score_controllability(probes), "probe_frames": args.probe_frames,
                            "raw": probes},
    }
    res["real_frame_stats"] = real_ranges(real_stats)
    res["stability"] = None
    if args.stability_frames:
        with progress_bar(total=args.stability_frames, unit="frame", desc="stability",
                          disable=args.no_progress) as bar:
            wm.seed = args.seed
            res["stability"] = stability(wm, first_ep, args.stability_frames, args.sample_every, args.seed,
                                         res["real_frame_stats"], bar)
    first_ep.close()
    res["plots"] = _plots(res, out)

    def clean(o):  # JSON has no infinity: PSNR of identical frames becomes the string "inf"
        if isinstance(o, float) and not math.isfinite(o):
            return "inf" if o > 0 else ("-inf" if o < 0 else "nan")
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    (out / "eval.json").write_text(json.dumps(clean(res), indent=1) + "\n")
    _summary(res)
    print(f"wrote {out / 'eval.json'}" + "".join(f", {p}" for p in res["plots"]))
    return 0


def _summary(res: dict) -> None:
    f = lambda v, s=".2f": "-" if v is None else format(v, s)  # noqa: E731
    print(f"\n{res['model']['name']} on {res['device']['name']} vs the real game, {res['wad']} {','.join(res['maps'])}, "
          f"{res['fidelity']['episodes']} episodes")
    print(f"{'horizon':>8}{'n':>4}{'PSNR':>8}{'copy':>8}{'SSIM':>8}{'copy':>8}")
    for h, r in res["fidelity"]["horizons"].items():
        print(f"{h:>8}{r['n']:>4}{f(r.get('psnr')):>8}{f(r.get('psnr_copy')):>8}{f(r.get('ssim'), '.3f'):>8}"
              f"{f(r.get('ssim_copy'), '.3f'):>8}")
    c = res["controllability"]
    print(f"controllability: model direction right {f(c['overall']['model_direction_correct'])}, real game "
          f"{f(c['overall']['real_direction_correct'])}, agreement with real {f(c['overall']['agreement_with_real'])}, "
          f"flow cosine {f(c['overall']['flow_cosine'])}")
    print("  per probe (model right / real right / model right where the real game moved as expected): " + ", ".join(
        f"{n} {f(p['model_direction_correct'], '.0%')}/{f(p['real_direction_correct'], '.0%')}/"
        f"{f(p['model_correct_where_real_moved'], '.0%')} of {p['n_real_moved']}" for n, p in c["probes"].items()))
    st = res.get("stability")
    if st:
        lat, mem = st["latency_flat"] or {}, st["memory_flat"] or {}
        print(f"stability: {st['frames']} frames at {st['fps']:.1f} fps; frame statistics within the real range "
              f"{f(st['in_real_range_all'])}; latency last/first tenth {f(lat.get('ratio_last_first'))}, "
              f"memory last/first {f(mem.get('ratio_last_first'), '.3f')}")
