"""The report of `worldmodel eval`: the rollouts scored (fidelity curves and horizons, controllability,
the real frames' range), the models side by side, the plots and the table on screen."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from worldmodel.metrics import STATS, mean_psnr
from worldmodel.evaluation.rollouts import PROBES


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


COMPARED = ("psnr", "psnr_copy", "psnr_gain_over_copy", "psnr_mean_1_to_h", "psnr_copy_mean_1_to_h",
            "psnr_mean_gain_over_copy", "ssim", "ssim_copy", "sharpness", "sharpness_real", "sharpness_in_real_range")


def paired_gain(per_episode: list[dict], reference: list[dict], h: int, resamples: int = 2000,
                seed: int = 0) -> dict | None:
    """Is one model ahead of another by more than the episodes' spread? Each episode's mean PSNR over
    frames 1..h, this model's minus the reference's on the same episode (the same real frames): their
    mean, its 95% interval (bootstrap over the episodes) and the episodes where this model is ahead."""
    d = np.asarray([mean_psnr(a["psnr"][:h]) - mean_psnr(b["psnr"][:h]) for a, b in zip(per_episode, reference)
                    if len(a["psnr"]) >= h and len(b["psnr"]) >= h])
    if not len(d):
        return None
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    return {"n": len(d), "mean": float(d.mean()), "ci95": [float(np.percentile(means, 2.5)),
                                                           float(np.percentile(means, 97.5))],
            "ahead": int((d > 0).sum())}


def comparison(sections: list[dict]) -> list[dict]:
    """The headline numbers of each model (--checkpoint's first) side by side: fidelity at each horizon,
    controllability (right direction where the real game moved as expected), stability; for each model
    after the first, its mean PSNR over 1..h against the first's, episode by episode (`paired_gain`)."""
    rows = []
    first = sections[0]["fidelity"]["per_episode"]
    for i, s in enumerate(sections):
        c = s["controllability"]
        st = s.get("stability")
        rows.append({"model": s["model"]["name"],
                     "horizons": {h: {k: r.get(k) for k in COMPARED} for h, r in s["fidelity"]["horizons"].items()},
                     "controllability_where_real_moved": {
                         "overall": c["overall"]["model_correct_where_real_moved"],
                         **{n: p["model_correct_where_real_moved"] for n, p in c["probes"].items()}},
                     "stability_in_real_range": st["in_real_range_all"] if st else None})
        if i:
            rows[-1]["psnr_mean_1_to_h_vs_first"] = {
                h: paired_gain(s["fidelity"]["per_episode"], first, int(h)) for h in s["fidelity"]["horizons"]}
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


def all_sections(res: dict) -> list[dict]:
    """The per-model results of a result (the top level, or its generalisation section)."""
    return [res] + res["compared"]


def write_plots(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = all_sections(res)
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
        gsecs = all_sections(gen)
        gwhere = f"generalisation: {gen['wad']} {','.join(gen['maps'])} (never trained on), {len(gen['episode_list'])} episodes"
        plots += [("generalisation_fidelity.png", lambda p: _fidelity_plot(plt, gsecs, res["horizons"],
                                                                            f"{models}: {gwhere}", p)),
                  ("generalisation_controllability.png",
                   lambda p: _controllability_plot(plt, gsecs, f"controllability, {gwhere}", p))]
    return [name for name, draw in plots if draw(out / name)]


def print_summary(res: dict) -> None:
    f = lambda v, s=".2f": "-" if v is None else format(v, s)  # noqa: E731
    parts = [(res, f"{res['wad']} {','.join(res['maps'])}" + (" (held-out episodes of the level)"
                                                                 if res["mode"] == "level" else ""))]
    if res.get("generalisation"):
        g = res["generalisation"]
        parts.append((g, f"generalisation: {g['wad']} {','.join(g['maps'])}, maps never trained on"))
    for part, where in parts:
        secs = all_sections(part)
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
        for row in part.get("comparison", [])[1:]:
            gains = [(h, g) for h, g in row["psnr_mean_1_to_h_vs_first"].items() if g]
            print(f"{row['model']} against {part['comparison'][0]['model']}, mean PSNR over 1..h episode by episode "
                  "(95% interval, episodes ahead): " + ", ".join(
                      f"1..{h} {g['mean']:+.2f} dB ({g['ci95'][0]:+.2f}..{g['ci95'][1]:+.2f}, {g['ahead']}/{g['n']})"
                      for h, g in gains))
    for sec in all_sections(res):
        st = sec.get("stability")
        if st:
            lat, mem = st["latency_flat"] or {}, st["memory_flat"] or {}
            print(f"{sec['model']['name']}: stability: {st['frames']} frames at {st['fps']:.1f} fps; frame statistics "
                  f"within the real range {f(st['in_real_range_all'])}; latency last/first tenth "
                  f"{f(lat.get('ratio_last_first'))}, memory last/first {f(mem.get('ratio_last_first'), '.3f')}")
