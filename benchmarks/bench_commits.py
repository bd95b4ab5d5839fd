"""The engine's speed at two commits, in one run on one box: `worldmodel bench` at each commit's own
defaults, in interleaved rounds (old, new, old, new, ...), so that a change in machine load hits both
alike. What a code change bought, as a ratio; the settings' ladder (what each setting buys within one
commit) is bench_speed.py's.

    python benchmarks/bench_commits.py e932cf6                       # that commit against the working tree
    python benchmarks/bench_commits.py e932cf6 --new HEAD --rounds 3 --out benchmarks/commits_cpu.json
    python benchmarks/bench_commits.py e932cf6 -- --steps 1 --threads 2   # after --: `worldmodel bench` flags

The old commit is checked out into a temporary git worktree (removed afterwards) and run with its own
code: `PYTHONPATH` puts its tree first, so the installed package is not the one measured. The JSON names
the box, both commits, each round's frames/s and latency, and the ratio of the pooled frames/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_speed import box  # noqa: E402  (the same description of the machine)
from worldmodel.provenance import git_commit, now  # noqa: E402


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def bench_once(tree: Path, flags: list[str], out: Path) -> dict:
    """`worldmodel bench` with `tree`'s code and checkpoints; its baseline result."""
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", "from worldmodel.cli import main; main()", "bench", "--out", str(out),
           "--no-plot", "--no-progress", "--profile-frames", "0", *flags]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench_commits: `worldmodel bench` failed in {tree}: "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    result = json.loads(out.read_text())
    base = result["baseline"]
    variants = {f"{v['factor']}={v['value']}": {"fps": v.get("fps"), "latency_ms": v.get("latency_ms"),
                                                 "acceptance_rate": v.get("acceptance_rate"), "status": v["status"]}
                for v in result["variants"]}
    return {"fps": base["fps"], "latency_ms": base["latency_ms"], "settings": result["baseline_settings"],
            "commit": result["commit"], "variants": variants}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the commit to compare against (any git revision)")
    ap.add_argument("--new", help="the other commit (default: the working tree as it is)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--frames", type=int, default=300, help="timed frames per measurement (default 300)")
    ap.add_argument("--out", help="JSON (default benchmarks/commits_<old>_<new>_cpu.json)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.frames < 1:
        ap.error("--rounds and --frames must be at least 1")
    revs = {}
    for name in ("old", "new"):
        rev = getattr(args, name)
        try:
            revs[name] = git("rev-parse", "--verify", f"{rev}^{{commit}}") if rev else None
        except subprocess.CalledProcessError:
            ap.error(f"not a commit of this repository: {rev}")
    old_rev, new_rev = revs["old"], revs["new"]
    new_name = new_rev[:10] if new_rev else git_commit(short=True)  # the working tree: "-dirty" if changed
    out = Path(args.out or ROOT / "benchmarks" / f"commits_{old_rev[:7]}_{new_name[:7]}_cpu.json")
    flags = ["--frames", str(args.frames), *bench_flags]
    rounds: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="bench-commits-") as tmp:
        tmp = Path(tmp)
        trees = {"old": tmp / "old"}
        git("worktree", "add", "--detach", str(trees["old"]), old_rev)
        if new_rev:
            trees["new"] = tmp / "new"
            git("worktree", "add", "--detach", str(trees["new"]), new_rev)
        else:
            trees["new"] = ROOT
        machine = box()
        t0 = time.perf_counter()
        try:
            for r in range(args.rounds):
                for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    print(f"[{time.perf_counter() - t0:6.0f} s] {name} (round {r + 1}/{args.rounds})", flush=True)
                    rounds[name].append(bench_once(trees[name], flags, tmp / f"{name}{r}.json"))
        finally:
            for name in ("old", "new"):
                if trees[name] != ROOT:
                    git("worktree", "remove", "--force", str(trees[name]))
    def median(values):
        values = sorted(v for v in values if v is not None)
        return values[len(values) // 2] if values else None

    fps = {name: median(x["fps"] for x in runs) for name, runs in rounds.items()}
    variants = {name: {key: median(x["variants"][key]["fps"] for x in runs if key in x["variants"])
                       for key in runs[0]["variants"]} for name, runs in rounds.items()}
    report = {"tool": "benchmarks/bench_commits.py", "command": "python " + " ".join(["benchmarks/bench_commits.py", *sys.argv[1:]]),
              "created": now(), "box": machine,
              "old": {"commit": old_rev, "rounds": rounds["old"], "fps_median": fps["old"],
                      "variants_fps_median": variants["old"]},
              "new": {"commit": new_rev or new_name, "rounds": rounds["new"], "fps_median": fps["new"],
                      "variants_fps_median": variants["new"]},
              "bench_flags": flags, "x_old": fps["new"] / fps["old"],
              "variants_x_old": {k: (variants["new"][k] / variants["old"][k]
                                     if variants["new"].get(k) and variants["old"].get(k) else None)
                                 for k in variants["new"]},
              "wall_s": time.perf_counter() - t0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"old {old_rev[:10]}: {fps['old']:.1f} frames/s, new {new_name}: {fps['new']:.1f} frames/s "
          f"(x{report['x_old']:.2f})")
    for key, x in report["variants_x_old"].items():
        if x is not None:
            print(f"  {key}: {variants['old'][key]:.1f} -> {variants['new'][key]:.1f} frames/s (x{x:.2f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
