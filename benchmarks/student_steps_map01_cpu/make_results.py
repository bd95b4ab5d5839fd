"""One step a frame against two: the level's students on MAP01's held-out episodes, paired with the default.

Run from the repository root after the evaluations named in ROWS (`runs/eval-NAME-s{0,1,2}`, each
`worldmodel eval ... --level MAP01 --episodes 24 --stability-frames 0 --seed S`), the 4,200-frame
stability runs (`runs/stab-NAME`) and `worldmodel bench` (BENCH):

    python benchmarks/student_steps_map01_cpu/make_results.py

It copies each evaluation's eval.json and plots here (NAME_seedS/), writes results.json (per seed the
level figures, paired differences against the default over frames 1-35 and 1-175 with 95% intervals)
and steps.png (mean PSNR against horizon over the 72 episodes; frames/s from the bench)."""
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from worldmodel.evaluation.eval_report import paired_gain  # noqa: E402

HERE = Path(__file__).resolve().parent
DISTILL = ("worldmodel distill --teacher runs/tiny-ft-lr1/export --data data/map01-back --val-data data/map01-val "
           "--out RUN --latents runs/tiny-ft-lr1/cache/train_latents.safetensors --iters 300 --batch 8 --lr 1e-4 "
           "--threads 2 --half --no-progress --guidance 2 --guide move,strafe --guidance-back 4 --guidance-centred")
BASE = "default"
ROWS = {  # name: (label, how the checkpoint was made)
    "default": ("doom-map01-guided, 2 steps (the default)",
                DISTILL.replace("RUN", "runs/tract-g2-back4-c") + " --steps-student 2 --teacher-steps 8"),
    "default-steps1": ("doom-map01-guided sampled at 1 step (eval --steps 1)", "the default's, sampled with --steps 1"),
    "1s": ("1-step student", DISTILL.replace("RUN", "runs/tract-1s-g2-back4-c") + " --steps-student 1 --teacher-steps 16"),
    "1s-sf4": ("1-step student, 4 self-forced context frames",
               DISTILL.replace("RUN", "runs/tract-1s-sf4-g2-back4-c") + " --steps-student 1 --teacher-steps 16 --self-forcing 4"),
    "1s-sf7": ("1-step student, 7 self-forced context frames",
               DISTILL.replace("RUN", "runs/tract-1s-sf7-g2-back4-c") + " --steps-student 1 --teacher-steps 16 --self-forcing 7"),
    "sf4": ("2-step student, 4 self-forced context frames",
            DISTILL.replace("RUN", "runs/tract-sf4-g2-back4-c") + " --steps-student 2 --teacher-steps 8 --self-forcing 4"),
}
BENCH = ROOT / "runs/bench-steps.json"


def level_eval(e: dict) -> dict:
    h, c = e["fidelity"]["horizons"], e["controllability"]
    return {"psnr": {k: round(h[k]["psnr"], 2) for k in h}, "copy_last_psnr": {k: round(h[k]["psnr_copy"], 2) for k in h},
            "psnr_mean_1_35": round(h["35"]["psnr_mean_1_to_h"], 2),
            "copy_last_mean_1_35": round(h["35"]["psnr_copy_mean_1_to_h"], 2),
            "psnr_mean_1_175": round(h["175"]["psnr_mean_1_to_h"], 2),
            "sharpness": {k: round(h[k]["sharpness"]) for k in h},
            "controllability": round(c["overall"]["model_correct_where_real_moved"], 3),
            "probes": {n: round(p["model_correct_where_real_moved"], 2) for n, p in c["probes"].items()}}


def gain(a: list, b: list, h: int) -> dict:
    g = paired_gain(a, b, h)
    return {"diff": round(g["mean"], 2), "ci95": [round(x, 2) for x in g["ci95"]], "episodes_better": g["ahead"],
            "episodes": g["n"]}


def stability(folder: Path) -> dict:
    e = json.loads((folder / "eval.json").read_text())
    s = e["stability"]
    return {"command": e["command"], "in_real_range_all": round(s["in_real_range_all"], 3),
            **{k: round(s["in_real_range"][k]["fraction"], 3) for k in ("brightness", "contrast", "sharpness")}}


def main():
    evals = {n: [json.loads((ROOT / f"runs/eval-{n}-s{s}/eval.json").read_text()) for s in range(3)] for n in ROWS}
    out = {"tool": "python benchmarks/student_steps_map01_cpu/make_results.py",
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip(),
           "device": evals[BASE][0]["device"]["name"] + ", 2 cores, PyTorch 2.13 CPU, engine in bfloat16",
           "teacher": "runs/tiny-ft-lr1 (the level teacher of checkpoints/doom-map01-guided's card, rebuilt with its commands)",
           "eval_command": "worldmodel eval --checkpoint C --context-noise 0.1 --seed S --level MAP01 --episodes 24 "
                           "--stability-frames 0",
           "paired": "differences with the default over the same real frames, mean PSNR over frames 1-h, 95% bootstrap",
           "rows": {}}
    for name, (label, made) in ROWS.items():
        row = {"label": label, "made_by": made, "per_seed": {}}
        pooled, pooled_base = [], []
        for s, e in enumerate(evals[name]):
            dst = HERE / f"{name}_seed{s}"
            dst.mkdir(exist_ok=True)
            for f in ("eval.json", "fidelity.png", "controllability.png"):
                shutil.copy(ROOT / f"runs/eval-{name}-s{s}" / f, dst / f)
            me, base = e["fidelity"]["per_episode"], evals[BASE][s]["fidelity"]["per_episode"]
            row["per_seed"][str(s)] = {"eval_command": e["command"], "steps": e["model"]["steps"], "level_eval": level_eval(e)}
            if name != BASE:
                row["per_seed"][str(s)]["vs_default"] = {f"mean_1_{h}": gain(me, base, h) for h in (35, 175)}
            pooled += me
            pooled_base += base
        if name != BASE:
            row["pooled_vs_default"] = {f"mean_1_{h}": gain(pooled, pooled_base, h) for h in (35, 175)}
        st = ROOT / f"runs/stab-{name}"
        if (st / "eval.json").exists():
            dst = HERE / f"stability_4200_{name}"
            dst.mkdir(exist_ok=True)
            for f in ("eval.json", "stability.png"):
                shutil.copy(st / f, dst / f)
            row["stability_4200"] = stability(st)
        out["rows"][name] = row
    if BENCH.exists():
        shutil.copy(BENCH, HERE / "bench.json")
        b = json.loads(BENCH.read_text())
        out["bench"] = {"command": b.get("command"), "file": "bench.json"}
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(evals, out)


def plot(evals: dict, out: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = ["turn_right", "turn_left", "forward", "backward", "strafe_right", "strafe_left"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(evals)
    for i, (name, es) in enumerate(evals.items()):
        row = out["rows"][name]
        eps = [p for e in es for p in e["fidelity"]["per_episode"]]
        curve = np.mean([p["psnr"] for p in eps], axis=0)
        ax.plot(np.arange(1, len(curve) + 1), curve, color=f"C{i}", label=row["label"])
        right = [100 * np.mean([s["level_eval"]["probes"][p] for s in row["per_seed"].values()]) for p in probes]
        bx.bar(np.arange(len(probes)) - 0.4 + width * (i + 0.5), right, width, color=f"C{i}", label=row["label"])
    copy = np.mean([p["psnr_copy"] for e in evals[BASE] for p in e["fidelity"]["per_episode"]], axis=0)
    ax.plot(np.arange(1, len(copy) + 1), copy, "k--", lw=0.8, label="copy the last real frame")
    ax.set_xscale("log")
    ax.set_xlabel("frames ahead")
    ax.set_ylabel("PSNR against the real game (dB)")
    ax.set_title("MAP01, 72 held-out episodes (seeds 0-2), context noise 0.1: mean PSNR", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.axhline(90, ls=":", color="k", lw=0.8)
    bx.set_xticks(np.arange(len(probes)), [p.replace("_", " ") for p in probes], fontsize=8)
    bx.set_ylabel("right where the real game moved (%)")
    bx.set_title("controls, mean over the three runs", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(HERE / "steps.png", dpi=100)


if __name__ == "__main__":
    main()
