"""The level model's recipe end to end at toy sizes: `scripts/gpu_train_level.sh run` with GPU_SMOKE=1
runs every stage of `scripts/train_level.sh` (collect the level and its held-out episodes, the decoder
fine-tune, the transformer from the shipped weights with the previous frame as input, distillation,
start clips) on the CPU and leaves what the device tool would bring back: a checkpoint that loads,
knows its level, and plays."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_level_recipe_runs_end_to_end_on_the_cpu_at_toy_sizes(tmp_path):
    from worldmodel import Action, WorldModel

    out = tmp_path / "out"
    env = {**os.environ, "GPU_SMOKE": "1", "OUT": str(out), "PYTHON": sys.executable, "RUNS": str(tmp_path / "runs"),
           "DATA": str(tmp_path / "data"), "VAL": str(tmp_path / "val"), "CKPT": str(tmp_path / "ckpt"),
           "WORKERS": "1", "THREADS": "1"}
    r = subprocess.run(["bash", "scripts/gpu_train_level.sh", "run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size < 16 * 2 ** 20 for p in out.iterdir()), files
    assert {"config.json", "autoencoder.safetensors", "transformer.safetensors", "extra.tar"} <= set(files)
    ckpt = tmp_path / "back"
    u = subprocess.run(["bash", "scripts/gpu_train_level.sh", "unpack", str(out), str(ckpt)], cwd=ROOT,
                       capture_output=True, text=True)
    assert u.returncode == 0, u.stderr
    from worldmodel.model.checkpoint import read_config, sampling_defaults
    config = read_config(ckpt)
    assert config["model"]["prev_frame"] is True and sampling_defaults(config).steps == 2
    assert config["info"]["level"] == {"wad": "freedoom2", "map": "MAP01"}
    wm = WorldModel.from_pretrained(ckpt, device="cpu")
    clips = wm.start_clips()
    assert len(clips) == 2
    frames, actions = clips[0]
    wm.reset(frames, actions)
    frame = wm.step(Action(move=1))
    assert frame.shape == (96, 128, 3) and frame.dtype == np.uint8
