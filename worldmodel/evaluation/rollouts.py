"""The rollouts of `worldmodel eval`: a model against the real game from the same start scene (method
in worldmodel/evaluation/evaluate.py). `Episode` is the real side, played once and shared by every model
scored on it; `fidelity`, `probe` and `stability` run a model from its context."""
from __future__ import annotations

import hashlib
import time

import numpy as np

from worldmodel.game.action import Action
from worldmodel.metrics import STATS, flow_cosine, frame_stats, motion, optical_flow, psnr, ssim

# probe name -> (action held, motion field looked at, expected sign)
PROBES = {
    "turn_right": (Action(turn=5.0), "tx", -1),
    "turn_left": (Action(turn=-5.0), "tx", +1),
    "forward": (Action(move=1), "zoom", +1),
    "backward": (Action(move=-1), "zoom", -1),
    "strafe_right": (Action(strafe=1), "tx", -1),  # the camera slides right: the scene moves left
    "strafe_left": (Action(strafe=-1), "tx", +1),
}


class Episode:
    """A start point in the real game: the env, the actions that led there (replayable), the context, and
    the real side of the evaluation (the game played on from the context, the probes), played once and
    shared by every model scored on the episode. `start`: (x, y, heading) to warp to after the reset (a
    level's start place), or None (the map's player start)."""

    def __init__(self, wad, map_name, seed, frame_size, context, warmup, policy_seed, start=None):
        from worldmodel.game.doom import DoomEnv
        from worldmodel.game.policy import ExplorerPolicy
        from worldmodel.game.scenes import explorer, start_scene

        self.env = DoomEnv(wad=wad, map=map_name, seed=seed, frame_size=frame_size, depth=True)
        self.policy = ExplorerPolicy(policy_seed)
        rng = np.random.default_rng([seed, policy_seed])
        n = int(rng.integers(min(35, warmup), warmup + 1)) + context
        self.scene = start_scene(self.env, seed, n, explorer(self.policy), start=start)
        self.real_stats = [frame_stats(f) for f in self.scene.frames]  # of every real frame seen (the real range)
        self.ctx_frames, self.ctx_actions = self.scene.context(context)
        self.position = self.env.position  # (x, y, angle) at the end of the context
        self._at_context = True  # the game stands at the end of the context
        self._rollout: dict | None = None
        self._probes: dict = {}

    @property
    def start_position(self) -> tuple:
        """(x, y, angle) where the episode began."""
        return self.scene.start_position

    def replay(self) -> np.ndarray:
        """Put the game back at the end of the context; returns that frame."""
        f = self.scene.replay()
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
