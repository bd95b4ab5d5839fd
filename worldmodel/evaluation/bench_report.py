"""The report of `worldmodel bench`: the table and the per-stage profile on screen, and the plot (latency
against rollout length; frames/s per variant)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def print_table(result: dict, file=None) -> None:
    file = file or sys.stdout
    rows = [("baseline", result["baseline"])] + [(f"{v['factor']}={v['value']}", v) for v in result["variants"]]
    head = f"{'variant':<18}{'fps':>8}{'x base':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'warmup s':>10}" \
           f"{'peak MB':>9}{'accept':>8}{'cpu fps':>9}"
    print(head, file=file)
    print("-" * len(head), file=file)
    for name, r in rows:
        if r.get("status") != "ok":
            print(f"{name:<18}  {r.get('status')}", file=file)
            continue
        lat = r["latency_ms"]
        acc = r.get("acceptance_rate")
        print(f"{name:<18}{r['fps']:>8.1f}{_fmt(r.get('speedup', 1.0), '.2f'):>8}{lat['p50']:>9.1f}{lat['p90']:>9.1f}"
              f"{lat['p99']:>9.1f}{r['warmup_s']:>10.1f}{_fmt(r.get('peak_memory_mb'), '.0f'):>9}"
              f"{_fmt(acc, '.2f'):>8}{_fmt(r.get('fps_cpu_time')):>9}", file=file)


def print_profile(profile: dict, file=None) -> None:
    file = file or sys.stdout
    print(f"\nwhere a frame's time goes (baseline settings, frame after frame, {profile['threads']} thread(s); "
          f"ms, p50 / mean):", file=file)
    for k, v in profile["stages"].items():
        print(f"  {k:<20}{v['p50']:>8.2f}{v['mean']:>8.2f}", file=file)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [("baseline", result["baseline"])] + [(f"{v['factor']}={v['value']}", v) for v in result["variants"]
                                                  if v.get("status") == "ok"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 9), gridspec_kw={"height_ratios": [3, 2]})
    cache = result["model"]["cache_frames"]
    for i, (name, r) in enumerate(runs):
        lat = np.asarray(r["latency_ms_per_frame"])
        x = np.arange(1, len(lat) + 1)
        if i == 0:
            ax.plot(x, lat, ".", ms=3, alpha=0.35, color="C0", label="baseline, each frame")
        # a running mean: it is the throughput that matters, and speculative sampling's latencies are
        # bimodal (an accepted draft costs a decode, a miss a whole batched pass), which a median hides
        k = max(1, min(15, len(lat) // 20))
        c = np.concatenate([[0.0], np.cumsum(lat)])
        lo, hi = np.maximum(0, np.arange(len(lat)) - k), np.minimum(len(lat), np.arange(len(lat)) + k + 1)
        smooth = (c[hi] - c[lo]) / (hi - lo)
        ax.plot(x, smooth, "-", lw=2 if i == 0 else 1.2, color=f"C{i % 10}", label=f"{name} (running mean)")
    ax.axvline(cache, ls="--", color="grey")
    ax.text(cache, ax.get_ylim()[1], f" KV cache full ({cache} frames)", va="top", color="grey", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("rollout length (frames since reset with one context frame)")
    ax.set_ylabel("latency per frame (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=3, loc="upper right", framealpha=0.85)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend
    dev = result["device"]
    ax.set_title(f"worldmodel bench: {result['model']['name']} on {dev['name']} ({dev['type']}, torch threads "
                 f"{dev['threads']}), commit {str(result.get('commit') or '?')[:10]}", fontsize=10)
    names = [n for n, _ in runs]
    fps = [r["fps"] for _, r in runs]
    bars = bx.bar(range(len(runs)), fps, color=[f"C{i % 10}" for i in range(len(runs))])
    for b, (_, r) in zip(bars, runs):
        label = f"{r['fps']:.1f}\nx{r.get('speedup', 1.0):.2f}"
        if r.get("acceptance_rate") is not None:
            label += f"\nacc {r['acceptance_rate']:.2f}"
        bx.text(b.get_x() + b.get_width() / 2, b.get_height(), label, ha="center", va="bottom", fontsize=8)
    bx.set_xticks(range(len(runs)), names, rotation=20, fontsize=8)
    bx.set_ylabel("frames / s")
    bx.set_ylim(0, max(fps) * 1.35)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
